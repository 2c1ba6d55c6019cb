"""Cloud worker: serves the tail of a split model over gRPC.

Parts (each importable on its own; this package imports them lazily so that the CLI's
entry point stays light):
- `splitexit.cloud.server`: `ServerConfig`, `build_server(config, models)` -> `CloudServer`
  (health, reflection, keepalive, limits, TLS/mTLS, token auth, graceful drain).
- `splitexit.cloud.served`: `load_models(paths)`, `ServedModel` (a bundle loaded, its
  rows answered).
- `splitexit.cloud.requests`: `parse_request`, `ServiceLimits` (each request checked and
  decoded in one pass).
- `splitexit.cloud.servicer`: `SplitInferenceServicer` (the gRPC face over the above).
- `splitexit.cloud.batcher`: `BatcherConfig`, `Batcher` (dynamic batching per key).
- `splitexit.cloud.metrics`: `Metrics` (Prometheus, a registry per server).
- `splitexit.cloud.discovery`: `Advertiser`, `txt_properties` (`_splitexit._tcp.local.`).
- `splitexit.cloud.cli`: `splitexit cloud serve`.

Typical use:

    models = load_models(["bundles/resnet20"])
    server = build_server(ServerConfig(host="0.0.0.0", port=50051), models)
    await server.start()
    server.install_signal_handlers()
    await server.wait_for_termination()
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Any

__all__ = [
    "Advertiser",
    "BatcherConfig",
    "CloudServer",
    "Metrics",
    "RequestError",
    "ServedModel",
    "ServerConfig",
    "ServerError",
    "build_server",
    "load_models",
]

_HOME = MappingProxyType({
    "Advertiser": "discovery",
    "BatcherConfig": "batcher",
    "CloudServer": "server",
    "Metrics": "metrics",
    "RequestError": "errors",
    "ServedModel": "served",
    "ServerConfig": "server",
    "ServerError": "server",
    "build_server": "server",
    "load_models": "served",
})


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
