"""Passes, the pass registry, the context passes record into, and the pipeline that runs them."""
from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import fx, nn

from .errors import ConfigError, GraphKDError, PassError
from .trace import as_input_tuple, propagate_shapes, trace

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphkd.passes"


class Pass:
    """A graph transformation of the student.

    Subclasses set ``name``, take their options as keyword-only ``__init__`` arguments with type
    hints and defaults (the config loader checks names and types from them; ``__init__`` checks
    ranges and raises :class:`ConfigError` with the option name as path), and implement
    :meth:`apply`. ``nncf_algorithm`` names the NNCF config section the pass accepts, translated by
    :meth:`options_from_nncf`.
    """

    name: ClassVar[str] = ""
    nncf_algorithm: ClassVar[str | None] = None

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Rewrite ``gm.graph`` in place and record training/export hooks on ``ctx``."""
        raise NotImplementedError(f"{type(self).__name__}.apply")

    @classmethod
    def options_from_nncf(cls, section: Mapping[str, Any]) -> dict[str, Any]:
        """Translate an NNCF ``compression`` section (minus ``algorithm``) to this pass's options."""
        return dict(section)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make ``cls`` available to pipelines under ``cls.name``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass needs a subclass of graphkd.Pass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be a non-empty identifier, got {cls.name!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and (
            existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        log.warning("pass %r: %s replaces %s", cls.name, cls.__qualname__, existing.__qualname__)
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others
            log.warning("cannot load pass %r from entry point %s: %s", ep.name, ep.value, exc)
            continue
        if ep.name not in _REGISTRY:
            register_pass(cls)


def available_passes() -> dict[str, type[Pass]]:
    """Every known pass by name: registered ones, built-ins and ``graphkd.passes`` entry points."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str, path: str = "") -> type[Pass]:
    """The pass class called ``name``, or a ConfigError that lists the available ones."""
    passes = available_passes()
    if name in passes:
        return passes[name]
    close = difflib.get_close_matches(name, passes, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown pass {name!r}.{hint} Available passes: {', '.join(passes) or 'none'}; register "
        f"your own with graphkd.register_pass or the 'graphkd.passes' entry point group.", path)


@dataclass
class PassContext:
    """What passes share with each other and hand over to :class:`Compressed`.

    Passes register callables here instead of keeping global state: losses (called after each
    training forward), step/epoch hooks (schedules), export steps (run on a deepcopy of the
    student, so they must look modules up by name in the graph they get), calibrators, stateful
    objects to checkpoint, and statistics (a dict, or a callable returning one, for live values).
    """

    example_inputs: tuple
    original: nn.Module
    losses: dict[str, Callable[[], torch.Tensor | None]] = field(default_factory=dict)
    step_hooks: list[Callable[[], None]] = field(default_factory=list)
    epoch_hooks: list[Callable[[], None]] = field(default_factory=list)
    export_steps: list[Callable[[fx.GraphModule], None]] = field(default_factory=list)
    calibrators: list[Callable[[Iterable, int | None], None]] = field(default_factory=list)
    states: dict[str, Stateful] = field(default_factory=dict)
    statistics: dict[str, dict | Callable[[], dict]] = field(default_factory=dict)
    teacher: nn.Module | None = None

    def frozen_teacher(self) -> nn.Module:
        """The teacher: a copy of the model given to ``compress`` as it was before any pass ran.

        Created on first request (``compress`` never modifies the original, so a late copy equals
        an early one), in eval mode with every parameter frozen.
        """
        if self.teacher is None:
            teacher = copy.deepcopy(self.original)
            teacher.eval()
            teacher.requires_grad_(False)
            self.teacher = teacher
        return self.teacher

    def add_loss(self, name: str, fn: Callable[[], torch.Tensor | None]) -> None:
        self.losses[name] = fn

    def on_step(self, fn: Callable[[], None]) -> None:
        self.step_hooks.append(fn)

    def on_epoch(self, fn: Callable[[], None]) -> None:
        self.epoch_hooks.append(fn)

    def on_export(self, fn: Callable[[fx.GraphModule], None]) -> None:
        self.export_steps.append(fn)

    def on_calibrate(self, fn: Callable[[Iterable, int | None], None]) -> None:
        self.calibrators.append(fn)

    def add_state(self, name: str, obj: Stateful) -> None:
        self.states[name] = obj


class Pipeline:
    """An ordered list of passes; :meth:`apply` turns a model into a :class:`Compressed`."""

    def __init__(self, passes: Iterable[Pass], document: Mapping[str, Any] | None = None) -> None:
        self.passes = list(passes)
        for i, p in enumerate(self.passes):
            if not isinstance(p, Pass):
                raise ConfigError(f"expected a graphkd.Pass instance, got {type(p).__name__}",
                                  f"pipeline[{i}]")
        self.document = dict(document or {"pipeline": []})

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Pipeline:
        """Build from a parsed document (``{"pipeline": [...]}`` or an NNCF-style config)."""
        from .config import build_passes
        passes, normalised = build_passes(document)
        return cls(passes, normalised)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Pipeline:
        """Build from a YAML/JSON file path or a YAML text."""
        from .config import load_document
        return cls.from_dict(load_document(source))

    @classmethod
    def coerce(cls, spec: Pipeline | Mapping[str, Any] | str | Path | Iterable[Pass]) -> Pipeline:
        if isinstance(spec, Pipeline):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (str, Path)):
            return cls.from_yaml(spec)
        return cls(spec)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(p.name for p in self.passes)}])"

    def apply(
        self,
        model: nn.Module,
        example_inputs: Any,
        dump_dir: str | Path | None = None,
        *,
        calibration_data: Iterable | None = None,
        num_calibration_samples: int | None = None,
        leaf_modules: Iterable[type | str] = (),
        auto_leaf: bool = True,
        dump_formats: Sequence[str] = ("dot", "json"),
    ):
        """Trace a copy of ``model``, run every pass on it, and return a ``Compressed``.

        ``model`` itself is never modified. After each pass the graph is linted, recompiled and run
        on ``example_inputs``; a pass that breaks it raises :class:`PassError` naming it. With
        ``dump_dir`` the graph is dumped after tracing and after each pass (``00_traced``,
        ``01_prune``...) in ``dump_formats`` (see :mod:`graphkd.viz`).
        """
        from .compressed import Compressed
        from .viz import dump_pipeline_stage

        inputs = as_input_tuple(example_inputs)
        gm = trace(copy.deepcopy(model), inputs, leaf_modules=tuple(leaf_modules),
                   auto_leaf=auto_leaf)
        ctx = PassContext(example_inputs=inputs, original=model)
        traced = set(gm.modules())
        if dump_dir is not None:
            dump_pipeline_stage(gm, dump_dir, 0, "traced", dump_formats)
        for i, p in enumerate(self.passes):
            self._run_pass(i, p, gm, ctx)
            if dump_dir is not None:
                dump_pipeline_stage(gm, dump_dir, i + 1, p.name, dump_formats)
        for module in gm.modules():  # what the passes added follows the model's mode
            if module not in traced:
                module.training = gm.training
        compressed = Compressed(gm, ctx)
        if calibration_data is not None:
            compressed.init_ranges(calibration_data, num_calibration_samples)
        return compressed

    @staticmethod
    def _run_pass(index: int, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        where = f"pipeline[{index}] ({p.name})"
        try:
            p.apply(gm, ctx)
        except ConfigError as exc:
            raise exc.under(f"pipeline[{index}]") from exc
        except GraphKDError:
            raise
        except Exception as exc:
            raise PassError(f"pass {where} failed: {type(exc).__name__}: {exc}") from exc
        try:
            gm.graph.lint()
            gm.recompile()
            propagate_shapes(gm, ctx.example_inputs)
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise PassError(
                f"pass {where} left the student graph broken: {type(cause).__name__}: {cause}. "
                f"The pass must keep the graph well-formed and runnable on the example inputs."
            ) from exc


def compress(
    model: nn.Module,
    pipeline: Pipeline | Mapping[str, Any] | str | Path | Iterable[Pass],
    example_inputs: Any,
    dump_dir: str | Path | None = None,
    **options: Any,
):
    """Compress ``model`` with ``pipeline`` (a Pipeline, a dict, a YAML/JSON path or text, or a
    list of passes). ``options`` go to :meth:`Pipeline.apply` (``calibration_data``,
    ``leaf_modules``, ``auto_leaf``...). Returns a :class:`graphkd.Compressed`.

    Example::

        c = compress(model, "configs/digits_prune_quant_kd.yaml", torch.randn(1, 1, 8, 8))
    """
    return Pipeline.coerce(pipeline).apply(model, example_inputs, dump_dir, **options)
