"""``scalselect run`` configuration: the :class:`RunConfig` fields, config files, validation.

Not here: fingerprints of what the fields mean for checkpoints (:mod:`.fingerprints`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

__all__ = ["RunConfig", "RunError", "SettingTypeError", "check_extract_options", "load_config_file",
           "make_config"]


class RunError(RuntimeError):
    """A run cannot proceed; the message names the file/sample and what to do."""


class SettingTypeError(RunError, TypeError):
    """A setting of the wrong type (a config file's value or a :func:`make_config` keyword): a
    :class:`RunError` for the command line's one-line report, a ``TypeError`` for Python callers."""


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunConfig:
    """Everything ``scalselect run`` needs. Field names are the config-file keys (``-`` or ``_``)."""

    model: str | None = None
    data: str | list | None = None  # file, directory, glob, URL, or a list of them (see data.open_dataset)
    out: str | None = None
    image_root: str | None = None
    format: str = "auto"
    id_field: str | None = None  # None: "id", and rows without an id field named by position
    # what per-source counts and --quota source=... group by (data.records.record_source): None: the
    # usual source fields; a field name; "image_folder": the first folder of the image path
    source_field: str | None = None
    text_only: str = "drop"  # rows without an image: "drop" (the reference) or "keep" (outside the budget)
    budget: str = "16%"
    layer: int = 0
    threshold: float = 0.9
    energy: float = 0.9
    k: int | None = None
    solver: str = "auto"
    seed: int = 0
    standardize: bool = False
    l2_normalize: bool = False
    drop_invalid: bool = False
    fit_device: str = "cpu"
    batch_size: int = 8
    device: str = "auto"
    # extraction processes, one per device: "auto" (every visible GPU, else one CPU process),
    # "cuda:0,cuda:3", "cpu:N" (a list in a config file / the API); see extract.launch.parse_devices
    devices: str | list = "auto"
    dtype: str = "auto"
    store_dtype: str = "float16"
    shard_size: int = 4096
    instruction: str = "all"
    roles: str = "reference"
    vision_tokens: str = "reference"
    pixels: str = "paper"
    max_length: int | None = None
    max_image_pixels: int = 40_000_000
    num_workers: int = 0
    # representation cache shared between runs and datasets (None: OUT/.scalselect/cache; "none": off)
    cache: str | None = None
    order: str = "original"
    dedup_selected: float | None = None
    quota: list = dataclasses.field(default_factory=list)
    stability_seeds: str = ""
    force: bool = False
    quiet: bool = False
    log_json: bool = False
    plan_check: bool = True
    html: bool = True

    # fields that change the representations (and so everything downstream)
    EXTRACT_KEYS = ("layer", "threshold", "batch_size", "device", "dtype", "store_dtype", "shard_size",
                    "format", "instruction", "max_length", "roles", "vision_tokens", "pixels", "max_image_pixels",
                    "id_field")
    FIT_KEYS = ("energy", "k", "solver", "seed", "standardize", "l2_normalize", "drop_invalid", "fit_device")
    SELECT_KEYS = ("budget", "order", "dedup_selected", "quota", "stability_seeds", "text_only", "source_field")
    #: settings added after runs were made: at their default they are left out of the fingerprints,
    #: so the checkpoints of those runs still resume
    LATER_DEFAULTS = {"id_field": None, "text_only": "drop", "source_field": None}

    def settings(self, keys) -> dict:
        """``{key: value}`` of ``keys`` as the fingerprints see them (see :attr:`LATER_DEFAULTS`)."""
        return {k: getattr(self, k) for k in keys
                if not (k in self.LATER_DEFAULTS and getattr(self, k) == self.LATER_DEFAULTS[k])}

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise RunError(f"--{name} is required (on the command line or in the --config file)")
        check_extract_options(layer=self.layer, threshold=self.threshold, batch_size=self.batch_size,
                              shard_size=self.shard_size, max_length=self.max_length,
                              num_workers=self.num_workers, image_root=self.image_root, format=self.format)
        if self.k is None and not (0.0 < float(self.energy) <= 1.0):
            raise RunError(f"--energy {self.energy}: the energy fraction must be in (0, 1], e.g. 0.9")
        if self.id_field is not None and (not isinstance(self.id_field, str) or not self.id_field.strip()):
            raise RunError(f"--id-field {self.id_field!r}: name the column that holds each record's id "
                           f"(omit it to use 'id', or each row's position where there is no id column)")
        if self.source_field is not None and (not isinstance(self.source_field, str) or not self.source_field.strip()):
            raise RunError(f"--source-field {self.source_field!r}: name the field that holds each record's source, "
                           f"or image_folder (omit it to use source, dataset, data_source, ...)")
        if self.text_only not in ("drop", "keep"):
            raise RunError(f"--text-only {self.text_only!r}: use 'drop' (rows without an image are left out, as "
                           f"the reference does) or 'keep' (written to the output outside the budget)")
        if self.order not in ("original", "score"):
            raise RunError(f"--order {self.order!r}: use 'original' (input order) or 'score' (best first)")
        if self.solver not in ("auto", "exact", "randomized"):
            raise RunError(f"--solver {self.solver!r}: use auto, exact or randomized")
        if self.fit_device not in ("cpu", "cuda", "auto"):
            raise RunError(f"--fit-device {self.fit_device!r}: use cpu, cuda (needs CuPy and a GPU) or auto")
        for name in ("standardize", "l2_normalize", "drop_invalid"):
            if not isinstance(getattr(self, name), bool):
                raise RunError(f"{name.replace('_', '-')} = {getattr(self, name)!r}: use true or false")
        if self.instruction not in ("all", "user"):
            raise RunError(f"--instruction {self.instruction!r}: use 'all' (every non-visual, non-answer token) "
                           f"or 'user' (user text only)")
        if self.roles not in ("reference", "label-mask"):
            raise RunError(f"--roles {self.roles!r}: use 'reference' (the authors' rule: answers are the answer "
                           f"text, end-of-turn markers are instruction tokens) or 'label-mask'")
        if self.vision_tokens not in ("reference", "pad-only"):
            raise RunError(f"--vision-tokens {self.vision_tokens!r}: use 'reference' (Qwen: image pads and the "
                           f"vision start/end markers) or 'pad-only'")
        from ..extract.model import parse_pixels

        try:
            parse_pixels(self.pixels)
        except ValueError as exc:
            raise RunError(f"--{exc}") from None
        if int(self.seed) < 0:  # refused whatever the solver (the randomized one cannot use it)
            raise RunError(f"--seed {self.seed}: seeds are integers >= 0, e.g. --seed 0")
        if self.k is not None and int(self.k) < 1:
            raise RunError(f"--k {self.k}: the subspace needs at least 1 component (omit --k to use --energy)")
        if self.dedup_selected is not None and not (0.0 <= float(self.dedup_selected) < 2.0):
            raise RunError(f"--dedup-selected {self.dedup_selected}: a cosine distance in [0, 2), e.g. 0.02")
        if self.store_dtype not in ("float16", "bfloat16", "float32"):
            raise RunError(f"--store-dtype {self.store_dtype!r}: use float16, bfloat16 or float32")
        from ..scoring import BudgetError, check_budget

        try:
            check_budget(self.budget)
        except BudgetError as exc:
            raise RunError(f"--budget: {exc}") from None
        mp = self.max_image_pixels
        if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1:
            raise RunError(f"--max-image-pixels {mp!r}: give a positive whole number of pixels (width x height), "
                           f"e.g. 40000000 (the default)")
        from ..postselect import parse_quota

        for q in self.quota or []:
            parse_quota(q)  # PostSelectError naming the rule, now rather than after extraction
        from ..stability import parse_seeds

        try:
            parse_seeds(self.stability_seeds)
        except ValueError as exc:
            raise RunError(f"--stability-seeds {exc}") from None
        self.validate_device()

    def validate_device(self) -> None:
        """Refuse an unknown --dtype / --device / --devices, or CUDA (for extraction or the fit) that is
        not there, before any stage runs."""
        from ..extract.launch import DevicesError, parse_devices
        from ..extract.model import UnsupportedModelError, resolve_device, resolve_dtype

        try:
            if str(self.dtype).lower() != "auto":
                resolve_dtype(self.dtype)
            if str(self.device).lower() != "auto":
                resolve_device(self.device)
            parse_devices(self.devices, self.device)
        except UnsupportedModelError as exc:
            raise RunError(str(exc)) from None
        except DevicesError as exc:
            raise RunError(str(exc)) from None
        if self.fit_device == "cuda":  # CuPy and a GPU, checked now rather than after extraction
            from ..devices import DeviceError, array_device

            try:
                array_device(self.fit_device)
            except DeviceError as exc:
                raise RunError(f"--fit-device cuda: {exc}") from None


def check_extract_options(*, layer=0, threshold=0.9, batch_size=8, shard_size=4096, max_length=None,
                          num_workers=0, image_root=None, format="auto") -> None:
    """Refuse extraction settings that cannot work, before anything is created or loaded.

    Shared by ``scalselect run`` (:meth:`RunConfig.validate`) and ``scalselect extract``.

    Raises
    ------
    RunError
        Naming the option and the values it accepts.
    """
    if not (0.0 < float(threshold) <= 1.0):
        raise RunError(f"--threshold {threshold}: the attention-mass threshold must be in (0, 1], "
                       f"e.g. 0.9 (the paper's default)")
    if int(layer) < 0:
        raise RunError(f"--layer {layer}: decoder layers are numbered from 0")
    if int(shard_size) < 1 or int(batch_size) < 1:
        raise RunError("--shard-size and --batch-size must be positive")
    if num_workers is not None and int(num_workers) < 0:
        raise RunError(f"--num-workers {num_workers}: use 0 (encode in the main process) or more")
    if max_length is not None and int(max_length) < 1:
        raise RunError(f"--max-length {max_length}: must be a positive number of tokens")
    if image_root is not None and not Path(image_root).is_dir():
        raise RunError(f"--image-root {image_root}: not a directory; pass the folder the dataset's image "
                       f"paths are relative to")
    from .. import data  # noqa: F401  (registers every container)
    from ..data.sources import formats

    if format not in formats():
        raise RunError(f"--format {format!r}: use auto or one of {', '.join(formats()[1:])}")


_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def _relative_to(base: Path, value):
    """A relative path in a config file is relative to the file's folder; URLs are kept as written."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    vp = Path(value).expanduser()
    return str(vp if vp.is_absolute() else (base / vp))


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a ``run.toml`` / ``run.yaml`` / ``run.json`` into a dict of :class:`RunConfig` fields.

    Keys may use ``-`` or ``_``; a ``[run]`` table (TOML) or ``run:`` mapping (YAML) is accepted as
    the root. Unknown keys, and one setting written both ways (``image-root`` and ``image_root``),
    are an error naming the key(s) and the file. Relative paths in the file are
    resolved against the file's directory.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise SettingTypeError(f"config file: expected a path (str or os.PathLike) to a .toml, .yaml or .json "
                               f"file, got {type(path).__name__}")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RunError(f"--config {p}: cannot read ({exc.strerror or exc})") from exc
    suf = p.suffix.lower()
    try:
        if suf == ".toml":
            import tomllib

            obj = tomllib.loads(text)
        elif suf in (".yaml", ".yml"):
            import yaml

            obj = yaml.safe_load(text) or {}
        elif suf == ".json":
            obj = json.loads(text)
        else:
            raise RunError(f"--config {p}: unknown extension {suf!r}; use .toml, .yaml or .json")
    except RunError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError
        raise RunError(f"--config {p}: not valid {suf.lstrip('.').upper()}: {exc}") from exc
    if not isinstance(obj, dict):
        raise RunError(f"--config {p}: expected a table of settings, got {type(obj).__name__}")
    if set(obj) == {"run"} and isinstance(obj["run"], dict):
        obj = obj["run"]
    out = {}
    written: dict[str, object] = {}  # setting -> the key it was written as
    for key, value in obj.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise RunError(f"--config {p}: unknown setting {key!r}; known: "
                           f"{', '.join(sorted(f.replace('_', '-') for f in _FIELDS))}")
        if name in written:  # image-root and image_root: which one was meant is not ours to guess
            raise RunError(f"--config {p}: {written[name]!r} and {key!r} are the same setting, given twice; "
                           f"keep one of them")
        written[name] = key
        if name in ("model", "data", "out", "image_root", "cache"):
            value = _relative_to(p.parent, value) if name != "data" or not isinstance(value, list) else [
                _relative_to(p.parent, v) for v in value]
        if name == "quota" and isinstance(value, str):
            value = [value]
        if name == "stability_seeds" and isinstance(value, list):  # stability-seeds = [0, 1, 2]
            value = ",".join(str(v) for v in value)
        out[name] = value
    return out


def make_config(config_file: str | os.PathLike | None = None, **overrides) -> RunConfig:
    """A :class:`RunConfig` from an optional file with keyword overrides (None = not given).

    Raises
    ------
    SettingTypeError
        (a ``TypeError`` and a :class:`RunError`) naming the setting and the types it accepts.
    TypeError
        An unknown keyword.
    RunError
        The config file cannot be read or holds an unknown or repeated setting.
    """
    values = load_config_file(config_file) if config_file else {}
    for k, v in overrides.items():
        if k not in _FIELDS:
            raise TypeError(f"make_config: unknown run setting {k!r}; known: "
                            f"{', '.join(sorted(_FIELDS))}")
        if v is not None and not (k == "quota" and v == []):
            values[k] = v
    cfg = RunConfig(**{k: _coerce(k, v, config_file) for k, v in values.items()})
    cfg.budget = str(cfg.budget)
    cfg.quota = list(cfg.quota or [])
    return cfg


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(name: str, value, source) -> object:
    """``value`` as field ``name``'s type; a RunError naming the setting (and file) if it is not one."""
    if value is None:
        return None
    ann = str(RunConfig.__dataclass_fields__[name].type).split("|")[0].strip()
    want = _TYPES.get(ann)
    where = f" (in {source})" if source else ""
    if name == "data":  # a path/glob/URL, a list of them, or (Python API) a datasets object
        from ..data.hf import is_hf_object

        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
            return [os.fspath(v) for v in value]
        if isinstance(value, str) or is_hf_object(value):
            return value
        raise SettingTypeError(f"setting data{where}: {value!r:.200} is not a path (str or os.PathLike), a list "
                               "of paths or a datasets Dataset")
    if name == "devices":  # "auto", "cuda:0,cuda:3", "cpu:2", or a list of device names
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)
        where = f" (in {source})" if source else ""
        raise SettingTypeError(f"setting devices{where}: {value!r:.200} is not 'auto', 'cpu:N' or a list of "
                               f"devices such as ['cuda:0', 'cuda:3']")
    if name == "budget":
        accepts = "a count (int, e.g. 100000), a fraction (float, e.g. 0.16) or a string ('16%', '0.16', '100000')"
    else:
        accepts = f"a{'n' if ann == 'int' else ''} {ann}"
    bad = SettingTypeError(f"setting {name.replace('_', '-')}{where}: {value!r:.200} is not {accepts}")
    if want is None:  # quota: a list of strings
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise SettingTypeError(f"setting {name}{where}: expected a list of strings such as "
                                   f"['source=coco<=40%'], got {value!r:.200}")
        return list(value)
    if want is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if want is str:
        if name == "budget" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # a number in a config file: kept, read by resolve_budget
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    try:
        if want is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
