"""Pre-flight estimate for ``scalselect run --plan``: time, disk and peak memory before anything runs.

Two levels of evidence. :func:`calibrate` measures the job on the user's own data and model: it parses
the first records with the run's reader (catching what the run would skip or refuse), loads the model
and times a few real batches through the extraction path the run uses (image decoding, preprocessing,
tokenisation, the truncated forward and pooling), and renders a report page of the run's shape. With
that, :func:`estimate_run` extrapolates per sample × N plus the fixed costs it measured. Without it
(the cheap pre-flight check of a real run) extraction time falls back to a FLOP count divided by a
measured matmul rate, which leaves decoding out and is only a lower bound.

Disk is counted per output in its real layout (store shards, checkpoints, scores, manifest, the
selected dataset in the input's format at the input's bytes per record, report.json and report.html
with its thumbnails, the representation cache), and compared with the free space of the filesystem of
``--out`` and of the cache directory. Constants and assumptions are listed in
:attr:`PlanEstimate.assumptions` and printed with the table.

Not here: running the job, or deciding anything the run decides (budgets, ids, skips): the plan calls
the same readers and extraction functions and reports what they say.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["PlanEstimate", "PlanError", "Calibration", "calibrate", "estimate_run", "startup_seconds", "model_cost",
           "count_samples", "measure_flops"]

GiB = 1024 ** 3
_DTYPE_BYTES = {"float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4}
#: fraction of the measured matmul rate a transformer forward reaches (layer norms, softmax, gathers)
FORWARD_EFFICIENCY = 0.35
#: Python interpreter + torch/transformers import, resident before any data
BASE_PROCESS_BYTES = int(0.6 * GiB)
#: bytes per store shard besides its rows (npy header, ids file, manifest entry) and per skip-log line
_SHARD_OVERHEAD = 700
_SKIP_LINE_BYTES = 2 * 180  # reps/skipped.jsonl and its published copy
#: report.json besides the gallery ids and the histogram/spectrum (config, fingerprints, versions)
_REPORT_JSON_BYTES = 8192
#: without calibration: a report page's plots and tables, one 128 px JPEG thumbnail, one gallery item's text
_REPORT_HTML_BYTES = 100_000
_THUMBNAIL_BYTES = 6_000
_GALLERY_ITEM_BYTES = 400



class PlanError(RuntimeError):
    """The run cannot fit on this machine; the message lists what to change."""


@dataclass
class PlanEstimate:
    """What a run will need. Times in seconds, sizes in bytes."""

    n: int
    d: int
    device: str
    processes: int = 1
    seconds: dict[str, float] = field(default_factory=dict)
    disk_bytes: dict[str, int] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    available: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    @property
    def total_disk(self) -> int:
        return int(sum(self.disk_bytes.values()))

    @property
    def peak_memory(self) -> int:
        return int(max(self.memory_bytes.values(), default=0))

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"n": self.n, "d": self.d, "device": self.device, "processes": self.processes, "seconds": self.seconds,
                "total_seconds": self.total_seconds, "disk_bytes": self.disk_bytes,
                "total_disk_bytes": self.total_disk, "memory_bytes": self.memory_bytes,
                "peak_memory_bytes": self.peak_memory, "available": self.available,
                "problems": self.problems, "ok": self.ok, "assumptions": self.assumptions}

    def format(self) -> str:
        gib = _size

        def dur(s):
            return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")

        lines = [f"Plan for N={self.n:,} samples, d={self.d}, device={self.device}"
                 + (f", {self.processes} extraction processes" if self.processes > 1 else "")]
        lines.append("  time (estimate):")
        lines += [f"    {k:<14} {dur(v):>12}" for k, v in self.seconds.items()]
        lines.append(f"    {'total':<14} {dur(self.total_seconds):>12}")
        if "calibrated" in self.assumptions:
            lines.append(f"    (measured on your data and model: {self.assumptions['calibrated']})")
        elif "extract" in self.seconds:
            lines.append("    (extract is a FLOP count: a lower bound without image decoding; --plan measures it)")
        lines.append(f"  disk (needed / free on output): {gib(self.total_disk)} / {gib(self.available.get('disk_free'))}")
        lines += [f"    {k:<24} {gib(v):>12}" for k, v in self.disk_bytes.items()]
        mem_avail = self.available.get("memory_available")
        lines.append(f"  peak memory (needed / available): {gib(self.peak_memory)} / {gib(mem_avail)}")
        lines += [f"    {k:<24} {gib(v):>12}" for k, v in self.memory_bytes.items()]
        if self.available.get("gpu_memory") is not None:
            lines.append(f"  GPU memory free: {gib(self.available['gpu_memory'])}")
        lines.append("  assumptions: " + ", ".join(f"{k}={v}" for k, v in self.assumptions.items() if k != "calibrated"))
        if self.problems:
            lines.append("  CANNOT RUN AS CONFIGURED:")
            lines += [f"    - {p}" for p in self.problems]
        else:
            lines.append("  fits: yes")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# model cost from a config.json
# --------------------------------------------------------------------------------------------------
def _load_config(model: str | os.PathLike | Mapping | None) -> dict:
    if model is None:
        return {}
    if isinstance(model, Mapping):
        return dict(model)
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanError(f"{model}: no config.json; pass a Hugging Face model directory")
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{p}: unreadable model config ({exc})") from exc


def model_cost(config: Mapping, layer: int = 0, text_tokens: int = 96) -> dict:
    """Parameter counts and per-sample FLOPs of what extraction runs, from a VLM ``config.json``.

    Parameters
    ----------
    config : mapping
        The model's config (LLaVA-style ``text_config``/``vision_config``, Qwen2-VL-style top-level
        text fields with ``vision_config``).
    layer : int
        Decoder layer ℓ; layers 0..ℓ run (early exit).
    text_tokens : int
        Assumed non-visual tokens per sample.

    Returns
    -------
    dict
        ``d`` (decoder hidden size), ``full_params``, ``run_params``, ``image_tokens``,
        ``flops_per_sample``.
    """
    text = dict(config.get("text_config") or {})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        if key not in text and key in config:
            text[key] = config[key]
    h = int(text.get("hidden_size", 4096))
    inter = int(text.get("intermediate_size", 4 * h))
    n_layers = int(text.get("num_hidden_layers", 32))
    heads = int(text.get("num_attention_heads", max(1, h // 128)))
    kv = int(text.get("num_key_value_heads", heads) or heads)
    vocab = int(text.get("vocab_size", 32000))
    head_dim = h // heads
    layer_params = h * h * 2 + 2 * h * kv * head_dim + 3 * h * inter
    vis = dict(config.get("vision_config") or {})
    # Qwen2-VL's vision "hidden_size" is the merger's output width; its transformer width is embed_dim
    vh = int(vis.get("embed_dim", vis.get("hidden_size", 1024)))
    v_inter = int(vis.get("intermediate_size", int(vis.get("mlp_ratio", 4) * vh)))
    v_layers = int(vis.get("num_hidden_layers", vis.get("depth", 24)))
    patch = int(vis.get("patch_size", 14))
    image_size = int(vis.get("image_size", 336))
    v_tokens = (image_size // patch) ** 2
    merge = int(vis.get("spatial_merge_size", 1))
    image_tokens = max(1, v_tokens // (merge * merge))
    v_params = v_layers * (4 * vh * vh + 2 * vh * v_inter)
    proj_params = vh * merge * merge * h + h * h
    ell = min(int(layer), n_layers - 1)
    run_layers = ell + 1
    seq = image_tokens + text_tokens
    flops = (2 * v_params * v_tokens + 4 * v_layers * v_tokens * v_tokens * vh
             + 2 * proj_params * image_tokens
             + 2 * layer_params * run_layers * seq + 4 * run_layers * seq * seq * h)
    return {"d": h, "full_params": int(vocab * h * 2 + n_layers * layer_params + v_params + proj_params),
            "run_params": int(vocab * h + run_layers * layer_params + v_params + proj_params),
            "image_tokens": image_tokens, "seq_tokens": seq, "flops_per_sample": float(flops),
            "hidden_size": h, "intermediate_size": inter}


def measure_flops(device: str = "cpu", seconds: float = 0.3) -> float:
    """Float32 matmul rate on ``device`` in FLOP/s: the best of short timed repeats.

    The best repeat (not the mean) is the machine's rate when it is not busy with something else;
    torch is used when importable (it is what extraction runs), numpy otherwise.
    """
    n = 768
    try:
        import torch

        dev = torch.device(device)
        a = torch.randn(n, n, device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def once():
            a @ a
            sync()
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)

        def once():
            a @ a
    once()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        once()
        best = max(best, 2 * n ** 3 / max(time.perf_counter() - t0, 1e-9))
    return best


def count_samples(path) -> tuple[int, int]:
    """(number of samples, bytes) of a dataset (file, directory, glob, URL or list), cheaply.

    The data layer's :func:`~scalselect_fast.data.count_records` counts (Parquet reads footers).
    """
    from .data import count_records
    from .data.sources import open_dataset

    source = open_dataset(path)
    return count_records(source), source.total_bytes()


# --------------------------------------------------------------------------------------------------
# calibration on the user's own data and model
# --------------------------------------------------------------------------------------------------
#: most batches run through the model by :func:`calibrate` (the first half is timed apart, as warm-up)
CALIBRATION_BATCHES = 16
#: no calibration batch starts after this many seconds (at least three run: one fixed, two timed)
CALIBRATION_SECONDS = 10.0
#: records parsed by :func:`calibrate` to find skips and the read rate (bounded by PROBE_SECONDS too)
PROBE_RECORDS = 2000
PROBE_SECONDS = 3.0
#: thumbnails :func:`calibrate` renders from the first images (the gallery's size is measured from them)
PROBE_THUMBNAILS = 8


@dataclass
class Calibration:
    """What :func:`calibrate` measured on the user's own records and model.

    Counts are records; times are seconds of this machine. ``skips`` counts the records the run's
    reader would skip among the ``parsed`` ones (text-only samples and image files missing under the
    image root included), ``model_kept / model_fed`` is the fraction of the remaining samples the
    model gave a vector to.
    """

    parsed: int = 0
    parse_seconds: float = 0.0
    exhausted: bool = False
    skips: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    id_bytes: float = 16.0
    digest_seconds: float = 0.0
    load_seconds: float = 0.0
    warmup: tuple[int, float] = (0, 0.0)
    timed: tuple[int, float] = (0, 0.0)
    timed_batches: int = 0
    model_fed: int = 0
    model_kept: int = 0
    d: int | None = None
    thumbnail_bytes: float | None = None
    thumbnail_seconds: float = 0.0
    report: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def keep_fraction(self) -> float:
        """Fraction of all records expected to get a representation."""
        if not self.parsed:
            return 1.0
        ok = self.parsed - sum(self.skips.values())
        model = self.model_kept / self.model_fed if self.model_fed else 1.0
        return max(0.0, ok / self.parsed) * model

    @property
    def seconds_per_sample(self) -> float:
        """Extraction seconds per sample after the warm-up (decode, preprocess, forward, pool).

        The mean over the timed batches, not the median: on a shared machine the run meets the same
        share of slow batches (other processes' bursts) as the calibration did, and a median would
        leave them out (it read 21 ms/sample where the run then took 93).
        """
        n, t = self.timed if self.timed[0] else self.warmup
        return t / n if n else 0.0


class _ProbeDone(Exception):
    """The probe has read enough (raised from the skip log, where a reader skipping every record
    hands control back between records)."""


class _ProbeSkips:
    """A skip log for the probe: counts reasons and keeps one example of each; with ``deadline``
    (a ``time.perf_counter()``) it ends the probe once past it."""

    def __init__(self, cal: Calibration, ids: set | None = None, deadline: float | None = None):
        self.cal, self.ids, self.deadline = cal, ids, deadline

    def add(self, sample_id, index, reason, detail="", **extra):
        self.cal.skips[reason] = self.cal.skips.get(reason, 0) + 1
        self.cal.examples.setdefault(reason, str(detail or sample_id))
        if self.ids is not None:
            self.ids.add(str(sample_id))
        if self.deadline is not None and time.perf_counter() > self.deadline and index is not None:
            self.cal.parsed = max(self.cal.parsed, int(index) + 1)
            raise _ProbeDone


def _missing_images(sample) -> list[str]:
    """The local image files of ``sample`` that do not exist (embedded images and URLs are not files)."""
    return [p for p in sample.images if isinstance(p, str) and "://" not in p and not os.path.exists(p)]


def _parse_probe(cal: Calibration, source, *, image_root, format, id_field, source_field, want: int) -> list:
    """Parse the first records with the run's reader; return the first ``want`` samples (for the model).

    A sample without an image, or whose image file is missing, counts as the skip the extraction
    will record for it (``text_only``, ``image_missing``), without loading any model.
    """
    from .data import read_dataset

    samples, t0 = [], time.perf_counter()
    # records the reader skips do not come back to this loop: the skip log stops a probe that finds
    # no sample at all (four times the time a probe that does may take)
    log = _ProbeSkips(cal, deadline=t0 + 4 * PROBE_SECONDS)
    try:
        _read_probe(cal, read_dataset(source, image_root=image_root, format=format, skip_log=log,
                                      id_field=id_field, source_field=source_field), log, samples, want, t0)
    except _ProbeDone:
        cal.exhausted = False
    cal.parsed = max(cal.parsed, sum(cal.skips.values()))
    cal.parse_seconds = time.perf_counter() - t0
    return samples


def _read_probe(cal: Calibration, it, log: _ProbeSkips, samples: list, want: int, t0: float) -> None:
    """Count what the samples of ``it`` show (ids, sources, would-be skips) until the probe's bounds."""
    id_total = n_read = 0
    cal.exhausted = True
    for s in it:
        cal.parsed = int(s.index) + 1
        id_total += len(str(s.id).encode("utf-8"))
        n_read += 1
        if s.source is not None:
            cal.sources[str(s.source)] = cal.sources.get(str(s.source), 0) + 1
        missing = _missing_images(s)
        if not s.images:
            log.add(s.id, s.index, "text_only", f"sample {s.id}: text-only sample (no image)")
        elif missing:
            log.add(s.id, s.index, "image_missing", f"sample {s.id}: image file {missing[0]} does not exist")
        if len(samples) < want:
            samples.append(s)
        cal.id_bytes = id_total / n_read
        if len(samples) >= want and (cal.parsed >= PROBE_RECORDS or time.perf_counter() - t0 > PROBE_SECONDS):
            cal.exhausted = False
            break


def calibrate(model, data, *, image_root=None, format: str = "auto", id_field: str | None = None,
              source_field: str | None = None, batch_size: int = 8, extract_options: Mapping[str, Any] | None = None,
              model_options: Mapping[str, Any] | None = None, batches: int = CALIBRATION_BATCHES,
              max_seconds: float = CALIBRATION_SECONDS) -> Calibration:
    """Measure the run's costs on its own data and model, in bounded time.

    Parameters
    ----------
    model : path
        The model directory the run will load.
    data : DataSource or anything :func:`~scalselect_fast.data.sources.open_dataset` accepts
        The run's dataset.
    image_root, format, id_field, source_field
        As for :func:`scalselect_fast.data.read_dataset` (``sources`` counts by ``source_field``, as
        the run's per-source counts do).
    batch_size : int
        The run's batch size; ``batches`` batches of it are run (the first half timed apart, as warm-up).
    extract_options : mapping, optional
        Keyword arguments of :func:`~scalselect_fast.extract.extract_representations` (threshold,
        instruction, num_workers, max_image_pixels).
    model_options : mapping, optional
        Keyword arguments of :func:`~scalselect_fast.extract.model.load_vlm` (layer, dtype, device,
        max_length, roles, vision_tokens, pixels).
    batches : int, >= 3
    max_seconds : float
        No new batch starts after this many seconds (three batches always run).

    Returns
    -------
    Calibration
        ``problems`` lists what the run would refuse (unreadable input, every record skipped, a model
        that cannot encode the samples); other fields are the measurements.

    Notes
    -----
    Four measurements: (1) the run's reader parses up to :data:`PROBE_RECORDS` records
    (:data:`PROBE_SECONDS` at most), counting skips and the read rate; (2) the input's digest is
    computed as the run computes it; (3) the model is loaded and ``batches`` batches of the first
    samples go through :func:`~scalselect_fast.extract.extract_representations`, the path the run's
    extraction uses, so image decoding and preprocessing are inside the timing; (4) a report page of
    the run's shape is rendered with thumbnails of the first images.
    """
    from .data import DatasetError, open_dataset

    cal = Calibration()
    try:
        source = open_dataset(data, format)
        samples = _parse_probe(cal, source, image_root=image_root, format=format, id_field=id_field,
                               source_field=source_field, want=max(3, int(batches)) * int(batch_size))
        t0 = time.perf_counter()
        source.digest()
        cal.digest_seconds = time.perf_counter() - t0
    except DatasetError as exc:
        cal.problems.append(f"data: {exc}")
        return cal
    if cal.parsed and cal.keep_fraction == 0.0:
        cal.problems.append(_all_skipped(cal))
        return cal
    _time_batches(cal, model, samples, batch_size, dict(extract_options or {}), dict(model_options or {}),
                  max_seconds)
    if cal.model_fed and not cal.model_kept and cal.exhausted:
        cal.problems.append(_all_skipped(cal))
    _measure_report(cal, samples)
    return cal


def _all_skipped(cal: Calibration) -> str:
    where = "every record" if cal.exhausted else f"the first {cal.parsed} records"
    why = ", ".join(f"{k}: {v}" for k, v in sorted(cal.skips.items()))
    example = next(iter(cal.examples.values()), "")
    return (f"data: {where} would be skipped ({why}), so the run has nothing to select from; e.g. {example}. "
            f"Check the image paths and --image-root, --id-field, or that the dataset is not text-only")


def _time_batches(cal: Calibration, model, samples: list, batch_size: int, extract_options: dict,
                  model_options: dict, max_seconds: float) -> None:
    """Load the model and time batches of ``samples`` through the run's extraction path."""
    from .extract import extract_representations
    from .extract.model import load_vlm
    from .extract.roles import ExtractError

    skipped: set = set()
    log = _ProbeSkips(Calibration(), skipped)  # the model's own skips; the reader's are counted already
    pre = {str(s.id) for s in samples if not s.images or _missing_images(s)}
    try:
        t0 = time.perf_counter()
        vlm = load_vlm(model, **model_options)
        cal.load_seconds = time.perf_counter() - t0
        cal.d = int(vlm.hidden_size)
        marks, t_start, fed = [], time.perf_counter(), 0
        batches = extract_representations(vlm, samples, batch_size=batch_size, skip_log=log, **extract_options)
        with contextlib.closing(batches):  # stopping early ends its encoding pool now
            for _ids, _vecs in batches:
                fed = min(len(samples), fed + batch_size)
                marks.append((fed, time.perf_counter()))
                if len(marks) >= 3 and marks[-1][1] - t_start > max_seconds:
                    break
    except (ExtractError, ValueError, OSError) as exc:
        cal.problems.append(f"model: extracting the first samples failed: {type(exc).__name__}: {exc}")
        return
    if not marks:
        return
    # The first half of the batches is warm-up, a fixed cost: every new padded length still sets up
    # kernels for a while (on the demo, batches 2-16 ran at 19-56 ms/sample, later ones at 12-20),
    # so the rate comes from the second half only.
    w = max(1, len(marks) // 2)
    cal.warmup = (marks[w - 1][0], marks[w - 1][1] - t_start)
    if len(marks) > w:
        cal.timed = (marks[-1][0] - marks[w - 1][0], marks[-1][1] - marks[w - 1][1])
        cal.timed_batches = len(marks) - w
    fed_ok = [s for s in samples[:marks[-1][0]] if str(s.id) not in pre]
    cal.model_fed = len(fed_ok)
    cal.model_kept = sum(1 for s in fed_ok if str(s.id) not in skipped)


def _measure_report(cal: Calibration, samples: list) -> None:
    """Thumbnail size/time from the first images, and the time/size of a report page of the run's shape."""
    from .report import render_html, score_histogram, spectrum_summary, thumbnail

    uris, t0 = [], time.perf_counter()
    for s in samples:
        if len(uris) >= PROBE_THUMBNAILS:
            break
        if s.images:
            uri, _why = thumbnail(s.images[0])
            if uri is not None:
                uris.append(uri)
    if uris:
        cal.thumbnail_seconds = (time.perf_counter() - t0) / len(uris)
        cal.thumbnail_bytes = sum(map(len, uris)) / len(uris)
    import numpy as np

    d = cal.d or 64
    rng = np.random.default_rng(0)  # any spectrum and scores: the page's size and cost, not its content
    sv = sorted(rng.random(d).tolist(), reverse=True)
    scores = rng.random(1000)
    per_source = {k: {"kept": v // 6, "total": v} for k, v in cal.sources.items()} or {"all": {"kept": 1, "total": 6}}
    page = {"spectrum": spectrum_summary(sv, max(1, d // 4), 0.9),
            "scores": score_histogram(scores, float(scores.mean())), "per_source": per_source}
    t0 = time.perf_counter()
    html = render_html(page)
    cal.report = {"seconds": time.perf_counter() - t0, "html_bytes": len(html.encode("utf-8")),
                  "json_bytes": len(json.dumps(page))}


# --------------------------------------------------------------------------------------------------
# the estimate
# --------------------------------------------------------------------------------------------------
def _mem_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return None


def _gpu_free(device: str) -> int | None:
    if not str(device).startswith("cuda"):
        return None
    try:
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except Exception:
        return None


def estimate_run(n: int, *, model: str | os.PathLike | Mapping | None = None, d: int | None = None,
                 device: str = "cpu", dtype: str = "float16", store_dtype: str = "float16",
                 batch_size: int = 8, layer: int = 0, out_dir: str | os.PathLike = ".",
                 data_bytes: int = 0, budget_fraction: float = 0.16, solver: str = "auto",
                 flops_per_s: float | None = None, text_tokens: int = 96, avg_id_bytes: int = 24,
                 memory_available: int | None = None, disk_free: int | None = None,
                 calibration: Calibration | None = None, shard_size: int = 4096,
                 cache_dir: str | os.PathLike | None = None, html: bool = True,
                 startup_seconds: float = 0.0, processes: int = 1) -> PlanEstimate:
    """Estimate time, disk and peak memory of ``scalselect run`` and list what would not fit.

    Parameters
    ----------
    n : int
        Number of records.
    model : path or mapping, optional
        Model directory (its ``config.json`` is read) or the config dict. Without it only the
        selection stages are estimated and ``d`` is required.
    d : int, optional
        Representation width (defaults to the calibrated model's, else the config's hidden size).
    device, dtype : str
        Extraction device and model dtype.
    store_dtype : str
        Representation store dtype.
    data_bytes : int
        Bytes of the input files; the selected dataset is estimated at the input's bytes per record.
    budget_fraction : float in [0, 1]
        Selected records / records.
    flops_per_s : float, optional
        Device matmul rate; measured (~0.3 s) when omitted and needed.
    memory_available, disk_free : int, optional
        Override the machine's free memory / free disk on ``out_dir`` (for tests and remote planning).
    calibration : Calibration, optional
        Measurements from :func:`calibrate`; extraction time, skip rate, id and thumbnail sizes and the
        report's cost come from it. Without it extraction is a FLOP count (a lower bound: image
        decoding and preprocessing are left out).
    shard_size : int
        Records per representation store shard.
    cache_dir : path, optional
        The representation cache the run writes to (None: ``--cache none``).
    html : bool
        Whether report.html is written.
    startup_seconds : float
        Time the run spends before its first stage (imports and input checks), measured by the caller.
    processes : int, >= 1
        Extraction processes (``--devices``: one per device, ``cpu:N``: N). Each owns ``n / processes``
        records and starts in parallel with the others, paying on its own the start-up
        (``startup_seconds``), the model load and the warm-up, and parsing the records before its
        range; its memory is counted once per process (each loads its own copy of the model).

    Returns
    -------
    PlanEstimate
        With ``problems`` non-empty when the run cannot fit; each problem names what to change.
    """
    n = int(n)
    cal = calibration
    cost = model_cost(_load_config(model), layer, text_tokens) if model is not None else None
    if d is None:
        d = cal.d if cal is not None and cal.d else (cost["d"] if cost is not None else None)
        if d is None:
            raise PlanError("estimate_run needs a model config or d")
    d = int(d)
    rate = float(flops_per_s) if flops_per_s else measure_flops(device)
    wbytes = _DTYPE_BYTES.get(str(dtype).lower(), 4)
    sbytes = _DTYPE_BYTES.get(str(store_dtype).lower(), 2)
    processes = int(processes)
    if processes < 1:
        raise PlanError(f"estimate_run: processes must be >= 1, got {processes}")
    est = PlanEstimate(n=n, d=d, device=str(device), processes=processes)
    own = -(-n // processes)  # the records of the largest rank
    from .subspace import choose_solver  # the fit's own auto rule, so the plan budgets the solver it runs

    exact = solver == "exact" or (solver == "auto" and choose_solver(n, d)[0] == "exact")
    k_guess = max(1, d // 4)
    keep = cal.keep_fraction if cal is not None else 1.0
    rows = int(round(n * keep))
    n_sel = int(round(n * min(1.0, max(0.0, budget_fraction))))
    id_bytes = cal.id_bytes if cal is not None and cal.id_bytes else avg_id_bytes
    from .gallery import GALLERY_SIZE

    gallery = min(4 * GALLERY_SIZE, rows)  # four groups: top, both sides of the cut-off, bottom
    selected_bytes = int(data_bytes * n_sel / max(n, 1))
    # time
    if startup_seconds:
        est.seconds["startup"] = float(startup_seconds) + (cal.digest_seconds if cal is not None else 0.0)
    read = cal.parse_seconds / cal.parsed if cal is not None and cal.parsed else 0.0
    # Several processes run side by side, so the wall time is the largest rank's: a fresh interpreter
    # (the start-up measured on this one), the model load and the warm-up, its own records, and parsing
    # every record up to the end of its range (read * n; at most: the files wholly before a range are
    # passed over, so a sharded input costs less). cpu:N processes share the machine's cores,
    # so past one process per core the per-sample time grows in proportion. The FLOP count (no
    # calibration) is the machine's matmul rate: GPUs add theirs, CPU processes share one.
    cuda = str(device).startswith("cuda")
    child_start = float(startup_seconds) if processes > 1 else 0.0
    crowding = 1.0 if cuda else processes / min(processes, os.cpu_count() or 1)
    if cal is not None and cal.warmup[0]:
        est.seconds["extract"] = (child_start + cal.load_seconds + cal.warmup[1]
                                  + cal.seconds_per_sample * max(own - cal.warmup[0], 0) * crowding + read * n)
    elif cost is not None:
        est.seconds["extract"] = child_start + n * cost["flops_per_sample"] / (rate * FORWARD_EFFICIENCY) / (
            processes if cuda else 1)
    fit_flops = 2.0 * rows * d * d + 10.0 * d ** 3 if exact else 2 * 2.0 * rows * d * (2 * k_guess) * 3
    est.seconds["fit"] = fit_flops / rate
    est.seconds["score"] = (2.0 * rows * d * k_guess) / rate
    select = n * 4e-6 + data_bytes / 200e6 + selected_bytes / 200e6
    if cal is not None:
        # the record table and the gallery each read the records again; the digest is checked again
        # before the commit; thumbnails and the report page as measured
        select += 2 * read * n + cal.digest_seconds + gallery * cal.thumbnail_seconds
        select += cal.report.get("seconds", 0.0) if html else 0.0
    est.seconds["select+write"] = select
    # disk, output by output in the layout the run writes
    n_shards = max(1, -(-n // max(int(shard_size), 1)))
    skipped = (n - rows) * _SKIP_LINE_BYTES
    est.disk_bytes["representation store"] = (rows * d * sbytes + rows * int(id_bytes + 1)
                                              + n_shards * _SHARD_OVERHEAD + skipped)
    est.disk_bytes["fit checkpoint"] = d * d * 8 + 4 * d * 8 + 1024 if exact else 0
    # scores: one checkpoint per shard and scores.npy; subspace.npz: the checkpoint and the output
    est.disk_bytes["scores"] = 2 * rows * 8 + (n_shards + 1) * 128
    est.disk_bytes["subspace"] = 2 * (d * (k_guess + 2) * 8 + 2048)
    est.disk_bytes["manifest.parquet"] = 4096 + n * int(id_bytes + 16)
    est.disk_bytes["selected dataset"] = selected_bytes + n_sel * int(id_bytes + 1) + skipped
    report_json = _REPORT_JSON_BYTES + gallery * int(id_bytes + 4) + (cal.report.get("json_bytes", 0) if cal else 0)
    est.disk_bytes["report.json"] = report_json
    if html:
        thumb = cal.thumbnail_bytes if cal is not None and cal.thumbnail_bytes else _THUMBNAIL_BYTES
        page = cal.report.get("html_bytes", _REPORT_HTML_BYTES) if cal is not None else _REPORT_HTML_BYTES
        est.disk_bytes["report.html"] = int(page + 1.3 * report_json + gallery * (thumb + _GALLERY_ITEM_BYTES))
    if cache_dir is not None:
        est.disk_bytes["cache"] = rows * (4 * d + 37) + 4096
    est.disk_bytes["margin (10%)"] = int(0.1 * sum(est.disk_bytes.values()))
    # memory per stage (peak = max over stages)
    block = 16384 * d * 4 * 2
    if cost is not None:
        act = batch_size * cost["seq_tokens"] * (cost["hidden_size"] * 8 + cost["intermediate_size"] * 3) * 4
        # extraction loads only the layers it runs (vision tower, projector, embeddings, layers 0..ℓ)
        est.memory_bytes["extract"] = processes * (BASE_PROCESS_BYTES + cost["run_params"] * wbytes + act
                                                   if not str(device).startswith("cuda") else BASE_PROCESS_BYTES + act // 8)
        if str(device).startswith("cuda"):
            est.assumptions["gpu_weights_bytes"] = cost["run_params"] * wbytes + act
    est.memory_bytes["fit"] = BASE_PROCESS_BYTES + (3 * d * d * 8 if exact else 3 * d * 2 * k_guess * 8) + block
    # per record: the float64 score, the int32 rank and record index, a code (at most int32) and the kept
    # mask; the record ids wait in a temporary file; per kept record its id as a Python string and in a set
    est.memory_bytes["score+select"] = BASE_PROCESS_BYTES + n * (8 + 4 + 4 + 4 + 1) + n_sel * int(id_bytes + 100) \
        + block
    est.available = {"disk_free": disk_free if disk_free is not None else _disk_free(out_dir),
                     "memory_available": memory_available if memory_available is not None else _mem_available(),
                     "gpu_memory": _gpu_free(device)}
    est.assumptions.update({"matmul_flops_per_s": f"{rate:.3g}", "forward_efficiency": FORWARD_EFFICIENCY,
                            "solver": "exact" if exact else "randomized", "k_guess": k_guess,
                            "store_dtype": store_dtype, "model_dtype": dtype, "extract_processes": processes})
    if cost is not None:
        est.assumptions.update({"model_params_loaded": cost["run_params"], "image_tokens": cost["image_tokens"],
                                "text_tokens": text_tokens})
    # problems, each with the fix
    if out_dir is not None:
        where = _existing_ancestor(out_dir)
        if not (where.is_dir() and os.access(where, os.W_OK | os.X_OK)):
            est.problems.append(f"output: cannot write under {out_dir} ({where} is not a writable folder); "
                                f"choose an --out you can write to")
    if cal is not None:
        _calibration_findings(est, cal, n, n_sel, rows)
    _check_disk(est, out_dir, cache_dir, store_dtype)
    mem = est.available["memory_available"]
    fix = {"extract": "use --device cuda, a smaller --dtype (bf16) or a lower --batch-size",
           "fit": "use --solver randomized (memory O(d·k) instead of O(d²))",
           "score+select": "split the dataset and select per part, or run on a machine with more RAM"}
    for stage, need in est.memory_bytes.items():
        if mem is not None and need > mem:
            est.problems.append(f"memory: stage '{stage}' needs ~{_size(need)} but {_size(mem)} "
                                f"is available; {fix.get(stage, 'free memory')}")
    gpu = est.available.get("gpu_memory")
    need_gpu = est.assumptions.get("gpu_weights_bytes")
    if gpu is not None and need_gpu and need_gpu > gpu:
        est.problems.append(f"GPU memory: the model needs ~{_size(need_gpu)} but {_size(gpu)} is "
                            f"free; use --dtype bfloat16, a lower --batch-size, or device_map over more GPUs")
    return est


#: a process older than this when the plan starts is a long-lived one (a notebook, a service), not a
#: fresh ``scalselect run`` whose age is its start-up cost
FRESH_PROCESS_SECONDS = 120.0


def startup_seconds(since: float | None = None) -> float:
    """Seconds a fresh ``scalselect run`` process spends before its first stage, measured on this one.

    The age of this process when it is fresh (interpreter start, imports, the input checks the run
    makes too); in a long-lived process only the time since ``since`` (a ``time.perf_counter()``).
    """
    try:
        import psutil

        age = time.time() - psutil.Process().create_time()
    except Exception:  # pragma: no cover - psutil missing or /proc unreadable
        age = FRESH_PROCESS_SECONDS
    if age < FRESH_PROCESS_SECONDS:
        return float(age)
    return float(time.perf_counter() - since) if since is not None else 0.0


def _calibration_findings(est: PlanEstimate, cal: Calibration, n: int, n_sel: int, rows: int) -> None:
    """What the calibration measured, in the assumptions; what the run would refuse, in the problems."""
    est.problems.extend(cal.problems)
    fed = cal.warmup[0] + cal.timed[0]
    est.assumptions["calibrated"] = (
        f"read {cal.parsed} records ({cal.parse_seconds:.2f} s), model load {cal.load_seconds:.2f} s, "
        f"{fed} samples extracted ({cal.seconds_per_sample * 1e3:.1f} ms/sample over "
        f"{cal.timed_batches} batches after a warm-up of "
        f"{cal.warmup[0]} in {cal.warmup[1]:.2f} s)")
    if cal.skips:
        est.assumptions["skipped_in_probe"] = ", ".join(f"{k}: {v}" for k, v in sorted(cal.skips.items()))
    if not cal.problems and n_sel > rows:
        sure = "" if cal.exhausted else f" (estimated from the first {cal.parsed} records)"
        est.problems.append(f"budget: selects {n_sel} samples but only ~{rows} of the {n} records will have a "
                            f"representation{sure}; lower --budget or fix the skipped samples "
                            f"({est.assumptions.get('skipped_in_probe', '')})")


def _check_disk(est: PlanEstimate, out_dir, cache_dir, store_dtype: str) -> None:
    """Compare the outputs with the free space of --out's filesystem and, when it is another one, of
    the cache directory's."""
    cache_need = int(1.1 * est.disk_bytes.get("cache", 0))
    out_need = est.total_disk
    if cache_dir is not None and out_dir is not None and not _same_filesystem(cache_dir, out_dir):
        out_need -= cache_need
        cache_free = est.available.setdefault("cache_disk_free", _disk_free(cache_dir))
        if cache_free is not None and cache_need > cache_free:
            est.problems.append(f"disk: the representation cache needs ~{_size(cache_need)} under {cache_dir} "
                                f"but only {_size(cache_free)} is free; choose another --cache or --cache none")
    free = est.available["disk_free"]
    if free is not None and out_need > free:
        big = sorted(((v, k) for k, v in est.disk_bytes.items() if not k.startswith("margin")), reverse=True)[:3]
        est.problems.append(
            f"disk: needs ~{_size(out_need)} under {out_dir} ({', '.join(f'{k} {_size(v)}' for v, k in big)}) "
            f"but only {_size(free)} is free; choose another --out on a larger disk, or store representations "
            f"as --store-dtype float16/bfloat16 (now {store_dtype})")


def _same_filesystem(a, b) -> bool:
    try:
        return os.stat(_existing_ancestor(a)).st_dev == os.stat(_existing_ancestor(b)).st_dev
    except OSError:  # pragma: no cover
        return True


def _disk_free(path: str | os.PathLike) -> int | None:
    """Free bytes for writing under ``path``, counting what is already there as free.

    A rerun or a resume overwrites or reuses what an earlier run left under ``path`` (store shards,
    checkpoints, outputs), so those bytes are available to it too; without them a run that stopped
    on a full disk would be refused again after the user freed space.
    """
    free = _fs_free(path)
    if free is None:
        return None
    p = Path(path)
    held = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.is_dir() else 0
    return free + held


def _size(b: int | None) -> str:
    """Bytes in the unit that shows them (a plan of a few MiB must not read "0.00 GiB")."""
    if b is None:
        return "?"
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def _existing_ancestor(path: str | os.PathLike) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _fs_free(path: str | os.PathLike) -> int | None:
    p = _existing_ancestor(path)
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:  # pragma: no cover
        return None
