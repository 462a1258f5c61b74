"""Channel groups: the units that filter pruning removes, and what removing them costs.

A **channel group** is a set of output channels that must be removed
together: a conv's filters with the BatchNorm that follows, every conv that
adds into the same residual stream, a pointwise conv with the depthwise conv
that consumes it, ... (docs/design.md section 2). Torch-Pruning's
``DependencyGraph`` traces them from one forward pass, so any torchvision-style
CNN works. Channel c of a group is out channel c of its root module, and the
group records, for every parameter tensor involved, which dimension is indexed
by the group's channels:

- ``out_slices``: the out-channel weights and biases of every conv/Linear in
  the group and the weight/bias of every BatchNorm (all along dim 0; a
  depthwise conv's weight too). Zeroing these slices of channel c makes
  channel c's activation exactly zero after BN (and ReLU), so it can then be
  removed without changing the outputs. The Z-step projection and the
  channel norms work on these.
- ``in_dims``: the in-channel weights of the consuming convs/Linears (dim 1),
  which shrink when the group does, with the number of elements each channel
  owns there (1, or H*W for a Linear after a flatten); only the cost model
  needs them.

Groups that Torch-Pruning couples to layers we cannot slice channel by
channel (transposed or grouped convs with 1 < groups < channels, LayerNorm,
attention, a BatchNorm after a concatenation at a non-zero offset as in
DenseNet, ...) are left out: those channels stay unpruned. So are channels
that reach the model's output: the classifier's outputs (the last
``nn.Linear``) are never pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch_pruning as tp
from torch import nn

from lis.measure import eval_mode

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER = _CONV + (nn.Linear,)
_NORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are pruned together.

    ``name``: the root module (the group's first conv/Linear in
    ``model.named_modules()`` order); channel c is its out channel c.
    ``out_slices``: (parameter name, dim) of every tensor whose slice c along
    dim belongs to channel c. ``in_dims``: (parameter name, dim, elements per
    channel) of the consumers' in-channel weights that shrink with the group
    (elements per channel is 1, or H*W for a Linear after a flatten).
    """
    name: str
    num_channels: int
    out_slices: tuple[tuple[str, int], ...]
    in_dims: tuple[tuple[str, int, int], ...]


