"""Token roles (visual / assistant answer / user text / template / padding) from the chat template.

Roles come from character spans, never from searching token subsequences (a subsequence search
silently fails when a word tokenises differently in context):

1. The conversation is rendered by the model's own chat template twice: once with every message text
   replaced by a unique placeholder, once with the real text. Substituting the texts back into the
   placeholder rendering must reproduce the real rendering exactly; that gives the exact character
   span of every message's text (templates that ``trim`` their content are handled; a template that
   rewrites the text is refused with a clear error).
2. An assistant turn's span runs from the first character of its text to the end of that turn's
   rendering (found by rendering the conversation up to and including that message), so the
   end-of-turn marker (``</s>``, ``<|im_end|>``) belongs to the answer, as in training-label masks.
3. The rendered text is tokenised with ``return_offsets_mapping``; a token is an answer token if its
   characters overlap an assistant span, user text if they overlap a user message's text, visual if
   its id is the model's image token, and template otherwise (system prompt, role headers, special
   tokens such as BOS, whose offsets are empty). A token straddling a boundary (byte-level BPE's
   ``" A"`` after ``"ASSISTANT:"``) takes the role of the text it touches, answer first.
4. Image placeholders are expanded to the number of visual tokens each image gets; the expanded ids
   must match what the model's processor produces (the tests check this).

The instruction set (the attention rows that are averaged) is ``{USER, TEMPLATE}`` for
``instruction="all"`` (the authors' choice: every non-visual, non-answer token) and ``{USER}`` for
``instruction="user"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["ExtractError", "PAD", "VISUAL", "ANSWER", "USER", "TEMPLATE", "ROLE_NAMES", "SampleError", "ChatTemplateError",
           "Rendered", "build_chat_messages", "render_conversation", "token_roles", "expand_image_tokens",
           "instruction_mask"]

#: role codes stored per token (int8)
PAD, VISUAL, ANSWER, USER, TEMPLATE = 0, 1, 2, 3, 4
ROLE_NAMES = {PAD: "pad", VISUAL: "visual", ANSWER: "answer", USER: "user", TEMPLATE: "template"}

IMAGE_MARKER = "<image>"
_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"  # private-use code points: never in real text, kept by templates


class ExtractError(ValueError):
    """Base of the extraction errors that stop a run (the message names the file/model and the fix)."""


class SampleError(ValueError):
    """A sample cannot be encoded (skipped with this message as the reason)."""


class ChatTemplateError(ExtractError):
    """The model's chat template does not render message text verbatim; roles cannot be derived."""


@dataclass
class Rendered:
    """A conversation rendered by a chat template.

    Attributes
    ----------
    text : str
        The rendered prompt (image placeholders not yet expanded).
    answer_spans, user_spans : list of (start, stop)
        Character spans of assistant answers (text + end-of-turn marker) and of user message text.
    n_images : int
        Number of image items rendered.
    """

    text: str
    answer_spans: list[tuple[int, int]]
    user_spans: list[tuple[int, int]]
    n_images: int


def build_chat_messages(messages: Sequence[dict], n_images: int, sample_id: str = "?") -> list[dict]:
    """Turn ``[{role, content: str}]`` into chat-template messages with typed content items.

    ``<image>`` markers in the text become ``{"type": "image"}`` items at their position; when the
    text has no marker at all, the images go before the first user message's text (the LLaVA
    convention). A marker count that differs from ``n_images`` is a :class:`SampleError`.
    """
    n_markers = sum(str(m.get("content", "")).count(IMAGE_MARKER) for m in messages)
    if n_markers not in (0, n_images):
        raise SampleError(f"sample {sample_id}: {n_markers} '<image>' markers in the text but {n_images} images")
    out = []
    placed = n_markers == n_images
    for m in messages:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise SampleError(f"sample {sample_id}: unknown message role {role!r}")
        text = str(m.get("content", ""))
        items: list[dict] = []
        if not placed and role == "user":
            items += [{"type": "image"} for _ in range(n_images)]
            placed = True
        pieces = text.split(IMAGE_MARKER)
        for j, piece in enumerate(pieces):
            if j > 0:
                items.append({"type": "image"})
            # LLaVA data writes "<image>\nQuestion": the newline belongs to the marker
            if j > 0 and piece.startswith("\n"):
                piece = piece[1:]
            if piece:
                items.append({"type": "text", "text": piece})
        out.append({"role": role, "content": items})
    if not placed:
        raise SampleError(f"sample {sample_id}: has images but no user message to attach them to")
    return out


