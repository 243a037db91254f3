"""Declared method parameters: name, type, default, allowed range and one line of help.

Every registered method declares its parameters once, as a tuple of :class:`Param` (the class
attribute ``PARAMS``). :func:`fmreg.methods.base.get_method` checks ``--param`` values against
it with :func:`check_params`, and ``fmreg methods NAME`` prints it.

Types and defaults are read from the code that uses them (a dataclass's fields or a
constructor's signature, see :func:`declare`), so the declaration cannot drift from the code;
the declaration adds what the code does not say: the allowed range and the help line.

A range is written as text, ``"[0, 1]"``, ``"(0, 1]"``, ``">= 1"``, ``"> 0"``, or as a tuple of
allowed strings (``("mse", "lncc")``); ``None`` allows any value of the type. A list value
(``Sequence[int]``) is checked element by element; ``null`` passes where the type allows it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from fmreg.errors import FmregError

__all__ = ["Param", "Range", "check_params", "check_types", "declare", "with_defaults"]

#: ``"[0, 1]"``, ``">= 1"`` and the like, a tuple of allowed strings, or None (no limit).
Range = str | tuple[str, ...] | None


class _Kind(NamedTuple):
    """What one annotation word accepts (``--param`` values are JSON)."""

    accepted: tuple[type, ...]
    words: str  # for error messages: "must be <words>"
    shown: str  # for the ``fmreg methods NAME`` table
    element: tuple[type, ...] | None = None  # list elements
    length: int | None = None  # fixed list length


_NUMBER = (int, float)
_KINDS = {
    "float": _Kind(_NUMBER, "a number", "float"),
    "int": _Kind((int,), "an integer", "int"),
    "str": _Kind((str,), "a string", "str"),
    "bool": _Kind((bool,), "true or false", "bool"),
    "None": _Kind((type(None),), "null", "null"),
    "Sequence[int]": _Kind((list, tuple), "a list of integers", "list[int]", (int,)),
    "Sequence[str]": _Kind((list, tuple), "a list of strings", "list[str]", (str,)),
    "Sequence[float]": _Kind((list, tuple), "a list of numbers", "list[float]", _NUMBER),
    "tuple[float, float]": _Kind((list, tuple), "a list of two numbers", "[float, float]", _NUMBER, 2),
    "dict[str, Any]": _Kind((dict,), "an object", "object"),
}

_NUM = r"[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?"
_INTERVAL = re.compile(rf"^([\[(])\s*({_NUM})\s*,\s*({_NUM})\s*([\])])$")
_BOUND = re.compile(rf"^(>=|>|<=|<)\s*({_NUM})$")


def _words(annotation: str) -> list[str]:
    return [w.strip() for w in annotation.split("|")]


def _is_a(value: Any, accepted: tuple[type, ...]) -> bool:
    # JSON true is not the number 1.
    return isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)


def _fits(kind: _Kind, value: Any) -> bool:
    if not _is_a(value, kind.accepted):
        return False
    if kind.element is not None and not all(_is_a(v, kind.element) for v in value):
        return False
    return kind.length is None or len(value) == kind.length


def check_types(annotations: dict[str, str], values: dict[str, Any]) -> None:
    """Check each value against its parameter's annotation (a string such as ``"float | None"``).

    Values without an annotation, or with one made of words this check does not know (such as
    ``str | torch.device | None``), pass: their method validates them itself.

    Raises:
        FmregError: Naming the parameter, the accepted types and the value, so that
            ``--param iterations=abc`` is an error line, not a traceback from inside a method.
    """
    for key, value in values.items():
        words = _words(annotations.get(key, ""))
        if not all(w in _KINDS for w in words):
            continue
        if not any(_fits(_KINDS[w], value) for w in words):
            expected = " or ".join(_KINDS[w].words for w in words)
            raise FmregError(f"parameter {key} must be {expected}, got {value!r}")


def _interval(spec: str) -> tuple[float, bool, float, bool]:
    """``(low, low_closed, high, high_closed)`` of a range text; open ends are infinite."""
    m = _INTERVAL.match(spec)
    if m:
        return float(m[2]), m[1] == "[", float(m[3]), m[4] == "]"
    m = _BOUND.match(spec)
    if not m:
        raise ValueError(f"range {spec!r}: write '[a, b]', '(a, b]', '>= a', '> a', '<= b' or '< b'")
    op, x = m[1], float(m[2])
    if op.startswith(">"):
        return x, op == ">=", math.inf, False
    return -math.inf, False, x, op == "<="


def _in_interval(x: float, spec: str) -> bool:
    low, low_closed, high, high_closed = _interval(spec)
    # NaN fails every comparison, so it is never in range.
    above = x >= low if low_closed else x > low
    below = x <= high if high_closed else x < high
    return above and below


def _or_list(items: tuple[str, ...]) -> str:
    return " or ".join(items) if len(items) <= 2 else "one of " + ", ".join(items)


@dataclass(frozen=True)
class Param:
    """One declared parameter of a method.

    Attributes:
        name: The ``--param`` key.
        type: Annotation text, e.g. ``"float | None"`` (see :func:`check_types`).
        default: The value the method uses when the parameter is not given.
        range: Allowed values (see the module docstring).
        help: One line saying what the parameter does.
    """

    name: str
    type: str
    default: Any
    range: Range
    help: str

    def __post_init__(self) -> None:
        if isinstance(self.range, str):
            _interval(self.range)  # a malformed range fails where it is declared

    def check(self, value: Any) -> None:
        """Raise :class:`FmregError` unless ``value`` has this parameter's type and range."""
        check_types({self.name: self.type}, {self.name: value})
        if value is None or self.range is None:
            return
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(self.range, tuple):
            for v in values:
                if v not in self.range:
                    raise FmregError(f"unknown {self.name} {v!r}: choose {_or_list(self.range)}")
            return
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not all(_in_interval(float(v), self.range) for v in numbers):
            each = " for each value" if isinstance(value, (list, tuple)) else ""
            raise FmregError(
                f"parameter {self.name} must be {self.range_text()}{each}, got {value!r} - {self.help}"
            )

    def range_text(self) -> str:
        """The range as the table and the error messages show it."""
        if self.range is None:
            return ""
        if isinstance(self.range, tuple):
            return "{" + ", ".join(self.range) + "}"
        return self.range if self.range[0] in "<>" else f"in {self.range}"

    def type_text(self) -> str:
        """The type as the table shows it (``float | null``, ``list[int] | int``)."""
        return " | ".join(_KINDS[w].shown if w in _KINDS else w for w in _words(self.type))

    def default_text(self) -> str:
        """The default written as a ``--param`` value (JSON; strings bare)."""
        if isinstance(self.default, str):
            return self.default
        value = list(self.default) if isinstance(self.default, tuple) else self.default
        try:
            return json.dumps(value)
        except TypeError:
            return str(value)


