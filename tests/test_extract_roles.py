"""Token roles from chat templates (character spans + offsets), on both tiny-model templates."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from scalselect_fast.extract import roles as R  # noqa: E402
from scalselect_fast.extract.tiny import build_tiny_model  # noqa: E402

CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "<image>\nWhat is shown in the picture?"},
    {"role": "assistant", "content": "A red square on blue."},
    {"role": "user", "content": "How many objects?"},
    {"role": "assistant", "content": "Three objects."},
]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    from scalselect_fast.extract import load_vlm

    root = tmp_path_factory.mktemp("tiny-roles")
    return {fam: load_vlm(build_tiny_model(fam, root / fam, num_layers=1), device="cpu")
            for fam in ("llava", "qwen2_vl")}


def _image(w=32, h=32, seed=0):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _text_of(vlm, enc, role):
    ids = [t for t, r in zip(enc.input_ids, enc.roles) if r == role]
    return vlm.tokenizer.decode(ids)


# LLaVA renders "ASSISTANT: A red..."; the byte-level BPE token " A" straddles the template space and the
# answer, and a token touching an answer belongs to it (as in token-level training-label masks).
@pytest.mark.parametrize("family,answers,end", [("llava", [" A red square on blue.", "Three objects."], "</s>"),
                                                ("qwen2_vl", ["A red square on blue.", "Three objects."], "<|im_end|>\n")])
def test_roles_on_both_templates(vlms, family, answers, end):
    vlm = vlms[family]
    enc = vlm.encode("x", CONV, [_image()])
    roles = enc.roles
    assert int((roles == R.VISUAL).sum()) == 16  # 32x32 image -> 16 tokens on both tiny models
    # the answer tokens are exactly the answers plus each turn's end marker
    assert _text_of(vlm, enc, R.ANSWER) == "".join(a + end for a in answers)
    assert _text_of(vlm, enc, R.USER) == "What is shown in the picture?How many objects?"
    # visual ids are the config's image token, and nothing else carries that id
    ids = np.array(enc.input_ids)
    assert ((ids == vlm.image_token_id) == (roles == R.VISUAL)).all()
    # instruction masks
    allm, userm = R.instruction_mask(roles, "all"), R.instruction_mask(roles, "user")
    assert (userm <= allm).all() and not (allm & (roles == R.ANSWER)).any() and not (allm & (roles == R.VISUAL)).any()
    assert "You are a helpful assistant." in vlm.tokenizer.decode(ids[roles == R.TEMPLATE])


def test_llava_expansion_equals_processor(vlms, tmp_path):
    """Our image-token expansion + tokenisation give exactly the LlavaProcessor's ids."""
    from transformers import AutoProcessor

    vlm = vlms["llava"]
    proc = AutoProcessor.from_pretrained(vlm.path)
    enc = vlm.encode("x", CONV, [_image(40, 32)])
    text = R.render_conversation(R.build_chat_messages(CONV, 1), vlm.render, vlm.image_token).text
    ref = proc(text=[text], images=[_image(40, 32)], return_tensors="pt")
    assert enc.input_ids == ref["input_ids"][0].tolist()
    np.testing.assert_array_equal(enc.image_inputs["pixel_values"].numpy(), ref["pixel_values"].numpy())


def test_qwen_visual_count_follows_grid(vlms):
    vlm = vlms["qwen2_vl"]
    enc = vlm.encode("x", CONV[1:3], [_image(40, 24)])
    grid = enc.image_inputs["image_grid_thw"][0]
    assert int((enc.roles == R.VISUAL).sum()) == int(grid.prod()) // 4
    i = enc.input_ids
    vis = np.flatnonzero(enc.roles == R.VISUAL)
    assert vlm.tokenizer.convert_ids_to_tokens(i[vis[0] - 1]) == "<|vision_start|>"
    assert vlm.tokenizer.convert_ids_to_tokens(i[vis[-1] + 1]) == "<|vision_end|>"


def test_context_dependent_tokenisation(vlms):
    """A word tokenised differently in context would break subsequence search; spans do not care."""
    vlm = vlms["llava"]
    conv = [{"role": "user", "content": "<image>\nquestionquestion?"}, {"role": "assistant", "content": "answeranswer"}]
    enc = vlm.encode("x", conv, [_image()])
    assert _text_of(vlm, enc, R.ANSWER) == " answeranswer</s>"  # " answer" straddles "ASSISTANT: |answer"
    assert _text_of(vlm, enc, R.USER) == "questionquestion?"


def test_multiple_images_and_placement(vlms):
    vlm = vlms["qwen2_vl"]
    conv = [{"role": "user", "content": "<image>first <image> second"}, {"role": "assistant", "content": "ok"}]
    enc = vlm.encode("x", conv, [_image(), _image(seed=1)])
    assert int((enc.roles == R.VISUAL).sum()) == 32
    with pytest.raises(R.SampleError, match="2 '<image>' markers in the text but 1 images"):
        vlm.encode("x", conv, [_image()])
    with pytest.raises(R.SampleError, match="text-only"):
        vlm.encode("x", conv, [])


def test_trimming_template_and_rewriting_template():
    msgs = R.build_chat_messages([{"role": "user", "content": "  hi there "}, {"role": "assistant", "content": "yo "}], 0)

    def trimming(ms):
        return "".join(f"<{m['role']}>" + "".join(i["text"].strip() for i in m["content"] if i["type"] == "text") + "</>"
                       for m in ms)

    r = R.render_conversation(msgs, trimming, "<image>")
    assert r.text == "<user>hi there</><assistant>yo</>"
    assert [r.text[a:b] for a, b in r.user_spans] == ["hi there"]
    assert [r.text[a:b] for a, b in r.answer_spans] == ["yo</>"]

    def upper(ms):
        return "".join(i["text"].upper() for m in ms for i in m["content"] if i["type"] == "text")

    with pytest.raises(R.ChatTemplateError, match="verbatim"):
        R.render_conversation(msgs, upper, "<image>")


def test_alignment_to_processor_ids():
    ids = [1, 7, 9, 9, 5]
    roles = np.array([R.TEMPLATE, R.USER, R.VISUAL, R.VISUAL, R.ANSWER], np.int8)
    out = R.align_to_processor(ids, roles, [1, 7, 9, 9, 9, 9, 5], 9)
    assert out.tolist() == [R.TEMPLATE, R.USER] + [R.VISUAL] * 4 + [R.ANSWER]
    with pytest.raises(R.SampleError, match="differs"):
        R.align_to_processor(ids, roles, [1, 8, 9, 5], 9)


def test_template_with_generation_blocks_and_images_first(vlms):
    """Templates that render images before the text and wrap answers in {% generation %} blocks."""
    vlm = vlms["llava"]
    tmpl = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] | upper }}: {% endif %}"
            "{% for c in m['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
            "{% for c in m['content'] if c['type'] == 'text' %}{% if m['role'] == 'assistant' %}"
            "{% generation %}{{ c['text'] }}{% endgeneration %}{% else %}{{ c['text'] }}{% endif %} {% endfor %}"
            "{% endfor %}")
    old = vlm.encoder.chat_template
    vlm.encoder.chat_template = tmpl
    try:
        conv = [{"role": "user", "content": "Look: <image> what is it?"}, {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
        enc = vlm.encode("x", conv, [_image()])
    finally:
        vlm.encoder.chat_template = old
    assert int((enc.roles == R.VISUAL).sum()) == 16
    assert _text_of(vlm, enc, R.USER) == "Look:  what is it?Sure?"
    assert _text_of(vlm, enc, R.ANSWER).split() == ["A", "cat.", "Yes."]
