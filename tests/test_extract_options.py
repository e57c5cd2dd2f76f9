"""ExtractOptions: settings validated once, and the same extraction whichever way they are given
(keyword arguments, ``options=``, the CLI's flags, the old ``backend`` spelling)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from scalselect_fast.extract.options import ExtractOptions, extract_options
from scalselect_fast.extract.roles import ExtractError


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be >= 1"),
    ("threshold", 0.0, r"threshold must be in \(0, 1\]"),
    ("threshold", 1.5, r"threshold must be in \(0, 1\]"),
    ("instruction", "assistant", "instruction must be 'all' or 'user'"),
    ("padding_side", "middle", "padding_side must be 'left' or 'right'"),
    ("max_image_pixels", 0, "max_image_pixels must be a positive number"),
    ("max_image_pixels", True, "max_image_pixels must be a positive number"),
    ("shard_size", 0, "shard_size must be >= 1"),
])
def test_bad_settings_are_refused_on_construction(field, value, message):
    with pytest.raises(ExtractError, match=message):
        ExtractOptions(**{field: value})
    with pytest.raises(ExtractError, match=message):  # replace() validates again
        dataclasses.replace(ExtractOptions(), **{field: value})


def test_options_are_frozen_and_none_pixel_limit_is_allowed():
    opts = ExtractOptions(max_image_pixels=None, batch_size=1, threshold=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.batch_size = 2


def test_keyword_settings_apply_on_top_of_options():
    base = ExtractOptions(batch_size=3, layer=1)
    got = extract_options(base, {"threshold": 0.5}, "f")
    assert (got.batch_size, got.layer, got.threshold) == (3, 1, 0.5)
    assert extract_options(base, {}, "f") is base
    assert extract_options(None, {}, "f") == ExtractOptions()


def test_unknown_setting_names_the_entry_point_and_the_fields():
    with pytest.raises(TypeError, match=r"extract_to_store\(\) got unexpected keyword argument\(s\) bach_size.*batch_size"):
        extract_options(None, {"bach_size": 4}, "extract_to_store")


def test_old_backend_keyword_is_pool_impl_with_a_warning():
    with pytest.warns(DeprecationWarning, match="use pool_impl"):
        got = extract_options(None, {"backend": "torch"}, "extract_to_store")
    assert got.pool_impl == "torch"
    with pytest.raises(TypeError, match="both pool_impl= and its old name backend="):
        extract_options(None, {"backend": "torch", "pool_impl": "torch"}, "extract_to_store")


# ------------------------------------------------------------------ through the public entry points
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from _extract_util import make_dataset

    from scalselect_fast.extract import build_tiny_model

    root = tmp_path_factory.mktemp("opts")
    model = build_tiny_model("llava", root / "llava", num_layers=1)
    return model, make_dataset(root / "ds", n=5), root / "ds"


def _store(out):
    from scalselect_fast.store import open_source

    src = open_source(out)
    return src.ids(), src.to_array()


def test_options_object_keywords_and_old_spelling_give_one_store(tiny, tmp_path):
    from scalselect_fast.extract import ExtractOptions as Exported
    from scalselect_fast.extract import extract_to_store

    assert Exported is ExtractOptions
    model, data, root = tiny
    kw = dict(image_root=root, dtype="fp32", device="cpu", store_dtype="float32", shard_size=2, batch_size=2,
              progress=False)
    extract_to_store(model, data, tmp_path / "kw", pool_impl="torch", **kw)
    extract_to_store(model, data, tmp_path / "opts", options=ExtractOptions(pool_impl="torch", **kw))
    with pytest.warns(DeprecationWarning, match="pool_impl"):
        extract_to_store(model, data, tmp_path / "old", backend="torch", **kw)
    ids, ref = _store(tmp_path / "kw")
    assert len(ids) == 5
    for name in ("opts", "old"):
        got_ids, got = _store(tmp_path / name)
        assert got_ids == ids
        np.testing.assert_array_equal(got, ref)
    with pytest.raises(ExtractError, match="batch_size must be >= 1"):  # before any data is opened
        extract_to_store(model, tmp_path / "missing.json", tmp_path / "bad", batch_size=0)


def test_cli_old_backend_flag_still_works_with_a_warning(tiny, tmp_path, capsys):
    from scalselect_fast.cli import main

    model, data, root = tiny
    args = ["extract", "--model", str(model), "--data", str(data), "--image-root", str(root), "--dtype", "fp32",
            "--device", "cpu", "--store-dtype", "float32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "new"), "--pool-impl", "torch"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "old"), "--backend", "torch"]) == 0
    captured = capsys.readouterr()
    assert "--backend is deprecated" in captured.err and "--pool-impl" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["rows"] == 5
    np.testing.assert_array_equal(_store(tmp_path / "old")[1], _store(tmp_path / "new")[1])
    assert main([*args, "--out", str(tmp_path / "both"), "--backend", "torch", "--pool-impl", "torch"]) == 2
    assert "pass --pool-impl only" in capsys.readouterr().err
