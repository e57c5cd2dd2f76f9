"""Selection reports: ``report.json`` (machine-readable) and a self-contained ``report.html``.

The JSON report is the record of a run: what was selected, from what, with which subspace, how long
each stage took and how stable the cut is. The HTML report is rendered from that JSON alone (plus
nothing else), so it can be regenerated later with :func:`render_html`; its plots are PNGs drawn
with matplotlib's Agg backend and embedded as base64 data URIs, so the file has no external
references and opens offline.

The one exception is the thumbnail gallery (the samples at the top, around the cut-off and at the
bottom of the ranking): its downscaled JPEG thumbnails are embedded as data URIs too, but they are not
in ``report.json`` (they would bloat it); :func:`render_html` takes them as ``gallery``.

:func:`build_report` is the one schema of ``report.json``: it summarises a selection the job
(:mod:`scalselect_fast.selection`) has made. This module does not rank, select or write the other
outputs, and it does not choose the gallery's samples (:mod:`scalselect_fast.gallery` does).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_json
from .jsonable import to_jsonable
from .manifest import RANK_BASE
from .rowmap import ID_CHUNK, budget_base, ids_of, row_record, value_codes

__all__ = ["build_report", "score_histogram", "spectrum_summary", "collect_versions", "render_html", "write_report",
           "thumbnail", "REPORT_JSON", "REPORT_HTML", "THUMBNAIL_PX"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
#: longest side of a gallery thumbnail, in pixels
THUMBNAIL_PX = 128


# --------------------------------------------------------------------------------------------------
# pieces of the JSON report
# --------------------------------------------------------------------------------------------------
def build_report(src, sub, scores, kept_rows, kept_mask, m, budget, *, records=None, post_info=None,
                 stability=None, reused=None, executor=None, source=None, outputs=None, timings=None,
                 drop_invalid=False, rank=None) -> dict:
    """The one report schema (``report.json``) of a selection.

    Parameters
    ----------
    src : MatrixSource
        The stored representations (n rows).
    sub : Subspace
        The fit the scores were computed with.
    scores : ndarray (n,) float64
        NaN where a row has no score.
    kept_rows : ndarray of int64
        The selection, in selection order.
    kept_mask : ndarray (n,) bool
        ``kept_rows`` as a mask.
    m : int
        The resolved budget.
    budget : int, float or str
        The budget as requested.
    records : Records, optional
        The dataset behind the store (per-source counts, skip reasons, text-only records).
    post_info : dict, optional
        :func:`scalselect_fast.postselect.select_ranked`'s info (its ``rejected`` is left out).
    stability, reused, executor, source, outputs, timings, drop_invalid
        Carried into the sections of the same names.
    rank : ndarray (n,) of int, optional
        :data:`~scalselect_fast.manifest.RANK_BASE`-based rank of every scored row (0 for the others),
        as the manifest writes it: the median is then read at the middle ranks, not from a sorted copy.

    Returns
    -------
    dict
        With ``"gallery": None``, filled in when ``report.html`` is written.
    """
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
        codes, values = value_codes(records.sources)
        n_val = len(values)
        total = np.zeros(n_val, np.int64)
        for a in range(0, codes.size, ID_CHUNK):  # bincount of all codes at once makes an (n,) int64 copy
            total += np.bincount(codes[a:a + ID_CHUNK], minlength=n_val)
        n_valid_of = np.zeros(n_val, np.int64)
        n_kept_of = np.zeros(n_val, np.int64)
        rec_of = row_record(src, records)
        for a in range(0, rec_of.size, ID_CHUNK):  # per block: no (n,) temporaries
            c = codes[rec_of[a:a + ID_CHUNK]]
            n_valid_of += np.bincount(c[valid[a:a + ID_CHUNK]], minlength=n_val)
            n_kept_of += np.bincount(c[np.asarray(kept_mask[a:a + ID_CHUNK], bool)], minlength=n_val)
        for code, s in enumerate(values):  # codes are in order of first occurrence, as the keys were
            d = per_source.setdefault(s if s is not None else "<none>", {"total": 0, "kept": 0, "valid": 0})
            d["total"] += int(total[code])
            d["valid"] += int(n_valid_of[code])
            d["kept"] += int(n_kept_of[code])
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
        # the scores themselves where every row has one: the same values in the same order, without a copy
        "scores": score_histogram(scores if not invalid.size and scores.flags.c_contiguous else scores[valid],
                                  cutoff, median=None if rank is None else _median_at_ranks(scores, rank, n_valid)),
        "per_source": per_source,
        "skip_reasons": skip_counts,
        "invalid_rows": {"count": int(invalid.size), "rows": invalid[:1000].tolist(),
                         "ids": ids_of(src, invalid[:1000]), "dropped": bool(drop_invalid)},
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


def _median_at_ranks(scores: np.ndarray, rank: np.ndarray, n_valid: int) -> float | None:
    """``np.median`` of the scored values, from the rows at the middle ranks (no sorted copy of them).

    The ascending order statistic ``k`` of the ``n_valid`` scores is the row ranked
    ``RANK_BASE + n_valid - 1 - k``; ``np.median`` of the one or two middle values is the median of all.
    """
    from .scoring import rows_ranked

    if n_valid == 0:
        return None
    # ascending order statistics (n-1)//2 and n//2 (one row when n is odd) sit at these ranks
    lo, hi = RANK_BASE + n_valid - 1 - n_valid // 2, RANK_BASE + n_valid - (n_valid - 1) // 2
    return float(np.median(scores[rows_ranked(rank, lo, hi)]))


def score_histogram(scores: np.ndarray, cutoff: float | None, bins: int = 60, median: float | None = None) -> dict:
    """Summarise a score vector for the report.

    Parameters
    ----------
    scores : ndarray, shape (n,)
        Leverage scores of the valid samples (float64).
    cutoff : float or None
        Score of the last kept sample (the selection threshold); None when nothing was kept.
    bins : int
        Number of equal-width histogram bins between min and max.
    median : float, optional
        The median when the caller knows it (from the ranks); default ``np.median(scores)``.

    Returns
    -------
    dict
        ``min, max, mean, median, sum, cutoff, histogram={edges (bins+1), counts (bins)}``; plain
        Python floats/ints so it serialises to JSON.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return {"n": 0, "min": None, "max": None, "mean": None, "median": None, "sum": 0.0,
                "cutoff": cutoff, "histogram": {"edges": [], "counts": []}}
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-9
    counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
    return {"n": int(s.size), "min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()),
            "median": float(np.median(s)) if median is None else float(median), "sum": float(s.sum()),
            "cutoff": None if cutoff is None else float(cutoff),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


def spectrum_summary(singular_values: Sequence[float], k: int, energy: float | None,
                     total_energy: float | None = None, max_points: int = 4096) -> dict:
    """Spectrum of the centred representation matrix, for the spectrum plot.

    Parameters
    ----------
    singular_values : sequence of float, shape (r,)
        Singular values σ in descending order (as many as the solver computed).
    k : int
        Chosen number of components.
    energy : float or None
        Energy threshold that chose k (None when k was given directly).
    total_energy : float, optional
        Full Frobenius energy Σσ² of the centred matrix. Defaults to the sum of the given σ², which
        is only right when the solver computed the whole spectrum.
    max_points : int
        Keep at most this many leading values (the report stays small for large d).

    Returns
    -------
    dict
        ``singular_values`` (truncated), ``cumulative_energy`` (fraction of the total, same length),
        ``k``, ``energy``, ``total_energy``, ``captured_energy`` (fraction captured by the first k).
    """
    sv = np.asarray(singular_values, dtype=np.float64).reshape(-1)
    sq = sv ** 2
    tot = float(total_energy) if total_energy is not None else float(sq.sum())
    cum = np.cumsum(sq) / tot if tot > 0 else np.zeros_like(sq)
    k = int(k)
    captured = float(cum[k - 1]) if 0 < k <= cum.size else None
    m = min(sv.size, max_points)
    return {"singular_values": [float(x) for x in sv[:m]], "cumulative_energy": [float(x) for x in cum[:m]],
            "k": k, "energy": None if energy is None else float(energy), "total_energy": tot,
            "captured_energy": captured, "computed_components": int(sv.size)}


def collect_versions() -> dict:
    """Versions of Python, the package and the libraries that can change a result."""
    from importlib import metadata

    from . import __version__

    out = {"scalselect_fast": __version__, "python": platform.python_version(),
           "platform": platform.platform()}
    for dist in ("numpy", "scipy", "torch", "transformers", "faiss-cpu", "pyarrow", "pillow", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        from .native import BACKEND

        out["scoring_backend"] = BACKEND
    except Exception as exc:  # pragma: no cover - the loader never raises by design
        out["scoring_backend"] = f"unavailable ({exc})"
    return out


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    # metadata={"Software": None} keeps matplotlib's version string out of the PNG bytes
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_spectrum(spec: Mapping[str, Any]) -> str | None:
    sv = np.asarray(spec.get("singular_values") or [], dtype=np.float64)
    if sv.size == 0:
        return None
    import matplotlib.pyplot as plt

    cum = np.asarray(spec["cumulative_energy"], dtype=np.float64)
    k = int(spec["k"])
    x = np.arange(1, sv.size + 1)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    sq = sv ** 2
    ax.semilogy(x, np.where(sq > 0, sq, np.nan), color="#1f77b4", lw=1.4, label="σ² (component energy)")
    ax.set_xlabel("component")
    ax.set_ylabel("σ²", color="#1f77b4")
    ax.axvline(k, color="#d62728", ls="--", lw=1.2, label=f"chosen k = {k}")
    ax2 = ax.twinx()
    ax2.plot(x, cum, color="#2ca02c", lw=1.4, label="cumulative energy")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative energy (fraction of total)", color="#2ca02c")
    if spec.get("energy") is not None:
        ax2.axhline(float(spec["energy"]), color="#2ca02c", ls=":", lw=1.0,
                    label=f"threshold {float(spec['energy']):g}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title("Spectrum of the centred representations")
    return _png(fig)


def _plot_histogram(hist: Mapping[str, Any]) -> str | None:
    h = hist.get("histogram") or {}
    edges = np.asarray(h.get("edges") or [], dtype=np.float64)
    counts = np.asarray(h.get("counts") or [], dtype=np.float64)
    if counts.size == 0:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#7f7f7f", edgecolor="none")
    if hist.get("cutoff") is not None:
        ax.axvline(float(hist["cutoff"]), color="#d62728", ls="--", lw=1.2,
                   label=f"cut-off {float(hist['cutoff']):.4g} (kept: right of line)")
        ax.legend(fontsize=8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("leverage score ||U_k[i]||²")
    ax.set_ylabel("samples")
    ax.set_title("Score distribution")
    return _png(fig)


def _plot_sources(per_source: Mapping[str, Mapping[str, int]], max_bars: int = 30) -> str | None:
    if not per_source:
        return None
    import matplotlib.pyplot as plt

    items = sorted(per_source.items(), key=lambda kv: (-kv[1].get("total", 0), kv[0]))[:max_bars]
    names = [k for k, _ in items]
    total = np.array([v.get("total", 0) for _, v in items], dtype=float)
    kept = np.array([v.get("kept", 0) for _, v in items], dtype=float)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(names)))
    ax.barh(y, total, color="#c7c7c7", label="total")
    ax.barh(y, kept, color="#1f77b4", label="kept")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Per-source counts: kept vs total")
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# gallery thumbnails
# --------------------------------------------------------------------------------------------------
def thumbnail(image, px: int = THUMBNAIL_PX) -> tuple[str | None, str | None]:
    """A downscaled JPEG of one image as a data URI: ``(uri, None)``, or ``(None, why)`` if unreadable.

    Parameters
    ----------
    image : str, PathLike or EmbeddedImage
        What :func:`scalselect_fast.data.load_image` accepts.
    px : int
        Longest side of the thumbnail (aspect ratio kept; never enlarged).
    """
    from .data import ImageError, load_image

    try:
        img = load_image(image)
    except (ImageError, OSError, ValueError) as exc:
        return None, f"{getattr(exc, 'reason', 'image_unreadable')}: {exc}"
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def _more_images_html(it: Mapping[str, Any]) -> str:
    """The images of a multi-image sample after the first (small), and how many are not shown."""
    rest, more = list(it.get("images") or [])[1:], int(it.get("more_images") or 0)
    if not rest and not more:
        return ""
    imgs = [f'<img alt="{_esc(it.get("id"))} image {j}" src="{im["thumbnail"]}">' if im.get("thumbnail") else
            f'<span class="noimg" title="{_esc(im.get("missing") or "no image")}">image {j} missing</span>'
            for j, im in enumerate(rest, start=2)]
    if more:
        imgs.append(f'<span class="more">+{more} more</span>')
    return '<div class="more-imgs">' + "".join(imgs) + "</div>"


def _gallery_html(gallery: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    parts = []
    for name, items in gallery.items():
        figs = []
        for it in items:
            cls = "kept" if it.get("kept") else "rejected"
            img = (f'<img alt="{_esc(it.get("id"))}" src="{it["thumbnail"]}">' if it.get("thumbnail") else
                   f'<div class="noimg">{_esc(it.get("missing") or "no image")}</div>') + _more_images_html(it)
            meta = (f'<div class="meta">#{_esc(it.get("rank"))} · {_esc(_fmt(it.get("score")))} · '
                    f'{"kept" if it.get("kept") else "rejected"}<br>{_esc(it.get("id"))}'
                    + (f' · {_esc(it["source"])}' if it.get("source") else "") + "</div>")
            figs.append(f'<figure class="{cls}">{img}{meta}<div class="text">{_esc(it.get("text", ""))}</div></figure>')
        parts.append(f"<h3>{_esc(name)} ({len(items)})</h3><div class='gallery'>" + "".join(figs) + "</div>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:60em;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%}code,pre{background:#f6f6f6;font-size:.85em}pre{padding:.6em;overflow-x:auto}
.warn{color:#a00}
.gallery{display:flex;flex-wrap:wrap;gap:.6em;margin:.4em 0 1em}
.gallery figure{margin:0;width:150px;border:1px solid #ddd;padding:.3em;font-size:.75em;background:#fafafa}
.gallery figure.kept{border-color:#1f77b4}.gallery figure.rejected{border-color:#d62728}
.gallery img{display:block;margin:0 auto .3em;width:140px;height:140px;object-fit:contain}
.gallery .noimg{height:90px;display:flex;align-items:center;justify-content:center;color:#888;text-align:center}
.gallery .meta{color:#555}.gallery .text{margin-top:.2em;overflow-wrap:anywhere}
.gallery .more-imgs{display:flex;flex-wrap:wrap;gap:2px;margin-bottom:.3em}
.gallery .more-imgs img{width:44px;height:44px;margin:0}
.gallery .more-imgs .noimg,.gallery .more-imgs .more{height:44px;font-size:.9em;color:#888;display:flex;
align-items:center}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.6g}"
    return str(x)


def _kv_table(d: Mapping[str, Any], depth: int = 0) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v and depth < 2:  # nested sections read better as nested tables
            rows.append(f"<tr><th>{_esc(k)}</th><td>{_kv_table(v, depth + 1)}</td></tr>")
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True, ensure_ascii=False)
        cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
        rows.append(f"<tr><th>{_esc(k)}</th><td{cls}>{_esc(_fmt(v))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _img(uri: str | None, alt: str) -> str:
    return f'<p><img alt="{_esc(alt)}" src="{uri}"></p>' if uri else f"<p><em>{_esc(alt)}: no data</em></p>"


def render_html(report: Mapping[str, Any], gallery: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> str:
    """Render a report dict (the content of ``report.json``) as one self-contained HTML page.

    Parameters
    ----------
    report : mapping
        The run report. Known keys are rendered in sections (summary, spectrum, scores, per-source,
        timings, stability, configuration, versions); missing keys are skipped.
    gallery : mapping of group name to list of dict, optional
        Samples to show as thumbnails, per group in display order; each item has ``id``, ``score``,
        ``rank``, ``kept``, ``source``, ``text`` (the truncated instruction) and ``thumbnail`` (a data
        URI from :func:`thumbnail`, or None with the reason in ``missing``); a multi-image sample also
        has ``images`` (every shown image's ``thumbnail``/``missing``, the first included) and
        ``more_images`` (how many were left out), see :func:`scalselect_fast.gallery.build_gallery`.
        Without it the page says why there is no gallery (``report["gallery"]["note"]``).

    Returns
    -------
    str
        HTML with every plot embedded as a base64 PNG (no external files or URLs).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>scalselect report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>ScalSelect selection report</h1>"]
    summary_keys = ["n_samples", "n_valid", "n_skipped", "budget", "n_selected", "order",
                    "config_hash", "created"]
    summary = {k: report[k] for k in summary_keys if k in report}
    sub = report.get("subspace") or {}
    for k in ("k", "solver", "captured_energy"):
        if k in sub:
            summary[f"subspace {k}"] = sub[k]
    parts.append("<h2>Summary</h2>" + _kv_table(summary))
    outputs = report.get("outputs")
    if outputs:
        parts.append("<h2>Outputs</h2>" + _kv_table(outputs))

    spec = report.get("spectrum")
    if spec:
        parts.append("<h2>Spectrum and chosen k</h2>" + _img(_plot_spectrum(spec), "spectrum"))
        parts.append(f"<p>k = {int(spec['k'])} components capture "
                     f"{_fmt(spec.get('captured_energy'))} of the total energy "
                     f"(threshold {_fmt(spec.get('energy'))}); {spec.get('computed_components')} "
                     f"singular values computed.</p>")
    if sub:
        parts.append("<h3>Subspace</h3>" + _kv_table({k: v for k, v in sub.items()
                                                      if k not in ("singular_values",)}))
    scores = report.get("scores")
    if scores:
        parts.append("<h2>Scores and cut-off</h2>" + _img(_plot_histogram(scores), "score histogram"))
        parts.append(_kv_table({k: v for k, v in scores.items() if k != "histogram"}))
    per_source = report.get("per_source")
    if per_source:
        rows = "".join(
            f"<tr><td>{_esc(s)}</td><td class='num'>{v.get('kept', 0)}</td><td class='num'>{v.get('total', 0)}"
            f"</td><td class='num'>{(v.get('kept', 0) / v['total'] * 100 if v.get('total') else 0):.1f}%</td></tr>"
            for s, v in sorted(per_source.items()))
        parts.append("<h2>Per-source counts</h2>" + _img(_plot_sources(per_source), "per-source counts")
                     + "<table><tr><th>source</th><th>kept</th><th>total</th><th>kept %</th></tr>"
                     + rows + "</table>")
    gnote = (report.get("gallery") or {}).get("note")
    if gallery:
        parts.append("<h2>Samples: top, around the cut-off, bottom</h2><p>Thumbnails with the instruction "
                     "text (truncated), best first within each group; blue border = kept, red = rejected."
                     + (f" <span class='warn'>{_esc(gnote)}</span>" if gnote else "") + "</p>"
                     + _gallery_html(gallery))
    elif gnote:
        parts.append(f"<h2>Samples</h2><p><em>{_esc(gnote)}</em></p>")
    skips = report.get("skip_reasons")
    if skips:
        parts.append("<h2>Skipped samples</h2><p class='warn'>These samples have no representation and "
                     "were not eligible (details in skipped.jsonl and the manifest).</p>" + _kv_table(skips))
    truth = report.get("demo_truth")
    if truth:
        parts.append("<h2>Demo ground truth</h2>" + _kv_table(truth))
    post = report.get("postselect")
    if post:
        parts.append("<h2>Post-selection</h2>" + _kv_table(post))
    timings = report.get("timings")
    if timings:
        parts.append("<h2>Stage timings (seconds)</h2>" + _kv_table(
            {k: round(float(v), 3) for k, v in timings.items()}))
    stab = report.get("stability")
    if stab:
        parts.append("<h2>Stability certificate</h2>" + _kv_table(stab))
    for key, title in (("fingerprint", "Fingerprints"), ("config", "Configuration"), ("versions", "Versions")):
        if report.get(key):
            parts.append(f"<h2>{title}</h2>" + _kv_table(report[key]))
    parts.append("<h2>Raw report.json</h2><details><summary>show</summary><pre>"
                 + _esc(json.dumps(report, indent=1, sort_keys=True, default=str)[:200000])
                 + "</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: str | Path, report: Mapping[str, Any], html_report: bool = True) -> dict:
    """Write ``report.json`` and (optionally) ``report.html`` into ``out_dir`` atomically.

    Returns
    -------
    dict
        ``{"json": path, "html": path or None}``.
    """
    out_dir = Path(out_dir)
    jpath = out_dir / REPORT_JSON
    atomic_write_json(jpath, to_jsonable(report))
    hpath = None
    if html_report:
        hpath = out_dir / REPORT_HTML
        atomic_write_bytes(hpath, render_html(to_jsonable(report)).encode("utf-8"))
    return {"json": str(jpath), "html": None if hpath is None else str(hpath)}


