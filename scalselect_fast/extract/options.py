"""The settings of one extraction, as one validated object (:class:`ExtractOptions`).

The public entry points (:func:`~.loop.extract_representations`, :func:`~.loop.extract_to_store`)
keep taking these settings as keyword arguments, or a ready ``options=`` object; either way they are
checked once here, before a model is loaded, and travel whole from there on.

Not here: what a setting does (see the entry points and :mod:`scalselect_fast.devices` for
``device`` and ``pool_impl``).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Callable

from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from . import roles as R

__all__ = ["ExtractOptions", "extract_options"]


@dataclass(frozen=True)
class ExtractOptions:
    """Everything an extraction is told besides its model and its data.

    Attributes
    ----------
    batch_size : int, >= 1
        Samples per forward pass.
    layer : int, >= 0
        Decoder layer ℓ whose attention selects the visual tokens; vectors are the mean of the kept
        tokens' hidden states at the output of layer ℓ (``hidden_states[ℓ+1]``).
    threshold : float in (0, 1]
        Cumulative attention mass of the kept visual tokens.
    instruction : {"all", "user"}
        Attention rows averaged: every non-visual, non-answer token (default), or user text only.
    dtype : {"auto", "bf16", "fp16", "fp32"}
        Model compute dtype.
    device : {"auto", "cpu", "cuda", "cuda:N"} or None
        Where the model runs (:func:`scalselect_fast.devices.torch_device`; None = ``"auto"``).
    devices : str or list of str, optional
        Processes to extract with, one per device (:func:`~.launch.parse_devices`): ``"auto"`` (None:
        every visible CUDA device, else one CPU process; a ``device`` that names one device keeps that
        one), ``"cuda:0,cuda:3"``, or ``"cpu:N"``. Ignored inside a process launched as one rank.
    device_map : str or dict, optional
        Passed to ``from_pretrained`` for models that do not fit one device.
    max_length : int, optional
        Samples longer than this (in tokens, image tokens included) are skipped.
    padding_side : {"right", "left"}
        Batch padding; results do not depend on it (up to float rounding).
    pool_impl : {"auto", "torch", "triton"}
        Pooling kernel implementation (:func:`scalselect_fast.ops.instruction_attended_pool`).
        Formerly ``backend`` (still accepted by the entry points, with a DeprecationWarning).
    num_workers : int, >= 0
        Processes encoding samples one batch ahead of the model (0: in this process).
    image_loader : callable, optional
        ``loader(path) -> PIL.Image`` replacing :func:`~scalselect_fast.data.load_image`.
    roles : {"reference", "label-mask"}, optional
        Answer tokens: the answer text itself (``"reference"``, the default: the authors' rule, the
        end-of-turn marker is an instruction token) or text + end-of-turn marker (``"label-mask"``).
    vision_tokens : {"reference", "pad-only"}, optional
        Visual tokens: image token + Qwen's vision start/end markers (``"reference"``, the default)
        or the image token only (``"pad-only"``).
    pixels : {"paper", "processor"} or "MIN:MAX", optional
        Qwen-VL image size range: the authors' 262,144..589,824 pixels (``"paper"``, the default),
        the checkpoint's own (``"processor"``), or explicit bounds.
        For these three, None means the default for a checkpoint path and the loaded model's own
        choice for a :class:`~.model.VLM`.
    max_image_pixels : int >= 1 or None
        Images with more pixels (width × height, read from the header before any decoding) are
        skipped as ``image_too_large``; default 40,000,000. ``None``: only Pillow's own bomb limit.

    The remaining attributes are read by :func:`~.loop.extract_to_store` only.

    image_root : path, optional
        Directory relative image paths are joined to (paths escaping it are refused).
    format : str
        Input container (``"auto"``: from the files).
    store_dtype : {"float16", "bfloat16", "float32"}
        Storage dtype of the vectors.
    shard_size : int, >= 1
        Records per shard (a shard's input range; skipped records still count).
    rank, world_size : int, optional
        Data-parallel slice; default from ``RANK`` / ``WORLD_SIZE`` (torchrun, accelerate launch).
    force : bool
        Discard an existing store from a different run instead of refusing.
    progress : bool
        Show a progress bar.
    on_progress : callable, optional
        ``on_progress(done, total)`` after every batch and shard (records of this rank's range).
    warn : callable, optional
        Receives the messages about committed shards that are redone (default ``logging.warning``).
    id_field : str, optional
        The id column (see :func:`scalselect_fast.data.read_dataset`).
    cache : path, optional
        A representation cache directory (:mod:`.cache`).

    Raises
    ------
    ExtractError
        On construction, for a value outside the constraints above (a ValueError: the CLI prints it
        as one line, API callers may catch ValueError).
    """

    batch_size: int = 8
    layer: int = 0
    threshold: float = 0.9
    instruction: str = "all"
    dtype: str = "fp32"
    device: str | None = "auto"
    devices: str | list | None = "auto"
    device_map: object = None
    max_length: int | None = None
    padding_side: str = "right"
    pool_impl: str = "auto"
    num_workers: int = 0
    image_loader: Callable | None = None
    roles: str | None = None
    vision_tokens: str | None = None
    pixels: str | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    image_root: str | os.PathLike | None = None
    format: str = "auto"
    store_dtype: str = "float16"
    shard_size: int = 4096
    rank: int | None = None
    world_size: int | None = None
    force: bool = False
    progress: bool = True
    on_progress: Callable[[int, int], None] | None = None
    warn: Callable[[str], None] | None = None
    id_field: str | None = None
    cache: str | os.PathLike | None = None

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise R.ExtractError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise R.ExtractError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.instruction not in ("all", "user"):
            raise R.ExtractError(f"instruction must be 'all' or 'user', got {self.instruction!r}")
        if self.padding_side not in ("left", "right"):
            raise R.ExtractError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        mp = self.max_image_pixels
        if mp is not None and (isinstance(mp, bool) or int(mp) < 1):
            raise R.ExtractError(f"max_image_pixels must be a positive number of pixels or None, got {mp!r}")
        if int(self.shard_size) < 1:
            raise R.ExtractError(f"shard_size must be >= 1, got {self.shard_size}")


_FIELDS = frozenset(f.name for f in dataclasses.fields(ExtractOptions))


def extract_options(options: ExtractOptions | None, settings: dict, where: str) -> ExtractOptions:
    """The options an entry point was given: ``options`` (default: all defaults) with ``settings``,
    its keyword arguments, applied on top and validated.

    ``where`` names the entry point in the errors. The old keyword ``backend`` is read as
    ``pool_impl`` with a DeprecationWarning (``backend`` names numpy/cupy elsewhere in the package).
    """
    if "backend" in settings:
        if "pool_impl" in settings:
            raise TypeError(f"{where}() got both pool_impl= and its old name backend=; pass pool_impl only")
        warnings.warn(f"{where}(backend=...) is deprecated; use pool_impl=... (the pooling kernel: "
                      f"'auto', 'torch' or 'triton')", DeprecationWarning, stacklevel=3)
        settings = {**settings, "pool_impl": settings["backend"]}
        del settings["backend"]
    unknown = sorted(set(settings) - _FIELDS)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"its settings are the fields of ExtractOptions: {', '.join(sorted(_FIELDS))}")
    if options is None:
        return ExtractOptions(**settings)
    return dataclasses.replace(options, **settings) if settings else options
