"""The data model of channel dependency groups: roles, member slices, groups, and the
union-find table the graph walk of :mod:`graphkd.passes.channels` fills.

Kept apart from the walk so that passes consuming groups (``prune``) depend on these few types
only.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import fx


class Role(Enum):
    """How a module holds a group's channels."""

    OUT = "out"              # a layer produces them: filters of its weight (and its bias)
    IN = "in"                # a layer consumes them: input slices of its weight
    DEPTHWISE = "depthwise"  # a depthwise conv carries them through: filters, bias and groups
    NORM = "norm"            # a per-channel norm or PReLU: affine parameters and running stats


@dataclass(frozen=True)
class Member:
    """One place a group's channels live: group channel ``c`` occupies indices
    ``offset + c * span ... offset + (c + 1) * span - 1`` of dimension ``dim`` of ``module``.

    ``dim`` is a weight dimension for layer roles and the activation's channel dimension for
    ``NORM`` (whose parameters are always sliced along their dim 0). ``span`` > 1 after a
    ``flatten``: one channel became ``span`` consecutive features of a linear layer.
    """

    module: str
    role: Role
    dim: int
    offset: int = 0
    span: int = 1

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices in the module's dimension covered by the group channels ``channels``."""
        base = self.offset + channels.long() * self.span
        return (base[:, None] + torch.arange(self.span)).flatten()

    def __str__(self) -> str:
        where = f"[{self.offset}:+{self.span}x]" if (self.offset or self.span > 1) else ""
        return f"{self.module}:{self.role.value}{where}"


@dataclass
class ChannelGroup:
    """Channels that must be pruned together, with every module slice that holds them.

    ``blocks`` > 1 means the channels form that many equal contiguous blocks (grouped convs,
    GroupNorm) and pruning must remove the same number from each block. ``blockers`` says why the
    group may not be pruned at all (empty when it may).
    """

    size: int
    members: list[Member] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    blocks: int = 1

    @property
    def prunable(self) -> bool:
        return not self.blockers

    def with_role(self, *roles: Role) -> list[Member]:
        return [m for m in self.members if m.role in roles]

    def describe(self) -> dict:
        """A plain summary for statistics and dumps."""
        return {"channels": self.size, "members": [str(m) for m in self.members],
                "blocked_by": list(self.blockers), "blocks": self.blocks}


@dataclass
class ChannelGroups:
    """The result of :func:`channel_groups`.

    ``input_layers``: layers whose input carries no prunable channel (they read the model input),
    the "first convs" of NNCF's ``prune_first_conv``. ``layer_nodes``: module path -> its nodes.
    """

    groups: list[ChannelGroup]
    input_layers: set[str]
    layer_nodes: dict[str, list[fx.Node]]


class GroupTable:
    """Union-find over groups; merging keeps members, blockers and block structure of both."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []
        self.sites: dict[tuple, int] = {}

    def new(self, size: int, blocks: int = 1) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(size, blocks=blocks))
        return len(self.parent) - 1

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def size(self, gid: int) -> int:
        return self.groups[self.find(gid)].size

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        keep, gone = (a, b) if a < b else (b, a)
        self.parent[gone] = keep
        kept, other = self.groups[keep], self.groups[gone]
        kept.members += [m for m in other.members if m not in kept.members]
        kept.blockers += other.blockers
        self.constrain(keep, other.blocks)

    def constrain(self, gid: int, blocks: int) -> None:
        group = self.groups[self.find(gid)]
        blocks = math.lcm(group.blocks, blocks)
        if group.size % blocks:
            group.blockers.append(f"{group.size} channels cannot form {blocks} equal blocks")
        else:
            group.blocks = blocks

    def add(self, gid: int, member: Member) -> None:
        """Add ``member``; a module slice already in another group merges the two groups
        (a layer called twice, a conv reading two tensors that must agree)."""
        key = (member.module, member.role, member.dim, member.offset, member.span)
        if key in self.sites:
            self.union(self.sites[key], gid)
        self.sites[key] = self.find(gid)
        group = self.groups[self.find(gid)]
        if member not in group.members:
            group.members.append(member)

    def block(self, gid: int, reason: str) -> None:
        group = self.groups[self.find(gid)]
        if reason not in group.blockers:
            group.blockers.append(reason)

    def result(self) -> list[ChannelGroup]:
        roots = sorted({self.find(g) for g in range(len(self.parent))})
        return [self.groups[r] for r in roots if self.groups[r].members]


SiteKey = tuple[str, Role, int]


def member_sites(
        groups: Iterable[ChannelGroup]) -> dict[SiteKey, list[tuple[ChannelGroup, Member]]]:
    """Members of ``groups`` by ``(module, role, dim)``: one site is one tensor dimension to
    mask and slice, possibly shared by several groups (a conv reading a concatenation)."""
    sites: dict[SiteKey, list[tuple[ChannelGroup, Member]]] = {}
    for group in groups:
        for member in group.members:
            sites.setdefault((member.module, member.role, member.dim), []).append((group, member))
    return sites
