"""Level schedules: how a compression level (sparsity, pruning ratio) moves from ``init`` to
``target`` while the student fine-tunes.

Raising the level gradually lets training recover between steps, which is why sparsity and
pruning passes share these schedules. A schedule counts *steps*: one ``Compressed.epoch_step()``
(the default, ``per: epoch``) or one ``Compressed.step()`` (``per: step``). With ``t`` the number
of steps taken so far and ``N = steps``:

``constant`` (the default)
    ``level = target`` from the start; ``init`` is not used.
``exponential``
    The kept fraction ``1 - level`` decays geometrically from ``1 - init`` to ``1 - target``::

        level(t) = 1 - (1 - init) * ((1 - target) / (1 - init)) ** (t / N)

    so each step removes the same *fraction of what is left* (NNCF's exponential sparsity
    schedule has this shape). Early steps remove more weights than late ones, in absolute terms.
``polynomial`` (``power``, default 3)
    ``level(t) = target + (init - target) * (1 - t / N) ** power``: fast at first, flat near the
    end (Zhu & Gupta, 2017, "To prune, or not to prune").
``multistep`` (``steps: [s1, s2, ...]``, ``levels: [l1, l2, ...]``)
    ``level = init`` for ``t < s1``, ``l_i`` for ``s_i <= t < s_(i+1)``; the last level must be the
    target.

For every type ``level(t) = target`` once ``t >= N`` (the last step of multistep), forever.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from .errors import ConfigError

if TYPE_CHECKING:
    from .pipeline import PassContext

log = logging.getLogger(__name__)

SCHEDULE_TYPES = ("constant", "exponential", "polynomial", "multistep")
SCHEDULE_UNITS = ("epoch", "step")
DEFAULT_POWER = 3.0

# Keys each schedule type accepts besides `type` and `per`, and which of them are required.
_TYPE_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "constant": (set(), set()),
    "exponential": ({"steps"}, {"steps"}),
    "polynomial": ({"steps", "power"}, {"steps"}),
    "multistep": ({"steps", "levels"}, {"steps", "levels"}),
}


class ScheduleSpec(TypedDict, total=False):
    """The ``schedule`` option of the sparsify and prune passes."""

    type: Literal["constant", "exponential", "polynomial", "multistep"]
    steps: int | list[int]
    power: float
    levels: list[float]
    per: Literal["epoch", "step"]


def validate_schedule(spec: Mapping[str, Any] | None, path: str = "schedule") -> None:
    """Raise :class:`ConfigError` at ``path.<key>`` unless ``spec`` is a usable schedule.

    Checks what a type hint cannot: the keys each type needs or forbids, ``steps`` being an
    integer (exponential, polynomial) or an increasing list (multistep), and value ranges.
    """
    if spec is None:
        return
    if not isinstance(spec, Mapping):
        raise ConfigError(f"must be a mapping like {{type: polynomial, steps: 10}}, got "
                          f"{type(spec).__name__}", path)
    kind = spec.get("type", "constant")
    if kind not in SCHEDULE_TYPES:
        raise ConfigError(f"unknown schedule type {kind!r}; use one of "
                          f"{', '.join(SCHEDULE_TYPES)}", f"{path}.type")
    allowed, required = _TYPE_KEYS[kind]
    for key in spec:
        if key not in allowed | {"type", "per"}:
            known = ", ".join(sorted(allowed | {"type", "per"}))
            raise ConfigError(f"key {key!r} has no meaning for a {kind!r} schedule; its keys are "
                              f"{known}", f"{path}.{key}")
    missing = sorted(required - set(spec))
    if missing:
        raise ConfigError(f"a {kind!r} schedule needs {', '.join(map(repr, missing))}", path)
    per = spec.get("per", "epoch")
    if per not in SCHEDULE_UNITS:
        raise ConfigError(f"must be 'epoch' or 'step', got {per!r}", f"{path}.per")
    if kind in ("exponential", "polynomial"):
        _check_step_count(spec["steps"], f"{path}.steps")
    if "power" in spec:
        power = spec["power"]
        if isinstance(power, bool) or not isinstance(power, (int, float)) or power <= 0:
            raise ConfigError(f"must be a number > 0, got {power!r}", f"{path}.power")
    if kind == "multistep":
        _check_multistep(spec["steps"], spec["levels"], path)


def _check_step_count(steps: Any, path: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"must be an integer >= 1 (the number of steps to reach the target), "
                          f"got {steps!r}", path)


def _check_multistep(steps: Any, levels: Any, path: str) -> None:
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ConfigError(f"a multistep schedule needs a non-empty list of step numbers, got "
                          f"{steps!r}", f"{path}.steps")
    for i, s in enumerate(steps):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"must be an integer >= 1, got {s!r}", f"{path}.steps[{i}]")
        if i and s <= steps[i - 1]:
            raise ConfigError(f"steps must increase strictly, got {steps[i - 1]} then {s}",
                              f"{path}.steps[{i}]")
    if not isinstance(levels, (list, tuple)) or len(levels) != len(steps):
        count = len(levels) if isinstance(levels, (list, tuple)) else type(levels).__name__
        raise ConfigError(f"needs one level per step: {len(steps)} steps but {count} levels",
                          f"{path}.levels")
    for i, level in enumerate(levels):
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level < 1:
            raise ConfigError(f"must be in [0, 1), got {level!r}", f"{path}.levels[{i}]")


class LevelSchedule:
    """The current level of a pass, moved by training steps or epochs.

    ``level`` is ``init`` before the first step (``target`` for a constant schedule) and
    ``target`` after the last one. Passes react to changes through :meth:`on_change` listeners
    (recompute masks), and :meth:`register` wires the schedule into a :class:`PassContext` so
    ``Compressed.step``/``epoch_step`` advance it and ``Compressed.state_dict`` saves it.

    Example::

        s = LevelSchedule(0.5, spec={"type": "polynomial", "steps": 4, "power": 1})
        s.level                     # 0.0
        s.epoch_step(); s.level     # 0.125
    """

    def __init__(self, target: float, init: float = 0.0, spec: Mapping[str, Any] | None = None,
                 path: str = "schedule") -> None:
        validate_schedule(spec, path)
        spec = dict(spec or {})
        for name, value in (("target", target), ("init", init)):
            if not 0 <= value < 1:
                raise ValueError(f"LevelSchedule {name} must be in [0, 1), got {value}")
        self.target = float(target)
        self.init = float(init)
        self.type: str = spec.get("type", "constant")
        self.per: str = spec.get("per", "epoch")
        self.power = float(spec.get("power", DEFAULT_POWER))
        steps = spec.get("steps", 0)
        self.milestones: list[int] = list(steps) if isinstance(steps, (list, tuple)) else []
        self.levels: list[float] = [float(v) for v in spec.get("levels", [])]
        self.num_steps: int = self.milestones[-1] if self.milestones else int(steps)
        if self.type == "multistep" and abs(self.levels[-1] - self.target) > 1e-12:
            raise ConfigError(f"the last level must be the target level {self.target}, got "
                              f"{self.levels[-1]}", f"{path}.levels[{len(self.levels) - 1}]")
        self.position = 0
        self._listeners: list[Callable[[float], None]] = []

    def level_at(self, t: int) -> float:
        """The level after ``t`` steps (the formulas in the module docstring)."""
        if self.type == "constant" or t >= self.num_steps:
            return self.target
        if self.type == "multistep":
            reached = [lv for s, lv in zip(self.milestones, self.levels) if t >= s]
            return reached[-1] if reached else self.init
        fraction = t / self.num_steps
        if self.type == "polynomial":
            return self.target + (self.init - self.target) * (1.0 - fraction) ** self.power
        kept = (1.0 - self.init) * ((1.0 - self.target) / (1.0 - self.init)) ** fraction
        return 1.0 - kept

    @property
    def level(self) -> float:
        """The current level."""
        return self.level_at(self.position)

    def on_change(self, fn: Callable[[float], None]) -> None:
        """Call ``fn(new_level)`` whenever a step changes the level (not on a state load)."""
        self._listeners.append(fn)

    def step(self) -> None:
        """One optimizer step: advances a ``per: step`` schedule, else does nothing."""
        if self.per == "step":
            self._advance()

    def epoch_step(self) -> None:
        """One epoch: advances a ``per: epoch`` schedule, else does nothing."""
        if self.per == "epoch":
            self._advance()

    def _advance(self) -> None:
        before = self.level
        self.position += 1
        after = self.level
        if after != before:
            log.debug("schedule level %.6g -> %.6g at step %d", before, after, self.position)
            for fn in self._listeners:
                fn(after)

    def register(self, ctx: PassContext, name: str) -> None:
        """Advance with ``Compressed.step``/``epoch_step`` and checkpoint under ``name``."""
        ctx.on_step(self.step)
        ctx.on_epoch(self.epoch_step)
        ctx.add_state(name, self)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position without running listeners.

        What the listeners derive from the level (masks) is checkpointed with the model, and
        recomputing it from the loaded weights could differ from what training was using, so a
        resumed run would not continue the saved one exactly.
        """
        self.position = int(state["position"])

    def __repr__(self) -> str:
        return (f"LevelSchedule(type={self.type!r}, init={self.init}, target={self.target}, "
                f"per={self.per!r}, position={self.position}, level={self.level:.4g})")
