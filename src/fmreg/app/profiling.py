"""Peak memory of a method's registration, as reported in ``result.json`` and ``results.csv``.

``peak_mem_mb`` is the increase of the process's peak resident set size during
``method.register``, in MiB. On Linux the kernel's high-water mark ``VmHWM`` is reset to the
current RSS through ``/proc/self/clear_refs`` just before the call, and the increase is
``VmHWM`` after the call minus ``VmRSS`` before it; this counts every allocation that touched
memory (Python, NumPy, torch, native libraries, all threads). Where ``clear_refs`` is not
available the growth of ``getrusage().ru_maxrss`` is reported instead, which reads 0 when the
process had reached a higher peak earlier (``peak_mem_measure`` in ``result.json`` names the
measure used).
"""

from __future__ import annotations

import re
import resource
import sys

__all__ = ["PeakMemory", "release_free_heap"]


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def release_free_heap() -> None:
    """Hand the heap pages freed by earlier work back to the OS (glibc only; a no-op elsewhere).

    glibc keeps freed heap pages in the process: after a registration of a 3000² pair some
    300 MiB stay resident although nothing uses them, and every later full-size step (warping,
    writing, drawing) peaks on top of them. Before a measurement it also makes the baseline the
    memory actually in use, so a method reusing freed pages still shows its growth.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring the peak RSS increase of the block (see the module notes).

    Attributes:
        mb: Peak increase in MiB after the block (``None`` when nothing could be measured).
        measure: Which measure was used, for reports.
    """

    def __init__(self) -> None:
        self.mb: float | None = None
        self.measure = "none"
        self._base_kib: int | None = None
        self._hwm_reset = False

    def __enter__(self) -> "PeakMemory":
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        if self._hwm_reset:
            self._base_kib = _proc_status_kib("VmRSS")
        else:
            self._base_kib = self._maxrss_kib()
        return self

    @staticmethod
    def _maxrss_kib() -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB elsewhere

    def __exit__(self, *exc) -> None:
        if self._hwm_reset:
            hwm = _proc_status_kib("VmHWM")
            if hwm is not None and self._base_kib is not None:
                self.mb = max(hwm - self._base_kib, 0) / 1024.0
                self.measure = "VmHWM increase (Linux /proc, reset via clear_refs)"
        elif self._base_kib is not None:
            self.mb = max(self._maxrss_kib() - self._base_kib, 0) / 1024.0
            self.measure = "ru_maxrss increase (lower bound: 0 when an earlier peak was higher)"
