"""``scalselect demo``: the whole run on the bundled demo dataset with a tiny random-weight model."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from .config import RunError, make_config
from .events import Events
from .stages import RunResult, quiet_libraries, run

__all__ = ["run_demo"]


def run_demo(out: str | os.PathLike = "demo-out", budget: str = "16%", force: bool = False, quiet: bool = False,
             log_json: bool = False) -> RunResult:
    """``scalselect demo``: the full ``run`` on the bundled demo dataset with the tiny LLaVA-style model.

    The model is built from the config shipped in ``scalselect_fast/assets/tiny_models/llava.json``
    with random weights drawn from seed 0 (nothing is downloaded) into ``OUT/tiny-llava``. The report
    gets a ``demo_truth`` section measured against the dataset's planted ground truth (near-duplicate
    pairs kept together, rare-mode recall); with random weights these numbers show the plumbing, not
    the quality of the method.
    """
    from ..data.demo import DEMO_DATA, DEMO_DIR, DEMO_TRUTH
    from ..extract.tiny import build_tiny_model

    out = Path(out)
    events = Events(quiet, log_json)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; choose a directory")
    events.info(f"demo: building the tiny random-weight LLaVA-style model in {out / 'tiny-llava'} (seed 0)")
    if quiet or log_json:
        quiet_libraries()
    model = build_tiny_model("llava", out / "tiny-llava", seed=0)
    truth = json.loads((DEMO_DIR / DEMO_TRUTH).read_text())
    cfg = make_config(model=str(model), data=str(DEMO_DIR / DEMO_DATA), image_root=str(DEMO_DIR),
                      out=str(out), budget=budget, batch_size=16, shard_size=64, force=force, quiet=quiet,
                      log_json=log_json)

    def truth_report(kept_ids):
        return {"demo_truth": _demo_truth(truth, kept_ids)}

    return run(cfg, events=events, report_extra=truth_report)


def _demo_truth(truth: Mapping, kept_ids: list[str]) -> dict:
    kept = set(map(str, kept_ids))
    dups = {str(k): str(v) for k, v in (truth.get("duplicates") or {}).items()}
    both = sum(1 for c, o in dups.items() if c in kept and o in kept)
    rare = [str(r) for r in (truth.get("rare") or [])]
    return {"planted_duplicate_pairs": len(dups), "duplicate_pairs_both_kept": both,
            "rare_samples": len(rare), "rare_kept": sum(r in kept for r in rare),
            "note": "tiny random-weight model: these numbers exercise the pipeline, they do not measure "
                    "the method's quality"}
