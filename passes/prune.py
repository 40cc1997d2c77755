"""Structured filter pruning with physical channel removal (pass name ``prune``).

The pass groups coupled channels (:mod:`graphkd.passes.channels`), ranks each group's channels by
the summed importance of its filters, and masks the least important ones while the student
fine-tunes: every site of a group (filters and bias of producers, input slices of consumers,
depthwise filters, per-channel norm outputs) gets a :class:`ChannelMask`. Masking the consumers'
input slices too makes the masked student exactly the pruned network, whatever the activations
between producer and consumer do with a zero channel. ``export()`` then removes the masked
channels physically, so the exported model is smaller and faster, unlike NNCF's zeroed filters.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import fx, nn

from graphkd.errors import ConfigError
from graphkd.flops import count_flops, count_params, node_macs
from graphkd.graph import (ScopeFilter, flat_name, insert_module_after, insert_module_before,
                           insert_on_weight, layer_of, scopes_of, weight_transforms)
from graphkd.passes.channel_surgery import kept_numel, slice_module
from graphkd.passes.channel_model import (ChannelGroup, ChannelGroups, Role, SiteKey,
                                          member_sites)
from graphkd.passes.channels import channel_groups
from graphkd.passes.filter_masks import (CRITERIA, ChannelMask, filter_importance, keep_count,
                                         select_channels)
from graphkd.passes.prune_nncf import translate_nncf_pruning
from graphkd.pipeline import Pass, PassContext
from graphkd.schedule import LevelSchedule, ScheduleSpec, validate_schedule

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.5


class PruningController:
    """Keeps one prune pass's masks at its schedule's level, reports on them, and exports.

    Holds the student only for training-time updates; :meth:`export` works on the copy it gets and
    finds everything there by name. ``active`` are the groups being pruned; ``excluded`` maps the
    index of every other group to why it is not.
    """

    def __init__(self, gm: fx.GraphModule, analysis: ChannelGroups, active: list[int],
                 excluded: dict[int, str], criterion: str, round_to: int) -> None:
        self.gm = gm
        self.groups = analysis.groups
        self.active = active
        self.excluded = excluded
        self.criterion = criterion
        self.round_to = round_to
        self.sites = member_sites(self.groups[i] for i in active)
        self.modules = {path: gm.get_submodule(path) for path, _, _ in self.sites}
        self.sizes = {key: _site_size(gm, key) for key in self.sites}
        self.flops_before = count_flops(gm)
        self.params_before = count_params(gm)
        self.layer_macs = {path: sum(node_macs(gm, n) for n in nodes)
                           for path, nodes in analysis.layer_nodes.items()}
        self.transforms = {path: list({id(t): t for n in analysis.layer_nodes.get(path, [])
                                       if n.op == "call_function"
                                       for t in weight_transforms(gm, n)}.values())
                           for path, _, _ in self.sites}
        self.transform_cache: dict[tuple, int] = {}
        self.masks: dict[SiteKey, list[str]] = {}
        self.bias_masks: dict[SiteKey, list[str]] = {}
        self.level = 0.0

    # -- building ---------------------------------------------------------------------------
    def insert_masks(self, analysis: ChannelGroups) -> None:
        """Put a :class:`ChannelMask` on every site: weight edges of layers (and their bias
        edges for filters), and after each call of a per-channel norm."""
        gm = self.gm
        for key in self.sites:
            path, role, dim = key
            module = gm.get_submodule(path)
            base = f"prune_masks.{flat_name(path)}_{role.value}"
            if role is Role.NORM:
                calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
                for node in calls:
                    mask = insert_module_after(gm, node, base, ChannelMask(dim, self.sizes[key]))
                    self.masks.setdefault(key, []).append(mask.target)
                continue
            nodes = analysis.layer_nodes[path]
            for i, node in enumerate(nodes):
                mask = ChannelMask(dim, module.weight.shape[dim])
                layer = insert_on_weight(gm, node, f"{base}_weight", mask)
                nodes[i] = layer
                self.masks.setdefault(key, []).append(layer.args[1].target)
                if role is not Role.IN and isinstance(layer.args[2], fx.Node):
                    bias = insert_module_before(gm, layer, f"{base}_bias",
                                                ChannelMask(0, module.bias.shape[0]), arg_index=2)
                    self.bias_masks.setdefault(key, []).append(bias.target)

    # -- selection --------------------------------------------------------------------------
    def keep_counts(self, ratio: float) -> dict[int, int]:
        return {i: keep_count(self.groups[i].size, ratio, self.round_to, self.groups[i].blocks)
                for i in self.active}

    def importance(self, group: ChannelGroup) -> torch.Tensor:
        """Sum over the group's filters (producers and depthwise convs) of their importance."""
        channels = torch.arange(group.size)
        total = torch.zeros(group.size)
        for member in group.with_role(Role.OUT, Role.DEPTHWISE):
            weight = self.gm.get_submodule(member.module).weight
            scores = filter_importance(weight, member.dim, self.criterion).cpu()
            total += scores[member.indices(channels)]
        return total

    def kept_channels(self, ratio: float) -> dict[int, torch.Tensor]:
        """Bool mask of the kept channels of each active group at ``ratio``."""
        counts = self.keep_counts(ratio)
        return {i: select_channels(self.importance(self.groups[i]), counts[i],
                                   self.groups[i].blocks) for i in self.active}

    def update_masks(self, level: float) -> None:
        """Recompute every mask from the current weights at pruning ratio ``level``."""
        self.level = level
        site_masks = self.site_masks(self.kept_channels(level))
        with torch.no_grad():
            for key, values in site_masks.items():
                for name in self.masks[key] + self.bias_masks.get(key, []):
                    mask = self.gm.get_submodule(name).mask
                    mask.copy_(values)

    def site_masks(self, kept: Mapping[int, torch.Tensor]) -> dict[SiteKey, torch.Tensor]:
        """0/1 vectors over each site's dimension from the groups' kept channels."""
        index = {id(self.groups[i]): i for i in self.active}
        out = {}
        for key, entries in self.sites.items():
            values = torch.ones(self.sizes[key])
            for group, member in entries:
                dropped = (~kept[index[id(group)]]).nonzero().flatten()
                values[member.indices(dropped)] = 0.0
            out[key] = values
        return out

    # -- estimates --------------------------------------------------------------------------
    def site_sizes(self, counts: Mapping[int, int]) -> dict[SiteKey, int]:
        """Entries each site keeps when group ``i`` keeps ``counts[i]`` channels."""
        index = {id(self.groups[i]): i for i in self.active}
        sizes = {}
        for key, entries in self.sites.items():
            removed = sum((group.size - counts[index[id(group)]]) * member.span
                          for group, member in entries)
            sizes[key] = self.sizes[key] - removed
        return sizes

    def estimate(self, counts: Mapping[int, int]) -> tuple[int, int]:
        """``(FLOPs, parameters)`` of the pruned student, from the propagated shapes."""
        sizes = self.site_sizes(counts)
        by_module: dict[str, dict[tuple[Role, int], int]] = {}
        for (path, role, dim), size in sizes.items():
            by_module.setdefault(path, {})[(role, dim)] = size
        macs = 0
        for path, layer_macs in self.layer_macs.items():
            factor = 1.0
            for (role, dim), size in by_module.get(path, {}).items():
                factor *= size / self.sizes[(path, role, dim)]
            macs += round(layer_macs * factor)
        flops = self.flops_before - 2 * (sum(self.layer_macs.values()) - macs)
        params = self.params_before - sum(
            _own_params(self.modules[path]) - kept_numel(self.modules[path], s)
            + self.transform_params_removed(path, s) for path, s in by_module.items())
        return flops, params

    def transform_params_removed(self, path: str, sizes: Mapping[tuple[Role, int], int]) -> int:
        """Parameters the export slices off modules of earlier passes on ``path``'s weight edge
        (per-channel quantizer scales...), measured on a copy through their own
        ``select_weight_channels`` so any such module is counted right."""
        key = (path, *sorted((role.value, dim, size) for (role, dim), size in sizes.items()))
        if key not in self.transform_cache:
            removed = 0
            for transform in self.transforms.get(path, []):
                if not hasattr(transform, "select_weight_channels"):
                    continue
                sliced = copy.deepcopy(transform)
                for (role, dim), size in sizes.items():
                    if role is not Role.NORM:
                        sliced.select_weight_channels(dim, torch.arange(size))
                removed += count_params(transform) - count_params(sliced)
            self.transform_cache[key] = removed
        return self.transform_cache[key]

    def ratio_for_flops(self, target: float) -> float:
        """The smallest ratio whose pruned FLOPs remove at least ``target`` of the total
        (bisection: removed FLOPs only grow with the ratio)."""
        def removed(ratio: float) -> float:
            return 1.0 - self.estimate(self.keep_counts(ratio))[0] / max(self.flops_before, 1)

        lo, hi = 0.0, 1.0 - 1e-6
        best = removed(hi)
        if best < target:
            raise ConfigError(
                f"cannot remove {target:.1%} of the FLOPs: pruning every prunable group as far "
                f"as possible removes {best:.1%} ({len(self.active)} of {len(self.groups)} groups "
                f"prunable; see statistics()['prune']['groups'] for why the others are not). "
                f"Lower flops_target or allow more groups (prune_first_conv, "
                f"prune_downsample_convs, scopes)", "flops_target")
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if removed(mid) >= target else (mid, hi)
        return hi

    # -- reporting --------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        counts = self.keep_counts(self.level)
        flops, params = self.estimate(counts)
        groups = []
        for i, group in enumerate(self.groups):
            entry = group.describe()
            entry["kept"] = counts.get(i, group.size)
            entry["status"] = "pruned" if i in counts else (
                "blocked" if group.blockers else "excluded")
            if i in self.excluded:
                entry["excluded_by"] = self.excluded[i]
            groups.append(entry)
        layers = {}
        for (path, role, dim), size in self.site_sizes(counts).items():
            if role is not Role.NORM:
                key = "in_channels" if role is Role.IN else "out_channels"
                layers.setdefault(path, {})[key] = [self.sizes[(path, role, dim)], size]
        total = sum(self.groups[i].size for i in self.active)
        return {
            "level": self.level,
            "criterion": self.criterion,
            "achieved_ratio": 1 - sum(counts.values()) / total if total else 0.0,
            "flops": {"before": self.flops_before, "after": flops,
                      "ratio": flops / max(self.flops_before, 1)},
            "params": {"before": self.params_before, "after": params,
                       "ratio": params / max(self.params_before, 1)},
            "layers": layers,
            "groups": groups,
        }

    # -- export -----------------------------------------------------------------------------
    def export(self, exported: fx.GraphModule) -> None:
        """Export step: slice every site to its kept channels and drop the mask nodes."""
        keeps: dict[str, dict[tuple[Role, int], torch.Tensor]] = {}
        for key, names in self.masks.items():
            mask = exported.get_submodule(names[0]).mask
            keeps.setdefault(key[0], {})[key[1:]] = mask.nonzero().flatten().cpu()
        mine = {n for names in (*self.masks.values(), *self.bias_masks.values()) for n in names}
        ours = {id(exported.get_submodule(n)) for n in mine}
        for node in list(exported.graph.nodes):
            info = layer_of(exported, node)
            if info is None or info[0] not in keeps:
                continue
            for transform in weight_transforms(exported, node):
                if id(transform) in ours:
                    continue  # removed below
                if hasattr(transform, "select_weight_channels"):
                    for (role, dim), keep in keeps[info[0]].items():
                        if role is not Role.NORM:
                            transform.select_weight_channels(dim, keep)
            if any(role is Role.DEPTHWISE for role, _ in keeps[info[0]]):
                node.update_arg(6, len(keeps[info[0]][(Role.DEPTHWISE, 0)]))
        for node in list(exported.graph.nodes):
            if node.op == "call_module" and node.target in mine:
                node.replace_all_uses_with(node.args[0])
                exported.graph.erase_node(node)
        for path, module_keeps in keeps.items():
            module = _find_module(exported, path)
            if module is not None:  # a later pass may have folded it away (BatchNorm folding)
                slice_module(module, module_keeps)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _find_module(gm: nn.Module, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _site_size(gm: fx.GraphModule, key: SiteKey) -> int:
    """Length of a site's dimension: a layer weight dim, or a norm's activation channel dim."""
    path, role, dim = key
    if role is not Role.NORM:
        return gm.get_submodule(path).weight.shape[dim]
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
    return int(node.meta["tensor_meta"].shape[dim])


class Prune(Pass):
    """Structured filter pruning with physical channel removal (pass name ``prune``).

    Options: ``ratio`` fraction of each group's channels removed, in [0, 1) (default 0.5), or
    ``flops_target`` fraction of FLOPs to remove (the ratio is found by bisection on the graph's
    FLOPs); ``criterion`` ``l1`` | ``l2`` | ``geometric_median``; ``init`` starting ratio and
    ``schedule`` (:mod:`graphkd.schedule`) to reach the target gradually; ``prune_first_conv``
    and ``prune_downsample_convs`` (stride > 1) allow the groups of those convs (NNCF's defaults:
    no); ``round_to`` keeps channel counts multiples of N; ``target_scopes`` / ``ignored_scopes``
    select groups by the module paths of their filters (a group is pruned only if all are
    selected).
    """

    name = "prune"
    nncf_algorithm = "filter_pruning"

    def __init__(
        self,
        *,
        ratio: float | None = None,
        flops_target: float | None = None,
        criterion: Literal["l1", "l2", "geometric_median"] = "l2",
        init: float = 0.0,
        schedule: ScheduleSpec | None = None,
        prune_first_conv: bool = False,
        prune_downsample_convs: bool = False,
        round_to: int = 1,
        target_scopes: list[str] | None = None,
        ignored_scopes: list[str] | None = None,
    ) -> None:
        if ratio is not None and flops_target is not None:
            raise ConfigError("give either ratio or flops_target, not both", "flops_target")
        for option, value in (("ratio", ratio), ("flops_target", flops_target), ("init", init)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < 1):
                raise ConfigError(f"must be a fraction in [0, 1), got {value!r}", option)
        if criterion not in CRITERIA:
            raise ConfigError(f"must be one of {', '.join(CRITERIA)}, got {criterion!r}",
                              "criterion")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ConfigError(f"must be an integer >= 1, got {round_to!r}", "round_to")
        self.ratio = float(ratio if ratio is not None else DEFAULT_RATIO)
        if flops_target is None and init > self.ratio:
            raise ConfigError(f"must not exceed ratio ({self.ratio}), got {init}: pruning only "
                              f"grows during training", "init")
        if flops_target is None:
            LevelSchedule(self.ratio, init, schedule)  # checks the schedule against the ratio
        else:
            validate_schedule(schedule)
            if (schedule or {}).get("type") == "multistep":
                raise ConfigError("a multistep schedule lists ratios, so it needs ratio, not "
                                  "flops_target", "schedule.type")
        self.flops_target = flops_target
        self.criterion = criterion
        self.init = float(init)
        self.schedule = dict(schedule or {})
        self.prune_first_conv = prune_first_conv
        self.prune_downsample_convs = prune_downsample_convs
        self.round_to = round_to
        self.target_scopes = list(target_scopes or [])
        self.ignored_scopes = list(ignored_scopes or [])

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        select = ScopeFilter(scopes_of(gm), self.target_scopes, self.ignored_scopes)
        analysis = channel_groups(gm)
        active, excluded = [], {}
        for i, group in enumerate(analysis.groups):
            reason = self.exclusion(gm, group, analysis, select)
            if reason:
                excluded[i] = reason
            elif group.prunable:
                active.append(i)
        controller = PruningController(gm, analysis, active, excluded, self.criterion,
                                       self.round_to)
        target = self.ratio
        if self.flops_target is not None:
            target = controller.ratio_for_flops(self.flops_target)
            if self.init > target:
                raise ConfigError(f"must not exceed the ratio {target:.4g} that reaches "
                                  f"flops_target, got {self.init}", "init")
        schedule = LevelSchedule(target, self.init, self.schedule)
        controller.insert_masks(analysis)
        controller.update_masks(schedule.level)
        schedule.on_change(controller.update_masks)
        key = self.name
        while key in ctx.states or key in ctx.statistics:
            key += "_"
        schedule.register(ctx, key)
        ctx.statistics[key] = controller.statistics
        ctx.on_export(controller.export)
        gm.graph.lint()
        gm.recompile()
        log.info("prune: %d of %d channel groups pruned at ratio %.4g (target %.4g)",
                 len(active), len(analysis.groups), schedule.level, target)

    def exclusion(self, gm: fx.GraphModule, group: ChannelGroup, analysis: ChannelGroups,
                  select: ScopeFilter) -> str | None:
        """Why the options keep ``group`` from being pruned (None when they do not)."""
        for member in group.with_role(Role.OUT, Role.DEPTHWISE):
            if not select(member.module):
                return f"{member.module} is outside target_scopes/ignored_scopes"
            if member.role is not Role.OUT:
                continue
            if not self.prune_first_conv and member.module in analysis.input_layers:
                return f"{member.module} reads the model input (set prune_first_conv: true)"
            stride = getattr(gm.get_submodule(member.module), "stride", (1,))
            if not self.prune_downsample_convs and any(s > 1 for s in stride):
                return f"{member.module} has stride {stride} (set prune_downsample_convs: true)"
        return None

    @classmethod
    def options_from_nncf(cls, section: Mapping[str, Any]) -> dict[str, Any]:
        """Translate NNCF ``filter_pruning``; see :func:`translate_nncf_pruning`."""
        return translate_nncf_pruning(section)
