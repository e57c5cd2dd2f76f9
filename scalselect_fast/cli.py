"""The ``scalselect`` command line. Thin: parse arguments, call the API, print.

Each command group lives in its own ``add_*`` function so it can grow without touching the others.
"""
from __future__ import annotations

import argparse
import sys


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--energy", type=float, default=0.9,
                   help="keep the smallest k whose σ² reach this fraction of the total energy (default 0.9)")
    p.add_argument("--k", type=int, default=None, help="use exactly k components (overrides --energy)")
    p.add_argument("--solver", choices=["auto", "exact", "randomized"], default="auto")
    p.add_argument("--standardize", action="store_true", help="divide centred columns by their std")
    p.add_argument("--l2-normalize", action="store_true", help="L2-normalise rows after centring/scaling")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized solver")


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-rows", type=int, default=16384, help="rows per streamed block")
    p.add_argument("--drop-invalid", action="store_true",
                   help="exclude rows with NaN/inf (recorded in the report) instead of failing")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where the fit's and scores' products run: cuda needs CuPy and a GPU; auto "
                        "uses the GPU when usable, else the CPU (default cpu)")


def _check_seed(args) -> None:
    """A negative --seed is refused whatever the solver, before any work (the randomized one cannot
    use it, and the exact one would record it as if it meant something)."""
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: seeds are integers >= 0, e.g. --seed 0")


def _fit_kwargs(args) -> dict:
    _check_seed(args)
    return dict(energy=args.energy, k=args.k, solver=args.solver, standardize=args.standardize,
                l2_normalize=args.l2_normalize, seed=args.seed)


class UsageError(ValueError):
    """An option value the command cannot use (printed as one line, exit status 2)."""


def _out_file(path: str, option: str = "--out") -> str:
    """``path`` if it can name an output file (not an existing directory)."""
    import os

    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory; name the file to write (e.g. {os.path.join(path, 'x')})")
    return path


def _no_overwrite(outputs, inputs) -> None:
    """Refuse, before any work, outputs that would replace an input (see :mod:`scalselect_fast.paths`)."""
    from .paths import refuse_overwrite

    refuse_overwrite(outputs, inputs)


