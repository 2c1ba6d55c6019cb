"""Cut any torch.fx-traceable module into a chain of stages, and wrap it as a MultiExitNet.

A cut "after node n" splits the traced graph in two: everything up to and including n,
and the rest. A cut is valid only when exactly one value crosses it, so that every stage
takes one tensor and returns one tensor (what the edge sends to the cloud). Node names
are those of `torch.fx.symbolic_trace(module)`; list them with `graph_node_names`.
"""

from __future__ import annotations

import difflib
from typing import Callable, Mapping, Sequence

import torch
from torch import fx, nn

from splitexit.models.multi_exit import MultiExitNet, StageInfo

__all__ = ["CutError", "cut_stages", "graph_node_names", "multi_exit_from_module"]


class CutError(ValueError):
    """A module cannot be traced, or cannot be cut where asked."""


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(module)
    except Exception as exc:  # TraceError, but also data-dependent control flow, etc.
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CutError(f"torch.fx cannot trace {type(module).__name__}: {first_line}") from exc


def _body(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")]


def graph_node_names(module: nn.Module) -> list[str]:
    """Names of the traced graph's nodes in execution order (inputs and output left out):
    the names `cut_stages` accepts."""
    return [n.name for n in _body(_trace(module).graph)]


def _resolve_cuts(module: nn.Module, body: list[fx.Node], cut_nodes: Sequence[str]) -> list[int]:
    """Positions in `body` of the named cut nodes, checked to be known and strictly increasing."""
    position = {n.name: i for i, n in enumerate(body)}
    cls = type(module).__name__
    cuts: list[int] = []
    for name in cut_nodes:
        if name not in position:
            close = difflib.get_close_matches(name, list(position), n=5, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            raise CutError(
                f"no node named {name!r} in the traced {cls} ({hint}); "
                "list them with splitexit.models.fx_cut.graph_node_names(module)"
            )
        pos = position[name]
        if cuts and pos <= cuts[-1]:
            prev = body[cuts[-1]].name
            what = "repeated" if pos == cuts[-1] else f"listed after {prev!r} but comes before it in the graph"
            raise CutError(f"cut nodes must be distinct and in graph order: {name!r} is {what}")
        if pos == len(body) - 1:
            raise CutError(f"cutting after the last node {name!r} of {cls} leaves an empty final stage")
        cuts.append(pos)
    return cuts


def _crossing_values(graph: fx.Graph, body: list[fx.Node], cuts: list[int]) -> list[fx.Node]:
    """The one value crossing each cut (CutError when none or several do)."""
    # Positions: the input is -1, the body 0..N-1, the output N.
    pos: dict[fx.Node, int] = {n: i for i, n in enumerate(body)}
    for n in graph.nodes:
        if n.op == "placeholder":
            pos[n] = -1
        elif n.op == "output":
            pos[n] = len(body)
    crossing: list[fx.Node] = []
    for cut in cuts:
        # get_attr nodes (constants, parameters) are not values to send: every stage
        # that needs one re-reads it, so they never cross a cut.
        values = [
            n
            for n in graph.nodes
            if n.op != "get_attr" and pos[n] <= cut and any(pos[u] > cut for u in n.users)
        ]
        where = f"the cut after {body[cut].name!r}"
        if len(values) != 1:
            if not values:
                raise CutError(f"no value crosses {where}: the rest of the graph does not depend on it")
            names = ", ".join(v.name for v in values)
            raise CutError(f"{len(values)} values cross {where} ({names}); a cut must be crossed by exactly one")
        crossing.append(values[0])
    return crossing


def _remapper(piece_graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> Callable[[fx.Node], fx.Node]:
    """Maps an original node to its copy in `piece_graph`."""

    def remap(arg: fx.Node) -> fx.Node:
        if arg not in env:
            # a get_attr defined in an earlier stage: re-read it here
            if arg.op != "get_attr":  # ruled out by _crossing_values
                raise CutError(f"internal error: {arg.name!r} used across a cut")
            env[arg] = piece_graph.node_copy(arg)
        return env[arg]

    return remap


def cut_stages(module: nn.Module, cut_nodes: Sequence[str]) -> list[fx.GraphModule]:
    """Trace `module` once and cut it after each named node (in graph order).

    Returns len(cut_nodes) + 1 GraphModules, each taking one tensor and returning one,
    whose chain computes what `module` does. The pieces reference the module's own
    submodules (parameters are shared, not copied).
    """
    traced = _trace(module)
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise CutError(
            f"{type(module).__name__}.forward takes {len(placeholders)} inputs; cut_stages needs exactly one"
        )
    body = _body(graph)
    cuts = _resolve_cuts(module, body, cut_nodes)
    crossing = _crossing_values(graph, body, cuts)
    output = next(n for n in graph.nodes if n.op == "output")

    shared = set(module.modules())
    bounds = [-1, *cuts, len(body) - 1]
    inputs = [placeholders[0], *crossing]
    pieces: list[fx.GraphModule] = []
    for i in range(len(bounds) - 1):
        piece_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if i == 0:
            env[inputs[0]] = piece_graph.node_copy(inputs[0])  # keeps the input's name
        else:
            env[inputs[i]] = piece_graph.placeholder(inputs[i].name)

        remap = _remapper(piece_graph, env)
        for node in body[bounds[i] + 1 : bounds[i + 1] + 1]:
            if node.op == "get_attr":
                continue  # copied on first use, so a stage holds only what it reads
            env[node] = piece_graph.node_copy(node, remap)
        if i == len(bounds) - 2:
            piece_graph.node_copy(output, remap)
        else:
            piece_graph.output(remap(crossing[i]))
        piece_graph.lint()
        # GraphModule(root, graph) copies over only the submodules and attributes the
        # graph names, so each stage owns just its own part of the module.
        piece = fx.GraphModule(traced, piece_graph, class_name=f"{type(module).__name__}Stage{i}")
        # Only the piece's own containers: train() would also reset the shared
        # submodules, losing a mixed mode such as a frozen BatchNorm.
        for m in piece.modules():
            if m not in shared:
                m.training = module.training
        pieces.append(piece)
    return pieces


def _stage_info(index: int, out: object, example_input: torch.Tensor) -> StageInfo:
    if not isinstance(out, torch.Tensor):
        raise CutError(f"stage {index} returns {type(out).__name__}, not a tensor")
    if out.dim() == 4 and example_input.dim() == 4:
        return StageInfo(out.shape[1], max(1, example_input.shape[-2] // out.shape[-2]), f"stages.{index}")
    return StageInfo(out.shape[-1], 1, f"stages.{index}")


def multi_exit_from_module(
    module: nn.Module,
    cut_nodes: Sequence[str],
    example_input: torch.Tensor,
    *,
    exits: Mapping[int, nn.Module] | None = None,
    exit_factory: Callable[[StageInfo], nn.Module] | None = None,
) -> MultiExitNet:
    """A MultiExitNet whose stages are `module` cut after `cut_nodes`.

    The stages' feature_info comes from running `example_input` through them. The last
    stage already produces logits, so the final head is the identity. Exits are either
    given (`exits`: stage index -> head) or built by `exit_factory(info)` after every
    stage but the last.
    """
    if exits is not None and exit_factory is not None:
        raise ValueError("give exits or exit_factory, not both")
    stages = cut_stages(module, cut_nodes)
    # Probe in eval mode (no batch-stat updates), then restore every submodule's mode.
    # The stages run the module's own submodules, so module.eval() covers them.
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            x = example_input
            info: list[StageInfo] = []
            for i, stage in enumerate(stages):
                x = stage(x)
                info.append(_stage_info(i, x, example_input))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if exit_factory is not None:
        exits = {i: exit_factory(info[i]) for i in range(len(stages) - 1)}
    return MultiExitNet(stages, info, nn.Identity(), exits)
