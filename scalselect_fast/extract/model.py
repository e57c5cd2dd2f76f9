"""Model adapters: load a VLM for extraction, encode samples, run the truncated forward.

Supported families (``config.model_type``): ``llava`` (llava-hf layout, LLaVA-1.5), ``qwen2_vl``,
``qwen2_5_vl``, ``qwen3_vl``; any other model that ``AutoModelForImageTextToText`` knows goes through
the generic path (its processor expands the image tokens; its language model must expose decoder
``layers``). Anything else is refused with a clear error.

Early exit has two halves. At load time the text config's ``num_hidden_layers`` is lowered to ℓ+1, so
the weights of layers > ℓ are never read from disk nor allocated; the known families load their base
``*Model`` class, so the LM head (never run) is not allocated either, and LLaVA's vision tower keeps
only the layers up to its ``vision_feature_layer``. At run time a hook on layer ℓ stops the forward
pass (see :mod:`.hook`), so neither the remaining layers nor the LM head run.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import roles as R
from .hook import StopForward, capture_layer, use_capturing_attention

log = logging.getLogger(__name__)

__all__ = ["check_model", "KNOWN_FAMILIES", "QWEN_FAMILIES", "PAPER_PIXELS", "UnsupportedModelError", "VLM", "load_vlm", "Encoded",
           "resolve_dtype", "parse_pixels"]

KNOWN_FAMILIES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
#: the classes extraction loads: vision tower + projector + decoder, without the LM head it never runs
BASE_CLASSES = {"llava": "LlavaModel", "qwen2_vl": "Qwen2VLModel", "qwen2_5_vl": "Qwen2_5_VLModel",
                "qwen3_vl": "Qwen3VLModel"}
#: families whose image processor takes a pixel range (``pixels``)
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: the authors' Qwen processor range (min, max) in pixels: 256·32·32 and 576·32·32
PAPER_PIXELS = (256 * 32 * 32, 576 * 32 * 32)
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}


class UnsupportedModelError(R.ExtractError):
    """The model type, layer or setting cannot be used for extraction (message says what to do)."""


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def resolve_dtype(dtype, device: str | None = "auto"):
    """``"auto"|"bf16"|"fp16"|"fp32"`` (or a torch dtype) -> torch dtype.

    ``auto`` is bfloat16 on a CUDA device that supports it (``device``, resolved as
    :func:`resolve_device` does) and float32 otherwise (CPU, or a GPU without bf16).
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        dev = resolve_device(device)
        return torch.bfloat16 if dev.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise UnsupportedModelError(f"unknown --dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return getattr(torch, name)


def resolve_device(device: str | None) -> str:
    """The model device (:func:`scalselect_fast.devices.model_device`), refusing a bad one with
    :class:`UnsupportedModelError` (an :class:`~.roles.ExtractError`, printed as one line)."""
    from ..devices import DeviceError, model_device

    try:
        return model_device(device)
    except DeviceError as exc:
        raise UnsupportedModelError(str(exc)) from None


def parse_pixels(pixels) -> tuple[int, int] | None:
    """``pixels`` option -> (min, max) pixels, or None for the checkpoint's own setting.

    ``"paper"`` = :data:`PAPER_PIXELS` (the authors' setting), ``"processor"`` = None, ``"MIN:MAX"``
    = two positive integers with MIN <= MAX.
    """
    if pixels is None or pixels == "paper":
        return PAPER_PIXELS
    if pixels == "processor":
        return None
    if isinstance(pixels, (tuple, list)) and len(pixels) == 2:
        lo, hi = pixels
    else:
        parts = str(pixels).split(":")
        if len(parts) != 2:
            raise ValueError(f"pixels {pixels!r}: use 'paper', 'processor' or MIN:MAX (e.g. 262144:589824)")
        lo, hi = parts
    try:
        lo, hi = int(lo), int(hi)
    except (TypeError, ValueError):
        raise ValueError(f"pixels {pixels!r}: MIN and MAX must be integers (pixels per image), e.g. 262144:589824") from None
    if not 0 < lo <= hi:
        raise ValueError(f"pixels {pixels!r}: need 0 < MIN <= MAX")
    return lo, hi


def _apply_pixels(image_processor, family: str, pixels, path) -> tuple[int, int] | None:
    """Set the Qwen image processor's pixel range as the authors do (``size`` = shortest/longest edge).

    Returns the range in effect, or None when the checkpoint's own setting is kept.
    """
    rng = parse_pixels(pixels)
    if family not in QWEN_FAMILIES:
        if pixels not in (None, "paper", "processor"):
            raise UnsupportedModelError(f"{path}: --pixels {pixels} applies to the Qwen-VL families only; "
                                        f"a {family!r} model uses its processor's image size (drop --pixels)")
        return None
    if rng is None:
        return None
    lo, hi = rng
    image_processor.size = {"shortest_edge": lo, "longest_edge": hi}
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):  # older processors read these attributes
        if hasattr(image_processor, name):
            setattr(image_processor, name, v)
    return rng


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclass
class Encoded:
    """One sample ready for the model (before batching).

    Attributes
    ----------
    input_ids : ndarray of int64, shape (L,)
        Expanded token ids (one id per visual token).
    roles : ndarray of int8, shape (len(input_ids),)
        Role codes from :mod:`.roles`.
    image_inputs : dict
        The image processor's outputs for this sample's images (tensors, batched along dim 0).
    """

    sample_id: str
    input_ids: np.ndarray
    roles: np.ndarray
    image_inputs: dict = field(default_factory=dict)