def _core_errors(fn):
    """Turn the engine's input errors into one clear line and exit status 2 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(args):
        from .distributed import SchedulerError
        from .gpu import DeviceError
        from .paths import OverwriteError
        from .scoring import BudgetError
        from .store import StoreError
        from .subspace import SubspaceError

        try:
            return fn(args)
        except (StoreError, SubspaceError, BudgetError, DeviceError, OverwriteError, UsageError,
                SchedulerError, FileNotFoundError) as exc:
            print(f"scalselect {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return wrapper


@_core_errors
def _cmd_fit(args) -> int:
    from .devices import array_backend
    from .subspace import fit_subspace

    _no_overwrite([_out_file(args.out)], [args.source])
    sub = fit_subspace(args.source, block_rows=args.block_rows, drop_invalid=args.drop_invalid,
                       array_backend=array_backend(args.device), **_fit_kwargs(args))
    sub.save(args.out)
    bad = len(sub.info.get("invalid_rows", []))
    print(f"fit: {sub.summary()}" + (f"; {bad} invalid rows dropped" if bad else "") + f" -> {args.out}")
    return 0


@_core_errors
def _cmd_score(args) -> int:
    import numpy as np

    from .scoring import leverage_scores
    from .selection import write_scores
    from .subspace import Subspace

    _no_overwrite([_out_file(args.out)], [args.source, args.subspace])
    sub = Subspace.load(args.subspace)
    scores = leverage_scores(args.source, sub, block_rows=args.block_rows,
                             drop_invalid=True if args.drop_invalid else None, device=args.device)
    write_scores(args.out, scores)
    bad = int(np.isnan(scores).sum())
    print(f"score: {scores.size} rows scored with k={sub.k}" + (f" ({bad} invalid: NaN)" if bad else "")
          + f" -> {args.out}")
    return 0


@_core_errors
def _cmd_select(args) -> int:
    from .selection import print_selection, run_selection

    _check_seed(args)
    seeds = _stability_seeds(args.stability_seeds)
    _no_overwrite([args.out], [args.source, args.subspace])
    report = run_selection(args.source, args.out, args.budget, subspace=args.subspace,
                           manifest_format=args.manifest_format, drop_invalid=args.drop_invalid,
                           block_rows=args.block_rows, stability_seeds=seeds,
                           device=args.device, html=args.html, **({} if args.subspace else _fit_kwargs(args)))
    print_selection(report)
    return 0


def _stability_seeds(text: str):
    """``--stability-seeds``: ``none`` -> None (no entry), ``''`` -> () (margin + bound, the default),
    ``0,1,2`` -> (0, 1, 2) (also re-fits under those seeds)."""
    from .stability import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise UsageError(f"--stability-seeds {exc}") from None


def add_core_commands(sub: argparse._SubParsersAction) -> None:
    """fit | score | select over a store or .npy (core engine). (`demo` is the run pipeline's.)"""
    p = sub.add_parser("fit", help="fit the dominant subspace of a store or .npy and save it (.npz)")
    p.add_argument("source", help="representation store directory or .npy matrix (n, d)")
    p.add_argument("--out", required=True, help="subspace file to write (.npz)")
    _add_fit_args(p)
    _add_stream_args(p)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("score", help="leverage scores of every row under a fitted subspace (.npy)")
    p.add_argument("source", help="representation store directory or .npy matrix (n, d)")
    p.add_argument("--subspace", required=True, help="subspace file written by `scalselect fit`")
    p.add_argument("--out", required=True, help="scores file to write (.npy, float64, NaN = invalid row)")
    _add_stream_args(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("select", help="fit + score + top budget in one go; writes a directory")
    p.add_argument("source", help="representation store directory or .npy matrix (n, d)")
    p.add_argument("--budget", required=True, help="rows to keep: a count (100000; 1 = one row), a fraction "
                                                   "(0.16; 1.0 = all rows) or a percentage (16%%)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--subspace", default=None, help="reuse this fitted subspace instead of fitting")
    p.add_argument("--manifest-format", choices=["parquet", "jsonl"], default="parquet")
    p.add_argument("--stability-seeds", default="",
                   help="the report always carries the cut-off margin and a perturbation bound from the fit "
                        "(no extra pass); seeds such as 0,1,2 also re-fit with the randomized solver under "
                        "them and compare the selections (reported as not applicable when that solver would "
                        "hand over to exact); 'none' leaves the stability entry out")
    p.add_argument("--no-html", dest="html", action="store_false",
                   help="skip report.html (report.json is always written)")
    _add_fit_args(p)
    _add_stream_args(p)
    p.set_defaults(func=_cmd_select)



def add_dask_options(sub: argparse._SubParsersAction) -> None:
    """--dask-scheduler ADDRESS on fit | score | select: the same job on a Dask cluster (scale)."""
    for name, dask_cmd in (("fit", _cmd_fit_dask), ("score", _cmd_score_dask), ("select", _cmd_select_dask)):
        p = sub.choices.get(name)
        if p is None:
            continue
        p.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                       help="run on this Dask scheduler (tcp://host:8786 or a scheduler .json file); "
                            "every worker must see the store at the same path")
        p.set_defaults(func=_dask_or_local(p.get_default("func"), dask_cmd))


def _dask_or_local(local, dask_cmd):
    def run(args):
        return dask_cmd(args) if getattr(args, "dask_scheduler", None) else local(args)
    return run


@_core_errors
def _cmd_fit_dask(args) -> int:
    from . import distributed

    _no_overwrite([_out_file(args.out)], [args.source])
    with distributed.connect(args.dask_scheduler) as client:
        kwargs = _fit_kwargs(args)
        kwargs.pop("seed")  # the exact solver, the only one on Dask, draws nothing
        sub = distributed.fit_subspace(args.source, client, block_rows=args.block_rows,
                                       drop_invalid=args.drop_invalid, **kwargs)
    sub.save(args.out)
    w = sub.info["distributed"]
    print(f"fit (dask, {w['workers']} workers, {w['shards']} shards): {sub.summary()} -> {args.out}")
    return 0


@_core_errors
def _cmd_score_dask(args) -> int:
    import numpy as np

    from . import distributed
    from .selection import write_scores
    from .subspace import Subspace

    _no_overwrite([_out_file(args.out)], [args.source, args.subspace])
    sub = Subspace.load(args.subspace)
    with distributed.connect(args.dask_scheduler) as client:
        scores = distributed.leverage_scores(args.source, sub, client, block_rows=args.block_rows,
                                             drop_invalid=True if args.drop_invalid else None)
    write_scores(args.out, scores)
    bad = int(np.isnan(scores).sum())
    print(f"score (dask): {scores.size} rows scored with k={sub.k}" + (f" ({bad} invalid: NaN)" if bad else "")
          + f" -> {args.out}")
    return 0


@_core_errors
def _cmd_select_dask(args) -> int:
    from . import distributed
    from .selection import print_selection

    _check_seed(args)
    seeds = _stability_seeds(args.stability_seeds)
    _no_overwrite([args.out], [args.source, args.subspace])
    with distributed.connect(args.dask_scheduler) as client:
        report = distributed.run_selection(args.source, args.out, args.budget, client, subspace=args.subspace,
                                           manifest_format=args.manifest_format, drop_invalid=args.drop_invalid,
                                           block_rows=args.block_rows, html=args.html,
                                           stability_seeds=seeds,
                                           **({} if args.subspace else _fit_kwargs(args)))
    print_selection(report)
    return 0


_DATA_HELP = ("dataset: a file (LLaVA JSON, ShareGPT JSON, JSONL, Parquet), a directory, a glob "
              "('data/train-*.parquet'), a datasets save_to_disk directory, a URL (s3://, gs://, hf://) "
              "or several of these")


class _DataAction(argparse.Action):
    """``--data`` takes one input or several (a shell-expanded glob); one is kept as a plain string."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


_ID_FIELD_HELP = ("column holding each record's unique id (default: 'id'; rows of files without an id column, "
                  "such as the Cauldron's and FineVision's, are named <file relative to --data>#<row>)")


def _formats() -> list[str]:
    from .data.sources import formats

    return list(formats())


def add_extract_command(sub: argparse._SubParsersAction) -> None:
    """extract: representations from a VLM into a store."""
    p = sub.add_parser(
        "extract", help="extract ScalSelect representations from a vision-language model into a store",
        description="Run a VLM up to decoder layer L on every sample and store one instruction-attended "
                    "vector per sample (resumable; one process per device with --devices, or launched "
                    "by torchrun/accelerate).")
    p.add_argument("--model", required=True, help="local checkpoint directory (LLaVA-1.5 hf, Qwen2/2.5/3-VL, ...)")
    p.add_argument("--data", required=True, nargs="+", action=_DataAction, help=_DATA_HELP)
    p.add_argument("--image-root", default=None, help="directory relative image paths are joined to")
    p.add_argument("--out", required=True, help="output store directory")
    p.add_argument("--layer", type=int, default=0, help="decoder layer (0-based) [0]")
    p.add_argument("--threshold", type=float, default=0.9, help="cumulative attention mass to keep [0.9]")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass [8]")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="model compute dtype; auto = bf16 on a GPU that supports it, fp32 on CPU [auto]")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when one is usable, "
                                                    "else cpu) [auto]")
    p.add_argument("--devices", default="auto",
                   help="extraction processes, one per device, writing one store: auto (every visible GPU, else "
                        "one CPU process; --device cuda:N keeps that one), a list such as cuda:0,cuda:3, or cpu:N "
                        "(N CPU processes) [auto]")
    p.add_argument("--device-map", default=None, help="transformers device_map (e.g. auto) for models that "
                                                      "do not fit one device")
    p.add_argument("--instruction", default="all", choices=["all", "user"],
                   help="attention rows: all non-visual non-answer tokens, or user text only [all]")
    _add_fidelity_options(p, defaults=True)
    p.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the vectors [float16]")
    p.add_argument("--shard-size", type=int, default=4096, help="records per shard [4096]")
    p.add_argument("--max-length", type=int, default=None,
                   help="skip samples longer than this many tokens [model max positions]")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, metavar="N",
                   help="skip images over N pixels (width x height, read from the header before decoding) as "
                        "image_too_large [40000000]")
    p.add_argument("--format", default="auto", choices=_formats(), help="input container (auto: from the files)")
    p.add_argument("--id-field", metavar="NAME", default=None, help=_ID_FIELD_HELP)
    p.add_argument("--padding-side", default="right", choices=["left", "right"])
    p.add_argument("--pool-impl", default=None, choices=["auto", "torch", "triton"],
                   help="pooling kernel implementation [auto: triton on CUDA, torch otherwise]")
    p.add_argument("--backend", dest="old_backend", default=None, choices=["auto", "torch", "triton"],
                   help=argparse.SUPPRESS)  # the old name of --pool-impl, accepted with a warning
    p.add_argument("--num-workers", type=int, default=0,
                   help="processes encoding samples (template, tokenizer, images) one batch ahead [0]")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="representation cache: look every sample up by content first, extract only the misses "
                        "and add them (shared between runs, datasets and processes) [off]")
    p.add_argument("--force", action="store_true", help="discard an existing store from a different run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args) -> int:
    import json

    from .extract import extract_to_store
    from .paths import OverwriteError

    if args.quiet:  # no transformers load bars either: errors stay one line
        from .run.stages import quiet_libraries

        quiet_libraries()
    try:
        from .data.sources import open_dataset as open_data

        from .run.config import check_extract_options

        check_extract_options(layer=args.layer, threshold=args.threshold, batch_size=args.batch_size,
                              shard_size=args.shard_size, max_length=args.max_length,
                              num_workers=args.num_workers, image_root=args.image_root, format=args.format)
        data_files = [f for f in open_data(args.data, args.format).input_paths() if "://" not in f]
        _no_overwrite([args.out], [args.model, *data_files])
        summary = _extract(args, extract_to_store)
    except (*_run_errors(), OverwriteError) as exc:
        return _fail(args, exc)
    print(json.dumps(summary))
    return 0


def _extract(args, extract_to_store) -> dict:
    return extract_to_store(
        args.model, args.data, args.out, image_root=args.image_root, format=args.format,
        batch_size=args.batch_size, layer=args.layer, threshold=args.threshold, instruction=args.instruction,
        dtype=args.dtype, device=args.device, devices=args.devices, device_map=args.device_map, store_dtype=args.store_dtype,
        shard_size=args.shard_size, max_length=args.max_length, padding_side=args.padding_side,
        pool_impl=_pool_impl_arg(args), force=args.force, progress=not args.quiet, num_workers=args.num_workers,
        roles=args.roles, vision_tokens=args.vision_tokens, pixels=args.pixels,
        max_image_pixels=args.max_image_pixels, id_field=args.id_field, cache=args.cache,
        warn=lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))


def _pool_impl_arg(args) -> str:
    """``--pool-impl``, or the value given under its old name ``--backend`` (with a warning)."""
    if args.old_backend is None:
        return args.pool_impl or "auto"
    if args.pool_impl is not None:
        from .extract.roles import ExtractError

        raise ExtractError("--backend is the old name of --pool-impl; pass --pool-impl only")
    print("warning: --backend is deprecated for the pooling kernel; use --pool-impl", file=sys.stderr, flush=True)
    return args.old_backend


def _pixels_arg(value: str) -> str:
    from .extract.model import parse_pixels

    try:
        parse_pixels(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _add_fidelity_options(p, defaults: bool) -> None:
    """--roles, --vision-tokens, --pixels: the authors' extraction by default, today's others as options."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--roles", default=d("reference"), choices=["reference", "label-mask"],
                   help="answer tokens: the answer text itself, end-of-turn markers count as instruction "
                        "(reference, the authors' rule), or text + end-of-turn marker (label-mask) [reference]")
    p.add_argument("--vision-tokens", default=d("reference"), choices=["reference", "pad-only"],
                   help="visual tokens: image tokens + Qwen's <|vision_start|>/<|vision_end|> (reference, the "
                        "authors' set) or image tokens only (pad-only) [reference]")
    p.add_argument("--pixels", default=d("paper"), type=_pixels_arg, metavar="paper|processor|MIN:MAX",
                   help="Qwen-VL image size range: 262144:589824 pixels (paper, the authors' setting), the "
                        "checkpoint's own (processor) or MIN:MAX [paper]")


