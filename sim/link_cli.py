"""`splitexit sim link`: run the link emulator between an edge and a worker, and
`splitexit sim link-ctl`: change it while it runs.

    splitexit sim link --target 127.0.0.1:50051 --listen 127.0.0.1:50052 --profile lte --control 127.0.0.1:50053
    splitexit sim link-ctl 127.0.0.1:50053 '{"set": {"up": {"rate_mbps": 1.0, "delay_ms": 150}}}'
    splitexit sim link-ctl 127.0.0.1:50053 '{"outage": {"mode": "blackhole", "seconds": 5}}'
    splitexit sim link-ctl 127.0.0.1:50053 '{"counters": {}}'

The control channel is one JSON object per line over TCP, answered with one JSON line:
{"ok": true, ...} or {"ok": false, "error": "..."}. `set` changes the named fields of a
direction (those of `splitexit.sim.link.Direction`; a trace as "FILE" or
"ARCHIVE.tar.gz:NAME"), the others stay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, fields, replace
from typing import Any, Callable

from splitexit.cli import CliError

__all__ = ["cmd_link", "cmd_link_ctl", "control", "register_into"]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def add_link_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=_address, required=True, help="HOST:PORT of the worker")
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="HOST:PORT to listen on (default: any free port)")
    p.add_argument("--profile", default=None, help="a link profile (3g, lte, wifi, ...); the flags below override it")
    for side in ("up", "down"):
        p.add_argument(f"--{side}-mbps", type=float, help=f"{side}link rate")
        p.add_argument(f"--{side}-delay-ms", type=float, help=f"{side}link one-way delay")
        p.add_argument(f"--{side}-jitter-ms", type=float, help=f"{side}link jitter (uniform +-)")
        p.add_argument(f"--{side}-loss", type=float, help=f"{side}link loss stall probability per segment")
        p.add_argument(f"--{side}-trace", help=f"{side}link capacity from a trace (FILE or ARCHIVE.tar.gz:NAME)")
    p.add_argument("--control", type=_address, help="HOST:PORT for `splitexit sim link-ctl`")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: until Ctrl-C)")


def add_ctl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", type=_address, help="the link's --control HOST:PORT")
    p.add_argument("command", help='one JSON object, e.g. \'{"counters": {}}\'')


def _trace(spec: str) -> Any:
    from splitexit.sim.link import load_trace

    archive, _, member = spec.partition(".tar.gz:")
    return load_trace(archive + ".tar.gz", member) if member else load_trace(spec)


def _direction(base: Any, changes: dict[str, Any]) -> Any:
    """`base` with the named fields changed (a trace given by its spec)."""
    names = {f.name for f in fields(base)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown link settings {unknown}; known: {sorted(names)}")
    if isinstance(changes.get("trace"), str):
        changes = {**changes, "trace": _trace(changes["trace"]), "rate_mbps": None}
    elif changes.get("rate_mbps") is not None:
        changes = {**changes, "trace": None}
    return replace(base, **changes)


def _describe(direction: Any) -> dict[str, Any]:
    out = {k: v for k, v in asdict(direction).items() if k != "trace"}
    out["trace"] = None if direction.trace is None else direction.trace.name
    return out


async def control(proxy: Any, message: dict[str, Any]) -> dict[str, Any]:
    """One control command applied to a running LinkProxy; the answer to send back."""
    try:
        if "set" in message:
            changes = message["set"]
            proxy.update(**{side: _direction(getattr(proxy.profile, side), changes[side])
                            for side in ("up", "down") if side in changes})
        if "outage" in message:
            o = message["outage"]
            proxy.outage(o.get("mode", "blackhole"), float(o["seconds"]))
        return {"ok": True, "t_s": round(proxy.now_s(), 3), "counters": asdict(proxy.counters),
                "up": _describe(proxy.profile.up), "down": _describe(proxy.profile.down)}
    except (KeyError, TypeError, ValueError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def cmd_link(args: argparse.Namespace) -> None:
    from splitexit.sim.link import PROFILES, LinkProfile, LinkProxy

    if args.profile is not None and args.profile not in PROFILES:
        raise CliError(f"unknown link profile {args.profile!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[args.profile] if args.profile else LinkProfile()
    try:
        for side in ("up", "down"):
            changes = {name: getattr(args, f"{side}_{flag}") for name, flag in
                       (("rate_mbps", "mbps"), ("delay_ms", "delay_ms"), ("jitter_ms", "jitter_ms"), ("loss", "loss"),
                        ("trace", "trace")) if getattr(args, f"{side}_{flag}") is not None}
            profile = replace(profile, **{side: _direction(getattr(profile, side), changes)})
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None

    async def serve() -> None:
        async with LinkProxy(args.target, profile, listen=args.listen) as proxy:
            server = None
            if args.control is not None:
                async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    while line := await reader.readline():
                        try:
                            message = json.loads(line)
                            answer = await control(proxy, message) if isinstance(message, dict) else \
                                {"ok": False, "error": "a command is one JSON object"}
                        except json.JSONDecodeError as exc:
                            answer = {"ok": False, "error": f"not JSON: {exc}"}
                        writer.write((json.dumps(answer) + "\n").encode())
                        await writer.drain()
                    writer.close()

                server = await asyncio.start_server(handle, *args.control)
            where = f", control on {args.control[0]}:{server.sockets[0].getsockname()[1]}" if server else ""
            print(f"link {proxy.address} -> {args.target[0]}:{args.target[1]}{where}", flush=True)
            try:
                await asyncio.sleep(args.seconds) if args.seconds > 0 else await asyncio.Event().wait()
            finally:
                if server is not None:
                    server.close()
                print(f"counters: {asdict(proxy.counters)}", flush=True)

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


def cmd_link_ctl(args: argparse.Namespace) -> None:
    try:
        message = json.loads(args.command)
    except json.JSONDecodeError as exc:
        raise CliError(f"the command is not JSON: {exc}") from None

    async def send() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(*args.address)
        writer.write((json.dumps(message) + "\n").encode())
        await writer.drain()
        answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
        writer.close()
        return answer

    try:
        answer = asyncio.run(send())
    except (OSError, asyncio.TimeoutError) as exc:
        raise CliError(f"no link control at {args.address[0]}:{args.address[1]} ({exc})") from None
    print(json.dumps(answer, indent=2))
    if not answer.get("ok"):
        sys.exit(2)


def register_into(commands: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = commands.add_parser("link", help="run the link emulator between an edge and a worker")
    add_link_arguments(p)
    p.set_defaults(func=cmd_link)
    ctl = commands.add_parser("link-ctl", help="change a running link emulator (its --control address)")
    add_ctl_arguments(ctl)
    ctl.set_defaults(func=cmd_link_ctl)