def _fields_of(source: Any) -> list[tuple[str, str, Any]]:
    """``(name, annotation text, default)`` of a dataclass's fields or a callable's arguments."""
    def text(annotation: Any) -> str:
        return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))

    if dataclasses.is_dataclass(source):
        out = []
        for f in dataclasses.fields(source):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            out.append((f.name, text(f.type), default))
        return out
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [(p.name, text(p.annotation), p.default) for p in inspect.signature(source).parameters.values()
            if p.kind in kinds and p.default is not inspect.Parameter.empty]


def declare(source: Callable | type, table: dict[str, tuple[Range, str]], prefix: str = "") -> tuple[Param, ...]:
    """The parameters of ``source`` (a dataclass, or a callable's keyword arguments), in order.

    Args:
        source: Where types and defaults come from: the dataclass or callable that uses them.
        table: ``name -> (range, help)`` for every field or argument with a default (arguments
            without a default, such as SamBackend's ``model``, are not parameters).
        prefix: Put before each name (``"sam_"`` for the SamBackend options).

    Raises:
        ValueError: When ``table`` and ``source`` do not name the same parameters: a
            programming error, caught at import time.
    """
    found = _fields_of(source)
    names = {name for name, _, _ in found}
    if names != set(table):
        raise ValueError(f"parameters of {getattr(source, '__qualname__', source)}: no range/help for "
                         f"{sorted(names - set(table))}, unknown {sorted(set(table) - names)}")
    return tuple(Param(prefix + name, annotation, default, *table[name]) for name, annotation, default in found)


def with_defaults(params: tuple[Param, ...], defaults: dict[str, Any]) -> tuple[Param, ...]:
    """``params`` with the defaults a method changes (e.g. ``samreg-sam``'s segmenter)."""
    unknown = set(defaults) - {p.name for p in params}
    if unknown:
        raise ValueError(f"defaults for undeclared parameters {sorted(unknown)}")
    return tuple(dataclasses.replace(p, default=defaults[p.name]) if p.name in defaults else p for p in params)


def check_params(method: str, params: tuple[Param, ...], values: dict[str, Any]) -> None:
    """Check ``values`` against the declaration ``params`` of ``method``.

    Raises:
        FmregError: One line: for an unknown name, the valid names for this method (and the
            closest one); for a wrong type or an out-of-range value, the parameter, what it
            accepts and the value.
    """
    declared = {p.name: p for p in params}
    for key, value in values.items():
        if key not in declared:
            close = difflib.get_close_matches(key, declared, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            valid = f"choose one of {', '.join(declared)}" if declared else "it takes no parameters"
            raise FmregError(f"unknown parameter '{key}' for {method}{hint}: {valid}")
        declared[key].check(value)
