"""Peak memory of ``fmreg register`` on a large 2D pair (issue 11: at most 1.5 GB for 3000²).

The whole command runs in a child process (reading, registering, warping, scoring, writing the
field and drawing the pictures) and reports its own peak resident set size, so nothing that
an earlier test allocated counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.io.images import write_image

#: The issue's bound for a 3000×3000 pair, in KiB (``ru_maxrss`` units on Linux).
LIMIT_KIB = int(1.5 * 1024 * 1024)

_CHILD = """
import resource, sys
from fmreg.cli import main
rc = main(sys.argv[1:])
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def _blobs(n: int, dx: float, dy: float) -> torch.Tensor:
    """Smooth blobs and a faint texture on an ``n``² image, shifted by ``(dx, dy)`` px."""
    y, x = torch.meshgrid(torch.arange(float(n)) - dy, torch.arange(float(n)) - dx, indexing="ij")
    s = n / 1500
    out = 0.1 * torch.sin(x / (37 * s)) * torch.cos(y / (23 * s))
    for cx, cy, r, v in [(400, 500, 90, 1.0), (1000, 450, 120, 0.6), (700, 950, 150, 0.8), (1150, 1050, 70, 0.4)]:
        out += v * torch.exp(-((x - cx * s) ** 2 + (y - cy * s) ** 2) / (2 * (r * s) ** 2))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_register_a_3000_pair_stays_under_1_5_gb(tmp_path: Path):
    grid = Grid((3000, 3000), (1.0, 1.0))
    write_image(Image(_blobs(3000, 0.0, 0.0), grid), tmp_path / "fixed.nii.gz")
    write_image(Image(_blobs(3000, 24.0, -16.0), grid), tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _CHILD, "register", str(tmp_path / "fixed.nii.gz"),
                           str(tmp_path / "moving.nii.gz"), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"ddf.nii.gz", "warped.nii.gz", "overview.png", "result.json"} <= {p.name for p in out.iterdir()}
    peak = int(proc.stdout.split("maxrss_kib")[-1])
    assert peak <= LIMIT_KIB, f"peak RSS {peak / 1024:.0f} MiB"