def _read_chat_template(path: Path, tokenizer) -> str:
    """The processor's chat template if the checkpoint ships one, else the tokenizer's."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.exists():
            with open(f) as fh:
                tmpl = json.load(fh).get("chat_template")
            if tmpl:
                return tmpl
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise UnsupportedModelError(f"{path}: no chat template found (chat_template.jinja, chat_template.json, "
                                f"processor_config.json or the tokenizer's); token roles need one")


class Encoder:
    """Turns one sample into model inputs: chat template, token roles, image preprocessing.

    Holds only the tokenizer, image processor and a few config numbers (no model), so it can be
    sent to worker processes (``num_workers`` in :mod:`.loop`).
    """

    def __init__(self, family, tokenizer, image_processor, chat_template, image_token_id, max_length,
                 processor=None, config=None, roles: str = "reference", visual_ids=()):
        self.family = family
        self.roles = _check_choice("roles", roles, R.ROLE_MODES)
        self.visual_ids = tuple(int(i) for i in visual_ids)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.max_length = max_length
        self.processor = processor
        if family == "llava":
            vc = config.vision_config
            strategy = getattr(config, "vision_feature_select_strategy", "default")
            self._llava_side = int(vc.image_size)
            self._llava_tokens = (vc.image_size // vc.patch_size) ** 2 + (1 if strategy == "full" else 0)

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=False)

    def encode(self, sample_id: str, messages: Sequence[dict], images: list) -> Encoded:
        """Render, tokenise, assign roles and preprocess the images of one sample.

        Raises :class:`~.roles.SampleError` (skip with reason) for a sample that cannot be encoded.
        """
        if not images:
            raise R.SampleError(f"sample {sample_id}: text-only sample (no image); no visual tokens to pool")
        chat = R.build_chat_messages(messages, len(images), sample_id)
        rendered = R.render_conversation(chat, self.render, self.image_token, sample_id, self.roles)
        text = rendered.text
        add_special = not (self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token))
        tok = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = np.asarray(tok["input_ids"], dtype=np.int64)
        offsets = np.asarray(tok["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        answer_ids = None
        if self.roles == "reference" and rendered.answer_spans:
            # the authors mark each answer's own tokenisation: one batched call for all answers
            texts = [text[s:e] for s, e in rendered.answer_spans]
            alone = self.tokenizer(texts + [" " + t for t in texts], add_special_tokens=False)["input_ids"]
            answer_ids = list(zip(alone[:len(texts)], alone[len(texts):]))
        base_roles = R.token_roles(offsets, ids, rendered, self.image_token_id, self.roles, self.visual_ids,
                                   answer_ids)
        if self.family in KNOWN_FAMILIES:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = self._image_token_counts(image_inputs, len(images), sample_id)
            full_ids, roles = R.expand_image_tokens(ids, base_roles, self.image_token_id, counts, sample_id)
        else:
            out = self.processor(text=[text], images=images, return_tensors="pt",
                                 add_special_tokens=add_special)
            full_ids = out["input_ids"][0].numpy()
            roles = R.align_to_processor(ids, base_roles, full_ids, self.image_token_id, sample_id)
            # the modality ids are rebuilt per batch by `VLM.collate`
            image_inputs = {k: v for k, v in out.items()
                            if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if self.max_length and len(full_ids) > self.max_length:
            raise R.SampleError(f"sample {sample_id}: {len(full_ids)} tokens exceed the maximum length "
                                f"{self.max_length} (raise --max-length if the model supports it)")
        return Encoded(sample_id, full_ids, roles, image_inputs)

    def _image_token_counts(self, image_inputs: dict, n_images: int, sample_id: str) -> list[int]:
        if self.family == "llava":
            pv = image_inputs["pixel_values"]
            if tuple(pv.shape[-2:]) != (self._llava_side, self._llava_side):
                raise R.SampleError(f"sample {sample_id}: image processor produced {tuple(pv.shape[-2:])} pixels, "
                                    f"the vision tower expects {self._llava_side}x{self._llava_side}")
            return [self._llava_tokens] * n_images
        grid = image_inputs["image_grid_thw"]
        merge = int(getattr(self.image_processor, "merge_size", 2))
        return [int(g.prod()) // (merge * merge) for g in grid]


class VLM:
    """A vision-language model prepared for layer-ℓ extraction.

    Use :func:`load_vlm` to build one. Attributes: ``model``, ``family``, ``layer``, ``tokenizer``,
    ``image_processor``, ``image_token``/``image_token_id``, ``device``, ``dtype``, ``depth`` (the
    checkpoint's decoder depth), ``final_norm`` (applied when ℓ is the last layer, because
    ``hidden_states[-1]`` is the normalised output).
    """

    def __init__(self, model, path, family, layer, depth, tokenizer, image_processor, chat_template,
                 processor=None, device="cpu", max_length=None, roles: str = "reference",
                 vision_tokens: str = "reference", pixels="paper", pixel_range=None):
        import torch

        self.model = model
        self.path = str(path)
        self.family = family
        self.layer = int(layer)
        self.depth = int(depth)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.processor = processor
        self._checkpoint_image_processor = None  # the processor's own settings (set by load_vlm)
        self.device = device
        self.dtype = next(model.parameters()).dtype
        cfg = model.config
        tid = getattr(cfg, "image_token_id", None)
        if tid is None:
            tid = getattr(cfg, "image_token_index", None)
        if tid is None and processor is not None:
            tid = getattr(processor, "image_token_id", None)
        if tid is None:
            raise UnsupportedModelError(f"{path}: the config names no image token id (image_token_id / "
                                        f"image_token_index); cannot tell visual tokens apart")
        self.image_token_id = int(tid)
        self.language_model = _language_model(model, path)
        layers = self.language_model.layers
        if self.layer >= len(layers):
            raise UnsupportedModelError(f"{path}: layer {self.layer} not loaded ({len(layers)} decoder layers)")
        self.decoder_layer = layers[self.layer]
        self.attention = getattr(self.decoder_layer, "self_attn", None)
        if self.attention is None:
            raise UnsupportedModelError(f"{path}: decoder layer {self.layer} has no `self_attn` module")
        self.final_norm = getattr(self.language_model, "norm", None) if self.layer == self.depth - 1 else None
        use_capturing_attention(self.language_model)
        text_cfg = cfg.get_text_config()
        self.max_length = int(max_length) if max_length else int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or None
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.hidden_size = int(text_cfg.hidden_size)
        self._base = getattr(model, "model", model)
        import inspect

        self._wants_mm_types = "mm_token_type_ids" in inspect.signature(self._base.forward).parameters
        self._set_encoding(roles, vision_tokens, pixels, pixel_range)
        torch.set_grad_enabled(False)

    def _set_encoding(self, roles, vision_tokens, pixels, pixel_range) -> None:
        cfg = self.model.config
        self.vision_tokens = _check_choice("vision_tokens", vision_tokens, R.VISION_TOKEN_MODES)
        self.visual_ids = (self.image_token_id,)
        if vision_tokens == "reference":
            # Qwen-style models: the authors count <|vision_start|> and <|vision_end|> as visual too
            self.visual_ids += tuple(int(t) for t in (getattr(cfg, "vision_start_token_id", None),
                                                      getattr(cfg, "vision_end_token_id", None)) if t is not None)
        self.pixels = pixels
        self.pixel_range = pixel_range
        self.encoder = Encoder(self.family, self.tokenizer, self.image_processor, self.chat_template,
                               self.image_token_id, self.max_length, processor=self.processor, config=cfg,
                               roles=roles, visual_ids=self.visual_ids)

    @property
    def roles(self) -> str:
        return self.encoder.roles

    def options(self) -> dict:
        """The extraction choices that change the vectors (recorded in a store's provenance)."""
        return {"roles": self.roles, "vision_tokens": self.vision_tokens,
                "pixels": self.pixels if self.family in QWEN_FAMILIES else None,
                "pixel_range": list(self.pixel_range) if self.pixel_range else None,
                "visual_token_ids": list(self.visual_ids)}

    def with_options(self, roles: str | None = None, vision_tokens: str | None = None, pixels=None) -> "VLM":
        """This model with other extraction choices (same weights; ``self`` when nothing changes).

        ``None`` keeps the current choice. The copy gets its own encoder and image processor, so the
        original keeps its settings.
        """
        import copy

        roles = self.roles if roles is None else roles
        vision_tokens = self.vision_tokens if vision_tokens is None else vision_tokens
        pixels = self.pixels if pixels is None else pixels
        if (roles, vision_tokens, pixels) == (self.roles, self.vision_tokens, self.pixels):
            return self
        image_processor = copy.deepcopy(self._checkpoint_image_processor or self.image_processor)
        processor = None
        if self.processor is not None:
            processor = copy.copy(self.processor)
            processor.image_processor = image_processor
        rng = _apply_pixels(image_processor, self.family, pixels, self.path)
        new = copy.copy(self)
        new.image_processor, new.processor = image_processor, processor
        new._set_encoding(roles, vision_tokens, pixels, rng)
        return new

    # ------------------------------------------------------------------ encoding (see Encoder)
    def render(self, messages: list[dict]) -> str:
        return self.encoder.render(messages)

    def encode(self, sample_id: str, messages: Sequence[dict], images: list) -> Encoded:
        """Encode one sample (see :meth:`Encoder.encode`)."""
        return self.encoder.encode(sample_id, messages, images)

    @property
    def image_token(self) -> str:
        return self.encoder.image_token

    # ------------------------------------------------------------------ batching + forward
    def collate(self, batch: list[Encoded], padding_side: str = "right") -> dict:
        """Pad a list of encoded samples into model inputs plus role masks (all torch tensors)."""
        import torch

        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        L = max(len(e.input_ids) for e in batch)
        B = len(batch)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.bool)
        roles = torch.full((B, L), R.PAD, dtype=torch.int8)
        for b, e in enumerate(batch):
            n = len(e.input_ids)
            sl = slice(L - n, L) if padding_side == "left" else slice(0, n)
            ids[b, sl] = torch.from_numpy(np.asarray(e.input_ids, dtype=np.int64))
            att[b, sl] = True
            roles[b, sl] = torch.from_numpy(e.roles)
        inputs = {"input_ids": ids, "attention_mask": att.long()}
        if self._wants_mm_types:  # M-RoPE models need the per-token modality (1 = image features)
            # from the ids, not the roles: vision markers may count as visual without being image features
            inputs["mm_token_type_ids"] = ((ids == self.image_token_id) & att).long()
        keys = batch[0].image_inputs.keys()
        for k in keys:
            vals = [e.image_inputs[k] for e in batch]
            if all(isinstance(v, torch.Tensor) for v in vals):
                inputs[k] = torch.cat(vals, dim=0)
        return {"inputs": inputs, "roles": roles, "mask": att}

    def forward_layer(self, inputs: dict):
        """Run vision + embeddings + decoder layers 0..ℓ on ``inputs``; return the :class:`~.hook.Capture`.

        ``capture.hidden`` is (B, L, D) = ``hidden_states[ℓ+1]`` of the full model (final norm applied
        when ℓ is the checkpoint's last layer); ``capture.query`` (B, Hq, L, Dh) and ``capture.key``
        (B, Hkv, L, Dh) are post-RoPE.
        """
        import torch

        dev_inputs = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device) if not self._device_map else v.to(self._input_device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            dev_inputs[k] = v
        with torch.inference_mode(), capture_layer(self.decoder_layer, self.attention) as cap:
            try:
                self._base(**dev_inputs, use_cache=False)
            except StopForward:
                pass
        if cap.hidden is None or cap.query is None:
            raise RuntimeError(f"{self.path}: layer {self.layer} did not run through the capturing attention "
                               f"(model type {self.family}); this model is not supported by the generic path")
        if self.final_norm is not None:
            with torch.inference_mode():
                cap.hidden = self.final_norm(cap.hidden)
        return cap

    _device_map = False
    _input_device = "cpu"


def _language_model(model, path):
    """The text decoder (a module with ``.layers``) inside a ``*ForConditionalGeneration`` model."""
    candidates = []
    inner = getattr(model, "model", None)
    if inner is not None:
        candidates.append(getattr(inner, "language_model", None))
    candidates.append(getattr(model, "language_model", None))
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # noqa: BLE001 - some models do not implement it
            pass
    for c in candidates:
        if c is None:
            continue
        if hasattr(c, "layers"):
            return c
        sub = getattr(c, "model", None)  # a *ForCausalLM language model
        if sub is not None and hasattr(sub, "layers"):
            return sub
    raise UnsupportedModelError(f"{path}: cannot find the language model's decoder layers "
                                f"(looked for model.language_model.layers); this architecture is not supported")


def _truncate_text_config(text_cfg, keep: int) -> None:
    text_cfg.num_hidden_layers = keep
    for name in ("layer_types", "mlp_only_layers"):
        v = getattr(text_cfg, name, None)
        if isinstance(v, list) and len(v) > keep and name == "layer_types":
            setattr(text_cfg, name, v[:keep])


def _truncate_vision_config(config) -> None:
    """LLaVA reads ``hidden_states[vision_feature_layer]`` of its vision tower: keep only the layers
    that feed it (24-layer CLIP at -2: 23) and read the new last one (-1). The dropped layer would
    run and be thrown away; its weights are not even loaded."""
    vfl = getattr(config, "vision_feature_layer", None)
    vc = getattr(config, "vision_config", None)
    if not isinstance(vfl, int) or isinstance(vfl, bool) or vc is None:
        return  # a list of layers (concatenated features): keep the tower whole
    n = int(vc.num_hidden_layers)
    keep = vfl if vfl >= 0 else n + 1 + vfl  # hidden_states holds the embeddings + one entry per layer
    if 1 <= keep < n:
        vc.num_hidden_layers = keep
        config.vision_feature_layer = -1


_TILE = 1_048_573  # a prime: the tiled block does not line up with any row width, so rows differ


@contextlib.contextmanager
def _fast_random_init(seed: int = 0):
    """Make transformers' random initialisation of missing weights cheap (used by ``random_weights``).

    Drawing ~1e9 normal numbers takes a minute on a busy host; a benchmark of published shapes only
    needs finite values of the right scale. Inside this context ``normal_``/``trunc_normal_`` copy a
    block of ``_TILE`` standard normals drawn once per (device, dtype), scaled to the requested mean
    and std (clamped for the truncated one), at memory speed. Every other initialiser (ones, zeros,
    buffers such as rotary frequencies) runs unchanged. Without the hook point (another transformers)
    the ordinary initialisation runs.
    """
    import torch

    try:
        from transformers import initialization as hf_init
        table = hf_init.TORCH_INIT_FUNCTIONS
    except (ImportError, AttributeError):
        yield
        return
    blocks: dict = {}

    def fill(tensor, mean=0.0, std=1.0, lo=None, hi=None):
        with torch.no_grad():
            key = (tensor.device, tensor.dtype)
            if key not in blocks:
                g = torch.Generator().manual_seed(seed)
                blocks[key] = torch.randn(_TILE, generator=g).to(device=tensor.device, dtype=torch.float32)
            block = blocks[key] * std + mean
            if lo is not None:
                block = block.clamp(lo, hi)
            block = block.to(tensor.dtype)
            flat = tensor.view(-1) if tensor.is_contiguous() else None
            if flat is None:
                return table_orig["normal_"](tensor, mean=mean, std=std)
            for start in range(0, flat.numel(), _TILE):
                n = min(_TILE, flat.numel() - start)
                flat[start:start + n].copy_(block[:n])
        return tensor

    def normal_(tensor, mean=0.0, std=1.0, generator=None):
        return fill(tensor, mean, std)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        return fill(tensor, mean, std, a, b)

    table_orig = dict(table)
    table.update(normal_=normal_, trunc_normal_=trunc_normal_)
    try:
        yield
    finally:
        table.update(table_orig)


def check_model(model, layer: int = 0, trust_remote_code: bool = False):
    """Read a checkpoint's config and check that ``layer`` exists, without loading any weight.

    Returns ``(path, config, family, model_cls, depth)``. Raises :class:`UnsupportedModelError` for a
    directory without a readable config, an unknown model type, or a layer the model does not have
    (``scalselect run`` calls it before its first stage).
    """
    import transformers
    from transformers import AutoConfig

    path = Path(model)
    if not (path / "config.json").exists():
        raise UnsupportedModelError(f"{path}: not a model directory (no config.json); pass a local checkpoint path")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:  # unknown model_type, unreadable/invalid config.json
        raise UnsupportedModelError(f"{path}: cannot read the model config ({_first_line(exc)}); pass a "
                                    f"checkpoint of a supported model type: {sorted(KNOWN_FAMILIES)}") from None
    family = config.model_type
    if family in KNOWN_FAMILIES:
        if not hasattr(transformers, BASE_CLASSES[family]):
            raise UnsupportedModelError(f"{path}: model type {family!r} needs a newer transformers "
                                        f"(this is {transformers.__version__})")
        model_cls = getattr(transformers, BASE_CLASSES[family])
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        if family not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise UnsupportedModelError(
                f"{path}: unknown model type {family!r}; supported: {sorted(KNOWN_FAMILIES)} and image-text-to-text "
                f"models known to AutoModelForImageTextToText")
        model_cls = transformers.AutoModelForImageTextToText
    text_cfg = config.get_text_config()
    depth = int(text_cfg.num_hidden_layers)
    layer = int(layer)
    if not 0 <= layer < depth:
        raise UnsupportedModelError(f"{path}: layer {layer} does not exist; the model has {depth} decoder layers "
                                    f"(choose --layer between 0 and {depth - 1})")
    return path, config, family, model_cls, depth


def load_vlm(model, layer: int = 0, dtype="fp32", device: str | None = "auto", device_map=None,
             truncate: bool = True, max_length: int | None = None, trust_remote_code: bool = False,
             random_weights: bool = False, roles: str | None = None, vision_tokens: str | None = None,
             pixels=None) -> VLM:
    """Load a checkpoint directory (or wrap a loaded model) for layer-``layer`` extraction.

    Parameters
    ----------
    model : str, PathLike or VLM
        A local checkpoint directory (config, weights, tokenizer, image-processor files), or an
        already-built :class:`VLM` (returned as is).
    layer : int
        Decoder layer ℓ (0-based). Must be < the checkpoint's depth.
    dtype : {"auto", "bf16", "fp16", "fp32"} or torch.dtype
        ``auto``: bf16 on a GPU that supports it, float32 on CPU.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        Ignored when ``device_map`` is given.
    device_map : str or dict, optional
        Passed to ``from_pretrained`` for models that do not fit one device.
    truncate : bool
        Load only layers 0..ℓ (default). False loads the whole model (the forward still stops at ℓ).
    max_length : int, optional
        Longest sample in tokens; default: the text config's ``max_position_embeddings``.
    random_weights : bool
        Allow weights missing from the checkpoint and initialise them randomly (transformers'
        initialisation with cheap normal draws, see :func:`_fast_random_init`). For benchmarks
        on published shapes without the weights (see :func:`~.tiny.build_shaped_model`). Without it, a
        checkpoint that lacks weights the model needs is refused: its vectors would be random.
    roles : {"reference", "label-mask"}, optional
        What counts as an answer token (default ``"reference"``, the authors' rule: the answer text
        itself; ``"label-mask"`` adds each turn's end-of-turn marker). See :mod:`.roles`.
    vision_tokens : {"reference", "pad-only"}, optional
        Visual token ids (default ``"reference"``: the image token plus Qwen's ``<|vision_start|>`` /
        ``<|vision_end|>``; ``"pad-only"``: the image token only).
    pixels : {"paper", "processor"} or "MIN:MAX", optional
        Qwen-VL image size range in pixels (default ``"paper"`` = 262,144..589,824, the authors'
        setting; ``"processor"`` = the checkpoint's own). Other families use their processor's size.

    For an already-loaded :class:`VLM`, the three choices given (not None) replace its own in a copy
    (:meth:`VLM.with_options`); the other arguments are ignored.
    """
    if isinstance(model, VLM):
        return model.with_options(roles, vision_tokens, pixels)
    roles = "reference" if roles is None else _check_choice("roles", roles, R.ROLE_MODES)
    vision_tokens = "reference" if vision_tokens is None else _check_choice("vision_tokens", vision_tokens,
                                                                            R.VISION_TOKEN_MODES)
    pixels = "paper" if pixels is None else pixels
    parse_pixels(pixels)  # a malformed value fails before the (slow) model load
    import torch
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    path, config, family, model_cls, depth = check_model(model, layer, trust_remote_code)
    text_cfg = config.get_text_config()
    layer = int(layer)
    if family not in QWEN_FAMILIES and pixels not in ("paper", "processor"):
        _apply_pixels(None, family, pixels, path)  # refuses before the (slow) model load
    if truncate and layer + 1 < depth:
        _truncate_text_config(text_cfg, layer + 1)
    if truncate and family == "llava":
        _truncate_vision_config(config)
    torch_dtype = resolve_dtype(dtype, device)
    dev = resolve_device(device) if device_map is None else None  # refuse a bad device before loading
    kw = dict(config=config, dtype=torch_dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code,
              output_loading_info=True)
    if device_map is not None:
        kw["device_map"] = device_map
    # Quiet the expected "weights of layers > ℓ were not used" report of a truncated load.
    tlog = transformers.utils.logging
    old = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        with _fast_random_init() if random_weights else contextlib.nullcontext():
            net, info = model_cls.from_pretrained(path, **kw)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        # A truncated/corrupt safetensors file (SafetensorError is an Exception subclass of its own),
        # missing weights, a config value torch cannot build: one line naming the checkpoint.
        raise UnsupportedModelError(f"{path}: cannot load the weights ({type(exc).__name__}: "
                                    f"{_first_line(exc)}); re-download or repair the checkpoint") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise UnsupportedModelError(f"{path}: a weights file is damaged ({_first_line(exc)}); re-download or "
                                    f"repair the checkpoint") from None
    finally:
        tlog.set_verbosity(old)
    net.eval()
    if dev is not None:
        net = net.to(dev)
    missing = sorted(info.get("missing_keys") or ())
    if missing and not random_weights:
        raise UnsupportedModelError(
            f"{path}: {len(missing)} weights the model needs are not in the checkpoint (e.g. {missing[0]}); "
            f"its layout does not match {model_cls.__name__}: check the checkpoint files")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor = None
    if family in KNOWN_FAMILIES:
        image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        image_processor = processor.image_processor
        tokenizer = processor.tokenizer
    chat_template = _read_chat_template(path, tokenizer)
    import copy

    checkpoint_ip = copy.deepcopy(image_processor)
    pixel_range = _apply_pixels(image_processor, family, pixels, path)
    vlm = VLM(net, path, family, layer, depth, tokenizer, image_processor, chat_template, processor=processor,
              device=dev or "cpu", max_length=max_length, roles=roles, vision_tokens=vision_tokens,
              pixels=pixels, pixel_range=pixel_range)
    vlm._checkpoint_image_processor = checkpoint_ip
    if device_map is not None:
        vlm._device_map = True
        vlm._input_device = str(net.get_input_embeddings().weight.device)
    return vlm
