"""``scalselect run``: dataset in, selected dataset + manifest + report out, resumable.

One module per concern: :mod:`.config` (settings), :mod:`.fingerprints` (what a checkpoint depends
on), :mod:`.events` (progress), :mod:`.state` (durable state, crash points), :mod:`.stages` (extract →
fit → score → select), :mod:`.demo`.
"""
from .config import RunConfig, RunError, SettingTypeError, load_config_file, make_config
from .demo import run_demo
from .events import Events
from .fingerprints import data_fingerprint, model_fingerprint
from .stages import RunResult, run

__all__ = ["RunConfig", "RunError", "SettingTypeError", "load_config_file", "make_config", "run", "RunResult",
           "model_fingerprint", "data_fingerprint", "Events", "run_demo"]
