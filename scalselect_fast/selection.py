"""The one selection job: fit-or-load, score, top-k, post-selection, then every output committed as a set.

``scalselect select`` (local executor), ``scalselect select --dask-scheduler``
(:class:`scalselect_fast.distributed.DaskExecutor`) and the select stage of ``scalselect run`` (which
hands over its checkpointed subspace and scores) all go through :func:`run_selection`, so they write
the same files with the same schemas:

``manifest.parquet`` (or ``.jsonl``)
    One row per input record (``run``) or per stored row (``select``); the schema, the rank base
    and the writer are in :mod:`scalselect_fast.manifest`.
``report.json`` / ``report.html``
    One schema (:func:`scalselect_fast.report.build_report`): ``n_samples``, ``n_valid``,
    ``n_skipped``, ``budget``, ``n_selected``, ``subspace``, ``spectrum``, ``scores``, ``stability``,
    ``timings``, ``executor``, ``outputs``, ... (see docs/engine.md); the page's thumbnail gallery is
    chosen by :mod:`scalselect_fast.gallery`.
``selected.txt``, ``scores.npy``, ``subspace.npz`` and, with a dataset, ``selected.<ext>``
    The kept ids in selection order; the (N,) float64 scores of the stored rows; the fit; the kept
    records in the input's own format (:func:`scalselect_fast.data.write_selected`).

**Commit protocol** (:class:`scalselect_fast.atomic.StagedOutputs`). All outputs of one selection are
first written under temporary names (``.<name>.<random>.tmp`` beside their targets), then the previous
``report.json`` is removed, the staged files are renamed into place, and ``report.json`` is written
last. A reader that finds no ``report.json`` knows the set is incomplete; one that finds it knows every
other output belongs to the same selection (a kill at any moment leaves either that, or no report).

Executors compute; they do not write. :class:`LocalExecutor` is this machine;
:class:`scalselect_fast.distributed.DaskExecutor` runs the same fit, scores and top-k as Dask tasks.
This module is the job's order of steps; it holds no schema and no file format of its own.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .atomic import StagedOutputs, atomic_path, atomic_write_bytes, crashpoint
from .devices import array_backend
from .gallery import build_gallery
from .manifest import MANIFEST_FORMATS, RANK_BASE, manifest_batches, write_manifest
from .memory import release_freed
from .jsonable import to_jsonable
from .report import REPORT_HTML, REPORT_JSON, build_report, render_html
from .rowmap import Records, budget_base, ids_of, row_record, value_codes
from .store import DEFAULT_BLOCK_ROWS, open_source
from .subspace import Subspace, SubspaceError

__all__ = ["run_selection", "LocalExecutor", "fit_or_load", "write_scores", "print_selection"]


def write_scores(path, scores: np.ndarray) -> None:
    """Atomically write the (n,) float64 scores as ``.npy``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(scores, dtype=np.float64), allow_pickle=False)


def fit_or_load(subspace, fit) -> tuple[Subspace, str | None]:
    """``(subspace, path it was loaded from or None)``: reuse a given Subspace or file, else ``fit()``."""
    if subspace is None:
        return fit(), None
    if isinstance(subspace, Subspace):
        return subspace, None
    return Subspace.load(subspace), str(subspace)


