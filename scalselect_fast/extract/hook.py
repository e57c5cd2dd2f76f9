"""Capture post-RoPE q/k of one decoder layer through transformers' attention interface, and stop there.

The language model is switched to a registered attention function, ``"scalselect_sdpa"``, that
computes exactly what ``"sdpa"`` computes (it calls transformers' own SDPA function) and, for the one
attention module that carries a capture slot, also keeps its post-RoPE ``query`` ``(B, Hq, L, Dh)``
and ``key`` ``(B, Hkv, L, Dh)`` (before any GQA repetition). No attention map is ever materialised:
no ``output_attentions``, no eager attention.

:func:`capture_layer` also installs a forward hook on decoder layer ℓ that records the layer's output
hidden state (what ``hidden_states[ℓ+1]`` holds) and raises :class:`StopForward`, so layers ℓ+1.. and
the LM head never run (early exit). The mask function registered under the same name is
transformers' SDPA mask, so masks are built exactly as for ``"sdpa"``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

ATTN_NAME = "scalselect_sdpa"
_registered = False


class StopForward(Exception):
    """Raised by the layer-ℓ hook to abandon the rest of the forward pass (private to extraction)."""


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    slot = getattr(module, "_scalselect_capture", None)
    if slot is not None:
        slot.query, slot.key = query, key
        if slot.scaling is None:
            slot.scaling = kwargs.get("scaling")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    """Register the capturing attention function (idempotent) and return its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, _capture_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _registered = True
    return ATTN_NAME


def use_capturing_attention(language_model) -> None:
    """Point the language model's attention dispatch (its config) at the capturing function.

    Only the text decoder's config is changed; the vision tower keeps its own implementation.
    """
    name = register_attention()
    configs = {id(language_model.config): language_model.config}
    for mod in language_model.modules():  # attention modules may hold their own config object
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs[id(cfg)] = cfg
    for cfg in configs.values():
        cfg._attn_implementation_internal = name


@dataclass
class Capture:
    """What one forward pass left behind at layer ℓ."""

    query: object = None
    key: object = None
    hidden: object = None
    scaling: float | None = None
    extra: dict = field(default_factory=dict)


def _first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hs = getattr(output, "hidden_states", None) if not isinstance(output, (tuple, list)) else None
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find the hidden state in a decoder layer output of type {type(output).__name__}")


@contextlib.contextmanager
def capture_layer(decoder_layer, attention_module, stop: bool = True):
    """Record q/k of ``attention_module`` and the output of ``decoder_layer`` during one forward.

    Parameters
    ----------
    decoder_layer : torch.nn.Module
        Decoder layer ℓ; its output is recorded (and :class:`StopForward` raised when ``stop``).
    attention_module : torch.nn.Module
        Its self-attention module (whose config must dispatch to :data:`ATTN_NAME`).

    Yields
    ------
    Capture
    """
    cap = Capture(scaling=getattr(attention_module, "scaling", None))

    def hook(_mod, _args, output):
        cap.hidden = _first_tensor(output)
        if stop:
            raise StopForward

    attention_module._scalselect_capture = cap
    handle = decoder_layer.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()
        with contextlib.suppress(AttributeError):
            del attention_module._scalselect_capture