def add_cache_command(sub: argparse._SubParsersAction) -> None:
    """cache: inspect, check and shrink a representation cache (see ``--cache``)."""
    p = sub.add_parser("cache", help="representation cache: info, verify, prune",
                       description="Inspect (size, entries, models), verify (every entry's checksum) or prune "
                                   "(by age or by model) a representation cache directory.")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("info", "size, entries and batches per model + settings"),
                       ("verify", "read every entry and check its checksum (exit 1 if any fails)"),
                       ("prune", "delete entries older than --older-than DAYS and/or of --model NAME")):
        q = csub.add_parser(name, help=text)
        q.add_argument("dir", help="the cache directory")
        if name == "prune":
            q.add_argument("--older-than", type=float, metavar="DAYS", help="batches written more than DAYS ago")
            q.add_argument("--model", help="every entry of models whose path (or context digest) contains NAME")
            q.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args) -> int:
    import json

    from .extract.cache import CacheError, cache_info, prune_cache, verify_cache

    try:
        if args.action == "info":
            out = cache_info(args.dir)
        elif args.action == "verify":
            out = verify_cache(args.dir)
        else:
            out = prune_cache(args.dir, older_than_days=args.older_than, model=args.model, dry_run=args.dry_run)
    except CacheError as exc:
        return _fail(args, exc)
    print(json.dumps(out, indent=2))
    return 1 if args.action == "verify" and (out["bad_entries"] or out["bad_batches"]) else 0


