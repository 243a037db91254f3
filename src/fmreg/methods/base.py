"""What every registration method returns, and the registry that names them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from ..errors import FmregError
from ..field import DisplacementField
from ..image import Image


@dataclass
class RegistrationResult:
    """The outcome of one registration.

    Attributes:
        field: Fixed→moving displacement on the fixed grid (see :mod:`fmreg.field`).
        method: Method name as the user chose it (e.g. ``"demons"``, ``"samreg"``).
        parameters: The settings that produced it (JSON-serialisable).
        info: Extra JSON-serialisable details (stage timings, ROI pairs, ...).
        artifacts: Extra pictures the method can draw: ``{file name: callable(path)}``.
    """

    field: DisplacementField
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Callable[[Any], None]] = field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    """A registration method.

    ``uses_labels`` is True only for methods that read the pair's label maps (upper bounds
    such as ``samreg-labels``); the CLI and the benchmark pass label maps to no other method.
    """

    name: str
    uses_labels: bool

    def register(
        self,
        fixed: Image,
        moving: Image,
        fixed_labels: Image | None = None,
        moving_labels: Image | None = None,
    ) -> RegistrationResult: ...


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str):
    """Class decorator adding a method factory to the registry under ``name``."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_methods() -> list[str]:
    from . import _load_all  # noqa: F401  (fills the registry)

    return sorted(_REGISTRY)


def get_method(name: str, **params: Any) -> Method:
    """Instantiate the method called ``name`` with ``params``."""
    names = available_methods()
    if name not in _REGISTRY:
        raise FmregError(f"unknown method '{name}': choose one of {', '.join(names)}")
    return _REGISTRY[name](**params)
