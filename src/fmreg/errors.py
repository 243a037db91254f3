"""The one exception type users see.

Every error that a user can cause (bad file, bad geometry, bad option) is raised as
:class:`FmregError` with a one-line message; the CLI prints it without a traceback.
"""

from __future__ import annotations


class FmregError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do."""


class FmregWarning(UserWarning):
    """A result that was produced but should not be trusted (see :mod:`fmreg.evaluate.trust`)."""


class MissingExtraError(FmregError, ImportError):
    """An optional backend is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        what = f" for {purpose}" if purpose else ""
        super().__init__(
            f"the optional package '{package}' is needed{what}: install it with "
            f"`pip install 'fmreg[{extra}]'`"
        )
        self.package = package
        self.extra = extra


def require(module: str, extra: str, purpose: str = ""):
    """Import an optional module lazily, or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc
