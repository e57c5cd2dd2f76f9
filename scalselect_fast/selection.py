"""The one selection job: fit-or-load, score, top-k, post-selection, then manifest + report.

``scalselect select`` (local executor), ``scalselect select --dask-scheduler``
(:class:`scalselect_fast.distributed.DaskExecutor`) and the select stage of ``scalselect run`` (which
hands over its checkpointed subspace and scores) all go through :func:`run_selection`, so they write
the same files with the same schemas:

``manifest.parquet`` (or ``.jsonl``)
    One row per input record (``run``) or per stored row (``select``)::

        id: string, index: int64, shard: string, row: int64, score: float64, rank: int64,
        kept: bool, skip_reason: string

    ``index`` is the record's position in the dataset (``select``: the global row), ``shard``/``row``
    where its representation is stored, ``rank`` the **1-based** position in the score order
    (descending score, ties → lower row) over the rows that have a score; rows without a score
    (skipped records, NaN/inf rows) have null ``shard``/``row``/``score``/``rank`` and a
    ``skip_reason``. The Parquet schema metadata carries ``scalselect.rank_base`` = ``"1"``, the budget
    and the caller's fingerprints.
``report.json`` / ``report.html``
    One schema (:func:`build_report`): ``n_samples``, ``n_valid``, ``n_skipped``, ``budget``,
    ``n_selected``, ``subspace``, ``spectrum``, ``scores``, ``stability``, ``timings``, ``executor``,
    ``outputs``, ... (see the README).
``selected.txt``, ``scores.npy``, ``subspace.npz`` and, with a dataset, ``selected.<ext>``
    The kept ids in selection order; the (N,) float64 scores of the stored rows; the fit; the kept
    records in the input's own format (:func:`scalselect_fast.data.write_selected`).

**Commit protocol.** All outputs of one selection are first written under temporary names
(``.<name>.<random>.tmp`` beside their targets), then the previous ``report.json`` is removed, the
staged files are renamed into place, and ``report.json`` is written last. A reader that finds no
``report.json`` knows the set is incomplete; one that finds it knows every other output belongs to
the same selection (a kill at any moment leaves either that, or no report).

Executors compute; they do not write. :class:`LocalExecutor` is this machine;
:class:`scalselect_fast.distributed.DaskExecutor` runs the same fit, scores and top-k as Dask tasks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .atomic import crashpoint, fsync_dir
from .store import DEFAULT_BLOCK_ROWS, open_source
from .subspace import Subspace, SubspaceError

__all__ = ["run_selection", "LocalExecutor", "Records", "budget_base", "fit_or_load", "write_scores", "shard_ids",
           "iter_shard_ids", "print_selection", "MANIFEST_SCHEMA", "RANK_BASE", "GALLERY_SIZE"]

#: column names and Arrow types of every manifest, in order
MANIFEST_SCHEMA = (("id", "string"), ("index", "int64"), ("shard", "string"), ("row", "int64"),
                   ("score", "float64"), ("rank", "int64"), ("kept", "bool"), ("skip_reason", "string"))
#: rank of the best row
RANK_BASE = 1
#: thumbnails per gallery group in report.html
GALLERY_SIZE = 12
INVALID_ROW = "invalid_row: NaN/inf in the representation (--drop-invalid)"


# --------------------------------------------------------------------------------------------------
# ids of stored rows
# --------------------------------------------------------------------------------------------------
def shard_ids(src, shard) -> list[str]:
    """The ids of one shard (row numbers as strings where the source has none).

    A store whose shards share an id is refused (:meth:`MatrixSource.check_unique_ids`, once per source).
    """
    from .store import read_ids

    if hasattr(src, "check_unique_ids"):
        src.check_unique_ids()

    arr_ids = getattr(src, "_ids", None)
    if arr_ids is not None:
        return arr_ids[shard.offset:shard.offset + shard.count]
    if shard.ids_path is not None:
        return read_ids(shard)
    return [str(i) for i in range(shard.offset, shard.offset + shard.count)]


def iter_shard_ids(src):
    """Yield ``(shard, ids)`` per shard, reading one shard's ids at a time (memory O(shard))."""
    for shard in src.shards:
        yield shard, shard_ids(src, shard)


