"""The base of the ``fmreg`` subcommands: :func:`arg` declares a dataclass field as an argument,
:class:`Command` turns such a dataclass into an argparse subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROG = "fmreg"


def arg(*flags: str, help: str, default: Any = None, **kwargs: Any) -> Any:
    """Declare a command-line argument as a dataclass field.

    Args:
        flags: Option strings (``"-o", "--outdir"``); none for a positional argument.
        help: Help text.
        default: Default value (also the dataclass default).
        kwargs: Further :meth:`argparse.ArgumentParser.add_argument` keywords.
    """
    return field(default=default, metadata={"flags": flags, "help": help, "kwargs": kwargs})


@dataclass(kw_only=True)
class Command:
    """Base of the subcommands: ``name``/``help`` name it, fields declared with :func:`arg`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    quiet: bool = False
    #: The arguments as given (for records such as a model card's command line).
    argv: list[str] = field(default_factory=list)

    @classmethod
    def add_to(cls, subparsers) -> None:
        doc = (cls.__doc__ or "").strip()
        p = subparsers.add_parser(
            cls.name, help=cls.help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        for f in dataclasses.fields(cls):
            if "flags" not in f.metadata:
                continue
            flags, kwargs = f.metadata["flags"], dict(f.metadata["kwargs"])
            if flags:
                p.add_argument(*flags, dest=f.name, help=f.metadata["help"], default=f.default, **kwargs)
            else:
                kwargs.setdefault("metavar", f.name.upper())
                p.add_argument(f.name, help=f.metadata["help"], **kwargs)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
        p.set_defaults(command=cls)

    @property
    def log(self):
        from fmreg.app.common import quiet_log, stderr_log

        return quiet_log if self.quiet else stderr_log

    def run(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"
