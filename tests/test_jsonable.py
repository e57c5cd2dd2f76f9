"""to_jsonable: the one numpy/path -> JSON conversion (report.json and saved subspaces)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from scalselect_fast.jsonable import to_jsonable


def test_numpy_paths_and_keys_become_plain_json():
    obj = {1: (np.int64(4), np.float32(0.5)), "b": np.bool_(True), "c": np.arange(3, dtype=np.int16),
           "p": Path("a/b"), "n": None, "s": "x", "m": np.array([[1.5, 2.0]])}
    out = to_jsonable(obj)
    assert out == {"1": [4, 0.5], "b": True, "c": [0, 1, 2], "p": "a/b", "n": None, "s": "x", "m": [[1.5, 2.0]]}
    assert json.loads(json.dumps(out, allow_nan=False)) == out   # strict JSON, no numpy left
    assert type(out["1"][0]) is int and type(out["b"]) is bool


@pytest.mark.parametrize("x", [np.nan, np.inf, -np.inf])
def test_nonfinite_as_strings_for_reports_or_kept_for_round_trips(x):
    as_text = to_jsonable({"v": np.float64(x), "w": [float(x)]})
    assert as_text == {"v": str(float(x)), "w": [str(float(x))]}
    kept = to_jsonable({"v": np.float32(x)}, "keep")["v"]
    back = json.loads(json.dumps({"v": kept}))["v"]
    assert (math.isnan(back) and math.isnan(x)) or back == x
    with pytest.raises(ValueError, match="nonfinite"):
        to_jsonable(1.0, "drop")