def add_baseline_command(sub: argparse._SubParsersAction) -> None:
    """baseline --method NAME, and bench."""
    from .baselines import METHODS

    p = sub.add_parser("baseline", help="select with a baseline method (random, kcenter, ...)",
                       description="Run a baseline selection method on the same representations "
                                   "ScalSelect uses; writes indices.npy, selected_ids.txt, report.json.")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("source", help="representation store directory or .npy matrix")
    p.add_argument("--budget", required=True, help="count (100000; 1 = one row), fraction (0.16; 1.0 = all "
                                                   "rows) or percentage (16%%)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-n", type=int, default=None, dest="max_n",
                   help="facility_location: run dense on a random subset of this many rows")
    p.add_argument("--knn", type=int, default=None,
                   help="facility_location: sparse K-nearest-neighbour similarity graph")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra method option (repeatable), e.g. --opt n_clusters=500 --opt eps=0.1")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where faiss runs for semdedup, cluster_balanced and facility_location --knn: cuda "
                        "needs faiss-gpu (scalselect-fast[gpu]); auto falls back to the CPU [cpu]")
    p.set_defaults(func=_cmd_baseline)

    b = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks) from a source checkout")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to `python -m benchmarks`")
    b.set_defaults(func=_cmd_bench)


def _parse_opts(items: list[str]) -> dict:
    import json

    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--opt {item!r}: expected KEY=VALUE, e.g. --opt n_clusters=500")
        try:
            opts[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.replace("-", "_")] = value  # a bare string such as keep=easy
    return opts


