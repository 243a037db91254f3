"""What every command of the app shares: the default method, progress lines, method parameters."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from fmreg.errors import FmregError
from fmreg.evaluate.scoring import Log
from fmreg.methods.base import Method, get_method

__all__ = ["DEFAULT_METHOD", "Log", "fmt_seconds", "make_method", "parse_params", "quiet_log", "stderr_log"]

#: The method ``register``, ``bench`` and ``demo`` use when none is named.
DEFAULT_METHOD = "samreg"


def stderr_log(message: str) -> None:
    """Print one progress line (``[fmreg] ...``) to stderr."""
    print(f"[fmreg] {message}", file=sys.stderr, flush=True)


def quiet_log(message: str) -> None:
    """A log that says nothing."""


def fmt_seconds(seconds: float) -> str:
    """A duration for progress lines: ``1.2 s``, or ``35 ms`` below a tenth of a second."""
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` method parameters; values are read as JSON when they parse
    (numbers, ``true``/``false``, lists) and kept as strings otherwise.

    Raises:
        FmregError: When an item has no ``=`` or an empty key.
    """
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise FmregError(f"--param {item!r}: write parameters as key=value, e.g. --param iterations=50")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def make_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method, turning a rejected parameter into a user error."""
    params = dict(params or {})
    try:
        return get_method(name, **params)
    except TypeError as exc:
        if "argument" in str(exc):
            raise FmregError(f"method '{name}' does not accept the given parameters ({exc})") from None
        raise
