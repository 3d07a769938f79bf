"""Blocks a network can lose whole, keeping every shape right: what `remove_blocks` removes.

Found from the module tree, torch.fx and one probe forward pass (``find_blocks``), three kinds:

- ``identity``: a residual block ``y = g(x + f(x))`` (LargeKernelBlock, a ResNet basic block with
  an identity shortcut, an NB201 cell with a skip edge, a transformer block's two adds): its
  residual branches go and what is left -- the input through the parameter-free ops around the
  adds (a ReLU after the add) -- replaces it; often that is plain ``nn.Identity``.
- ``projection``: the same with a shortcut module (a strided 1x1 conv-BN, NB201's pool + 1x1
  conv): the block becomes that shortcut (and the ops after the add), shapes kept.
- ``cell``: a multi-branch module in a stack (an item of an ``nn.Sequential`` / ``nn.ModuleList``)
  whose output has the shape of one of its inputs (NB201 cells without a skip edge, NASNet/DARTS
  normal cells). It is replaced by that input: a NASNet cell reads ``(s0, s1)`` and its output
  becomes the next ``s1``, so a removed cell passes ``s1`` on and the next cell reads
  ``(s0_prev, s1)`` where it read ``(s1, cell(s0, s1))`` -- the states one step earlier, of the
  same shapes. Reduction cells change the shape and are never candidates.

How a residual block is recognised (`_residual`): the block's own forward is traced by torch.fx
with every child module a leaf. "Trunk" nodes are the input, an optional shortcut (a child with
parameters applied to the input alone) and parameter-free ops on trunk nodes; an add of a trunk
node and a non-trunk node is a residual add and becomes its trunk operand. The block is removable
when its output is then a trunk node: nothing with parameters is left but the shortcut. The
replacement is checked on the probe input (same output shape; a "shortcut" that outputs zeros,
NB201's ``none`` edge, is no shortcut). In-place ops on the trunk are made out-of-place: the
replacement reads its caller's tensor, which the original never modified.

Not considered: modules called more than once per forward pass (shared weights), modules whose
forward torch.fx cannot trace (data-dependent control flow; they are named in the refusal when
nothing is found), and blocks nested inside another removable block (only the outermost counts).

Replacements keep the names of what they keep (a GraphModule holds ``shortcut.0`` under the
block's name, as the original did), so replaying a record on a fresh copy gives the same
state_dict, and layer names in later passes (structured pruning's ``per_layer``) still resolve.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Block", "BlockSearch", "PassThrough", "find_blocks", "remove_blocks", "set_module", "swapped"]

_ADDS = {operator.add, operator.iadd, torch.add}
_CONCATS = {torch.cat, torch.concat}


class PassThrough(nn.Module):
    """A removed cell: returns its input ``index`` (the state the next cell reads in its place)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return inputs[self.index]

    def extra_repr(self) -> str:
        return f"input {self.index}"


@dataclass(frozen=True)
class Block:
    """One removable block: its module name, kind, stage (parent container and output shape, the
    blocks ``keep_per_stage`` counts together), the parameters its removal saves and the
    conv/linear layers that go with it."""

    name: str
    kind: str  # "identity", "projection" or "cell"
    stage: str
    params: int
    layers: tuple[str, ...]


@dataclass
class BlockSearch:
    """What `find_blocks` found: the blocks in forward order, the module that would replace each
    (sharing the kept submodules with the model), and the modules it could not analyse."""

    blocks: list[Block]
    replacements: dict[str, nn.Module]
    untraceable: list[str]
    modules: int  # modules looked at

    def by_name(self) -> dict[str, Block]:
        return {b.name: b for b in self.blocks}


@dataclass
class _Call:
    inputs: tuple[torch.Tensor, ...]
    output_shape: tuple[int, ...]
    calls: int = 1
    plain: bool = True  # tensors in, one tensor out, no keyword arguments


