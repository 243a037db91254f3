"""What every registration method returns, and the registry that names them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField
from fmreg.core.image import Image

if TYPE_CHECKING:
    from fmreg.correspond.pairs import RoiPair


@dataclass
class RegistrationResult:
    """The outcome of one registration.

    Attributes:
        field: Fixed→moving displacement on the fixed grid (see :mod:`fmreg.transforms.displacement`).
        method: Method name as the user chose it (e.g. ``"demons"``, ``"samreg"``).
        parameters: The settings that produced it (JSON-serialisable).
        roi_pairs: The matched ROI pairs (masks on the fixed and moving grids) of a method
            that builds them (SAMReg), None for the others; the app writes their summary to
            ``result.json`` and draws ``roi_pairs.png``.
        fit_report: What the dense fit did (JSON-serialisable), None without one.
        stage_seconds: Wall time of each stage of the method, seconds.
        info: Any other JSON-serialisable details.
    """

    field: DisplacementField
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    roi_pairs: list["RoiPair"] | None = None
    fit_report: dict[str, Any] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def details(self, fixed_grid, moving_grid) -> dict[str, Any]:
        """The method's details for ``result.json``: ROI pair summaries, stage timings, fit report."""
        out: dict[str, Any] = {}
        if self.roi_pairs is not None:
            out["roi_pairs"] = [p.summary(fixed_grid, moving_grid) for p in self.roi_pairs]
        if self.stage_seconds:
            out["stage_seconds"] = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        if self.fit_report is not None:
            out["fit"] = self.fit_report
        return {**out, **self.info}


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


def add_method(name: str):
    """Class decorator adding a method factory to the registry under ``name``."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_methods() -> list[str]:
    import fmreg.methods  # noqa: F401  (importing the package fills the registry)

    return sorted(_REGISTRY)


#: Annotation words → the Python types a parameter value may have (``--param`` values are JSON).
_ACCEPTED = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,), "None": (type(None),),
             "Sequence[int]": (list, tuple)}
_TYPE_WORDS = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false",
               "None": "null", "Sequence[int]": "a list of integers"}


def check_parameter_types(annotations: dict[str, str], values: dict[str, Any]) -> None:
    """Check each value against its parameter's annotation (a string such as ``"float | None"``).

    Values without an annotation, or with one made of words this check does not know, pass:
    their method validates them itself.

    Raises:
        FmregError: Naming the parameter, the accepted types and the value, so that
            ``--param iterations=abc`` is an error line, not a traceback from inside a method.
    """
    for key, value in values.items():
        words = [w.strip() for w in annotations.get(key, "").split("|")]
        if not all(w in _ACCEPTED for w in words):
            continue
        ok = any(isinstance(value, _ACCEPTED[w]) for w in words)
        if isinstance(value, bool) and "bool" not in words:
            ok = False  # JSON true is not the number 1
        if not ok:
            expected = " or ".join(_TYPE_WORDS[w] for w in words)
            raise FmregError(f"parameter {key} must be {expected}, got {value!r}")


def get_method(name: str, **params: Any) -> Method:
    """Instantiate the method called ``name`` with ``params`` (types checked against its signature)."""
    names = available_methods()
    if name not in _REGISTRY:
        raise FmregError(f"unknown method '{name}': choose one of {', '.join(names)}")
    factory = _REGISTRY[name]
    signature = inspect.signature(factory)
    check_parameter_types({p.name: str(p.annotation) for p in signature.parameters.values()
                           if p.annotation is not inspect.Parameter.empty}, params)
    return factory(**params)
