"""`splitexit edge run` and `splitexit edge refine`: thin wrappers over `EdgeAgent`.

Registered through the `splitexit.commands` entry point (`edge = splitexit.edge.cli:register`).
Every input is read and checked before the first answer; results and traces are written
to temporary files renamed into place at the end, so a failed run leaves nothing
half-written. Errors are one line and exit status 2 (see `splitexit.cli.main`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

from splitexit.cli import EXIT_PARTIAL, CliError
from splitexit.codec import CODECS

if TYPE_CHECKING:
    from splitexit.edge.transport import GrpcConfig, WorkerPool

__all__ = ["build_transport", "cmd_refine", "cmd_run", "register"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds > 0, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected milliseconds > 0, got {text!r}")
    return value


def _address(text: str) -> str:
    from splitexit.edge.discovery import parse_static

    try:
        return parse_static([text])[0]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", action="append", type=_address, default=[], metavar="HOST:PORT",
                   help="a cloud worker (repeatable); dns:///NAME:PORT spreads over every address of a name "
                        "(dns://SERVER:PORT/NAME:PORT asks that DNS server)")
    p.add_argument("--discover", action="store_true", help="find workers serving this bundle by mDNS (zeroconf)")
    p.add_argument("--discover-wait", type=float, default=2.0, metavar="S",
                   help="with --discover: how long to look for workers before starting (default: %(default)s)")
    p.add_argument("--interface", action="append", default=None, metavar="IP",
                   help="with --discover: browse only on this interface address (repeatable)")
    p.add_argument("--strategy", choices=("least_outstanding", "round_robin"), default="least_outstanding",
                   help="how requests spread over workers")
    p.add_argument("--token-file", type=Path, help="a file holding a bearer token for the workers")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to verify workers with; enables TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mTLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="client private key (PEM) for mTLS")
    p.add_argument("--tls-server-name", help="the name expected in the worker's certificate, if not its address")
    p.add_argument("--request-timeout-ms", type=_positive_ms, default=5000.0,
                   help="upper bound of one offload (default: %(default)s)")


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    edge = sub.add_parser("edge", help="run the edge agent: exits on the device, the rest offloaded to workers")
    cmds = edge.add_subparsers(dest="edge_command", required=True, metavar="COMMAND")

    run = cmds.add_parser("run", help="answer every input of a file, folder, archive or array; JSON lines out")
    common(run)
    run.add_argument("bundle", type=Path, help="a bundle directory (splitexit export)")
    run.add_argument("--input", required=True, type=Path,
                     help="an image, a folder of images, a .tar.gz of images, or a .npy/.npz array")
    run.add_argument("--out", required=True, type=Path, help="results as JSON lines ('-' = stdout)")
    _connection_args(run)
    run.add_argument("--codec", choices=CODECS,
                     help="feature codec (default: the bundle's)")
    run.add_argument("--latency-budget-ms", type=_positive_ms,
                     help="end-to-end budget per batch; rows the cloud cannot answer within it are answered locally")
    run.add_argument("--batch-size", type=_positive_int, default=64)
    run.add_argument("--spool", type=Path, metavar="DIR", help="keep failed offloads here for `edge refine`")
    run.add_argument("--trace", type=Path, metavar="FILE", help="one msgpack trace record per batch")
    run.add_argument("--resize", action="store_true", help="resize images to the bundle's input size")
    run.add_argument("--engine", choices=("auto", "onnx", "torch"), default="auto",
                     help="what runs the head: the bundle's ONNX segments in ONNX Runtime (no torch needed) or "
                          "eager torch on its weights (default auto: onnx when the bundle has segments)")
    run.add_argument("--engine-threads", type=_positive_int, default=1, metavar="N",
                     help="ONNX Runtime intra-op threads (default: %(default)s)")
    run.add_argument("--probabilities", type=int, nargs="?", const=0, default=None, metavar="K",
                     help="write each answer's class probabilities (the K most probable; all without K)")
    run.add_argument("--split", type=int, metavar="S",
                     help="cut after stage S, one of the bundle's split points (default: its first)")
    run.add_argument("--replan", action="store_true",
                     help="move the cut among the bundle's split points as the link changes (needs "
                          "--device-profile; the bundle must allow several splits: export --splits)")
    run.add_argument("--device-profile", type=Path, metavar="FILE",
                     help="this device's times (`splitexit profile`), for --replan")
    run.add_argument("--cloud-profile", type=Path, metavar="FILE",
                     help="the worker's times, for --replan (default: its compute counted as 0)")
    run.set_defaults(func=cmd_run)

    refine = cmds.add_parser("refine", help="resend spooled offloads; their answers as updates (JSON lines)")
    common(refine)
    refine.add_argument("bundle", type=Path, help="the bundle the spooled rows were computed with")
    refine.add_argument("--spool", required=True, type=Path, metavar="DIR")
    refine.add_argument("--out", required=True, type=Path, help="updated answers as JSON lines ('-' = stdout)")
    _connection_args(refine)
    refine.set_defaults(func=cmd_refine)


def _grpc_config(args: argparse.Namespace) -> "GrpcConfig":
    from splitexit.edge.transport import GrpcConfig, TlsConfig

    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"{args.token_file}: cannot read the token ({exc})") from None
        if not token or "\n" in token:
            raise CliError(f"{args.token_file}: expected one line holding the token")
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise CliError("mTLS needs both --tls-cert and --tls-key")
        tls = TlsConfig.from_files(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                                   server_name=args.tls_server_name)
    elif args.tls_server_name:
        raise CliError("--tls-server-name needs TLS (--tls-ca)")
    lb: Literal["round_robin", "pick_first"] = (
        "round_robin" if any(w.startswith("dns:") for w in args.worker) else "pick_first")
    return GrpcConfig(token=token, tls=tls, lb_policy=lb)


def share_cores(args: argparse.Namespace, engine: Any) -> str | None:
    """When a --worker runs on this machine, edge and worker share its cores: a torch edge
    left at torch's default (every core) and a worker at its own default oversubscribe
    them, and each slows the other several times over (OpenMP threads spin while they
    wait). The torch edge then takes half the cores (unless --threads says otherwise);
    either way the note returned says what the worker should take."""
    from splitexit.edge.transport.base import is_loopback
    from splitexit.runtime import TorchEngine

    if not any(is_loopback(w) for w in args.worker):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(engine, TorchEngine):
        import torch

        if args.threads is None:
            torch.set_num_threads(max(1, cores // 2))
        edge_threads = torch.get_num_threads()
    else:
        edge_threads = args.engine_threads
    return (f"note: the worker at {next(w for w in args.worker if is_loopback(w))} shares this machine's {cores} "
            f"cores: the edge computes on {edge_threads} thread(s); start the worker with "
            f"`--threads {max(1, cores - edge_threads)}` so that the two do not fight over the cores")


def build_transport(args: argparse.Namespace, bundle: Any, codec: str) -> "WorkerPool | None":
    """A WorkerPool over --worker addresses (and --discover's finds), or None (offline)."""
    from splitexit.edge.transport import GrpcTransport, PoolConfig, WorkerPool

    if not args.worker and not args.discover:
        return None
    config = _grpc_config(args)
    pool = WorkerPool(bundle_hash=bundle.hash, model=bundle.name, split=bundle.split, codec=codec,
                      config=PoolConfig(strategy=args.strategy),
                      connect=lambda address: GrpcTransport(address, config))
    for address in args.worker:
        pool.add(address)
    return pool


async def _connect(args: argparse.Namespace, pool: "WorkerPool | None") -> Any:
    """Confirm static workers and, with --discover, browse for a while; returns the browser
    (to close at the end) or None."""
    if pool is None:
        return None
    browser = None
    if args.discover:
        from splitexit.edge.discovery import DiscoveryBrowser, DiscoveryConfig

        config = DiscoveryConfig(interfaces=tuple(args.interface) if args.interface else None)
        browser = DiscoveryBrowser(pool, config=config)
        await browser.start()
        await browser.wait_for(lambda b: any(w.matches for w in b.found.values()), max(args.discover_wait, 0.0))
    await pool.probe(force=True)
    up = [w.key for w in pool.workers() if w.state == "up"]
    if not up:
        states = "; ".join(f"{w.key}: {w.state} {w.last_error}".strip() for w in pool.workers()) or "none found"
        print(f"splitexit: warning: no cloud worker confirmed ({states}); answering on the edge until one is",
              file=sys.stderr)
    return browser


def cmd_run(args: argparse.Namespace) -> int:
    from splitexit.edge.agent import AgentConfig
    from splitexit.edge.engine import open_edge
    from splitexit.edge.inputs import load_inputs
    from splitexit.edge.results import ResultWriter
    from splitexit.edge.spool import Spool
    from splitexit.edge.trace import TraceWriter

    bundle, engine = open_edge(args.bundle, args.engine, threads=args.engine_threads)
    note = share_cores(args, engine)  # printed once the arguments have all been accepted
    codec = args.codec or bundle.codec
    if args.split is not None and args.split not in bundle.splits:
        raise CliError(f"--split {args.split}: the bundle allows {list(bundle.splits)}")
    config = AgentConfig(codec=codec, latency_budget_ms=args.latency_budget_ms,
                         request_timeout_ms=args.request_timeout_ms, engine=args.engine,
                         engine_threads=args.engine_threads, want_probabilities=args.probabilities is not None,
                         top_k=args.probabilities or 0, replan=_replan_config(args, bundle))
    inputs = load_inputs(args.input, bundle.input_shape, resize=args.resize)
    writer = ResultWriter(args.out, run=bundle.hash)  # checked (and a partial run found) before any answer
    todo = inputs.without(writer.done)
    if writer.done:
        print(f"resuming: {len(inputs) - len(todo)} answers kept from {writer.partial}, {len(todo)} inputs left",
              file=sys.stderr)
    for _, why in inputs.errors:
        print(f"splitexit: warning: {why}: not answered", file=sys.stderr)
    trace = None
    try:
        transport = build_transport(args, bundle, codec)
        if args.spool is not None:
            args.spool = Spool(args.spool)  # created and checked before any answer
        if note is not None:
            print(note, file=sys.stderr)
        trace = TraceWriter(args.trace, atomic=True) if args.trace is not None else None
        counts = asyncio.run(_run(args, (bundle, engine), config, todo, transport, writer, trace))
    except BaseException:
        writer.abort()  # what was answered stays in the partial file for a rerun
        if trace is not None:
            trace.abort()
        raise
    writer.commit()
    if trace is not None:
        trace.commit()
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if not k.startswith("reason:") and v)
    reasons = ", ".join(f"{k.removeprefix('reason:')} {v}" for k, v in counts.items() if k.startswith("reason:"))
    kept = f"; {len(inputs) - len(todo)} kept from the interrupted run" if writer.done else ""
    print(f"{len(todo)} answers ({summary}{'; degraded: ' + reasons if reasons else ''}{kept}) -> {args.out}",
          file=sys.stderr)
    accuracy = labelled_accuracy(args.out, inputs.labels, bundle.classes)
    if accuracy is not None:
        correct, known = accuracy
        print(f"accuracy {correct / known:.4f} ({correct} of {known} inputs whose class the inputs name: class "
              f"folders or a .npz's labels)", file=sys.stderr)
    if inputs.errors:
        print(f"splitexit: {len(inputs.errors)} of {len(inputs) + len(inputs.errors)} inputs could not be read "
              f"(named above) and have no answer", file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def labelled_accuracy(results: Path, labels: "Mapping[str, str]", classes: Sequence[str]) -> tuple[int, int] | None:
    """(correct, counted) over the answers in `results` whose input names one of `classes`
    (a class folder's name, or a class index); None when no input does."""
    from splitexit.edge.results import read_results

    names = set(classes)
    known = {sample: label for sample, label in labels.items()
             if label in names or (label.isdigit() and int(label) < len(classes))}
    if not known:
        return None
    correct = counted = 0
    for answer in read_results(results):
        label = known.get(answer.get("sample_id", ""))
        if label is not None:
            counted += 1
            correct += label in (answer.get("class_name"), str(answer.get("label")))
    return (correct, counted) if counted else None


def _replan_config(args: argparse.Namespace, bundle: Any) -> Any:
    """--replan's config from the profiles, checked against the bundle (None without --replan)."""
    from splitexit.edge.replan import ReplanConfig
    from splitexit.profile import ProfileError, load_profile

    if not args.replan:
        if args.device_profile or args.cloud_profile:
            raise CliError("--device-profile and --cloud-profile are for --replan")
        return None
    if args.device_profile is None:
        raise CliError("--replan needs --device-profile FILE (`splitexit profile BUNDLE --out FILE`)")
    if len(bundle.splits) < 2:
        raise CliError(f"--replan: the bundle allows one split ({bundle.split}); export it with --splits")
    times: list[Any] = []  # DeviceTimes, or None for a worker without a profile
    for path in (args.device_profile, args.cloud_profile):
        if path is None:
            times.append(None)
            continue
        try:
            profile = load_profile(path)
        except ProfileError as exc:
            raise CliError(str(exc)) from None
        if profile.arch != bundle.manifest.arch:
            raise CliError(f"{path} profiles {profile.arch}, the bundle's network is {bundle.manifest.arch}")
        times.append(profile.at(1))
    return ReplanConfig(device=times[0], cloud=times[1])


async def _run(args: argparse.Namespace, loaded: tuple[Any, Any], config: Any, inputs: Any, transport: Any,
               writer: Any, trace: Any) -> dict[str, int]:
    from splitexit.edge.agent import EdgeAgent

    bundle, engine = loaded
    agent = EdgeAgent(bundle, transport, config=config, spool=args.spool, trace=trace, engine=engine)
    if args.split is not None:
        agent.split = args.split
        if agent.chooser is not None:
            agent.chooser.split = args.split
    counts = {"edge": 0, "cloud": 0, "degraded": 0}
    browser = None
    try:
        browser = await _connect(args, transport)
        for ids, batch in inputs.batches(args.batch_size):
            for answer in await agent.infer(batch, ids):
                writer.write(answer)
                counts[answer.route] += 1
                if answer.reason and answer.degraded:
                    counts[f"reason:{answer.reason}"] = counts.get(f"reason:{answer.reason}", 0) + 1
            writer.checkpoint()  # a kill after this point loses no answer of this batch
    finally:
        if browser is not None:
            await browser.close()
        agent.trace = None  # committed or aborted by the caller
        await agent.close()
    return counts


def cmd_refine(args: argparse.Namespace) -> None:
    from splitexit.edge.agent import AgentConfig
    from splitexit.edge.engine import open_edge
    from splitexit.edge.results import ResultWriter
    from splitexit.edge.spool import LOG

    bundle, engine = open_edge(args.bundle)
    if not (args.spool / LOG).is_file():
        raise CliError(f"{args.spool}: not a spool (no {LOG})")
    if not args.worker and not args.discover:
        raise CliError("refine needs a worker: give --worker HOST:PORT or --discover")
    transport = build_transport(args, bundle, bundle.codec)
    config = AgentConfig(refine_timeout_ms=args.request_timeout_ms)
    writer = ResultWriter(args.out, resume=False)  # refined rows leave the spool: nothing to resume from
    try:
        refined, left, damage = asyncio.run(_refine(args, (bundle, engine), config, transport, writer))
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    damaged = (f"; {damage.records} damaged spool records ({damage.bytes} bytes) could not be read and were "
               f"dropped" if damage.records else "")
    print(f"{refined} refined answers -> {args.out}; {left} requests left in {args.spool}{damaged}", file=sys.stderr)


async def _refine(args: argparse.Namespace, loaded: tuple[Any, Any], config: Any, transport: Any,
                  writer: Any) -> tuple[int, int, Any]:
    from splitexit.edge.agent import EdgeAgent

    bundle, engine = loaded
    agent = EdgeAgent(bundle, transport, config=config, spool=args.spool, engine=engine)
    browser = None
    refined = 0
    try:
        browser = await _connect(args, transport)
        async for answer in agent.refine():
            writer.write(answer)
            refined += 1
    finally:
        if browser is not None:
            await browser.close()
        await agent.close()
    assert agent.spool is not None
    damage = agent.spool.damage  # as read before the compaction that drops the damaged bytes
    return refined, len(agent.spool), damage
