"""The worker's mDNS advertisement, browsed on 127.0.0.1 only (never multicast off the machine)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from splitexit.cloud.discovery import SERVICE_TYPE, Advertiser, DiscoveryError, ServiceModel, txt_properties
from splitexit.proto import PROTOCOL_VERSION

pytestmark = pytest.mark.loopback
LOOPBACK = ["127.0.0.1"]


def test_txt_properties() -> None:
    models = [ServiceModel(name="r20", bundle_hash="a" * 64, split=4),
              ServiceModel(name="r20", bundle_hash="b" * 64, split=4),
              ServiceModel(name="tiny", bundle_hash="c" * 64, split=2)]
    props = txt_properties(models, tls=True, auth=True, worker_id="w-1")
    assert props == {"proto": str(PROTOCOL_VERSION), "models": "r20,tiny", "tls": "1", "auth": "1", "worker": "w-1",
                     "hash.r20": f"{'a' * 64},{'b' * 64}", "split.r20": "4,4", "hash.tiny": "c" * 64, "split.tiny": "2"}
    with pytest.raises(DiscoveryError, match="cannot go into TXT"):
        txt_properties([ServiceModel(name="a,b", bundle_hash="x", split=0)], tls=False)
    with pytest.raises(DiscoveryError, match="over 255 bytes"):
        txt_properties([ServiceModel(name="m", bundle_hash="h" * 64, split=0)] * 4, tls=False)


@pytest.mark.slow
def test_advertise_then_browse_on_loopback_finds_the_worker_with_its_txt() -> None:
    props = txt_properties([ServiceModel(name="tiny", bundle_hash="c" * 64, split=2)], tls=False, worker_id="w-1")
    threads_before = set(threading.enumerate())

    async def body() -> None:
        async with Advertiser(instance="worker-test", port=50123, properties=props, interfaces=LOOPBACK):
            browser_zc = AsyncZeroconf(interfaces=LOOPBACK)
            found: asyncio.Queue[str] = asyncio.Queue()

            def on_change(zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
                if state_change is ServiceStateChange.Added:  # handlers are synchronous: hand over only
                    found.put_nowait(name)

            browser = AsyncServiceBrowser(browser_zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
            try:
                name = await asyncio.wait_for(found.get(), 10)
                assert name == f"worker-test.{SERVICE_TYPE}"
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                assert await info.async_request(browser_zc.zeroconf, 3000)
                assert info.port == 50123 and info.parsed_addresses() == ["127.0.0.1"]
                assert info.decoded_properties == props
            finally:
                await browser.async_cancel()
                await browser_zc.async_close()

    asyncio.run(asyncio.wait_for(body(), 30))
    assert set(threading.enumerate()) <= threads_before, "zeroconf left a thread running"


@pytest.mark.slow
def test_a_stopped_worker_says_goodbye_and_a_long_id_is_still_advertised() -> None:
    """Browsers hear the worker leave at once (not when its records expire), and a worker id
    over the 63-byte DNS label limit is advertised under a shortened, unique name."""
    long_id = "worker-" + "x" * 80
    props = txt_properties([ServiceModel(name="tiny", bundle_hash="c" * 64, split=2)], tls=False, worker_id=long_id)

    async def body() -> None:
        browser_zc = AsyncZeroconf(interfaces=LOOPBACK)
        events: asyncio.Queue[tuple[str, ServiceStateChange]] = asyncio.Queue()

        def on_change(zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            events.put_nowait((name, state_change))

        browser = AsyncServiceBrowser(browser_zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        try:
            advertiser = Advertiser(instance=long_id, port=50124, properties=props, interfaces=LOOPBACK)
            await advertiser.start()
            name, change = await asyncio.wait_for(events.get(), 10)
            assert change is ServiceStateChange.Added
            label = name.removesuffix(f".{SERVICE_TYPE}")
            assert len(label.encode()) <= 63 and label.startswith("worker-xxx") and label != long_id[:63]
            await advertiser.stop()
            while change is not ServiceStateChange.Removed:
                gone, change = await asyncio.wait_for(events.get(), 5)
            assert gone == name
        finally:
            await browser.async_cancel()
            await browser_zc.async_close()

    asyncio.run(asyncio.wait_for(body(), 30))