def _cmd_baseline(args) -> int:
    import time
    from pathlib import Path

    import numpy as np

    from . import baselines
    from .scoring import resolve_budget
    from .atomic import atomic_write_bytes, atomic_write_json
    from .store import open_source

    try:
        _check_seed(args)
        opts = _parse_opts(args.opt)
        for key in ("max_n", "knn"):
            if getattr(args, key) is not None:
                opts[key] = getattr(args, key)
        _check_method_opts(args.method, opts)
        _no_overwrite([args.out], [args.source])
        src = open_source(args.source)
        budget = resolve_budget(args.budget, src.n)
        src.check_unique_ids()
    except ValueError as exc:  # UsageError / OverwriteError / StoreError / BudgetError: one line
        print(f"scalselect baseline: {exc}", file=sys.stderr)
        return 2
    import inspect

    from .gpu import DeviceError

    if "device" in inspect.signature(baselines.get(args.method)).parameters:
        opts.setdefault("device", args.device)
    elif args.device == "cuda":
        print(f"scalselect baseline {args.method}: this method has no GPU path (it uses no faiss); "
              f"use --device cpu or auto", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        idx = baselines.select(args.method, src, budget, seed=args.seed, **opts)
    except TypeError as exc:  # an --opt value of the wrong type
        print(f"scalselect baseline {args.method}: an --opt value has the wrong type ({exc}); see "
              f"`scalselect baseline --help`", file=sys.stderr)
        return 2
    except (ValueError, MemoryError, DeviceError) as exc:  # bad input, size refusal, missing faiss-gpu
        print(f"scalselect baseline {args.method}: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    np.save(buf, idx)
    atomic_write_bytes(out / "indices.npy", buf.getvalue())
    ids = src.ids()
    atomic_write_bytes(out / "selected_ids.txt", "".join(f"{ids[i]}\n" for i in idx).encode("utf-8"))
    atomic_write_json(out / "report.json", {
        "method": args.method, "source": str(args.source), "n": src.n, "d": src.d, "dtype": src.dtype,
        "budget": int(budget), "seed": args.seed, "options": opts, "seconds": round(seconds, 4)})
    print(f"{args.method}: selected {budget} of {src.n} rows in {seconds:.2f} s -> {out}")
    return 0


def _check_method_opts(method: str, opts: dict) -> None:
    """Refuse an --opt the method does not take, listing the ones it does."""
    import inspect

    from . import baselines

    params = inspect.signature(baselines.get(method)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n in params if n not in ("source", "budget", "seed")]
    for key in opts:
        if key not in known:
            raise UsageError(f"--opt {key}: the {method} method has no option {key!r}; its options: "
                             f"{', '.join(known) or 'none'}")


def _cmd_bench(args) -> int:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise SystemExit("the benchmarks live in the source checkout (benchmarks/), which this "
                         "installation does not have; clone the repository and run `scalselect bench` "
                         "or `python -m benchmarks` from its root")
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.args], cwd=root)


