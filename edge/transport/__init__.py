"""Offload transports: how the edge agent reaches a cloud worker, one room each.

- `base`: `Transport`, the protocol the agent talks to (infer / model_info / health /
  close), and `OffloadError`, the one failure every transport raises.
- `grpc_channel`: `GrpcTransport`, one cloud worker (or one DNS name) over a `grpc.aio`
  channel (limits, keepalive, TLS/mTLS, bearer token, idempotent retries), and its
  `GrpcConfig` / `TlsConfig`.
- `inprocess`: `InProcessTransport`, any async handler in this process (a cloud
  servicer's function, a simulator, a test double), messages serialized both ways.
- `pool`: `WorkerPool`, a Transport over several workers (confirmed before use, marked
  down after failures, probed back).

Every failure surfaces as `OffloadError` with a gRPC status code name (the table both
sides share is `splitexit.status`), which the agent turns into a local answer flagged
`degraded`. Only `grpc_channel` imports grpc, and only where a gRPC object is built, so
in-process users never load it.
"""

from __future__ import annotations

from splitexit.edge.transport.base import SERVING, OffloadError, Transport
from splitexit.edge.transport.grpc_channel import GrpcConfig, GrpcTransport, TlsConfig, channel_options, create_channel
from splitexit.edge.transport.inprocess import InProcessTransport
from splitexit.edge.transport.pool import PoolConfig, WorkerPool, WorkerStatus, check_model_info
from splitexit.proto import PROTOCOL_VERSION  # ModelInfo.protocol_version this edge understands

__all__ = [
    "GrpcConfig",
    "GrpcTransport",
    "InProcessTransport",
    "OffloadError",
    "PoolConfig",
    "PROTOCOL_VERSION",
    "SERVING",
    "TlsConfig",
    "Transport",
    "WorkerPool",
    "WorkerStatus",
    "channel_options",
    "check_model_info",
    "create_channel",
]
