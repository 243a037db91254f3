"""``fmreg bench``: register every pair of a manifest with each method and tabulate the scores.

Outputs (all written atomically, see :class:`fmreg.io.outputs.Staging`):

* ``OUTDIR/results.csv`` with the columns ``name, method, dice_mean, dice_<value>...,
  hd95_mean, tre_mean, tre_median, folding_pct, std_log_jacobian, seconds, peak_mem_mb`` (one ``dice_<value>``
  column per label value scored anywhere in the manifest, ascending; ``fg`` pairs are
  binarized at > 127 and scored as value 1). A cell is empty where the pair has no ground
  truth for it, or where the score is undefined (e.g. a label absent from both maps).
* ``OUTDIR/results.md``: the same table, per-method means, and notes on the columns.
* ``OUTDIR/<method>/<pair>/``: everything ``fmreg register`` writes for that pair.

TRE: the landmark TRE (mean/median over points) when the pair has landmarks, otherwise the
centroid TRE of its labels (distance between label centroids, SAMReg's measure; mean/median
over labels). Units are mm, or pixels for PNG pairs. ``seconds`` and ``peak_mem_mb`` cover
``method.register`` only (see :mod:`fmreg.app.register`).

Every pair is read and validated before the first registration starts, so a bad file is
reported at once rather than after an hour of work.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fmreg.app.common import DEFAULT_METHOD, Log, make_method, quiet_log, stderr_log
from fmreg.app.register import Outcome, earlier_outputs, register_into, supersede
from fmreg.errors import FmregError
from fmreg.io.manifest import Case, read_manifest
from fmreg.io.outputs import Staging, check_outputs, check_writable
from fmreg.io.paths import absolute
from fmreg.methods.base import Method, method_factory

FIXED_COLUMNS_HEAD = ("name", "method", "dice_mean")
FIXED_COLUMNS_TAIL = ("hd95_mean", "tre_mean", "tre_median", "folding_pct", "std_log_jacobian", "seconds", "peak_mem_mb")


def columns_for(cases: Sequence[Case]) -> list[str]:
    """The results.csv header for ``cases``: one ``dice_<value>`` per scored value, ascending."""
    values = sorted({v for c in cases for v in c.scored_values()})
    return [*FIXED_COLUMNS_HEAD, *(f"dice_{v}" for v in values), *FIXED_COLUMNS_TAIL]


@dataclass
class BenchResult:
    """What :func:`run_bench` produced.

    Attributes:
        columns: The results.csv header.
        rows: One dict per (pair, method), keys from ``columns`` (``None`` = empty cell) plus
            ``tre_kind`` (``"landmark"``, ``"centroid"`` or ``None``).
        outdir: Where the tables are.
    """

    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    outdir: Path | None = None


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _row(case: Case, method: str, doc: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    mets = doc.get("metrics", {})
    row: dict[str, Any] = {c: None for c in columns}
    row.update(name=case.name, method=method, seconds=_finite(doc.get("seconds")), peak_mem_mb=_finite(doc.get("peak_mem_mb")))
    row["folding_pct"] = _finite(mets.get("folding_pct"))
    row["std_log_jacobian"] = _finite(mets.get("std_log_jacobian"))
    row["tre_kind"] = None
    if "dice" in mets:
        row["dice_mean"] = _finite(mets.get("mean_dice"))
        row["hd95_mean"] = _finite(mets.get("mean_hd95"))
        for value, d in mets["dice"].items():
            row[f"dice_{value}"] = _finite(d)
    if "landmark_tre" in mets:
        row["tre_mean"] = _finite(mets["landmark_tre"]["mean"])
        row["tre_median"] = _finite(mets["landmark_tre"]["median"])
        row["tre_kind"] = "landmark"
    elif "centroid_tre" in mets:
        tres = [t for t in (_finite(v) for v in mets["centroid_tre"].values()) if t is not None]
        if tres:
            row["tre_mean"] = sum(tres) / len(tres)
            row["tre_median"] = float(statistics.median(tres))
        row["tre_kind"] = "centroid"
    return row


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, ".6g")
    return str(v)


def _md_cell(column: str, v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, float):
        return str(v).replace("|", "\\|")
    if column.startswith("dice"):
        return f"{v:.3f}"
    if column in ("folding_pct", "std_log_jacobian"):
        return f"{v:.3f}"
    if column == "peak_mem_mb":
        return f"{v:.1f}"
    return f"{v:.2f}"


def method_means(result: BenchResult) -> list[dict[str, Any]]:
    """Per-method mean of every numeric column over the pairs where it is defined, and the
    largest peak memory of any pair (``peak_mem_mb_max``)."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in result.rows))
    for m in methods:
        rows = [r for r in result.rows if r["method"] == m]
        mean: dict[str, Any] = {"method": m, "pairs": len(rows)}
        for c in result.columns[2:]:
            vals = [r[c] for r in rows if r.get(c) is not None]
            mean[c] = sum(vals) / len(vals) if vals else None
        peaks = [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None]
        mean["peak_mem_mb_max"] = max(peaks) if peaks else None
        out.append(mean)
    return out


