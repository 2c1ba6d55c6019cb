"""Edge agent: runs the head of a split model with its exits and offloads the rest.

- `EdgeAgent` / `SyncEdgeAgent`: answers a batch; exited rows on the device, pending rows'
  features to a cloud worker, escalated rows' raw input to a cascade's larger network;
  anything the cloud cannot answer in time comes back as the best local exit, `degraded`.
  The agent orchestrates (offloads within the budget, fallbacks, spool, traces); the head's
  run and the requests it leaves are `splitexit.edge.head`, the answers
  `splitexit.edge.answering`, its settings `splitexit.edge.config.AgentConfig`.
- Transports (`splitexit.edge.transport`): `GrpcTransport`, `InProcessTransport`,
  `WorkerPool` (confirmed workers, least-outstanding / round-robin, down + probe back).
- Discovery (`splitexit.edge.discovery`): a zeroconf browser feeding the pool.
- `Spool` (store-and-forward for `refine`), `TraceWriter` / `read_trace`, JSONL results,
  input loaders. `splitexit edge run|refine` is the command line (`splitexit.edge.cli`).

Importing this package loads neither torch, grpc nor zeroconf; each is imported where used.
"""

from splitexit.edge.agent import AgentConfig, EdgeAgent, SyncEdgeAgent
from splitexit.edge.discovery import SERVICE_TYPE, DiscoveredWorker, DiscoveryBrowser, DiscoveryConfig, txt_lists_hash
from splitexit.edge.inputs import InputError, InputSet, load_inputs
from splitexit.edge.results import Answer, ResultsError, ResultWriter, Route, read_results
from splitexit.edge.spool import Spool, SpoolEntry, SpoolError
from splitexit.edge.trace import TraceWriter, read_trace
from splitexit.edge.transport import (
    GrpcConfig,
    GrpcTransport,
    InProcessTransport,
    OffloadError,
    PoolConfig,
    TlsConfig,
    Transport,
    WorkerPool,
    WorkerStatus,
    check_model_info,
    create_channel,
)

__all__ = [
    "AgentConfig",
    "Answer",
    "DiscoveredWorker",
    "DiscoveryBrowser",
    "DiscoveryConfig",
    "EdgeAgent",
    "GrpcConfig",
    "GrpcTransport",
    "InProcessTransport",
    "InputError",
    "InputSet",
    "OffloadError",
    "PoolConfig",
    "ResultWriter",
    "ResultsError",
    "Route",
    "SERVICE_TYPE",
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "SyncEdgeAgent",
    "TlsConfig",
    "TraceWriter",
    "Transport",
    "WorkerPool",
    "WorkerStatus",
    "check_model_info",
    "create_channel",
    "load_inputs",
    "read_results",
    "read_trace",
    "txt_lists_hash",
]
