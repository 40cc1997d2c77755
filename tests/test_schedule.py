"""Level schedules: documented levels step by step, stepping units, listeners, state, errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from graphkd.errors import ConfigError
from graphkd.pipeline import PassContext
from graphkd.schedule import LevelSchedule, validate_schedule


def levels_per_epoch(schedule: LevelSchedule, epochs: int) -> list[float]:
    """The level before any epoch, then after each of ``epochs`` epoch steps."""
    seen = [schedule.level]
    for _ in range(epochs):
        schedule.epoch_step()
        seen.append(schedule.level)
    return seen


def test_constant_is_the_target_from_the_start() -> None:
    s = LevelSchedule(0.4, init=0.1)
    assert levels_per_epoch(s, 3) == [0.4, 0.4, 0.4, 0.4]


def test_polynomial_levels_step_by_step() -> None:
    # level(t) = 0.5 + (0.1 - 0.5) * (1 - t/4) ** 2
    s = LevelSchedule(0.5, init=0.1, spec={"type": "polynomial", "steps": 4, "power": 2})
    expected = [0.1, 0.5 - 0.4 * 0.5625, 0.5 - 0.4 * 0.25, 0.5 - 0.4 * 0.0625, 0.5, 0.5, 0.5]
    assert levels_per_epoch(s, 6) == pytest.approx(expected, abs=1e-12)


def test_polynomial_default_power_is_3() -> None:
    s = LevelSchedule(0.8, spec={"type": "polynomial", "steps": 2})
    assert levels_per_epoch(s, 2) == pytest.approx([0.0, 0.8 - 0.8 * 0.125, 0.8])


def test_exponential_halves_the_kept_fraction_each_step() -> None:
    # kept fraction 1 -> 1/16 over 4 steps: 1, 1/2, 1/4, 1/8, 1/16
    s = LevelSchedule(0.9375, spec={"type": "exponential", "steps": 4})
    assert levels_per_epoch(s, 6) == pytest.approx(
        [0.0, 0.5, 0.75, 0.875, 0.9375, 0.9375, 0.9375], abs=1e-12)


def test_exponential_from_nonzero_init() -> None:
    # kept 0.5 -> 0.125 in 2 steps: 0.5, 0.25, 0.125
    s = LevelSchedule(0.875, init=0.5, spec={"type": "exponential", "steps": 2})
    assert levels_per_epoch(s, 3) == pytest.approx([0.5, 0.75, 0.875, 0.875], abs=1e-12)


def test_multistep_levels_step_by_step() -> None:
    s = LevelSchedule(0.5, init=0.1, spec={"type": "multistep", "steps": [2, 4],
                                            "levels": [0.3, 0.5]})
    assert levels_per_epoch(s, 6) == [0.1, 0.1, 0.3, 0.3, 0.5, 0.5, 0.5]


def test_per_step_advances_on_step_only() -> None:
    s = LevelSchedule(0.5, spec={"type": "polynomial", "steps": 2, "power": 1, "per": "step"})
    s.epoch_step()
    assert s.level == 0.0 and s.position == 0
    s.step()
    assert s.level == pytest.approx(0.25)
    s.step()
    s.step()
    assert s.level == 0.5 and s.position == 3


def test_per_epoch_ignores_optimizer_steps() -> None:
    s = LevelSchedule(0.5, spec={"type": "polynomial", "steps": 2, "power": 1})
    for _ in range(10):
        s.step()
    assert s.level == 0.0
    s.epoch_step()
    assert s.level == pytest.approx(0.25)


def test_listeners_run_only_when_the_level_changes() -> None:
    s = LevelSchedule(0.5, init=0.1, spec={"type": "multistep", "steps": [2, 4],
                                            "levels": [0.3, 0.5]})
    calls: list[tuple[int, float]] = []
    s.on_change(lambda level: calls.append((s.position, level)))
    levels_per_epoch(s, 6)
    assert calls == [(2, 0.3), (4, 0.5)]


def test_state_dict_round_trip_restores_level_silently() -> None:
    spec = {"type": "polynomial", "steps": 4, "power": 1}
    a = LevelSchedule(0.8, spec=spec)
    levels_per_epoch(a, 3)
    b = LevelSchedule(0.8, spec=spec)
    seen: list[float] = []
    b.on_change(seen.append)
    b.load_state_dict(a.state_dict())
    assert b.position == 3 and b.level == pytest.approx(0.6) == a.level
    assert seen == []  # masks come back with the model's state_dict, not by recomputation
    b.epoch_step()
    assert seen == [0.8]


def test_register_wires_hooks_and_state_into_the_context() -> None:
    ctx = PassContext(example_inputs=(), original=nn.Identity())
    s = LevelSchedule(0.5, spec={"type": "polynomial", "steps": 2, "power": 1})
    s.register(ctx, "sparsify")
    assert ctx.states == {"sparsify": s}
    for hook in ctx.step_hooks:
        hook()
    assert s.position == 0
    for hook in ctx.epoch_hooks:
        hook()
    assert s.level == pytest.approx(0.25)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["exponential", "polynomial"]),
       init=st.floats(0, 0.95), gap=st.floats(0, 1), steps=st.integers(1, 20),
       power=st.floats(0.5, 5))
def test_gradual_schedules_are_monotone_and_end_at_target(
        kind: str, init: float, gap: float, steps: int, power: float) -> None:
    target = init + gap * (0.99 - init)
    spec = {"type": kind, "steps": steps, **({"power": power} if kind == "polynomial" else {})}
    s = LevelSchedule(target, init=init, spec=spec)
    levels = [s.level_at(t) for t in range(steps + 3)]
    assert levels[0] == pytest.approx(init)
    assert all(a <= b + 1e-12 for a, b in zip(levels, levels[1:]))
    assert all(init - 1e-12 <= lv <= target + 1e-12 for lv in levels)
    assert levels[steps:] == [target] * 3


@pytest.mark.parametrize("spec, path, words", [
    ({"type": "cosine"}, "schedule.type", "unknown schedule type 'cosine'"),
    ({"type": "polynomial"}, "schedule", "a 'polynomial' schedule needs 'steps'"),
    ({"type": "multistep", "steps": [1]}, "schedule", "needs 'levels'"),
    ({"type": "exponential", "steps": 3, "power": 2}, "schedule.power",
     "key 'power' has no meaning for a 'exponential' schedule"),
    ({"type": "constant", "steps": 3}, "schedule.steps", "no meaning for a 'constant' schedule"),
    ({"type": "polynomial", "steps": 0}, "schedule.steps", "must be an integer >= 1"),
    ({"type": "polynomial", "steps": [1, 2]}, "schedule.steps", "must be an integer >= 1"),
    ({"type": "polynomial", "steps": 3, "power": 0}, "schedule.power", "must be a number > 0"),
    ({"type": "polynomial", "steps": 3, "per": "batch"}, "schedule.per",
     "must be 'epoch' or 'step'"),
    ({"type": "multistep", "steps": 3, "levels": [0.5]}, "schedule.steps",
     "non-empty list of step numbers"),
    ({"type": "multistep", "steps": [2, 2], "levels": [0.1, 0.5]}, "schedule.steps[1]",
     "must increase strictly, got 2 then 2"),
    ({"type": "multistep", "steps": [1, 2], "levels": [0.5]}, "schedule.levels",
     "needs one level per step: 2 steps but 1 levels"),
    ({"type": "multistep", "steps": [1], "levels": [1.0]}, "schedule.levels[0]",
     "must be in [0, 1), got 1.0"),
    ("polynomial", "schedule", "must be a mapping"),
])
def test_invalid_schedules_name_the_key(spec: object, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_schedule(spec)  # type: ignore[arg-type]
    assert info.value.path == path
    assert words in str(info.value)


def test_validation_path_is_prefixed() -> None:
    with pytest.raises(ConfigError, match=r"^opts\.sched\.type: unknown schedule type"):
        validate_schedule({"type": "x"}, "opts.sched")


def test_multistep_must_end_at_the_target() -> None:
    with pytest.raises(ConfigError) as info:
        LevelSchedule(0.5, spec={"type": "multistep", "steps": [1, 3], "levels": [0.2, 0.4]})
    assert info.value.path == "schedule.levels[1]"
    assert "the last level must be the target level 0.5, got 0.4" in str(info.value)


def test_valid_specs_pass() -> None:
    for spec in (None, {}, {"type": "constant", "per": "step"}, {"type": "exponential", "steps": 5},
                 {"type": "polynomial", "steps": 2, "power": 1},
                 {"type": "multistep", "steps": [1, 4], "levels": [0.2, 0.3]}):
        validate_schedule(spec)