def find_blocks(model: nn.Module, input_shape: Sequence[int]) -> BlockSearch:
    """The removable blocks of ``model`` in forward order (see the module docstring)."""
    calls = _probe_calls(model, input_shape)
    modules = dict(model.named_modules())
    found: dict[str, tuple[str, nn.Module]] = {}
    untraceable: list[str] = []
    looked = 0
    for name, module in modules.items():  # outer modules first: a block's own blocks are not looked at
        call = calls.get(name)
        if call is None or not name or call.calls != 1 or not call.plain or not _has_children_with_params(module):
            continue
        if any(name.startswith(other + ".") for other in found):  # nested in a block already found
            continue
        looked += 1
        try:
            graph = _trace(module)
        except Exception:  # noqa: BLE001 - fx refuses data-dependent control flow: not a candidate
            untraceable.append(name)
            continue
        hit = _residual(module, graph, call) or _cell(name, model, module, graph, call)
        if hit is not None:
            found[name] = hit
    blocks, replacements = [], {}
    ran = list(calls)  # completion order: forward order for blocks that do not nest
    for name, (kind, repl) in sorted(found.items(), key=lambda item: ran.index(item[0])):
        call = calls[name]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        stage = f"{parent or '<root>'}@{'x'.join(map(str, call.output_shape[1:]))}"
        kept = {n for n, _ in repl.named_modules()}
        layers = tuple(f"{name}.{n}" for n, m in modules[name].named_modules()
                       if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and n not in kept)
        saved = _params(modules[name]) - _params(repl)
        blocks.append(Block(name, kind, stage, saved, layers))
        replacements[name] = repl
    return BlockSearch(blocks, replacements, untraceable, looked)


