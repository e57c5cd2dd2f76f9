"""Token roles (visual / assistant answer / user text / template / padding) from the chat template.

Roles come from character spans, never from searching token subsequences (a subsequence search
silently fails when a word tokenises differently in context):

1. The conversation is rendered by the model's own chat template twice: once with every message text
   replaced by a unique placeholder, once with the real text. Substituting the texts back into the
   placeholder rendering must reproduce the real rendering exactly; that gives the exact character
   span of every message's text (templates that ``trim`` their content are handled; a template that
   rewrites the text is refused with a clear error).
2. What an answer is depends on ``roles`` (see :data:`ROLE_MODES`):

   ``"reference"`` (default; the authors' extraction, ``feature_extract_sft.py`` of ScalSelect)
      An answer is the text of the assistant message itself, without surrounding whitespace. The
      end-of-turn marker after it (``</s>`` for LLaVA, ``<|im_end|>`` and the newline after it for
      Qwen) is *not* an answer token, so it is an instruction token (a template token). The authors
      mark the ids of the answer tokenised on its own; where that tokenisation starts with a piece
      the context splits off before the answer (SentencePiece's ``"▁"`` before a digit), that
      token is an answer token too. This is checked at the answer's own position only, never by a
      search through the sequence.
   ``"label-mask"``
      An answer runs from the first character of its text to the end of that turn's rendering (found
      by rendering the conversation up to and including that message), so the end-of-turn marker
      belongs to the answer, as in training-label masks.

3. The rendered text is tokenised with ``return_offsets_mapping``; a token is an answer token if its
   characters overlap an answer span, user text if they overlap a user message's text, visual if its
   id is in the visual id set, and template otherwise (system prompt, role headers, special tokens
   such as BOS, whose offsets are empty). A token straddling a boundary (byte-level BPE's ``" A"``
   after ``"ASSISTANT:"``) takes the role of the text it touches, answer first. Only the rendered
   text as a whole is tokenised, never a message on its own, so tokenizers that treat a leading
   space differently (transformers' Llama tokenizer vs SentencePiece) cannot change the roles.
4. Image placeholders are expanded to the number of visual tokens each image gets; the expanded ids
   must match what the model's processor produces (the tests check this).

The visual id set (``vision_tokens``, see :data:`VISION_TOKEN_MODES`) is the image token plus, for
``"reference"``, the vision start/end markers of Qwen-style models (``<|vision_start|>``,
``<|vision_end|>``), which the authors count as visual; ``"pad-only"`` keeps the image token only.

The instruction set (the attention rows that are averaged) is ``{USER, TEMPLATE}`` for
``instruction="all"`` (the authors' choice: every non-visual, non-answer token) and ``{USER}`` for
``instruction="user"``.

Everything per token is numpy array work (interval search, ``np.repeat``); there is no Python loop
over tokens (``benchmarks/bench_roles.py`` measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["ExtractError", "PAD", "VISUAL", "ANSWER", "USER", "TEMPLATE", "ROLE_NAMES", "SampleError", "ChatTemplateError",
           "ROLE_MODES", "VISION_TOKEN_MODES", "Rendered", "build_chat_messages", "render_conversation",
           "token_roles", "expand_image_tokens", "align_to_processor", "instruction_mask"]

#: role codes stored per token (int8)
PAD, VISUAL, ANSWER, USER, TEMPLATE = 0, 1, 2, 3, 4
ROLE_NAMES = {PAD: "pad", VISUAL: "visual", ANSWER: "answer", USER: "user", TEMPLATE: "template"}

#: ``roles`` choices: what counts as an answer token (first = default)
ROLE_MODES = ("reference", "label-mask")
#: ``vision_tokens`` choices: which token ids are visual (first = default)
VISION_TOKEN_MODES = ("reference", "pad-only")

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
    answer_spans : list of (start, stop)
        Character spans of assistant answers: the answer text without surrounding whitespace.
    user_spans : list of (start, stop)
        Character spans of user message text.
    n_images : int
        Number of image items rendered.
    turn_spans : list of (start, stop) or None
        Answer text + the rest of its turn (the end-of-turn marker), for ``roles="label-mask"``;
        None when not located (rendered with ``roles="reference"``).
    """

    text: str
    answer_spans: list[tuple[int, int]]
    user_spans: list[tuple[int, int]]
    n_images: int
    turn_spans: list[tuple[int, int]] | None = None

    def spans(self, roles: str = "reference") -> list[tuple[int, int]]:
        """Answer spans under the ``roles`` rule (see the module docstring)."""
        if roles == "reference":
            return self.answer_spans
        if roles == "label-mask":
            if self.turn_spans is None:
                raise ValueError("turn spans were not located; render with roles='label-mask'")
            return self.turn_spans
        raise ValueError(f"roles must be one of {ROLE_MODES}, got {roles!r}")


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
                        sample_id: str = "?", roles: str = "reference") -> Rendered:
    """Render ``messages`` (typed content, see :func:`build_chat_messages`) and locate every span.

    Parameters
    ----------
    messages : list of dict
        Chat messages whose content is a list of ``{"type": "text"|"image"}`` items.
    render : callable
        ``render(messages) -> str``; the model's chat template without generation prompt.
    image_token : str
        The image placeholder string the template emits for each image item (e.g. ``"<image>"``).
    roles : {"reference", "label-mask"}
        ``"label-mask"`` also locates each answer's end of turn (one more rendering per answer).

    Raises
    ------
    ChatTemplateError
        If the template does not insert message text verbatim (then no span can be trusted).
    """
    if roles not in ROLE_MODES:
        raise ValueError(f"roles must be one of {ROLE_MODES}, got {roles!r}")
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

    answer, turns, user = [], [], []
    for k, m in enumerate(messages):
        mine = [(s, e) for (kk, s, e) in spans if kk == k]
        if m["role"] == "user":
            user += [(s, e) for s, e in mine if e > s]
        elif m["role"] == "assistant" and mine:
            start = min(s for s, _ in mine)
            stop = max(e for _, e in mine)
            # the answer text itself, as the authors tokenise it (``content.strip()``)
            a, b = start, stop
            while a < b and real[a].isspace():
                a += 1
            while b > a and real[b - 1].isspace():
                b -= 1
            if b > a:
                answer.append((a, b))
            if roles != "label-mask":
                continue
            # label-mask: extend to the end of this turn (render the conversation up to this message)
            try:
                prefix = render(ph_msgs[:k + 1])
            except Exception:  # noqa: BLE001 - some templates refuse partial conversations
                prefix = None
            if prefix is not None and ph_text.startswith(prefix):
                stop = max(stop, to_real(len(prefix)))
            turns.append((start, stop))
    n_images = sum(1 for m in messages for it in m["content"] if it["type"] == "image")
    if real.count(image_token) != n_images:
        raise ChatTemplateError(
            f"sample {sample_id}: the chat template rendered {real.count(image_token)} {image_token!r} "
            f"placeholders for {n_images} images")
    return Rendered(real, answer, user, n_images, turns if roles == "label-mask" else None)


