"""Advertise a cloud worker over mDNS/DNS-SD as `_splitexit._tcp.local.`.

The edge browses this type, reads the TXT record to pick a worker that serves its bundle,
and confirms with a gRPC health check before use: mDNS is a hint, not a trust anchor.

TXT keys (values are UTF-8 strings, each key=value at most 255 bytes):

| key            | value                                                  |
|----------------|--------------------------------------------------------|
| `proto`        | protocol version (`splitexit.proto.PROTOCOL_VERSION`)  |
| `models`       | served model names, comma-separated                    |
| `hash.<model>` | that model's bundle hash(es), comma-separated          |
| `split.<model>`| its split point(s), comma-separated                    |
| `tls`          | `1` when the worker speaks TLS, else `0`               |
| `auth`         | `1` when a bearer token is required, else `0`          |
| `worker`       | the worker id (ModelInfo.worker_id)                    |

`Advertiser(..., interfaces=...)` takes the interfaces to bind: tests pass
`["127.0.0.1"]` so that nothing is multicast off the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from zeroconf import InterfaceChoice, get_all_addresses
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from splitexit.proto import PROTOCOL_VERSION

__all__ = ["Advertiser", "DiscoveryError", "SERVICE_TYPE", "ServiceModel", "txt_properties"]

SERVICE_TYPE = "_splitexit._tcp.local."
_MAX_TXT_ENTRY = 255  # DNS character-string limit for one key=value
_MAX_LABEL = 63  # DNS label limit: the instance name
_GOODBYE_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


class DiscoveryError(ValueError):
    """The advertisement cannot be built (e.g. a TXT entry over 255 bytes)."""


@dataclass(frozen=True, kw_only=True)
class ServiceModel:
    """What TXT says about one served bundle."""

    name: str
    bundle_hash: str
    split: int


def txt_properties(models: Iterable[ServiceModel], *, tls: bool, auth: bool = False, worker_id: str = "") -> dict[str, str]:
    """The TXT record of a worker serving `models` (see the module docstring)."""
    by_name: dict[str, list[ServiceModel]] = {}
    for m in models:
        if not m.name or any(c in m.name for c in ",= "):
            raise DiscoveryError(f"model name {m.name!r} cannot go into TXT (empty, or has ',', '=' or a space)")
        by_name.setdefault(m.name, []).append(m)
    props = {"proto": str(PROTOCOL_VERSION), "models": ",".join(sorted(by_name)), "tls": "1" if tls else "0",
             "auth": "1" if auth else "0"}
    if worker_id:
        props["worker"] = worker_id
    for name, versions in sorted(by_name.items()):
        props[f"hash.{name}"] = ",".join(v.bundle_hash for v in versions)
        props[f"split.{name}"] = ",".join(str(v.split) for v in versions)
    for key, value in props.items():
        if len(key.encode()) + 1 + len(value.encode()) > _MAX_TXT_ENTRY:
            raise DiscoveryError(f"TXT entry {key!r} is over {_MAX_TXT_ENTRY} bytes: too many models for one record")
    return props


@dataclass(kw_only=True)
class Advertiser:
    """Registers the worker while entered (`async with Advertiser(...)`), unregisters on exit.

    interfaces: addresses to bind zeroconf to (e.g. ["127.0.0.1"]), or None for all.
    addresses: the IPv4 addresses to advertise; default: the interfaces given, else every
        address of the machine.
    """

    instance: str  # unique per worker, e.g. "worker-host-1234"
    port: int
    properties: Mapping[str, str]
    interfaces: Sequence[str] | None = None
    addresses: Sequence[str] | None = None
    host: str = field(default_factory=socket.gethostname)
    _zc: AsyncZeroconf | None = field(default=None, init=False, repr=False)
    _info: AsyncServiceInfo | None = field(default=None, init=False, repr=False)

    @property
    def service_name(self) -> str:
        return f"{instance_label(self.instance)}.{SERVICE_TYPE}"

    def _addresses(self) -> list[str]:
        if self.addresses is not None:
            return list(self.addresses)
        if self.interfaces is not None:
            return [a for a in self.interfaces if _is_ipv4(a)]
        return [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]

    async def start(self) -> None:
        if self._zc is not None:
            return
        addresses = self._addresses()
        if not addresses:
            raise DiscoveryError("no IPv4 address to advertise")
        host = self.host.split(".")[0] or "splitexit"
        self._info = AsyncServiceInfo(SERVICE_TYPE, self.service_name, port=self.port,
                                      properties=dict(self.properties), server=f"{host}.local.",
                                      parsed_addresses=addresses)
        self._zc = AsyncZeroconf(interfaces=list(self.interfaces) if self.interfaces is not None
                                 else InterfaceChoice.All)
        try:
            await self._zc.async_register_service(self._info, allow_name_change=True)
        except BaseException:
            await self._zc.async_close()
            self._zc = None
            raise

    async def stop(self) -> None:
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        try:
            if self._info is not None:
                # the call returns once the goodbyes are scheduled; closing before they are
                # sent would leave the worker listed until its records expire
                sent = await zc.async_unregister_service(self._info)
                await asyncio.wait_for(sent, _GOODBYE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("mDNS goodbye for %s not confirmed within %.0f s", self.service_name, _GOODBYE_TIMEOUT_S)
        finally:
            await zc.async_close()

    async def __aenter__(self) -> "Advertiser":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def instance_label(instance: str) -> str:
    """The DNS-SD instance name of a worker id: at most 63 bytes, the DNS label limit (zeroconf
    refuses a longer one). A longer id keeps its first bytes and gains a hash of the whole,
    so two long ids stay apart; the full id still travels in TXT `worker`."""
    encoded = instance.encode()
    if len(encoded) <= _MAX_LABEL:
        return instance
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    head = encoded[: _MAX_LABEL - len(digest) - 1].decode("utf-8", "ignore")
    label = f"{head}-{digest}"
    log.warning("worker id %r is over %d bytes: advertised as %r", instance, _MAX_LABEL, label)
    return label


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return text.count(".") == 3