def add_run_command(sub: argparse._SubParsersAction) -> None:
    """run: the end-to-end job (extract -> fit -> score -> select -> write dataset and report), and demo."""
    p = sub.add_parser(
        "run", help="dataset -> selected dataset: extract, fit, score, select, write (resumable)",
        description="Select a subset of a multimodal instruction dataset with ScalSelect, end to end. "
                    "Every stage checkpoints under OUT/.scalselect; rerun the same command to resume.")
    p.add_argument("--config", help="run.toml / run.yaml / run.json with any of the options below "
                                    "(command-line flags override the file)")
    g = p.add_argument_group("input and output")
    g.add_argument("--model", help="local Hugging Face VLM directory (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, ...)")
    g.add_argument("--data", nargs="+", action=_DataAction, help=_DATA_HELP)
    g.add_argument("--image-root", help="directory that relative image paths are joined to (paths may not "
                                        "escape it)")
    g.add_argument("--format", choices=_formats(), help="input container (auto: from the files)")
    g.add_argument("--id-field", metavar="NAME", help=_ID_FIELD_HELP)
    g.add_argument("--source-field", metavar="NAME",
                   help="what per-source counts and --quota source=... group by: a record field, or image_folder "
                        "(the first folder of the image path: coco/train2017/1.jpg -> coco, for LLaVA-665K); "
                        "default: the first of source, dataset, data_source, task, task_type, category")
    g.add_argument("--text-only", choices=["drop", "keep"],
                   help="rows without an image: drop them (the reference) or keep them in the output, outside "
                        "the budget (drop)")
    g.add_argument("--out", help="output directory (created; holds the selection, manifest, report)")
    g.add_argument("--budget", help="samples to keep: a count (100000; 1 = one sample), a fraction (0.16; "
                                    "1.0 = all) or a percentage (16%%); default 16%%")
    g.add_argument("--order", choices=["original", "score"], help="order of the selected dataset "
                                                                   "(default original)")
    g = p.add_argument_group("representation and subspace")
    g.add_argument("--layer", type=int, help="decoder layer whose attention/hidden states are used (0)")
    g.add_argument("--threshold", type=float, help="cumulative attention mass of kept visual tokens (0.9)")
    g.add_argument("--energy", type=float, help="spectral energy the subspace keeps (0.9)")
    g.add_argument("--k", type=int, help="fixed number of components (overrides --energy)")
    g.add_argument("--solver", choices=["auto", "exact", "randomized"], help="subspace solver (auto)")
    g.add_argument("--seed", type=int, help="seed of the randomized solver and certificates (0)")
    g.add_argument("--standardize", action="store_const", const=True,
                   help="divide centred columns by their std before the fit (off)")
    g.add_argument("--l2-normalize", action="store_const", const=True,
                   help="L2-normalise rows after centring/scaling (off; one extra pass over the store)")
    g.add_argument("--drop-invalid", action="store_const", const=True,
                   help="exclude stored rows with NaN/inf from the fit and the selection (no score, never "
                        "selected; listed in subspace.npz) instead of failing (off)")
    g.add_argument("--fit-device", choices=["cpu", "cuda", "auto"],
                   help="where the fit's products run: cuda needs CuPy and a GPU, auto uses one when usable "
                        "(cpu, as `scalselect fit`)")
    g.add_argument("--batch-size", type=int, help="extraction batch size (8)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 or auto: the GPU when one is usable, else cpu (auto)")
    g.add_argument("--devices", help="extraction processes, one per device, then one fit and selection: auto "
                                     "(every visible GPU, else one CPU process), a list such as cuda:0,cuda:3, or "
                                     "cpu:N (N CPU processes) (auto)")
    g.add_argument("--dtype", help="model dtype: auto (bf16 on a GPU that supports it, float32 on CPU), "
                                   "float32, bfloat16, float16 (auto)")
    g.add_argument("--store-dtype", choices=["float16", "bfloat16", "float32"],
                   help="representation store dtype (float16)")
    g.add_argument("--shard-size", type=int, help="samples per representation shard / checkpoint (4096)")
    g.add_argument("--instruction", choices=["all", "user"],
                   help="attention rows averaged: every non-visual, non-answer token (all) or user text only")
    g.add_argument("--max-length", type=int, help="skip samples longer than this many tokens")
    g.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="skip images over N pixels (width x height, read from the header before decoding) as "
                        "image_too_large (40000000)")
    g.add_argument("--num-workers", type=int, help="processes decoding images and encoding samples (0)")
    g.add_argument("--cache", metavar="DIR",
                   help="representation cache shared between runs and datasets: samples are looked up by "
                        "content (model, settings, messages, image bytes) and only new ones are extracted "
                        "(default OUT/.scalselect/cache; 'none' turns it off). Either way each stored row keeps "
                        "its content key, and a run whose selected record was edited after extraction writes no "
                        "selection, naming the record (rerun to extract it again)")
    _add_fidelity_options(g, defaults=False)
    g = p.add_argument_group("beyond the paper (off by default)")
    g.add_argument("--dedup-selected", type=float, metavar="EPS",
                   help="drop selected samples within cosine distance EPS of a better-ranked selected one, "
                        "refilling from the next-ranked (e.g. 0.02)")
    g.add_argument("--quota", action="append", metavar="FIELD=RULES",
                   help="per-group share bounds of the budget, e.g. 'source=coco<=40%%,ocr>=10%%' "
                        "(rules VALUE>=S, VALUE<=S, VALUE=LO:HI, * for every value); repeatable")
    g.add_argument("--stability-seeds", metavar="SEEDS",
                   help="the report always carries the cut-off margin and a perturbation bound; seeds such as "
                        "0,1,2 also re-fit with the randomized solver under them and compare the selections; "
                        "'none' leaves the stability entry out")
    g.add_argument("--plan", action="store_true", help="print the time/disk/memory estimate and exit "
                                                       "(exit 3 if it cannot fit)")
    g.add_argument("--no-plan-check", dest="plan_check", action="store_const", const=False,
                   help="skip the pre-flight check that refuses runs that cannot fit")
    g = p.add_argument_group("behaviour")
    g.add_argument("--force", action="store_const", const=True,
                   help="discard checkpoints of a different run in OUT and start over")
    g.add_argument("--quiet", action="store_const", const=True, help="no progress bars or messages")
    g.add_argument("--log-json", action="store_const", const=True,
                   help="machine-readable JSON-lines events on stdout instead of progress bars")
    g.add_argument("--no-html", dest="html", action="store_const", const=False, help="skip report.html")
    p.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="the main job on the bundled demo dataset with a tiny random model",
                       description="Build the tiny LLaVA-style model from the shipped config (random weights, "
                                   "fixed seed, no download) and run `scalselect run` on the bundled demo "
                                   "dataset (generated images, planted near-duplicates and rare modes).")
    d.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    d.add_argument("--budget", default="16%", help="samples to keep (default 16%%)")
    d.add_argument("--force", action="store_true", help="discard an earlier demo run in OUT")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--log-json", action="store_true", help="JSON-lines events on stdout")
    d.set_defaults(func=_cmd_run_demo)