def _overlapping(starts: np.ndarray, stops: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Mask of the intervals ``[starts, stops)`` that overlap any of ``spans`` (vectorised).

    ``spans`` are merged into sorted disjoint intervals; for each token the first span ending after
    its start is found by binary search, and the token overlaps iff that span starts before its stop.
    """
    if not spans:
        return np.zeros(starts.shape, bool)
    sp = np.array(sorted(spans), dtype=np.int64)
    # merge overlapping / touching spans so that the span ends are sorted
    keep = np.ones(len(sp), bool)
    ends = np.maximum.accumulate(sp[:, 1])
    keep[1:] = sp[1:, 0] > ends[:-1]
    group = np.cumsum(keep) - 1
    m_start = sp[keep, 0]
    m_stop = np.zeros(len(m_start), np.int64)
    np.maximum.at(m_stop, group, sp[:, 1])
    j = np.searchsorted(m_stop, starts, side="right")
    hit = j < len(m_start)
    out = np.zeros(starts.shape, bool)
    out[hit] = m_start[j[hit]] < stops[hit]
    return out


def _anchor_answers(ids: np.ndarray, text: np.ndarray, a: np.ndarray, b: np.ndarray, spans, answer_ids,
                    answer: np.ndarray) -> None:
    """Extend each answer to the tokens of its own tokenisation (in place on ``answer``).

    The authors mark the ids of the answer text tokenised alone. Where that sequence ends where the
    answer's tokens end but starts earlier — SentencePiece's ``"▁"`` prefix piece, a separate token
    for the space before a digit or punctuation — the extra leading tokens are answer tokens too. The
    match is checked only at the answer's own position (no search elsewhere in the sequence).
    """
    for (s0, s1), candidates in zip(spans, answer_ids):
        idx = np.flatnonzero(text & (a < s1) & (s0 < b))
        if len(idx) == 0:
            continue
        first, end = int(idx[0]), int(idx[-1]) + 1
        for cand in candidates:  # the first that matches wins, as in the authors' search
            start = end - len(cand)
            if 0 <= start <= first and np.array_equal(ids[start:end], np.asarray(cand, dtype=np.int64)):
                answer[start:first] = True
                break


def token_roles(offsets, ids, rendered: Rendered, image_token_id: int, roles: str = "reference",
                visual_ids=(), answer_ids=None) -> np.ndarray:
    """Role code (int8) of each token of the tokenised ``rendered.text``.

    Parameters
    ----------
    offsets : array-like of int, shape (T, 2)
        Character ``(start, stop)`` of each token (``return_offsets_mapping=True``); special tokens
        have ``start == stop``.
    ids : array-like of int, shape (T,)
        Token ids.
    rendered : Rendered
        The spans of the rendered conversation.
    image_token_id : int
        The image placeholder id (always visual).
    roles : {"reference", "label-mask"}
        Which answer spans apply (see the module docstring).
    visual_ids : iterable of int
        Further ids that are visual (the vision start/end markers under ``vision_tokens="reference"``).
    answer_ids : list of sequences of list of int, optional
        For ``roles="reference"``: per answer span, the ids of its text tokenised alone (and with a
        leading space); tokens just before the answer that complete that sequence are answer tokens
        (see :func:`_anchor_answers`).

    Returns
    -------
    ndarray of int8, shape (T,)
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(off) != len(ids):
        raise ValueError(f"{len(off)} offsets for {len(ids)} tokens")
    a, b = off[:, 0], off[:, 1]
    text = b > a
    out = np.full(len(ids), TEMPLATE, dtype=np.int8)
    user = text & _overlapping(a, b, rendered.user_spans)
    answer = text & _overlapping(a, b, rendered.spans(roles))
    if roles == "reference" and answer_ids is not None:
        _anchor_answers(ids, text, a, b, rendered.answer_spans, answer_ids, answer)
    out[user] = USER
    out[answer] = ANSWER  # a token touching an answer and a user text is an answer token
    out[np.isin(ids, np.fromiter({int(image_token_id), *map(int, visual_ids)}, np.int64))] = VISUAL
    return out


def expand_image_tokens(ids, roles: np.ndarray, image_token_id: int, counts: Sequence[int],
                        sample_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """Repeat the i-th image token ``counts[i]`` times (what the processor does to the text).

    Parameters
    ----------
    ids : array-like of int, shape (T,)
    roles : ndarray of int8, shape (T,)
    counts : sequence of int
        Visual tokens of each image, in order.

    Returns
    -------
    ids : ndarray of int64, shape (T - n_images + sum(counts),)
    roles : ndarray of int8, same shape (the expanded tokens are VISUAL)
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != len(counts):
        raise SampleError(f"sample {sample_id}: {len(where)} image tokens in the text for {len(counts)} images")
    reps = np.ones(len(ids), np.int64)
    reps[where] = np.asarray(counts, dtype=np.int64)
    roles = np.asarray(roles, dtype=np.int8).copy()
    roles[where] = VISUAL
    return np.repeat(ids, reps), np.repeat(roles, reps)


def _runs(ids: np.ndarray, image_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collapse each run of image tokens to one entry: (collapsed ids, first position, run length)."""
    img = ids == image_token_id
    first = np.ones(len(ids), bool)
    first[1:] = ~(img[1:] & img[:-1])  # an image token right after another continues its run
    starts = np.flatnonzero(first)
    lengths = np.diff(np.append(starts, len(ids)))
    return ids[starts], starts, lengths


def align_to_processor(ids, roles: np.ndarray, proc_ids, image_token_id: int, sample_id: str = "?") -> np.ndarray:
    """Roles for the processor's (expanded) ids, given roles of the unexpanded tokenisation.

    Each run of image tokens in ``ids`` must correspond to a (longer or equal) run in ``proc_ids``;
    every other token must match one to one.

    Parameters
    ----------
    ids : array-like of int, shape (T,)
    roles : ndarray of int8, shape (T,)
    proc_ids : array-like of int, shape (P,)
        The processor's ids (image runs expanded).

    Returns
    -------
    ndarray of int8, shape (P,)
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    proc = np.asarray(proc_ids, dtype=np.int64).reshape(-1)
    c_ids, starts, _ = _runs(ids, image_token_id)
    c_proc, _, p_len = _runs(proc, image_token_id)
    n = min(len(c_ids), len(c_proc))
    bad = np.flatnonzero(c_ids[:n] != c_proc[:n])
    if len(bad) or len(c_ids) != len(c_proc):
        at = int(bad[0]) if len(bad) else n
        if at < len(c_ids) and c_ids[at] == image_token_id:
            raise SampleError(f"sample {sample_id}: processor output does not expand the image token where expected")
        if at >= len(c_ids):
            raise SampleError(f"sample {sample_id}: processor output has {len(proc) - int(np.sum(p_len[:at]))} "
                              f"extra tokens")
        raise SampleError(f"sample {sample_id}: processor tokenisation differs from the chat-template "
                          f"tokenisation at token {int(starts[at])}")
    c_roles = np.asarray(roles, dtype=np.int8)[starts].copy()
    c_roles[c_ids == image_token_id] = VISUAL
    return np.repeat(c_roles, p_len)


def instruction_mask(roles: np.ndarray, instruction: str = "all") -> np.ndarray:
    """Boolean mask of the instruction (attention-row) tokens: ``"all"`` = user + template, ``"user"``."""
    if instruction == "all":
        return (roles == USER) | (roles == TEMPLATE)
    if instruction == "user":
        return roles == USER
    raise ValueError(f"instruction must be 'all' or 'user', got {instruction!r}")
