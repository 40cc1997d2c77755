"""Exceptions raised by graphkd.

Every user-facing failure derives from :class:`GraphKDError`, so callers can catch one type; the
subclass says which stage failed. Messages name the thing (config path, node, module path), what
was wrong and how to fix it.
"""
from __future__ import annotations


class GraphKDError(Exception):
    """Base class of every error graphkd raises on purpose."""


class TraceError(GraphKDError):
    """The model could not be traced into a torch.fx graph."""


class ConfigError(GraphKDError):
    """A pipeline document, a pass option or a scope pattern is invalid.

    ``path`` is where in the document the problem is (``pipeline[1].ratio``); it is prefixed to the
    message. Code that validates a nested piece raises with a relative path and the caller re-raises
    with :meth:`under`, so the final message carries the full path.
    """

    def __init__(self, message: str, path: str = "", line: int | None = None) -> None:
        self.path = path
        self.problem = message
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.path
        if self.line is not None:
            where = f"{where} (line {self.line})" if where else f"line {self.line}"
        return f"{where}: {self.problem}" if where else self.problem

    def under(self, prefix: str, line: int | None = None) -> ConfigError:
        """Return the same error with ``prefix`` put in front of its path."""
        if not prefix:
            path = self.path
        elif not self.path:
            path = prefix
        elif self.path.startswith("["):
            path = prefix + self.path
        else:
            path = f"{prefix}.{self.path}"
        return ConfigError(self.problem, path, line if line is not None else self.line)


class PassError(GraphKDError):
    """A pass failed or left the student graph broken."""


class DistillError(GraphKDError):
    """Knowledge distillation cannot pair student and teacher outputs."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut at ``limit`` characters): why an optional step
    was skipped, short enough for a log line or ``metrics.json``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"