def remove_blocks(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> list[Block]:
    """Replace the blocks ``names`` of ``model`` in place; returns them as found (a `KeyError`
    names one that is not a removable block). All are found on the model before any goes, so the
    result does not depend on the order of ``names``."""
    search = find_blocks(model, input_shape)
    known = search.by_name()
    chosen = [known[n] for n in names]  # KeyError: not a block
    for block in chosen:
        set_module(model, block.name, search.replacements[block.name])
    return chosen


@contextlib.contextmanager
def swapped(model: nn.Module, search: BlockSearch, name: str) -> Iterator[None]:
    """``model`` with block ``name`` replaced for the duration (the probe of one removal)."""
    original = model.get_submodule(name)
    set_module(model, name, search.replacements[name])
    try:
        yield
    finally:
        set_module(model, name, original)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------------
# the probe pass


def _probe_calls(model: nn.Module, input_shape: Sequence[int]) -> dict[str, _Call]:
    """Per module (in the order they first run): its first call's tensor inputs (kept only for
    containers holding parameters, the possible blocks: a large model's every activation would
    not fit), its output shape, how often it ran, and whether the call was plain (tensors in, one
    tensor out)."""
    calls: dict[str, _Call] = {}
    containers = {n for n, m in model.named_modules() if _has_children_with_params(m)}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name in calls:
                calls[name].calls += 1
                return
            tensors = all(isinstance(a, torch.Tensor) for a in args) and bool(args)
            plain = tensors and not kwargs and isinstance(output, torch.Tensor)
            inputs = tuple(a.detach().clone() for a in args) if plain and name in containers else ()
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            calls[name] = _Call(inputs, shape, 1, plain)
        return record

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()]
    flags = {n: m.training for n, m in model.named_modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for n, m in model.named_modules():
            m.training = flags[n]
    return calls


# ---------------------------------------------------------------------------------------------
# recognising blocks


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward; every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.Graph:
    return _ChildrenAsLeaves().trace(module)


def _residual(module: nn.Module, graph: fx.Graph, call: _Call) -> tuple[str, nn.Module] | None:
    """("identity" | "projection", replacement) when ``module`` is a residual block."""
    if len(call.inputs) != 1:
        return None
    shortcuts = [n for n in graph.nodes if n.op == "call_module" and _params(module.get_submodule(n.target))
                 and n.all_input_nodes and all(i.op == "placeholder" for i in n.all_input_nodes)]
    shortcuts.sort(key=lambda n: _params(module.get_submodule(n.target)))
    for shortcut in (None, *shortcuts):
        repl = _without_branches(module, graph, shortcut)
        if repl is not None and _keeps_shape(repl, call):
            return ("identity" if shortcut is None else "projection"), repl
    return None


def _without_branches(module: nn.Module, graph: fx.Graph, shortcut: fx.Node | None) -> nn.Module | None:
    """The block with every residual add replaced by its trunk operand, or None when something
    with parameters other than ``shortcut`` would be left (see the module docstring)."""
    trunk: set[fx.Node] = set()
    residual: dict[fx.Node, fx.Node] = {}
    output = None
    for node in graph.nodes:
        if node.op == "placeholder" or node is shortcut:
            trunk.add(node)
        elif node.op == "output":
            output = node
        elif _is_add(node) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            a, b = node.args[:2]
            if (a in trunk) != (b in trunk):
                residual[node] = a if a in trunk else b
                trunk.add(node)
            elif a in trunk and b in trunk:
                trunk.add(node)
        elif node.all_input_nodes and all(i in trunk for i in node.all_input_nodes) and _parameter_free(module, node):
            trunk.add(node)
    if output is None or not residual or not isinstance(output.args[0], fx.Node) or output.args[0] not in trunk:
        return None
    gm = fx.GraphModule(module, copy.deepcopy(graph))
    by_name = {n.name: n for n in gm.graph.nodes}
    for node, keep in residual.items():  # in graph order; an add whose trunk is an earlier add
        while keep in residual:  # reads what that add became
            keep = residual[keep]
        new, kept = by_name[node.name], by_name[keep.name]
        new.replace_all_uses_with(kept)
        gm.graph.erase_node(new)
    gm.graph.eliminate_dead_code()
    _out_of_place(gm)
    gm.recompile()
    gm.delete_all_unused_submodules()
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    return nn.Identity() if not body else gm


def _cell(name: str, model: nn.Module, module: nn.Module, graph: fx.Graph, call: _Call) -> tuple[str, nn.Module] | None:
    """("cell", replacement) when ``module`` is a same-shape multi-branch module in a stack."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    if not isinstance(parent, nn.Sequential | nn.ModuleList):
        return None
    merges = any((_is_add(n) or (n.op == "call_function" and n.target in _CONCATS))
                 and sum(isinstance(a, fx.Node) for a in _flat(n.args)) >= 2 for n in graph.nodes)
    same = [i for i, x in enumerate(call.inputs) if tuple(x.shape) == call.output_shape]
    if not merges or not same:
        return None
    repl: nn.Module = nn.Identity() if len(call.inputs) == 1 else PassThrough(same[-1])
    return "cell", repl


def _keeps_shape(repl: nn.Module, call: _Call) -> bool:
    """Whether the replacement runs on the block's probe input, gives its output shape and, from a
    nonzero input, a nonzero output."""
    flags = {n: m.training for n, m in repl.named_modules()}
    try:
        repl.eval()
        with torch.no_grad():
            out = repl(*[x.clone() for x in call.inputs])
    except Exception:  # noqa: BLE001 - a replacement that does not run is no replacement
        return False
    finally:
        for n, m in repl.named_modules():
            m.training = flags[n]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != call.output_shape:
        return False
    # NB201's `none` edge (x * 0) is parameter-free: a "shortcut" through it carries nothing
    return bool(out.abs().max() > 0) or not bool(call.inputs[0].abs().max() > 0)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return not node.kwargs  # torch.add(a, b, alpha=2) is no residual add
    return node.op == "call_method" and node.target == "add" and not node.kwargs


def _parameter_free(module: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return not _params(module.get_submodule(str(node.target)))
    if node.op == "call_method":
        return not str(node.target).endswith("_")  # x.relu_(): an in-place method on the trunk
    return node.op == "call_function"


def _out_of_place(gm: fx.GraphModule) -> None:
    """In-place modules and functions left in the replacement work on the caller's tensor, which
    the block itself never modified (its in-place ReLU ran on the sum): make them out-of-place."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            if getattr(sub, "inplace", False):
                fresh = copy.deepcopy(sub)
                fresh.inplace = False
                new_name = f"{str(node.target).replace('.', '_')}_out_of_place"
                gm.add_submodule(new_name, fresh)
                node.target = new_name
        elif node.op == "call_function" and node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}


def _flat(args: Any) -> list[Any]:
    out: list[Any] = []
    for a in args:
        out.extend(_flat(a) if isinstance(a, list | tuple) else [a])
    return out


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _has_children_with_params(module: nn.Module) -> bool:
    return any(True for _ in module.children()) and _params(module) > 0