def _with_placeholders(messages: list[dict]) -> tuple[list[dict], list[tuple[int, str, str]]]:
    """Replace each text item by a unique placeholder; return (messages, [(msg_idx, placeholder, text)])."""
    out, table = [], []
    for k, m in enumerate(messages):
        items = []
        for it in m["content"]:
            if it["type"] == "text":
                ph = f"{_PH_OPEN}{len(table)}{_PH_CLOSE}"
                table.append((k, ph, it["text"]))
                items.append({"type": "text", "text": ph})
            else:
                items.append(dict(it))
        out.append({"role": m["role"], "content": items})
    return out, table


def _substitute(ph_text: str, table: list[tuple[int, str, str]], strip: bool):
    """Put the real texts back into the placeholder rendering.

    Returns (text, [(msg_idx, start, stop)], [(end of placeholder in ph_text, cumulative length change)])
    or None when a placeholder is missing (the template dropped or altered it).
    """
    pieces, spans, shift = [], [], []
    pos = delta = 0
    for k, ph, text in table:
        at = ph_text.find(ph, pos)
        if at < 0:
            return None
        val = text.strip() if strip else text
        pieces += [ph_text[pos:at], val]
        spans.append((k, at + delta, at + delta + len(val)))
        delta += len(val) - len(ph)
        shift.append((at + len(ph), delta))
        pos = at + len(ph)
    pieces.append(ph_text[pos:])
    return "".join(pieces), spans, shift


def render_conversation(messages: list[dict], render: Callable[[list[dict]], str], image_token: str,
                        sample_id: str = "?") -> Rendered:
    """Render ``messages`` (typed content, see :func:`build_chat_messages`) and locate every span.

    Parameters
    ----------
    messages : list of dict
        Chat messages whose content is a list of ``{"type": "text"|"image"}`` items.
    render : callable
        ``render(messages) -> str``; the model's chat template without generation prompt.
    image_token : str
        The image placeholder string the template emits for each image item (e.g. ``"<image>"``).

    Raises
    ------
    ChatTemplateError
        If the template does not insert message text verbatim (then no span can be trusted).
    """
    real = render(messages)
    ph_msgs, table = _with_placeholders(messages)
    ph_text = render(ph_msgs)
    found = None
    for strip in (False, True):  # some templates `trim` message content
        found = _substitute(ph_text, table, strip)
        if found is not None and found[0] == real:
            break
        found = None
    if found is None:
        raise ChatTemplateError(
            f"sample {sample_id}: the chat template does not render message text verbatim, so token roles "
            f"cannot be located; use a model/tokenizer whose chat template inserts message content unchanged")
    _, spans, shift = found

    def to_real(p: int) -> int:  # map a position of ph_text to the real text
        d = 0
        for end, cum in shift:
            if end <= p:
                d = cum
            else:
                break
        return p + d

    answer, user = [], []
    for k, m in enumerate(messages):
        mine = [(s, e) for (kk, s, e) in spans if kk == k]
        if m["role"] == "user":
            user += [(s, e) for s, e in mine if e > s]
        elif m["role"] == "assistant" and mine:
            start = min(s for s, _ in mine)
            stop = max(e for _, e in mine)
            # extend to the end of this turn: render the conversation up to this message
            try:
                prefix = render(ph_msgs[:k + 1])
            except Exception:  # noqa: BLE001 - some templates refuse partial conversations
                prefix = None
            if prefix is not None and ph_text.startswith(prefix):
                stop = max(stop, to_real(len(prefix)))
            answer.append((start, stop))
    n_images = sum(1 for m in messages for it in m["content"] if it["type"] == "image")
    if real.count(image_token) != n_images:
        raise ChatTemplateError(
            f"sample {sample_id}: the chat template rendered {real.count(image_token)} {image_token!r} "
            f"placeholders for {n_images} images")
    return Rendered(real, answer, user, n_images)