def to_csv(result: BenchResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(result.columns)
    for r in result.rows:
        w.writerow([_csv_cell(r.get(c)) for c in result.columns])
    return buf.getvalue()


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def to_markdown(result: BenchResult, manifest: Path | None = None) -> str:
    """results.md: the results table, the per-method means and notes on the columns."""
    cols = result.columns
    lines = ["# fmreg bench results", ""]
    if manifest is not None:
        lines += [f"Manifest: `{manifest}`", ""]
    lines += _md_table(cols, [[_md_cell(c, r.get(c)) for c in cols] for r in result.rows])
    lines += ["", "## Per-method means", ""]
    means = method_means(result)
    mcols = ["method", "pairs", *cols[2:]]
    lines += _md_table(mcols, [[_md_cell(c, m.get(c)) for c in mcols] for m in means])
    landmark = sorted({r["name"] for r in result.rows if r["tre_kind"] == "landmark"})
    centroid = sorted({r["name"] for r in result.rows if r["tre_kind"] == "centroid"})
    lines += [
        "",
        "## Column notes",
        "",
        "- `dice_<value>`: Dice of that label value; `fg` pairs (binary masks, foreground = "
        "value > 127) are scored as value 1. `dice_mean`, `hd95_mean`: mean over the pair's "
        "scored labels. HD95 in mm (pixels for PNG pairs).",
        "- `tre_mean`, `tre_median`: landmark TRE over the landmark points where the pair has "
        "landmarks, otherwise centroid TRE (distance between label centroids, SAMReg's measure) "
        "over its labels; mm, or pixels for PNG pairs.",
        f"  - landmark TRE: {', '.join(landmark) if landmark else 'none'}",
        f"  - centroid TRE: {', '.join(centroid) if centroid else 'none'}",
        "- `folding_pct`: % of voxels with Jacobian determinant ≤ 0.",
        "- `std_log_jacobian`: standard deviation of log det J (smoothness; 0 for a rigid map).",
        "- `seconds`: wall time of the method's registration only; `peak_mem_mb`: increase of "
        "the process's peak resident memory during it (MiB).",
        "- Empty cell: no ground truth for it, or undefined (e.g. a label absent from both maps).",
        "- Means are taken over the pairs where a value is defined.",
        "",
    ]
    return "\n".join(lines)


def _params_for(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``params`` that ``method`` declares."""
    declared = {p.name for p in method_factory(method).PARAMS}
    return {k: v for k, v in params.items() if k in declared}


def _check_params_used(methods: Sequence[str], params: dict[str, Any]) -> None:
    declared = {p.name for m in methods for p in method_factory(m).PARAMS}
    unused = sorted(set(params) - declared)
    if unused:
        raise FmregError(f"no method of this run ({', '.join(methods)}) takes the parameter(s) {', '.join(unused)}")


def run_bench(
    manifest: str | os.PathLike,
    methods: Sequence[str] | None = None,
    outdir: str | os.PathLike = "fmreg-bench",
    pairs: Sequence[str] | None = None,
    overwrite: bool = False,
    log: Log = stderr_log,
    progress: bool = True,
    params: dict[str, Any] | None = None,
) -> BenchResult:
    """Register every selected pair of ``manifest`` with each method and write the tables.

    Args:
        manifest: Pair manifest CSV (see :mod:`fmreg.io.manifest`).
        methods: Method names (default: ``[DEFAULT_METHOD]``); repeats are dropped.
        outdir: Output folder.
        pairs: Only these pair names (default: all), in manifest order.
        overwrite: Allow replacing existing files in an input's folder, and remove fmreg's own
            earlier results this run does not write (per-pair folders of other pairs or
            methods, outputs a pair no longer has), so that ``outdir`` is one consistent result.
        log: Progress lines.
        progress: Report each (pair, method) registration: a tqdm bar with the log lines
            written through it when stderr is a terminal, one plain line each otherwise.
        params: Method parameters; each goes to every method of the run that declares it (a
            name no method declares is an error).

    Returns:
        The :class:`BenchResult`.

    Raises:
        FmregError: Bad manifest (missing column or file), unknown pair or method name, any
            pair failing validation, or an ``outdir`` that cannot be written (all checked
            before the first registration).
    """
    t_start = time.perf_counter()
    manifest = absolute(manifest)
    outdir = absolute(outdir)
    check_writable(outdir)
    cases = _select(read_manifest(manifest), pairs, manifest)
    names = list(dict.fromkeys(methods or [DEFAULT_METHOD]))
    insts = {m: make_method(m, _params_for(m, params or {})) for m in names}  # fail before any work
    _check_params_used(names, params or {})

    inputs: list[Path | None] = [manifest]
    for case in cases:
        inputs += list(case.paths.values())
    check_outputs([outdir / "results.csv", outdir / "results.md"], inputs, overwrite)
    log(f"checking {len(cases)} pairs of {manifest.name} …")
    _check_cases(cases, insts)

    result = BenchResult(columns_for(cases), outdir=outdir)
    with _Progress(len(cases) * len(names), log, progress) as prog, Staging(outdir) as staging:
        for case in cases:
            # Loaded one at a time: the check above let every image go again.
            loaded = case.load(quiet_log)
            for m in names:
                prog.start(f"{case.name} / {m}")
                outcome = _register_one(insts[m], m, loaded, staging.root / m / case.name, prog.line)
                # A method's own name for its result (e.g. samreg-labels) labels the row.
                result.rows.append(_row(case, outcome.doc.get("method") or m, outcome.doc, result.columns))
                prog.done()
        staging.path("results.csv").write_text(to_csv(result))
        staging.path("results.md").write_text(to_markdown(result, manifest))
        written = {str(f) for f in staging.files()}
        check_outputs([outdir / f for f in written], inputs, overwrite)
        supersede(staging, [f for f in _earlier_results(outdir, inputs) if f not in written], overwrite, prog.line)
    log(f"wrote {outdir / 'results.csv'} and results.md ({len(result.rows)} rows) in {time.perf_counter() - t_start:.1f} s")
    return result


class _Progress:
    """Progress of a bench run on stderr, never two writers on one line.

    On a terminal: a tqdm bar, with every log line, Python warning and ``fmreg`` logging
    record written above it (``tqdm.write``). Otherwise (a log file, a pipe): no bar, whose
    redraws would fill the file, but one plain ``[i/n] pair / method`` line per registration.
    """

    def __init__(self, total: int, log: Log, enabled: bool) -> None:
        self.total, self.count, self.log = total, 0, log
        self.enabled = enabled and log is not quiet_log
        self.bar = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Progress":
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total, desc="fmreg bench", unit="reg", file=sys.stderr, dynamic_ncols=True)
            self._stack.enter_context(logging_redirect_tqdm([logging.getLogger("fmreg")]))
            self._stack.enter_context(warnings.catch_warnings())
            warnings.showwarning = self._warning
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self.bar is not None:
            self.bar.close()

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.line(f"warning: {' '.join(str(message).split())}")

    def line(self, message: str) -> None:
        """One log line (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"[fmreg] {message}", file=sys.stderr)
        else:
            self.log(message)

    def start(self, what: str) -> None:
        """A registration begins."""
        if self.bar is not None:
            self.bar.set_postfix_str(what)
        self.line(f"[{self.count + 1}/{self.total}] {what}")

    def done(self) -> None:
        """A registration ended."""
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)


def _earlier_results(outdir: Path, inputs: list[Path | None]) -> list[str]:
    """Files of an earlier bench run in ``outdir``, relative to it: the tables, and the known
    outputs of every ``<method>/<pair>/`` folder holding an fmreg ``result.json``."""
    found = [n for n in ("results.csv", "results.md") if (outdir / n).is_file()]
    for doc in sorted(outdir.glob("*/*/result.json")):
        try:
            if "fmreg_version" not in json.loads(doc.read_text()):
                continue
        except (OSError, ValueError, TypeError):
            continue  # not a result fmreg wrote: none of that folder is ours to remove
        rel = doc.parent.relative_to(outdir)
        found += [str(rel / n) for n in earlier_outputs(doc.parent, inputs)]
    return found


def _select(cases: list[Case], names: Sequence[str] | None, manifest: Path) -> list[Case]:
    """The cases named in ``names`` (all when empty), in manifest order."""
    if not names:
        return cases
    known = {c.name for c in cases}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FmregError(f"pair {unknown[0]!r} is not in {manifest}; it lists {', '.join(sorted(known))}")
    wanted = set(names)
    return [c for c in cases if c.name in wanted]


def _check_cases(cases: Sequence[Case], insts: dict[str, Method]) -> None:
    """Read and validate every case before the first registration starts."""
    for case in cases:
        try:
            case.load(quiet_log)
        except FmregError as exc:
            raise FmregError(f"pair {case.name!r}: {exc}") from None
        for m, inst in insts.items():
            if getattr(inst, "uses_labels", False) and not case.has_labels:
                raise FmregError(f"method '{m}' needs label maps but pair {case.name!r} has none")


def _register_one(method: Method, method_name: str, case: Case, stage_dir: Path, log: Log) -> Outcome:
    """``register_into`` one staged folder, naming the pair and method in a user error."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    try:
        return register_into(method, case, stage_dir, case.label_spec, None, log=log)
    except FmregError as exc:
        raise FmregError(f"pair {case.name!r}, method {method_name}: {exc}") from None