_RUN_FIELDS = ("model", "data", "image_root", "format", "id_field", "source_field", "text_only", "out", "budget",
               "order", "layer", "threshold", "energy", "k", "solver", "seed", "standardize", "l2_normalize",
               "drop_invalid", "fit_device", "batch_size", "device", "devices", "dtype", "store_dtype", "shard_size",
               "instruction", "roles", "vision_tokens", "pixels", "max_length", "max_image_pixels", "num_workers",
               "cache", "dedup_selected", "quota", "stability_seeds", "force", "quiet", "log_json", "plan_check",
               "html")


def _run_errors():
    """Exception types whose message is the whole story (printed without a traceback)."""
    from .lock import LockError
    from .run import RunError
    from .postselect import PostSelectError
    from .store import StoreError

    from .paths import OverwriteError

    errs = [RunError, PostSelectError, StoreError, OverwriteError, LockError]
    for mod, name in (("scalselect_fast.data", "DatasetError"), ("scalselect_fast.data", "ImageError"),
                      ("scalselect_fast.subspace", "SubspaceError"),
                      ("scalselect_fast.extract", "UnsupportedModelError"),
                      ("scalselect_fast.extract", "ExtractError"),
                      ("scalselect_fast.extract", "WorkerError"),
                      ("scalselect_fast.extract.cache", "CacheError")):
        try:
            import importlib

            errs.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def _fail(args, exc) -> int:
    import json

    if getattr(args, "log_json", False):
        print(json.dumps({"event": "error", "type": type(exc).__name__, "message": str(exc)}), flush=True)
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _cmd_run(args) -> int:
    from .run import make_config, run

    try:
        cfg = make_config(args.config, **{f: getattr(args, f, None) for f in _RUN_FIELDS})
        if args.plan:
            est = run(cfg, plan_only=True)
            if cfg.log_json:
                import json

                print(json.dumps({"event": "plan", **est.to_dict()}, default=str))
            else:
                print(est.format())
            return 0 if est.ok else 3
        res = run(cfg)
    except _run_errors() as exc:
        return _fail(args, exc)
    if res is None:  # a rank other than 0 under torchrun: rank 0 writes and prints the selection
        return 0
    if not cfg.log_json:
        from .selection import print_selection

        print_selection(res.report, quiet=cfg.quiet)
    return 0