def find_groups(model: nn.Module, example_input: torch.Tensor, ignored: Sequence[str] = ()) -> list[ChannelGroup]:
    """Every prunable channel group of ``model``, ordered by the position of its root in the model.

    ``example_input`` is a batch the model accepts (its values do not matter).
    Modules named in ``ignored`` and the classifier (the last ``nn.Linear``)
    keep all their output channels. The model is traced in eval mode and left
    as it was.
    """
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    ignored_modules = [modules[n] for n in ignored] + [m for m in names if isinstance(m, nn.Linear)][-1:]

    dg = dependency_graph(model, example_input)
    rank = {m: i for i, m in enumerate(names)}
    groups = [_channel_group(dg, tp_group, names, rank)
              for tp_group in dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=_LAYER)]
    return sorted((g for g in groups if g is not None), key=lambda g: rank[modules[g.name]])


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode.

    Train/eval flags and ``requires_grad`` flags are restored afterwards: the
    trace follows autograd, so a frozen model (a teacher) is unfrozen for it.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            # a tuple, because Torch-Pruning would unpack a bare tensor along the batch dimension
            return tp.DependencyGraph().build_dependency(model, (example_input,), verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _channel_group(dg: tp.DependencyGraph, tp_group, names: dict[nn.Module, str],
                   rank: dict[nn.Module, int]) -> ChannelGroup | None:
    """Translate a Torch-Pruning group into a ChannelGroup, or None if it touches a layer we cannot slice."""
    num_channels = len(tp_group[0].idxs)
    if any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in tp_group):
        return None  # pruning would change the shape of the model's output
    # Torch-Pruning's own nodes (add, concat, flatten, ...) are not model modules and own no
    # parameters; the rest is visited in model order, so the root is the first conv/Linear found
    members = sorted((item for item in tp_group if item.dep.target.module in names),
                     key=lambda item: rank[item.dep.target.module])
    out_slices, in_dims, roots = [], [], []
    for dep, idxs in members:
        module, name = dep.target.module, names[dep.target.module]
        if dg.is_out_channel_pruning_fn(dep.handler):
            # depthwise convs and BatchNorms prune "in" and "out" with the same function: they land here
            if not (_sliceable(module) and list(idxs) == list(range(num_channels))):
                return None
            out_slices += [(_join(name, p), 0) for p, _ in module.named_parameters(recurse=False)]
            if isinstance(module, _LAYER):
                roots.append(name)
        elif isinstance(module, _LAYER) and _sliceable(module):
            in_dims.append((_join(name, "weight"), 1, len(idxs) // num_channels))
        else:
            return None
    return ChannelGroup(roots[0], num_channels, tuple(out_slices), tuple(in_dims))


def _sliceable(module: nn.Module) -> bool:
    """Can its channels be removed one at a time (conv with groups 1 or depthwise, Linear, BatchNorm)?"""
    if isinstance(module, _CONV):
        return module.groups == 1 or _depthwise(module)
    return isinstance(module, (nn.Linear, _NORM))


def _depthwise(module: nn.Module) -> bool:
    # Torch-Pruning's definition (torch_pruning.ops.module2type)
    return isinstance(module, _CONV) and module.groups == module.out_channels > 1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def group_tensors(model: nn.Module, group: ChannelGroup) -> list[tuple[torch.Tensor, int]]:
    """The live parameters of ``group.out_slices`` with their channel dims (differentiable)."""
    params = dict(model.named_parameters())
    return [(params[name], dim) for name, dim in group.out_slices]


def channel_norms(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Group L2 norm of each channel over all its out-slices, shape (num_channels,), detached."""
    sq = sum(t.detach().movedim(d, 0).reshape(group.num_channels, -1).pow(2).sum(1)
             for t, d in group_tensors(model, group))
    return sq.sqrt()


class CostModel:
    """Per-sample MACs and parameter count of the model after pruning, without pruning it.

    Every parameter shrinks along its grouped dims (``out_slices`` and
    ``in_dims``) by the channels its groups give up; a conv/Linear costs its
    (shrunk) weight's numel times its output positions per sample (H*W for a
    2-D conv, L for a 1-D one, 1 for a Linear on vectors). MACs count only
    convs and Linears, as ``lis.measure.count_macs`` does; parameters count
    every parameter, as ``lis.measure.count_params`` does.
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor):
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        # (param, dim) -> (group, elements per channel) of each group indexing it; a dim can be
        # shared by several groups (the in-channels of a conv after a concatenation)
        self.dims: dict[tuple[str, int], list[tuple[ChannelGroup, int]]] = {}
        for g in groups:
            for name, dim, per_channel in [(n, d, 1) for n, d in g.out_slices] + list(g.in_dims):
                self.dims.setdefault((name, dim), []).append((g, per_channel))
        self.positions = _output_positions(model, example_input)

    def shape(self, name: str, keep: dict[str, int]) -> tuple[int, ...]:
        """Shape of parameter ``name`` after keeping ``keep[g]`` channels of each group g."""
        shape = list(self.shapes[name])
        for dim in range(len(shape)):
            for g, per_channel in self.dims.get((name, dim), ()):
                shape[dim] -= (g.num_channels - keep.get(g.name, g.num_channels)) * per_channel
        return tuple(shape)

    def params(self, keep: dict[str, int]) -> int:
        """Number of parameters after pruning to ``keep`` (groups not in ``keep`` keep all channels)."""
        return sum(math.prod(self.shape(name, keep)) for name in self.shapes)

    def macs(self, keep: dict[str, int]) -> int:
        """Per-sample multiply-accumulates after pruning to ``keep`` (groups not in ``keep`` keep all channels)."""
        return sum(math.prod(self.shape(_join(m, "weight"), keep)) * n for m, n in self.positions.items())


def _output_positions(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Output positions per sample of every conv/Linear (summed over calls), from one eval-mode forward."""
    positions: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            positions[name] = positions.get(name, 0) + output[0].numel() // module.weight.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, _LAYER)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return positions