def _overlaps(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < e and s < b for s, e in spans)


def token_roles(offsets: Sequence[tuple[int, int]], ids: Sequence[int], rendered: Rendered,
                image_token_id: int) -> np.ndarray:
    """Role code (int8) of each token of the tokenised ``rendered.text``.

    Parameters
    ----------
    offsets : sequence of (start, stop)
        Character offsets from the tokenizer (``return_offsets_mapping=True``).
    ids : sequence of int
        Token ids (same length).
    """
    roles = np.full(len(ids), TEMPLATE, dtype=np.int8)
    for t, ((a, b), tid) in enumerate(zip(offsets, ids)):
        if tid == image_token_id:
            roles[t] = VISUAL
        elif b > a and _overlaps(a, b, rendered.answer_spans):
            roles[t] = ANSWER
        elif b > a and _overlaps(a, b, rendered.user_spans):
            roles[t] = USER
    return roles


def expand_image_tokens(ids: Sequence[int], roles: np.ndarray, image_token_id: int,
                        counts: Sequence[int], sample_id: str = "?") -> tuple[list[int], np.ndarray]:
    """Repeat the i-th image token ``counts[i]`` times (what the processor does to the text)."""
    n = sum(1 for t in ids if t == image_token_id)
    if n != len(counts):
        raise SampleError(f"sample {sample_id}: {n} image tokens in the text for {len(counts)} images")
    out_ids: list[int] = []
    out_roles: list[np.ndarray] = []
    i = 0
    for t, r in zip(ids, roles):
        if t == image_token_id:
            out_ids += [t] * int(counts[i])
            out_roles.append(np.full(int(counts[i]), VISUAL, np.int8))
            i += 1
        else:
            out_ids.append(t)
            out_roles.append(np.array([r], np.int8))
    return out_ids, (np.concatenate(out_roles) if out_roles else np.zeros(0, np.int8))


def align_to_processor(ids: Sequence[int], roles: np.ndarray, proc_ids: Sequence[int], image_token_id: int,
                       sample_id: str = "?") -> np.ndarray:
    """Roles for the processor's (expanded) ids, given roles of the unexpanded tokenisation.

    Each run of image tokens in ``ids`` must correspond to a (longer or equal) run in ``proc_ids``;
    every other token must match one to one.
    """
    out = np.empty(len(proc_ids), np.int8)
    i = j = 0
    n, m = len(ids), len(proc_ids)
    while i < n:
        if ids[i] == image_token_id:
            while i < n and ids[i] == image_token_id:
                i += 1
            if j >= m or proc_ids[j] != image_token_id:
                raise SampleError(f"sample {sample_id}: processor output does not expand the image token where expected")
            while j < m and proc_ids[j] == image_token_id:
                out[j] = VISUAL
                j += 1
        else:
            if j >= m or proc_ids[j] != ids[i]:
                raise SampleError(f"sample {sample_id}: processor tokenisation differs from the chat-template "
                                  f"tokenisation at token {i}")
            out[j] = roles[i]
            i += 1
            j += 1
    if j != m:
        raise SampleError(f"sample {sample_id}: processor output has {m - j} extra tokens")
    return out


def instruction_mask(roles: np.ndarray, instruction: str = "all") -> np.ndarray:
    """Boolean mask of the instruction (attention-row) tokens: ``"all"`` = user + template, ``"user"``."""
    if instruction == "all":
        return (roles == USER) | (roles == TEMPLATE)
    if instruction == "user":
        return roles == USER
    raise ValueError(f"instruction must be 'all' or 'user', got {instruction!r}")