# --------------------------------------------------------------------------------------------------
# executors: where the fit, the scores and the top-k run
# --------------------------------------------------------------------------------------------------
class LocalExecutor:
    """Fit, score and take the top-k on this machine (CPU, or a GPU with ``device``).

    Parameters
    ----------
    device : {"cpu", "cuda", "auto"}
        Where the fit's and the scores' products run (:func:`scalselect_fast.leverage_scores`).
    block_rows : int
        Rows per streamed block.
    """

    name = "local"

    def __init__(self, device: str = "cpu", block_rows: int = DEFAULT_BLOCK_ROWS):
        from .devices import array_device

        self.device = array_device(device)
        self.block_rows = int(block_rows)

    def fit(self, src, *, drop_invalid: bool, **fit_kwargs) -> Subspace:
        from .subspace import fit_subspace

        return fit_subspace(src, block_rows=self.block_rows, drop_invalid=drop_invalid,
                            array_backend=array_backend(self.device, check=False), **fit_kwargs)

    def score_and_select(self, src, sub: Subspace, m: int, *, drop_invalid: bool):
        """``(scores (n,) float64, top-m rows int64)`` and the seconds each took."""
        from .scoring import leverage_scores, top_k

        t = time.perf_counter()
        scores = leverage_scores(src, sub, block_rows=self.block_rows, drop_invalid=drop_invalid,
                                 device=self.device)
        t_score = time.perf_counter() - t
        t = time.perf_counter()
        top = top_k(scores, m)
        return scores, top, t_score, time.perf_counter() - t

    def stability(self, src, sub, scores, m, seeds, drop_invalid: bool) -> dict:
        from .stability import stability_certificate

        return stability_certificate(src, sub, scores, m, seeds=seeds, drop_invalid=drop_invalid,
                                     block_rows=self.block_rows)

    def describe(self) -> dict:
        from . import native

        return {"name": self.name, "device": self.device, "native_backend": native.BACKEND}


