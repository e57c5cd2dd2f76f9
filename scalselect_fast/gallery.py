"""What the thumbnail gallery of ``report.html`` shows: which samples, with which images and text.

Four groups of the ranking, :data:`GALLERY_SIZE` samples each: the highest-scored kept rows, the last
kept and first rejected around the cut-off (in score order), and the lowest-scored rows. Every image
of a multi-image sample is shown, up to :data:`IMAGES_PER_SAMPLE` (the rest are counted, so the page
stays bounded); the first at :data:`~scalselect_fast.report.THUMBNAIL_PX`, the others at half that.

This module picks the samples and loads their thumbnails (one streaming pass over the dataset); it
does not render HTML (:func:`scalselect_fast.report.render_html` does) and it does not rank.
"""
from __future__ import annotations

import numpy as np

from .manifest import RANK_BASE
from .rowmap import Records, row_record

__all__ = ["build_gallery", "gallery_groups", "GALLERY_SIZE", "IMAGES_PER_SAMPLE"]

#: thumbnails per gallery group in report.html
GALLERY_SIZE = 12
#: images shown per multi-image sample; the others are counted ("+N more")
IMAGES_PER_SAMPLE = 4

_NO_RECORDS = ("no gallery: this selection was made from stored representations only "
               "(no dataset, so no images to show)")


def gallery_groups(rank: np.ndarray, kept_mask: np.ndarray, size: int = GALLERY_SIZE) -> dict[str, np.ndarray]:
    """The rows each gallery group shows, in rank order: the first and last ``size`` kept rows, the
    first ``size`` rejected ones and the ``size`` lowest scored.

    Parameters
    ----------
    rank : ndarray (n,) of int
        :data:`~scalselect_fast.manifest.RANK_BASE`-based rank of every scored row, 0 for the others
        (:func:`scalselect_fast.scoring.rank_scores`).
    kept_mask : ndarray (n,) bool
        The kept rows (all scored).
    size : int

    Returns
    -------
    dict of str to ndarray of int64
        The same rows as slicing the whole order (kept / rejected parts, its tail), read from the
        ranks a block at a time: memory is the kept rows, not an (n,) order.
    """
    from .scoring import rows_ranked

    kept = np.flatnonzero(kept_mask)
    kept_order = kept[np.argsort(rank[kept], kind="stable")]
    n_scored = sum(int(np.count_nonzero(rank[a:a + (1 << 20)])) for a in range(0, rank.size, 1 << 20))
    # among the best kept.size + size ranks at most kept.size rows are kept: the first rejected are there
    head = rows_ranked(rank, RANK_BASE, RANK_BASE + min(kept.size + size, n_scored))
    rejected = head[~kept_mask[head]][:size]
    tail = rows_ranked(rank, RANK_BASE + max(n_scored - size, 0), RANK_BASE + n_scored)
    return {"top kept": kept_order[:size], "last kept (cut-off)": kept_order[-size:],
            "first rejected (cut-off)": rejected, "lowest scored": tail}


def build_gallery(src, scores, rank, kept_mask, records: Records | None, warn=None) -> tuple[dict | None, dict]:
    """Thumbnails for report.html and the JSON summary of what they show.

    Parameters
    ----------
    src : MatrixSource
        The stored representations (n rows).
    scores : ndarray (n,) float64
    rank : ndarray (n,) of int
        :data:`~scalselect_fast.manifest.RANK_BASE`-based rank of every scored row, 0 for the others.
    kept_mask : ndarray (n,) bool
    records : Records or None
        The dataset behind the store; None gives no gallery, with a note saying why.
    warn : callable, optional
        Told once when some thumbnails could not be made.

    Returns
    -------
    gallery : dict of str to list of dict, or None
        Per group, in display order, the items :func:`scalselect_fast.report.render_html` takes:
        ``id``, ``score``, ``rank``, ``kept``, ``source``, ``text``, ``thumbnail``/``missing`` (the
        first image), ``images`` (each shown image's ``thumbnail``/``missing``) and ``more_images``.
    summary : dict
        ``groups`` (the ids per group) and ``note`` (what could not be shown), for ``report.json``.
    """
    if records is None:
        return None, {"note": _NO_RECORDS}
    groups = gallery_groups(rank, kept_mask)
    rec_of = row_record(src, records)
    samples = _load_samples(records, {int(rec_of[r]) for rows in groups.values() for r in rows.tolist()})
    out, summary, failed = {}, {}, 0
    for name, rows in groups.items():
        items = []
        for r in rows.tolist():
            rec = int(rec_of[r])
            sample = samples.get(rec)
            images, more = _thumbnails(sample)
            failed += sum(im["thumbnail"] is None for im in images)
            items.append({"id": records.ids[rec], "score": float(scores[r]), "rank": int(rank[r]),
                          "kept": bool(kept_mask[r]), "source": records.sources[rec],
                          "text": _instruction(sample), **images[0], "images": images, "more_images": more})
        out[name] = items
        summary[name] = [it["id"] for it in items]
    note = None
    if failed:
        note = f"{failed} thumbnail(s) could not be loaded (shown as placeholders with the reason)"
        if warn is not None:
            warn(f"report gallery: {note}")
    return out, {"groups": summary, "note": note}


def _thumbnails(sample) -> tuple[list[dict], int]:
    """``([{thumbnail, missing}, ...], images left out)``: at least one entry (a placeholder if none)."""
    from .report import THUMBNAIL_PX, thumbnail

    if sample is None:
        return [{"thumbnail": None, "missing": "record could not be read again"}], 0
    if not sample.images:
        return [{"thumbnail": None, "missing": "text only"}], 0
    shown = []
    for j, image in enumerate(sample.images[:IMAGES_PER_SAMPLE]):
        uri, why = thumbnail(image, THUMBNAIL_PX if j == 0 else THUMBNAIL_PX // 2)
        shown.append({"thumbnail": uri, "missing": why})
    return shown, max(len(sample.images) - IMAGES_PER_SAMPLE, 0)


def _load_samples(records: Records, want: set[int]) -> dict:
    """The Samples at the wanted record indices (one streaming pass, stopped once all are found)."""
    from .data import read_dataset
    from .data.skiplog import DiscardSkips

    found = {}
    if not want:
        return found
    for sample in read_dataset(records.path, records.image_root, records.format, skip_log=DiscardSkips(),
                               id_field=records.id_field):
        if sample.index in want:
            found[sample.index] = sample
            if len(found) == len(want):
                break
    return found


def _instruction(sample, limit: int = 160) -> str:
    """The first user turn without image placeholders, cut at ``limit`` characters."""
    if sample is None:
        return ""
    from .data import IMAGE_TOKEN

    text = next((m["content"] for m in sample.messages if m["role"] == "user"), "")
    text = " ".join(text.replace(IMAGE_TOKEN, " ").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
