"""Loading a SAM-family checkpoint (SAM, MedSAM, SlimSAM) in Hugging Face format.

The model is ``transformers``' :class:`~transformers.SamModel`, loaded from a local folder
(``config.json`` + weights) or, with internet, from a hub id such as
``facebook/sam-vit-base``. Every way this can fail is a one-line user error that says how
to get a usable checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fmreg.errors import FmregError, require

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import SamModel

__all__ = ["DEFAULT_HUB_ID", "load_sam_model"]

DEFAULT_HUB_ID = "facebook/sam-vit-base"

# "org/name" as the hub spells repository ids; anything else is treated as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_sam_model(model: str | Path, device: str | torch.device = "cpu") -> "SamModel":
    """Load a SAM-family checkpoint in Hugging Face format.

    Args:
        model: A local folder holding ``config.json`` and the weights
            (``model.safetensors`` or ``pytorch_model.bin``), e.g. a download of
            ``facebook/sam-vit-base`` / ``-large`` / ``-huge``, MedSAM or SlimSAM; or a hub id
            ``"org/name"`` (needs internet, or the Hugging Face cache).
        device: Torch device to put the model on.

    Returns:
        The :class:`transformers.SamModel` in eval mode on ``device``.

    Raises:
        MissingExtraError: ``transformers`` is not installed (extra ``sam``).
        FmregError: the folder does not exist or is not a SAM checkpoint, or the hub id
            cannot be fetched.
    """
    transformers = require("transformers", "sam", "the SAM backend")
    path = Path(model).expanduser()
    how = (
        f"download a checkpoint in Hugging Face format on a machine with internet, e.g. "
        f"`hf download {DEFAULT_HUB_ID} --local-dir DIR`, and pass DIR"
    )
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FmregError(
                f"SAM model {path.resolve()} is not a Hugging Face model folder (no config.json "
                f"in it): {how}"
            )
        model_type = _config_model_type(path / "config.json")
        if model_type not in (None, "sam"):
            # SamModel would load such a folder with random weights and only a warning.
            raise FmregError(
                f"{path.resolve()} holds a '{model_type}' model, not SAM (model_type 'sam'): "
                "pass a SAM, MedSAM or SlimSAM checkpoint in Hugging Face format"
            )
        source: str | Path = path
    elif isinstance(model, str) and _HUB_ID.match(model):
        source = model
    else:
        raise FmregError(f"SAM model folder {path.resolve()} does not exist: {how}")

    try:
        sam = transformers.SamModel.from_pretrained(source)
    except Exception as exc:  # hub/network/format errors come in many types; all are user-fixable
        reason = _first_line(exc)
        if isinstance(source, Path):
            raise FmregError(f"cannot load SAM model from {path.resolve()}: {reason}") from exc
        raise FmregError(
            f"SAM model '{model}' is not a local folder ({path.resolve()} does not exist) and "
            f"could not be fetched from the Hugging Face hub ({reason}): {how}"
        ) from exc
    return sam.to(device).eval()


def _config_model_type(config: Path) -> str | None:
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise FmregError(
            f"cannot read SAM model config {config.resolve()}: {_first_line(exc)}"
        ) from exc
    return value if isinstance(value, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