# --------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------
def run_selection(source, out_dir, budget, *, executor=None, subspace=None, scores=None,
                  manifest_format: str = "parquet", drop_invalid: bool = False,
                  block_rows: int = DEFAULT_BLOCK_ROWS, stability_seeds: Sequence[int] | None = (),
                  device: str = "cpu", records: Records | None = None, quotas: Sequence = (),
                  dedup_eps: float | None = None, html: bool = True, metadata: Mapping[str, str] | None = None,
                  timings: Mapping[str, float] | None = None, report_extra: Callable | None = None,
                  warn: Callable[[str], None] | None = None, before_commit: Callable[[], None] | None = None,
                  check_kept: Callable[[np.ndarray], None] | None = None, **fit_kwargs) -> dict:
    """Fit (unless given), score (unless given), select, and write every output into ``out_dir``.

    Parameters
    ----------
    source : anything :func:`~scalselect_fast.store.open_source` accepts
        The stored representations, (n, d).
    out_dir : str or PathLike
        Created if missing. Outputs are committed together (see the module notes).
    budget : int, float or str
        See :func:`~scalselect_fast.scoring.resolve_budget`; a fraction is of the records that are
        not text-only when ``records`` is given, else of the stored rows.
    executor : LocalExecutor or DaskExecutor, optional
        Where the fit, scores and top-k run; default ``LocalExecutor(device, block_rows)``.
    subspace : Subspace, str or PathLike, optional
        Reuse a fitted subspace instead of fitting.
    scores : ndarray (n,) float64, optional
        Scores already computed with ``subspace`` (``run``'s checkpoints); skips the scoring pass.
    manifest_format : {"parquet", "jsonl"}
    drop_invalid : bool
        Exclude NaN/inf rows (reported, never selected) instead of failing.
    block_rows : int
        Rows per streamed block (for the default executor).
    stability_seeds : sequence of int or None
        ``()`` (default): the free stability entry (cut-off margin + perturbation bound,
        :func:`~scalselect_fast.stability.stability_bound`); seeds: also re-fit with the randomized
        solver under them (:func:`~scalselect_fast.stability.stability_certificate`); None: no entry.
    device : {"cpu", "cuda", "auto"}
        For the default executor.
    records : Records, optional
        The dataset behind the store: one manifest row per record, per-source counts, the selected
        dataset in the input's format, post-selection by record fields, the thumbnail gallery.
    quotas : sequence of postselect.Quota
        Per-group share bounds (needs ``records``).
    dedup_eps : float, optional
        Drop selected rows within this cosine distance of a better-ranked kept one, refilling.
    html : bool
        Also write ``report.html`` (with the gallery when ``records`` has reachable images).
    metadata : mapping of str to str, optional
        Extra Parquet schema metadata (``run`` puts its fingerprints here).
    timings : mapping, optional
        Seconds of earlier stages to carry into the report (``run``: extract, fit, score).
    report_extra : callable, optional
        ``f(kept_ids) -> dict`` merged into the report before it is written.
    warn : callable, optional
        Where non-fatal warnings go (default: ignored).
    before_commit : callable, optional
        Called once every output is written under its temporary name, before any is renamed into
        place; an exception it raises deletes them and leaves the previous outputs (``run`` checks
        here that the dataset files still hold what it read).
    check_kept : callable, optional
        ``f(kept_rows)``, called with the selected rows (selection order) before anything is written;
        an exception it raises stops the selection with nothing written (``run`` refuses records edited
        after extraction here, :class:`scalselect_fast.output_check.RecordCheck`).
    **fit_kwargs
        Passed to the executor's fit (energy, k, solver, standardize, l2_normalize, seed, ...).

    Returns
    -------
    dict
        The report, as written to ``report.json``.

    Raises
    ------
    BudgetError, SubspaceError, InvalidRowsError, StoreError, PostSelectError
        Bad budget or input; nothing is written (or a previous complete selection stays).
    """
    from .scoring import resolve_budget

    if manifest_format not in MANIFEST_FORMATS:
        raise ValueError(f"unknown manifest format {manifest_format!r}; use 'parquet' or 'jsonl'")
    if quotas and records is None:
        raise ValueError("quotas need the dataset's records (scalselect run)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SubspaceError(f"{out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(source)
    m = resolve_budget(budget, budget_base(src, records)["n"])  # fail before any heavy work
    src.check_unique_ids()  # the outputs name rows by id: a store with a repeated id is refused now
    job = _SelectionJob(src, m, budget, executor or LocalExecutor(device, block_rows), records,
                        drop_invalid, timings, warn)
    sub, reused = job.fit(subspace, fit_kwargs)
    scores, top = job.score(sub, scores)
    ranked = job.select(scores, top, quotas, dedup_eps)
    if check_kept is not None:
        check_kept(ranked.kept_rows)
    release_freed()  # the ranking's and the record check's temporaries, before the outputs are built
    stability = job.stability(sub, scores, ranked, stability_seeds)
    release_freed()  # the cut-off's tops
    names = _output_names(out, manifest_format, records, html)
    t_write = time.perf_counter()
    report = build_report(src, sub, scores, ranked.kept_rows, ranked.kept_mask, m, budget, records=records,
                          post_info=ranked.post_info, stability=stability, reused=reused,
                          executor=job.executor, source=source, outputs={k: str(v) for k, v in names.items()},
                          timings=job.times, drop_invalid=drop_invalid, rank=ranked.rank)
    kept_ids = ids_of(src, ranked.kept_rows)  # selection order
    if report_extra is not None:
        report.update(report_extra(kept_ids))
    gallery = job.gallery(report, scores, ranked) if html else None
    meta = {"scalselect.rank_base": str(RANK_BASE), "scalselect.budget": str(m), **dict(metadata or {})}
    with StagedOutputs(out) as stage:
        job.write_outputs(stage, names, sub, scores, ranked, kept_ids, manifest_format, meta)
        crashpoint("select.staged")
        job.times["write"] = time.perf_counter() - t_write - job.times.get("gallery", 0.0)
        report["timings"] = dict(job.times)
        if html:
            atomic_write_bytes(stage.path(names["report_html"]),
                               render_html(to_jsonable(report), gallery=gallery).encode("utf-8"))
        if before_commit is not None:
            before_commit()
        stage.commit(names["report"], to_jsonable(report))
    return report


class _Ranked:
    """The ranking and the kept set of one selection."""

    def __init__(self, scores: np.ndarray, order: np.ndarray | None, kept_rows: np.ndarray, post_info: dict):
        from .scoring import rank_scores

        n = scores.size
        self.kept_rows = kept_rows  # selection order
        self.post_info = post_info  # select_ranked's info ({} without post-selection)
        # int32 below 2**31 rows: one (n,) array held until the manifest is written; without the
        # (n,) int64 order when post-selection did not need it (rank_scores ranks a range at a time)
        if order is None:
            self.rank = rank_scores(scores, RANK_BASE)
        else:
            self.rank = np.zeros(n, np.int32 if n < 2**31 - RANK_BASE else np.int64)
            self.rank[order] = np.arange(RANK_BASE, RANK_BASE + order.size, dtype=self.rank.dtype)
        self.kept_mask = np.zeros(n, bool)
        self.kept_mask[kept_rows] = True


class _SelectionJob:
    """The steps of :func:`run_selection` and what they share: the source, the budget, where the work
    runs, the dataset behind the store and the seconds each step took (``times``, in step order)."""

    def __init__(self, src, m: int, budget, executor, records: Records | None, drop_invalid: bool,
                 timings: Mapping[str, float] | None, warn: Callable[[str], None] | None):
        self.src, self.m, self.budget, self.executor = src, m, budget, executor
        self.records, self.drop_invalid, self.warn = records, drop_invalid, warn
        self.times: dict[str, float] = {k: float(v) for k, v in (timings or {}).items()}
        self._top_s = 0.0  # the top-k's seconds, counted into the select step's

    def fit(self, subspace, fit_kwargs: dict) -> tuple[Subspace, str | None]:
        """Fit, or reuse ``subspace``; the fit's seconds go to ``times`` unless the caller timed it."""
        t = time.perf_counter()
        sub, reused = fit_or_load(subspace, lambda: self.executor.fit(self.src, drop_invalid=self.drop_invalid,
                                                                      **fit_kwargs))
        if subspace is None or "fit" not in self.times:
            self.times["fit"] = self.times.get("fit", 0.0) + (time.perf_counter() - t)
        return sub, reused

    def score(self, sub: Subspace, scores) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (n,) float64, top-m rows)``: scored by the executor, or the given ones checked."""
        from .scoring import BudgetError, count_scored, top_k

        if scores is None:
            scores, top, t_score, self._top_s = self.executor.score_and_select(self.src, sub, self.m,
                                                                                drop_invalid=self.drop_invalid)
            self.times["score"] = t_score
            return scores, top
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (self.src.n,):
            raise ValueError(f"scores has shape {scores.shape} but the source has {self.src.n} rows")
        t = time.perf_counter()
        n_scored = count_scored(scores)
        if self.m > n_scored:
            raise BudgetError(f"budget {self.budget!r} asks for {self.m} rows but only {n_scored} have a score")
        top = top_k(scores, self.m)
        self._top_s = time.perf_counter() - t
        return scores, top

    def select(self, scores: np.ndarray, top: np.ndarray, quotas: Sequence, dedup_eps: float | None) -> _Ranked:
        """The ranking, and the top-m or (with quotas or ``dedup_eps``) the post-selected rows."""
        from .scoring import score_order

        t = time.perf_counter()
        post_info: dict[str, Any] = {}
        order = None  # the whole ranking only where post-selection walks it (the ranks need no order)
        if dedup_eps is not None or quotas:
            order = score_order(scores)
            kept_rows, post_info = self._post_select(order, quotas, dedup_eps)
        else:
            kept_rows = np.asarray(top, dtype=np.int64)
        ranked = _Ranked(scores, order, kept_rows, post_info)
        self.times["select"] = self._top_s + (time.perf_counter() - t)
        return ranked

    def _post_select(self, order: np.ndarray, quotas: Sequence, dedup_eps: float | None) -> tuple[np.ndarray, dict]:
        from .postselect import select_ranked

        labels = None
        if quotas:
            rec_of = row_record(self.src, self.records)
            labels = {}
            for q in quotas:
                codes, values = value_codes(self.records.fields[q.field])
                names = ["<none>" if v is None else v for v in values]
                labels[q.field] = [names[c] for c in codes[rec_of].tolist()]
        kept_rows, post_info = select_ranked(order, self.m, labels=labels, quotas=list(quotas),
                                             vectors=self.src.read_rows, dedup_eps=dedup_eps)
        kept_rows = np.asarray(kept_rows, dtype=np.int64)
        if kept_rows.size < self.m and self.warn is not None:
            self.warn(f"only {kept_rows.size} of the {self.m} budgeted samples remain after near-duplicate "
                      f"removal (--dedup-selected {dedup_eps}); lower the threshold to keep more")
        return kept_rows, post_info

    def stability(self, sub: Subspace, scores: np.ndarray, ranked: _Ranked, seeds) -> dict | None:
        """The report's stability entry (None when ``seeds`` is None): margin and bound, re-fits with seeds."""
        from .stability import stability_bound

        if seeds is None:
            return None
        t = time.perf_counter()
        seeds = tuple(seeds)
        if seeds and hasattr(self.executor, "stability"):
            st = self.executor.stability(self.src, sub, scores, self.m, seeds, self.drop_invalid)
        else:
            st = stability_bound(sub, scores, self.m, ranked.rank, RANK_BASE)
            st["refits"] = "not requested" if not seeds else \
                f"not applicable: the {self.executor.name} executor does not run the randomized solver"
        # the written rows are the top budget when they are that many distinct rows, all ranked within it
        kept = ranked.kept_rows
        same = (kept.size == self.m and np.unique(kept).size == kept.size
                and bool(np.all((ranked.rank[kept] >= RANK_BASE) & (ranked.rank[kept] < RANK_BASE + self.m))))
        st["certifies"] = ("the written selection (the top budget by score)" if same else
                           "the top budget by score, before post-selection changed the written selection")
        self.times["stability"] = time.perf_counter() - t
        return st

    def gallery(self, report: dict, scores: np.ndarray, ranked: _Ranked) -> dict | None:
        """The thumbnails for report.html; their summary goes into ``report["gallery"]``."""
        t = time.perf_counter()
        gallery, report["gallery"] = build_gallery(self.src, scores, ranked.rank, ranked.kept_mask,
                                                   self.records, self.warn)
        self.times["gallery"] = time.perf_counter() - t
        return gallery

    def write_outputs(self, stage: StagedOutputs, names: dict[str, Path], sub: Subspace, scores: np.ndarray,
                      ranked: _Ranked, kept_ids: list[str], manifest_format: str, meta: dict) -> None:
        """Every output but the report, under the stage's temporary names."""
        records = self.records
        sub.save(stage.path(names["subspace"]))
        write_scores(stage.path(names["scores"]), scores)
        write_manifest(stage.path(names["manifest"]), manifest_format,
                       manifest_batches(self.src, scores, ranked.rank, ranked.kept_mask, records,
                                        ranked.post_info.get("rejected", {})), meta)
        release_freed()  # the manifest's batches, before the selected dataset is read and written
        # records written outside the budget (text-only ones, run --text-only keep), after the ranked ones
        extra_ids = [records.ids[i] for i in records.passthrough if records.ids[i] is not None] if records else []
        written = kept_ids + extra_ids if extra_ids else kept_ids
        with atomic_path(stage.path(names["selected_ids"])) as tmp, open(tmp, "wb") as fh:
            for a in range(0, len(written), 1 << 16):  # a block of ids at a time, not one string of all
                fh.write("".join(f"{i}\n" for i in written[a:a + (1 << 16)]).encode("utf-8"))
        if records is not None:
            from .data import write_selected

            write_selected(records.path, stage.path(names["selected"]),
                           keep=written if records.order == "score" else set(written),
                           order=records.order, format=records.format, id_field=records.id_field)


def _output_names(out: Path, manifest_format: str, records: Records | None, html: bool) -> dict[str, Path]:
    """Where each output goes (the report's ``outputs``, in this order)."""
    names = {"subspace": out / "subspace.npz", "scores": out / "scores.npy",
             "manifest": out / f"manifest.{manifest_format}", "selected_ids": out / "selected.txt",
             "report": out / REPORT_JSON}
    if records is not None:
        names["selected"] = out / records.selected_name
    if html:
        names["report_html"] = out / REPORT_HTML
    return names


# --------------------------------------------------------------------------------------------------
# the one CLI printer
# --------------------------------------------------------------------------------------------------
def print_selection(report: Mapping[str, Any], quiet: bool = False, file=None) -> None:
    """Print a selection report for a person: counts, fit, timings, stability, output paths."""
    import sys

    fh = file or sys.stdout
    sub, t = report["subspace"], report.get("timings", {})
    base, to = report.get("budget_base"), report.get("text_only")
    bad = report.get("invalid_rows", {}).get("count", 0)
    if base and to is not None:  # run: the budget's fraction is of the records that are not text-only
        frac = report["n_selected"] / max(base["n"], 1)
        n_to = to.get("n", 0)
        what = (f"; {n_to} text-only {'row' if n_to == 1 else 'rows'} "
                + ("kept outside the budget" if to.get("action") == "kept" else "dropped") if n_to else "")
        head = (f"selected {report['n_selected']} of {report['n_samples']} samples ({frac:.1%} of the {base['n']} "
                f"that are not text-only; {report['n_valid']} usable{what})")
    else:
        frac = report["n_selected"] / max(report["n_samples"], 1)
        head = (f"selected {report['n_selected']} of {report['n_samples']} samples ({frac:.1%}; "
                f"{report['n_valid']} usable)")
    line = (f"{head} | k={sub['k']} of d={sub['d']} captures {sub['captured_energy']:.4f} "
            f"of the energy | {sub['solver']} solver, {sub['passes']} pass(es)")
    if not quiet:
        line += " | " + " ".join(f"{k} {float(v):.2f}s" for k, v in t.items())
    cache = report.get("cache")
    if cache:  # how much of the extraction the representation cache saved
        line += f" | cache: {cache['reused']} reused, {cache['extracted']} extracted"
    print(line + (f" | {bad} invalid rows excluded" if bad else ""), file=fh)
    st = report.get("stability")
    if st and not quiet:
        m = st["margin"]
        rel = m.get("relative_margin")
        tol = (st.get("bound") or {}).get("tolerated_relative")
        msg = (f"stability: relative cut-off margin {'n/a' if rel is None else f'{rel:.2e}'}, any Gram "
               f"change below {'n/a' if tol is None else f'{tol:.2e}'} of the total energy keeps the set, "
               f"certified={st['certified']}")
        if st.get("refits") == "run":
            msg += (f"; re-fits: min overlap {st['min_overlap_randomized']}, exact vs randomized "
                    f"{st['overlap_exact_vs_randomized']}, all within half the margin={st['refits_certified']}")
        elif str(st.get("refits", "")).startswith("not applicable"):
            msg += f"; re-fits {st['refits']}"
        print(msg, file=fh)
    outs = report.get("outputs", {})
    labels = (("selected", "selected dataset"), ("manifest", "manifest"), ("report_html", "report"),
              ("report", "report.json"), ("selected_ids", "selected ids"), ("subspace", "subspace"),
              ("scores", "scores"))
    shown = [(label, outs[k]) for k, label in labels if outs.get(k)]
    if quiet:
        shown = [(label, p) for label, p in shown if label in ("selected dataset", "manifest", "report")] or shown[:1]
    for label, p in shown:
        print(f"  {label + ':':<18}{p}", file=fh)