def _cmd_run_demo(args) -> int:
    from .run import run_demo

    try:
        res = run_demo(args.out, budget=args.budget, force=args.force, quiet=args.quiet, log_json=args.log_json)
    except _run_errors() as exc:
        return _fail(args, exc)
    if not args.log_json:
        from .selection import print_selection

        print_selection(res.report, quiet=args.quiet)
        print(f"open {res.report_html or res.report_json} to see the spectrum, scores and per-source counts")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), like every other error; the full usage is in ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _OneLineParser(
        prog="scalselect",
        description="Training-free, linear-time selection of visual instruction-tuning data (ScalSelect).")
    parser.add_argument("--version", action="version", version=f"scalselect-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_core_commands(sub)
    add_dask_options(sub)
    add_extract_command(sub)
    add_baseline_command(sub)
    add_cache_command(sub)
    add_run_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Every stage writes atomically and checkpoints: what finished is kept, the rest reruns.
        msg = "interrupted; rerun the same command to resume"
        if getattr(args, "log_json", False):
            import json

            print(json.dumps({"event": "error", "type": "KeyboardInterrupt", "message": msg}), flush=True)
        print(f"scalselect {args.command}: {msg}", file=sys.stderr)
        return 130
    except OSError as exc:
        # What the OS refuses (a file where a folder should be, permissions, a vanished path): the
        # engine's own errors are caught above; this keeps the rest to one line naming the path.
        if exc.strerror is None:  # raised with a message of its own
            print(f"scalselect {args.command}: error: {exc}", file=sys.stderr)
        else:
            path = "" if exc.filename is None else f": {exc.filename}"
            print(f"scalselect {args.command}: error: {exc.strerror}{path}; check the path and its permissions",
                  file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
