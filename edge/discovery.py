"""Finding cloud workers: a zeroconf (mDNS/DNS-SD) browser that feeds a `WorkerPool`.

Workers advertise `_splitexit._tcp.local.` with TXT records naming the bundle hashes they
serve. The browser proposes to the pool every address of a service whose TXT lists our
bundle hash; the pool still confirms each by health SERVING and GetModelInfo before use,
because mDNS is a hint and anyone on the link can answer it. A service that says goodbye
is removed from the pool.

The TXT format (splitexit.cloud.discovery: `proto`, `models`, `hash.<model>`,
`split.<model>`, `tls`, `auth`, `worker`) is read leniently: a `proto` other than ours
rules a worker out; otherwise our full hash must appear as a token (split on `,;:= `
and whitespace) of some TXT value, whatever its key. Static addresses and DNS names need no browser:
`WorkerPool.add("host:port")` or `add("dns:///name:port")`.

Handlers of python-zeroconf are synchronous: they only start a task, kept in a set until
it is done, and `close` cancels what is left.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from splitexit.edge.transport import WorkerPool
from splitexit.edge.transport.base import dns_name
from splitexit.proto import PROTOCOL_VERSION

__all__ = ["DiscoveredWorker", "DiscoveryBrowser", "DiscoveryConfig", "SERVICE_TYPE", "parse_static", "txt_lists_hash"]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_splitexit._tcp.local."
_TOKEN = re.compile(r"[,;:=\s]+")


@dataclass(frozen=True, kw_only=True)
class DiscoveryConfig:
    service_type: str = SERVICE_TYPE
    # Interfaces to browse on, as zeroconf takes them (IP addresses); None = all. Tests pass
    # ["127.0.0.1"] so that nothing is multicast off the machine.
    interfaces: tuple[str, ...] | None = None
    ip_version: Literal["v4", "v6", "all"] = "v4"
    resolve_timeout_ms: int = 3000  # asking a service for its addresses and TXT

    def __post_init__(self) -> None:
        if not self.service_type.endswith("._tcp.local."):
            raise ValueError(f"service type {self.service_type!r} must end with ._tcp.local.")
        if self.ip_version not in ("v4", "v6", "all"):
            raise ValueError(f"ip_version must be v4, v6 or all, got {self.ip_version!r}")
        if self.resolve_timeout_ms < 1:
            raise ValueError("resolve_timeout_ms must be >= 1")


@dataclass(frozen=True)
class DiscoveredWorker:
    name: str  # the service instance name
    addresses: tuple[str, ...]  # "host:port" keys proposed to the pool
    properties: dict[str, str]
    matches: bool  # whether its TXT lists our bundle hash


def txt_lists_hash(properties: dict[Any, Any], bundle_hash: str) -> bool:
    """Does some TXT value name `bundle_hash` (as a whole token), in a protocol version we
    speak?"""
    want = bundle_hash.lower()
    text_props = {(k.decode("utf-8", "replace") if isinstance(k, (bytes, bytearray)) else str(k)): v
                  for k, v in properties.items()}
    proto = text_props.get("proto")
    if isinstance(proto, (bytes, bytearray)):
        proto = proto.decode("utf-8", "replace")
    if proto is not None and str(proto).strip() != str(PROTOCOL_VERSION):
        return False
    for value in text_props.values():
        if value is None:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
        if want in (t.lower() for t in _TOKEN.split(text)):
            return True
    return False


def _key(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class DiscoveryBrowser:
    """Browses for workers and proposes matching ones to `pool` (see the module doc).

    Use as `async with DiscoveryBrowser(pool, config=...) as browser:`; `found` lists what
    was seen, matching or not. A given `zeroconf` (AsyncZeroconf) is shared, not closed.
    """

    def __init__(self, pool: WorkerPool, *, bundle_hash: str | None = None, config: DiscoveryConfig | None = None,
                 zeroconf: Any = None) -> None:
        self.pool = pool
        self.bundle_hash = bundle_hash or pool.bundle_hash
        self.config = config or DiscoveryConfig()
        self.found: dict[str, DiscoveredWorker] = {}
        self._aiozc = zeroconf
        self._own_zc = zeroconf is None
        self._browser: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self._loop = asyncio.get_running_loop()
        if self._aiozc is None:
            version = {"v4": IPVersion.V4Only, "v6": IPVersion.V6Only, "all": IPVersion.All}[self.config.ip_version]
            interfaces: Any = list(self.config.interfaces) if self.config.interfaces is not None else None
            kwargs: dict[str, Any] = {"ip_version": version}
            if interfaces is not None:
                kwargs["interfaces"] = interfaces
            self._aiozc = AsyncZeroconf(**kwargs)
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, [self.config.service_type],
                                            handlers=[self._on_change])

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        # Called by zeroconf in the event loop: only start a task, keep it until done.
        assert self._loop is not None
        task = self._loop.create_task(self._handle(service_type, name, state_change.name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, service_type: str, name: str, change: str) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        try:
            if change == "Removed":
                gone = self.found.pop(name, None)
                if gone is not None and gone.matches:
                    for key in gone.addresses:
                        await self.pool.remove(key)
                return
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(self._aiozc.zeroconf, self.config.resolve_timeout_ms):
                log.info("mDNS service %s did not answer", name)
                return
            version = {"v4": IPVersion.V4Only, "v6": IPVersion.V6Only, "all": IPVersion.All}[self.config.ip_version]
            properties = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)):
                          (v.decode("utf-8", "replace") if isinstance(v, bytes) else ("" if v is None else str(v)))
                          for k, v in info.properties.items()}
            addresses = tuple(_key(a, int(info.port)) for a in info.parsed_addresses(version) if info.port)
            matches = txt_lists_hash(properties, self.bundle_hash)
            old = self.found.get(name)
            self.found[name] = DiscoveredWorker(name, addresses, properties, matches)
            if old is not None and old.matches:
                for key in set(old.addresses) - (set(addresses) if matches else set()):
                    await self.pool.remove(key)
            if matches:
                for key in addresses:
                    self.pool.add(key)
            else:
                log.info("mDNS service %s does not list bundle %s; ignored", name, self.bundle_hash[:12])
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad advertisement must not stop discovery
            log.exception("handling mDNS service %s failed", name)
        finally:
            self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Wait until `predicate(self)` holds (e.g. a worker was found); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return bool(predicate(self))
        return True

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_zc and self._aiozc is not None:
            await self._aiozc.async_close()
            self._aiozc = None

    async def __aenter__(self) -> "DiscoveryBrowser":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def parse_static(addresses: Sequence[str]) -> list[str]:
    """Check "host:port", "[v6]:port", "dns:///name:port" and "dns://server:port/name:port"
    worker addresses (a DNS target spreads over every address of the name, re-resolved
    as the workers behind it change)."""
    out = []
    for address in addresses:
        target = address.strip()
        name = dns_name(target)
        host, sep, port = (target if name is None else name).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad worker address {address!r}; expected HOST:PORT, [IPv6]:PORT, dns:///NAME:PORT or "
                             f"dns://DNS-SERVER:PORT/NAME:PORT")
        out.append(target)
    return out
