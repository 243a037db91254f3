"""``fmreg methods``: the registered methods and their declared parameters, as text lines.

Everything comes from the registry: a method's ``PARAMS`` (:mod:`fmreg.methods.params`), its
``EXTRA`` (:class:`fmreg.methods.base.Extra`) and the first paragraph of its docstring.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Sequence

from fmreg.methods.base import available_methods, method_factory

__all__ = ["describe_method", "extra_installed", "list_methods"]


def extra_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (itk, ants are slow)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _description(factory) -> str:
    """The first paragraph of the method's docstring, as one line without reST markup."""
    first = (inspect.getdoc(factory) or "").split("\n\n")[0]
    return " ".join(first.replace("``", "").split())


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart (the last column is not padded)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in [header, *rows]]


def list_methods() -> list[str]:
    """One line per registered method: name, the extra it needs, whether that is installed, what it is."""
    rows = []
    for name in available_methods():
        factory = method_factory(name)
        extra = getattr(factory, "EXTRA", None)
        if extra is None:
            rows.append((name, "core", "yes", _description(factory)))
        else:
            rows.append((name, extra.name, "yes" if extra_installed(extra.module) else "no",
                         _description(factory)))
    return _table(("method", "extra", "installed", "description"), rows) + [
        "",
        "fmreg methods NAME lists a method's parameters (set them with --param KEY=VALUE); "
        "install a missing extra with: pip install 'fmreg[EXTRA]'",
    ]


def describe_method(name: str) -> list[str]:
    """What ``name`` is, the extra it needs, and its parameters as a table.

    Raises:
        FmregError: For an unknown name, listing the registered methods.
    """
    factory = method_factory(name)
    extra = getattr(factory, "EXTRA", None)
    if extra is None:
        needs = "needs: nothing beyond the core install"
    else:
        state = "installed" if extra_installed(extra.module) else f"not installed: {extra.command()}"
        needs = f"needs: the {extra.name} extra ({extra.module}; {state})"
    lines = [f"{name}: {_description(factory)}", needs, ""]
    if not factory.PARAMS:
        return lines + ["no parameters"]
    rows = [(p.name, p.type_text(), p.default_text(), p.range_text(), p.help) for p in factory.PARAMS]
    return lines + _table(("parameter", "type", "default", "range", "help"), rows) + [
        "",
        "set with --param KEY=VALUE; values are JSON (numbers, true/false, null, [lists], {objects})",
    ]
