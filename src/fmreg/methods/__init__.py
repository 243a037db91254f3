"""Registration methods: fmreg's own and the peers it is compared with.

Peers whose packages are optional (elastix, ANTs) import them only when they run.
"""

from .base import Method, RegistrationResult, available_methods, get_method, register_method


def _import_methods() -> None:
    import importlib

    for module in ("identity", "demons", "elastix", "ants", "samreg"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            # Only a module of ours that is not written yet may be missing; anything else is a bug.
            if exc.name != f"{__name__}.{module}":
                raise


_import_methods()
_load_all = True

__all__ = ["Method", "RegistrationResult", "available_methods", "get_method", "register_method"]