def _ids_of(src, rows: np.ndarray) -> list[str]:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    out = [""] * rows.size
    pos: dict[int, list[int]] = {}
    for j, r in enumerate(rows.tolist()):
        pos.setdefault(r, []).append(j)
    want = np.unique(rows)
    for shard in src.shards:
        lo, hi = np.searchsorted(want, [shard.offset, shard.offset + shard.count])
        if hi == lo:
            continue
        ids = shard_ids(src, shard)
        for r in want[lo:hi].tolist():
            for j in pos[r]:
                out[j] = ids[r - shard.offset]
    return out


def write_scores(path, scores: np.ndarray) -> None:
    """Atomically write the (n,) float64 scores as ``.npy``."""
    from .atomic import atomic_path

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
        from .gpu import resolve_device

        self.device = resolve_device(device)
        self.block_rows = int(block_rows)

    def fit(self, src, *, drop_invalid: bool, **fit_kwargs) -> Subspace:
        from .subspace import fit_subspace

        return fit_subspace(src, block_rows=self.block_rows, drop_invalid=drop_invalid,
                            backend="cupy" if self.device == "cuda" else "numpy", **fit_kwargs)

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
# the dataset behind a store (run): one entry per input record
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Records:
    """The input dataset a store was extracted from, as ``run`` reads it.

    Attributes
    ----------
    path : str, list or dataset object
        The input as ``run`` was given it (read again by :func:`scalselect_fast.data.write_selected`
        and the gallery).
    ids : list of str or None
        Id per record (None where the record has no usable id).
    sources : list of str or None
        ``Sample.source`` per record (per-source counts).
    fields : dict of str to list
        Quota field values per record.
    skip_reason : dict of int to str
        Record index → why it has no representation.
    skip_counts : dict of str to int
        Reason → records skipped.
    selected_name : str
        File name of the selected dataset in the output directory (``selected.json``, ...).
    format : str
        Input container (``auto``, ``json``, ``jsonl``, ``parquet``).
    image_root : str or None
        Where relative image paths resolve (the gallery loads thumbnails from there).
    order : {"original", "score"}
        Record order of the selected dataset.
    id_field : str or None
        The id column the records were read with (``None``: ``id``, or the positional id of a
        record without one; see :func:`scalselect_fast.data.read_dataset`).
    text_only : list of int
        Indices of the text-only records (no image, so no representation). A fractional budget is
        of the records that are not text-only.
    keep_text_only : bool
        Write the text-only records to the selected dataset outside the budget (``run --text-only
        keep``): they are ``kept`` in the manifest, with no rank, and follow the ranked ids in
        ``selected.txt``.
    """

    path: Any
    ids: list
    sources: list
    fields: dict
    skip_reason: dict
    skip_counts: dict
    selected_name: str
    format: str = "auto"
    image_root: str | None = None
    order: str = "original"
    id_field: str | None = None
    text_only: list = dataclasses.field(default_factory=list)
    keep_text_only: bool = False

    @property
    def passthrough(self) -> list:
        """Record indices written outside the budget."""
        return self.text_only if self.keep_text_only else []


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
                  **fit_kwargs) -> dict:
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
    from .scoring import BudgetError, resolve_budget

    if manifest_format not in ("parquet", "jsonl"):
        raise ValueError(f"unknown manifest format {manifest_format!r}; use 'parquet' or 'jsonl'")
    if quotas and records is None:
        raise ValueError("quotas need the dataset's records (scalselect run)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SubspaceError(f"{out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(source)
    n_total = budget_base(src, records)["n"]
    m = resolve_budget(budget, n_total)  # fail before any heavy work
    src.check_unique_ids()  # the outputs name rows by id: a store with a repeated id is refused now
    executor = executor or LocalExecutor(device, block_rows)
    times: dict[str, float] = {k: float(v) for k, v in (timings or {}).items()}

    t = time.perf_counter()
    sub, reused = fit_or_load(subspace, lambda: executor.fit(src, drop_invalid=drop_invalid, **fit_kwargs))
    if subspace is None or "fit" not in times:
        times["fit"] = times.get("fit", 0.0) + (time.perf_counter() - t)
    if scores is None:
        scores, top, t_score, t_top = executor.score_and_select(src, sub, m, drop_invalid=drop_invalid)
        times["score"], select_s = t_score, t_top
    else:
        from .scoring import top_k

        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (src.n,):
            raise ValueError(f"scores has shape {scores.shape} but the source has {src.n} rows")
        t = time.perf_counter()
        n_scored = int(np.count_nonzero(~np.isnan(scores)))
        if m > n_scored:
            raise BudgetError(f"budget {budget!r} asks for {m} rows but only {n_scored} have a score")
        top = top_k(scores, m)
        select_s = time.perf_counter() - t
    t = time.perf_counter()
    valid = ~np.isnan(scores)
    order = np.flatnonzero(valid)
    order = order[np.lexsort((order, -scores[order]))]  # descending score, ties -> lower row
    post_info: dict[str, Any] = {}
    if dedup_eps is not None or quotas:
        from .postselect import select_ranked

        labels = None
        if quotas:
            row_record = _row_record(src, records)
            labels = {q.field: [records.fields[q.field][r] if records.fields[q.field][r] is not None else "<none>"
                                for r in row_record.tolist()] for q in quotas}
        kept_rows, post_info = select_ranked(order, m, labels=labels, quotas=list(quotas),
                                             vectors=src.read_rows, dedup_eps=dedup_eps)
        kept_rows = np.asarray(kept_rows, dtype=np.int64)
        if kept_rows.size < m and warn is not None:
            warn(f"only {kept_rows.size} of the {m} budgeted samples remain after near-duplicate removal "
                 f"(--dedup-selected {dedup_eps}); lower the threshold to keep more")
    else:
        kept_rows = np.asarray(top, dtype=np.int64)
    times["select"] = select_s + (time.perf_counter() - t)

    stability = None
    if stability_seeds is not None:
        t = time.perf_counter()
        stability = _stability(executor, src, sub, scores, m, tuple(stability_seeds), drop_invalid, kept_rows)
        times["stability"] = time.perf_counter() - t

    t = time.perf_counter()
    rank = np.zeros(src.n, np.int64)
    rank[order] = np.arange(RANK_BASE, RANK_BASE + order.size)
    kept_mask = np.zeros(src.n, bool)
    kept_mask[kept_rows] = True
    kept_ids = _ids_of(src, kept_rows)  # selection order
    # records written outside the budget (text-only ones, run --text-only keep), after the ranked ones
    extra_ids = [records.ids[i] for i in records.passthrough if records.ids[i] is not None] if records else []
    names = _output_names(out, manifest_format, records, html)
    report = build_report(src, sub, scores, kept_rows, kept_mask, m, budget, records=records,
                          post_info=post_info, stability=stability, reused=reused, executor=executor,
                          source=source, outputs={k: str(v) for k, v in names.items()}, timings=times,
                          drop_invalid=drop_invalid)
    if report_extra is not None:
        report.update(report_extra(kept_ids))
    gallery = None
    if html:
        t_g = time.perf_counter()
        gallery, report["gallery"] = _gallery(src, scores, order, kept_mask, records, warn)
        times["gallery"] = time.perf_counter() - t_g
    meta = {"scalselect.rank_base": str(RANK_BASE), "scalselect.budget": str(m), **dict(metadata or {})}
    with _Staged(out) as stage:
        sub.save(stage.path(names["subspace"]))
        write_scores(stage.path(names["scores"]), scores)
        _write_manifest(stage.path(names["manifest"]), manifest_format,
                        _manifest_batches(src, scores, rank, kept_mask, records, post_info.get("rejected", {})),
                        meta)
        from .atomic import atomic_write_bytes

        atomic_write_bytes(stage.path(names["selected_ids"]),
                           "".join(f"{i}\n" for i in kept_ids + extra_ids).encode("utf-8"))
        if records is not None:
            from .data import write_selected

            written = kept_ids + extra_ids
            write_selected(records.path, stage.path(names["selected"]),
                           keep=written if records.order == "score" else set(written),
                           order=records.order, format=records.format, id_field=records.id_field)
        crashpoint("select.staged")
        times["write"] = time.perf_counter() - t - times.get("gallery", 0.0)
        report["timings"] = dict(times)
        if html:
            from .report import render_html

            atomic_write_bytes(stage.path(names["report_html"]),
                               render_html(_jsonable(report), gallery=gallery).encode("utf-8"))
        if before_commit is not None:
            before_commit()
        stage.commit(names["report"], _jsonable(report))
    return report


def _row_record(src, records: Records) -> np.ndarray:
    """Record index of every stored row (ids are matched; the store holds the records' ids)."""
    from .data.ids import locate_ids

    ids = src.ids()
    rows = locate_ids(records.ids, ids)
    if (rows < 0).any():
        missing = [ids[j] for j in np.flatnonzero(rows < 0)[:3].tolist()]
        raise SubspaceError(f"the representation store holds ids not in {records.path} (e.g. {missing}); "
                            f"the dataset changed after extraction")
    return rows


def _stability(executor, src, sub, scores, m, seeds, drop_invalid, kept_rows) -> dict:
    from .scoring import top_k
    from .stability import stability_bound

    if seeds and hasattr(executor, "stability"):
        st = executor.stability(src, sub, scores, m, seeds, drop_invalid)
    else:
        st = stability_bound(sub, scores, m)
        st["refits"] = "not requested" if not seeds else \
            f"not applicable: the {executor.name} executor does not run the randomized solver"
    same = np.array_equal(np.sort(kept_rows), np.sort(top_k(scores, m)))
    st["certifies"] = ("the written selection (the top budget by score)" if same else
                       "the top budget by score, before post-selection changed the written selection")
    return st


def _output_names(out: Path, manifest_format: str, records, html: bool) -> dict[str, Path]:
    names = {"subspace": out / "subspace.npz", "scores": out / "scores.npy",
             "manifest": out / f"manifest.{manifest_format}", "selected_ids": out / "selected.txt",
             "report": out / "report.json"}
    if records is not None:
        names["selected"] = out / records.selected_name
    if html:
        names["report_html"] = out / "report.html"
    return names


# --------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------
def _manifest_batches(src, scores, rank, kept_mask, records, rejected: Mapping[int, str]) -> Iterator[dict]:
    """Column batches of the manifest: per store shard (select) or one batch per records table (run).

    ``rejected`` maps a stored row to why post-selection dropped it (``near-duplicate of row R``).
    """
    if records is None:
        for shard, ids in iter_shard_ids(src):
            sl = slice(shard.offset, shard.offset + shard.count)
            v = ~np.isnan(scores[sl])
            reasons = [rejected.get(shard.offset + j) if ok else INVALID_ROW for j, ok in enumerate(v.tolist())]
            yield {"id": list(ids), "index": np.arange(shard.offset, shard.offset + shard.count),
                   "shard": [shard.name] * shard.count, "row": np.arange(shard.count), "score": scores[sl],
                   "rank": rank[sl], "kept": kept_mask[sl], "skip_reason": reasons,
                   "_valid": v, "_placed": np.ones(shard.count, bool)}
        return
    n_rec = len(records.ids)
    row_record = _row_record(src, records)
    rec_row = np.full(n_rec, -1, np.int64)
    rec_row[row_record] = np.arange(src.n)
    has = rec_row >= 0
    rr = np.where(has, rec_row, 0)
    shard_of = np.empty(src.n, dtype=object)
    row_in = np.empty(src.n, np.int64)
    for sh in src.shards:
        shard_of[sh.offset:sh.offset + sh.count] = sh.name
        row_in[sh.offset:sh.offset + sh.count] = np.arange(sh.count)
    sc = scores[rr] if src.n else np.zeros(n_rec)
    valid = has & ~np.isnan(sc) if src.n else has
    reasons = []
    for i in range(n_rec):
        if not has[i]:
            reasons.append(records.skip_reason.get(i, "not extracted (no representation; see skipped.jsonl)"))
        elif not valid[i]:
            reasons.append(INVALID_ROW)
        else:
            reasons.append(rejected.get(int(rec_row[i])))
    kept = (kept_mask[rr] & has) if src.n else np.zeros(n_rec, bool)
    kept[np.asarray(records.passthrough, dtype=np.int64)] = True  # written outside the budget
    yield {"id": list(records.ids), "index": np.arange(n_rec),
           "shard": [shard_of[r] if h else None for r, h in zip(rr.tolist(), has.tolist())],
           "row": row_in[rr] if src.n else np.zeros(n_rec, np.int64), "score": sc,
           "rank": rank[rr] if src.n else np.zeros(n_rec, np.int64),
           "kept": kept,
           "skip_reason": reasons, "_valid": valid, "_placed": has}


def _write_manifest(path: Path, fmt: str, batches, metadata: Mapping[str, str]) -> None:
    """Write the manifest batches (see :data:`MANIFEST_SCHEMA`) to ``path`` (a staged temp name)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(n, getattr(pa, {"bool": "bool_"}.get(t, t))()) for n, t in MANIFEST_SCHEMA],
                           metadata={k: str(v) for k, v in metadata.items()})
        with pq.ParquetWriter(path, schema, compression="zstd") as w:
            for b in batches:
                v, placed = b["_valid"], b["_placed"]
                w.write_table(pa.table({
                    "id": pa.array(b["id"], pa.string()),
                    "index": pa.array(np.asarray(b["index"], np.int64), pa.int64()),
                    "shard": pa.array(b["shard"], pa.string()),
                    "row": pa.array(np.asarray(b["row"], np.int64), pa.int64(), mask=~placed),
                    "score": pa.array(np.where(v, b["score"], 0.0), pa.float64(), mask=~v),
                    "rank": pa.array(np.where(v, b["rank"], 0), pa.int64(), mask=~v),
                    "kept": pa.array(np.asarray(b["kept"], bool), pa.bool_()),
                    "skip_reason": pa.array(b["skip_reason"], pa.string())}, schema=schema))
        return
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for b in batches:
            v, placed = b["_valid"], b["_placed"]
            for j in range(len(b["id"])):
                ok = bool(v[j])
                fh.write(json.dumps({
                    "id": b["id"][j], "index": int(b["index"][j]), "shard": b["shard"][j],
                    "row": int(b["row"][j]) if placed[j] else None,
                    "score": float(b["score"][j]) if ok else None, "rank": int(b["rank"][j]) if ok else None,
                    "kept": bool(b["kept"][j]), "skip_reason": b["skip_reason"][j]}) + "\n")


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def build_report(src, sub, scores, kept_rows, kept_mask, m, budget, *, records=None, post_info=None,
                 stability=None, reused=None, executor=None, source=None, outputs=None, timings=None,
                 drop_invalid=False) -> dict:
    """The one report schema (``report.json``) of a selection."""
    from .report import collect_versions, score_histogram, spectrum_summary

    valid = ~np.isnan(scores)
    invalid = np.flatnonzero(~valid)
    n_samples = len(records.ids) if records is not None else int(src.n)
    n_valid = int(valid.sum())
    skip_counts = dict(records.skip_counts) if records is not None else {}
    if invalid.size:
        skip_counts["invalid_row"] = skip_counts.get("invalid_row", 0) + int(invalid.size)
    cutoff = float(scores[kept_rows].min()) if kept_rows.size else None
    per_source = None
    if records is not None:
        per_source = {}
        for s in records.sources:
            d = per_source.setdefault(s if s is not None else "<none>", {"total": 0, "kept": 0, "valid": 0})
            d["total"] += 1
        row_record = _row_record(src, records)
        for r, rec_i in enumerate(row_record.tolist()):
            s = records.sources[rec_i]
            d = per_source[s if s is not None else "<none>"]
            d["valid"] += int(valid[r])
            d["kept"] += int(kept_mask[r])
    spectrum = spectrum_summary(np.sqrt(np.maximum(np.asarray(sub.energy_curve, np.float64), 0)), sub.k,
                                sub.energy, sub.total_energy)
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": "ndarray" if isinstance(source, np.ndarray) else str(source),
        "source_dtype": src.dtype,
        "n_samples": n_samples, "n_valid": n_valid, "n_skipped": n_samples - n_valid,
        "budget": int(m), "budget_requested": str(budget), "n_selected": int(kept_rows.size),
        "order": records.order if records is not None else "score",
        "rank_base": RANK_BASE,
        "subspace": {"k": int(sub.k), "d": int(sub.d), "n": int(sub.n), "solver": sub.solver,
                     "solver_reason": sub.info.get("solver_reason"), "passes": int(sub.passes),
                     "energy": sub.energy, "captured_energy": float(sub.captured_energy / sub.total_energy),
                     "total_energy": float(sub.total_energy), "standardize": sub.scale is not None,
                     "l2_normalize": bool(sub.l2_normalize), "reused_from": reused,
                     "fit_timings": sub.info.get("timings", {}), "provenance": sub.provenance},
        "spectrum": spectrum,
        "scores": score_histogram(scores[valid], cutoff),
        "per_source": per_source,
        "skip_reasons": skip_counts,
        "invalid_rows": {"count": int(invalid.size), "rows": invalid[:1000].tolist(),
                         "ids": _ids_of(src, invalid[:1000]), "dropped": bool(drop_invalid)},
        "budget_base": budget_base(src, records),
        "text_only": None if records is None else {
            "n": len(records.text_only), "action": "kept" if records.keep_text_only else "dropped",
            "in_output": len(records.passthrough),
            "rule": ("text-only rows have no image, so no representation: they are never scored or ranked; "
                     "--text-only keep writes them to the selected dataset outside the budget, drop leaves "
                     "them out")},
        "postselect": {k: v for k, v in (post_info or {}).items() if k != "rejected"} or None,
        "stability": stability,
        "timings": dict(timings or {}),
        "executor": executor.describe() if executor is not None else None,
        "gallery": None,  # filled when report.html is written
        "versions": collect_versions(),
        "outputs": dict(outputs or {}),
    }


def budget_base(src, records: Records | None) -> dict:
    """What a fractional budget is a fraction of: the records that are not text-only (``run``; they
    have no representation by nature), or the stored rows (a store alone, ``src``)."""
    if records is None:
        return {"n": int(src.n), "of": "stored rows"}
    n = len(records.ids)
    return {"n": n - len(records.text_only), "of": "records that are not text-only", "n_records": n,
            "n_text_only": len(records.text_only)}


def _jsonable(obj):
    from .report import _jsonable as j

    return j(obj)


# --------------------------------------------------------------------------------------------------
# gallery (report.html)
# --------------------------------------------------------------------------------------------------
def _gallery(src, scores, order, kept_mask, records, warn):
    """Thumbnails for report.html and the JSON summary of what they show.

    Groups: the 12 highest-scored kept rows, the 12 last kept and 12 first rejected around the
    cut-off (in score order), and the 12 lowest-scored rows.
    """
    if records is None:
        return None, {"note": "no gallery: this selection was made from stored representations only "
                              "(no dataset, so no images to show)"}
    kept_order = order[kept_mask[order]]
    rej_order = order[~kept_mask[order]]
    g = GALLERY_SIZE
    groups = {"top kept": kept_order[:g], "last kept (cut-off)": kept_order[-g:],
              "first rejected (cut-off)": rej_order[:g], "lowest scored": order[::-1][:g][::-1]}
    row_record = _row_record(src, records)
    want = {int(row_record[r]) for rows in groups.values() for r in rows.tolist()}
    from .report import thumbnail

    samples = _load_samples(records, want)
    rank_of = np.empty(src.n, np.int64)
    rank_of[order] = np.arange(RANK_BASE, RANK_BASE + order.size)
    out, summary, failed = {}, {}, 0
    for name, rows in groups.items():
        items = []
        for r in rows.tolist():
            rec = int(row_record[r])
            sample = samples.get(rec)
            uri, why = (None, "record could not be read again") if sample is None else (None, "text only")
            if sample is not None and sample.images:
                uri, why = thumbnail(sample.images[0])
            failed += uri is None
            items.append({"id": records.ids[rec], "score": float(scores[r]), "rank": int(rank_of[r]),
                          "kept": bool(kept_mask[r]), "source": records.sources[rec],
                          "text": _instruction(sample), "thumbnail": uri, "missing": why if uri is None else None})
        out[name] = items
        summary[name] = [it["id"] for it in items]
    note = None
    if failed:
        note = f"{failed} thumbnail(s) could not be loaded (shown as placeholders with the reason)"
        if warn is not None:
            warn(f"report gallery: {note}")
    return out, {"groups": summary, "note": note}


class _NoSkipLog:
    """A skip log that forgets: records without a representation are not in the gallery anyway."""

    def add(self, *args, **kwargs) -> None:
        pass


def _load_samples(records: Records, want: set[int]) -> dict:
    """The Samples at the wanted record indices (one streaming pass, stopped once all are found)."""
    from .data import read_dataset

    found = {}
    if not want:
        return found
    for sample in read_dataset(records.path, records.image_root, records.format, skip_log=_NoSkipLog(),
                               id_field=records.id_field):
        if sample.index in want:
            found[sample.index] = sample
            if len(found) == len(want):
                break
    return found


def _instruction(sample, limit: int = 160) -> str:
    if sample is None:
        return ""
    from .data import IMAGE_TOKEN

    text = next((m["content"] for m in sample.messages if m["role"] == "user"), "")
    text = " ".join(text.replace(IMAGE_TOKEN, " ").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --------------------------------------------------------------------------------------------------
# staging and commit
# --------------------------------------------------------------------------------------------------
class _Staged:
    """Temporary names for the outputs of one selection, committed together with the report last.

    ``path(final)`` hands out a fresh temporary path beside ``final`` (``.<name>.stage-XXXX.tmp``:
    the ``stage-`` tag keeps ``selected`` and ``selected.txt`` apart); ``commit(report_path,
    report)`` removes the old report (so a reader knows the set is in flux), renames every staged file
    into place (directories too: an old one is moved aside and deleted after) and writes the report
    atomically as the last step. On an exception every staged file is deleted and the previous
    outputs are left as they were, report included.
    """

    def __init__(self, out: Path):
        self.out = out
        self.staged: list[tuple[Path, Path]] = []

    def __enter__(self):
        return self

    def path(self, final: Path) -> Path:
        final = Path(final)
        # left by a killed selection: staged names, and the writers' own temporaries of those
        for pattern in (f".{final.name}.stage-*.tmp", f"..{final.name}.stage-*.tmp.*.tmp"):
            for old in final.parent.glob(pattern):
                _remove(old)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.stage-", suffix=".tmp", dir=final.parent)
        os.close(fd)
        os.unlink(tmp)  # the writers create it (file or directory) through their own atomic path
        self.staged.append((Path(tmp), final))
        return Path(tmp)

    def commit(self, report_path: Path, report: dict) -> None:
        from .atomic import atomic_write_json

        for tmp, _ in self.staged:
            if not tmp.exists():
                raise FileNotFoundError(f"staged output {tmp} was not written")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(report_path)
        fsync_dir(self.out)
        for tmp, final in self.staged:
            if final.is_dir() and not final.is_symlink():
                aside = final.with_name(f".{final.name}.old.tmp")
                _remove(aside)
                os.replace(final, aside)
                os.replace(tmp, final)
                _remove(aside)
            else:
                os.replace(tmp, final)
            crashpoint("select.commit")  # the tests kill here after the n-th rename
        fsync_dir(self.out)
        self.staged = []
        atomic_write_json(report_path, report)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for tmp, _ in self.staged:
                _remove(tmp)
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


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
