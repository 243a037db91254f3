"""What every registration method returns, and the registry that names them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, runtime_checkable

from fmreg.errors import FmregError
from fmreg.methods.params import check_params
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


class Extra(NamedTuple):
    """An optional dependency group of fmreg (``pip install 'fmreg[NAME]'``) a method needs.

    Attributes:
        name: The extra, as ``pyproject.toml`` names it (``"peers"``, ``"sam"``, ``"medsam"``).
        module: The module the method imports from it; ``fmreg methods`` looks it up
            (``importlib.util.find_spec``) to say whether the extra is installed.
    """

    name: str
    module: str

    def command(self) -> str:
        """The shell command that installs it."""
        return f"pip install 'fmreg[{self.name}]'"


def add_method(name: str):
    """Class decorator adding a method factory to the registry under ``name``.

    The factory declares its parameters as ``PARAMS`` (a tuple of
    :class:`fmreg.methods.params.Param`), may name the extra it needs as ``EXTRA`` (an
    :class:`Extra`), and says what it is in the first line of its docstring.
    """

    def deco(factory):
        if not isinstance(getattr(factory, "PARAMS", None), tuple):
            raise TypeError(f"method {name}: {factory!r} declares no PARAMS")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_methods() -> list[str]:
    import fmreg.methods  # noqa: F401  (importing the package fills the registry)

    return sorted(_REGISTRY)


def method_factory(name: str) -> Callable[..., Method]:
    """The registered factory (class) of ``name``, with its ``PARAMS``, ``EXTRA`` and docstring.

    Raises:
        FmregError: For an unknown name, listing the registered ones.
    """
    names = available_methods()
    if name not in _REGISTRY:
        raise FmregError(f"unknown method '{name}': choose one of {', '.join(names)}")
    return _REGISTRY[name]


def get_method(name: str, **params: Any) -> Method:
    """Instantiate the method called ``name`` with ``params``, checked against its ``PARAMS``."""
    factory = method_factory(name)
    check_params(name, factory.PARAMS, params)
    return factory(**params)
