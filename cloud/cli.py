"""`splitexit cloud serve BUNDLE [BUNDLE...]`: run a cloud worker.

Registered through the `splitexit.commands` entry point (`cloud =
"splitexit.cloud.cli:register"`); importing this module imports neither torch nor grpc,
so `splitexit --help` stays quick.

Bad bundles, a port in use, unreadable TLS files or token: one line on stderr, exit 2.
Once listening it prints `serving MODEL@HASH on HOST:PORT ...` and logs a stats line every
`--stats-interval` seconds; SIGTERM/SIGINT drain it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from splitexit.cloud.server import CloudServer, ServerConfig
    from splitexit.cloud.served import ServedModel

__all__ = ["build_config", "register", "serve"]

log = logging.getLogger("splitexit.cloud")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value < 0 or (kind is int and value == 0):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    cloud = sub.add_parser("cloud", help="the cloud worker: serve bundle tails over gRPC")
    commands = cloud.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")
    serve_p = commands.add_parser("serve", help="serve one or more bundles (health, reflection, metrics, drain)")
    common(serve_p)  # --cache-dir (unused here), --threads (torch threads of the compute thread)
    serve_p.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help="bundle directories")
    serve_p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    serve_p.add_argument("--port", type=_port, default=50051, help="gRPC port; 0 = any free one (default: %(default)s)")
    serve_p.add_argument("--max-batch", type=_positive(int), default=32, help="rows per tail call (default: %(default)s)")
    serve_p.add_argument("--max-delay-ms", type=_positive(float), default=2.0,
                         help="most a request waits for a batch to fill (default: %(default)s)")
    serve_p.add_argument("--concurrent-batches", type=_positive(int), default=1,
                         help="batches computed at once, each on a compute thread of its own with --threads torch "
                              "threads; on a CPU with spare cores, N batches of 1 thread each often beat 1 batch "
                              "of N threads (default: %(default)s)")
    serve_p.add_argument("--queue-limit", type=_positive(int), default=2048,
                         help="rows waiting before RESOURCE_EXHAUSTED (default: %(default)s)")
    serve_p.add_argument("--max-queue-wait-ms", type=_positive(float), default=250.0,
                         help="refuse (RESOURCE_EXHAUSTED) a request expected to wait longer than this behind the "
                              "work already queued, or past its own deadline: under overload the worker answers "
                              "in time what it accepts instead of queueing what will expire (default: %(default)s)")
    serve_p.add_argument("--max-concurrent-rpcs", type=_positive(int), default=1024,
                         help="RPCs the worker holds at once; beyond, gRPC refuses (RESOURCE_EXHAUSTED) before "
                              "the worker reads them, which bounds its memory under a flood (default: %(default)s)")
    serve_p.add_argument("--trim-idle-s", type=float, default=1.0, metavar="SECONDS",
                         help="give freed memory back to the OS once idle this long after serving; 0 = never "
                              "(default: %(default)s)")
    serve_p.add_argument("--max-connection-age", type=_positive(float), default=None, metavar="SECONDS",
                         help="close each client connection after this many seconds (calls in flight may finish), "
                              "so clients re-resolve and spread to workers added since, e.g. behind a headless "
                              "Kubernetes Service (default: never)")
    serve_p.add_argument("--max-rows", type=_positive(int), default=256, help="rows in one request (default: %(default)s)")
    serve_p.add_argument("--switch-interval-ms", type=_positive(float), default=None,
                         help="the process's GIL switch interval: shorter lets the compute thread back in sooner "
                              "between torch ops (default: 0.5)")
    serve_p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (TLS)")
    serve_p.add_argument("--tls-key", type=Path, help="PEM private key (TLS)")
    serve_p.add_argument("--client-ca", type=Path, help="PEM CA that client certificates must chain to (mTLS)")
    serve_p.add_argument("--token-file", type=Path, help="file holding the bearer token clients must send")
    serve_p.add_argument("--metrics-port", type=_port, default=0, help="Prometheus /metrics port; 0 = off")
    serve_p.add_argument("--advertise", action=argparse.BooleanOptionalAction, default=True,
                         help="announce the worker over mDNS as _splitexit._tcp (default: on)")
    serve_p.add_argument("--interfaces", help="comma-separated addresses for mDNS (default: all)")
    serve_p.add_argument("--grace", type=_positive(float), default=10.0, help="drain grace period in s")
    serve_p.add_argument("--worker-id", default="", help="worker id in answers (default: hostname-pid)")
    serve_p.add_argument("--stats-interval", type=_positive(float), default=60.0, help="seconds between stats lines")
    serve_p.set_defaults(func=cmd_serve)


def build_config(args: argparse.Namespace) -> "ServerConfig":
    """ServerConfig from parsed arguments; raises ValueError (ServerError) with one line."""
    from splitexit.cloud.batcher import BatcherConfig
    from splitexit.cloud.server import ServerConfig, ServerError

    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServerError(f"cannot read the token file {args.token_file}: {exc}") from None
        if not token:
            raise ServerError(f"the token file {args.token_file} is empty")
    for name in ("tls_cert", "tls_key", "client_ca"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise ServerError(f"--{name.replace('_', '-')} {path}: no such file")
    return ServerConfig(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
        token=token, max_request_rows=min(args.max_rows, args.queue_limit), compute_threads=args.threads,
        batching=BatcherConfig(max_batch=args.max_batch, max_queue_delay_ms=args.max_delay_ms,
                               queue_limit_rows=args.queue_limit, concurrent_batches=args.concurrent_batches,
                               max_queue_wait_ms=args.max_queue_wait_ms),
        drain_grace_s=args.grace, metrics_port=args.metrics_port, worker_id=args.worker_id,
        max_concurrent_rpcs=args.max_concurrent_rpcs, max_connection_age_s=args.max_connection_age,
        trim_idle_s=args.trim_idle_s,
    )


async def serve(config: "ServerConfig", models: Mapping[tuple[str, str], "ServedModel"], *, advertise: bool = False,
                interfaces: Sequence[str] | None = None, stats_interval: float = 60.0,
                on_ready: Callable[["CloudServer"], None] | None = None) -> None:
    """Run a worker until it is drained (SIGTERM/SIGINT). Raises ServerError on start."""
    from splitexit.cloud.discovery import Advertiser, ServiceModel, txt_properties
    from splitexit.cloud.server import build_server

    server = build_server(config, models)
    await server.start()
    server.install_signal_handlers()
    tls = "mTLS" if config.client_ca else ("TLS" if config.tls else "plaintext")
    metrics = f", metrics on :{server.metrics_port}" if server.metrics_port else ""
    names = ", ".join(f"{m.name}@{m.hash[:12]}" for m in models.values())
    print(f"serving {names} on {server.address} ({tls}{', token' if config.token else ''}{metrics})", flush=True)
    for warning in exposure_warnings(config, server.port, advertise=advertise, interfaces=interfaces):
        print(f"splitexit: warning: {warning}", file=sys.stderr, flush=True)
    if on_ready is not None:
        on_ready(server)
    advertiser = None
    if advertise:
        props = txt_properties((ServiceModel(name=m.name, bundle_hash=m.hash, split=m.bundle.split)
                                for m in models.values()), tls=config.tls, auth=config.token is not None,
                               worker_id=server.servicer.worker_id)
        advertiser = Advertiser(instance=server.servicer.worker_id.replace(".", "-"), port=server.port,
                                properties=props, interfaces=interfaces)
        try:
            await advertiser.start()
            server.on_drain(advertiser.stop)  # withdrawn as the drain starts, not after it
        except Exception as exc:  # mDNS is a convenience: the worker serves without it
            log.warning("not advertised over mDNS: %s", exc)
            advertiser = None
    stats = asyncio.create_task(_report_stats(server, stats_interval))
    try:
        await server.wait_for_termination()
    finally:
        stats.cancel()
        if advertiser is not None:
            await advertiser.stop()
    log.info("stopped")


def exposure_warnings(config: "ServerConfig", port: int, *, advertise: bool,
                      interfaces: Sequence[str] | None) -> list[str]:
    """What an operator should know at start: a worker on every interface with neither TLS
    nor a token serves anyone who reaches it, and mDNS announces it on every interface."""
    warnings = []
    if config.host in ("0.0.0.0", "", "::", "[::]") and not config.tls and config.token is None:
        warnings.append(f"listening on every interface ({config.host or '*'}:{port}) in plaintext without a token: "
                        "anyone who reaches this port can use the worker (--host 127.0.0.1 keeps it on this "
                        "machine; --tls-cert/--tls-key and --token-file protect it)")
    if advertise and interfaces is None:
        warnings.append("advertising over mDNS on every interface (--interfaces to choose, --no-advertise to stop)")
    return warnings


async def _report_stats(server: "CloudServer", interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        s = server.metrics.snapshot()
        log.info("stats: %d requests (%d errors), %d rows, %d batches (mean %.1f rows), %d rows queued",
                 s.requests, s.errors, s.rows, s.batches, s.mean_batch, s.queue_rows)


# glibc's mallopt parameter for the number of malloc arenas (malloc.h: M_ARENA_MAX)
def cmd_serve(args: argparse.Namespace) -> None:
    """BundleError and ServerError are ValueErrors: `splitexit.cli.main` prints them as
    one line and exits 2."""
    from splitexit.cloud.memory import limit_malloc_arenas
    from splitexit.cloud.served import load_models

    limit_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    interfaces = [a.strip() for a in args.interfaces.split(",") if a.strip()] if args.interfaces else None
    from splitexit.cloud.server import SWITCH_INTERVAL_MS

    config = build_config(args)
    sys.setswitchinterval((args.switch_interval_ms or SWITCH_INTERVAL_MS) / 1000)
    models = load_models(args.bundles)
    asyncio.run(serve(config, models, advertise=args.advertise, interfaces=interfaces,
                      stats_interval=args.stats_interval))
