"""Suite-wide test setup.

Triton picks interpreter or compiled mode when a kernel is decorated, so the choice has to be made
before any test module imports a kernel: without a CUDA device, kernels run under the (exact, slow)
Triton interpreter on CPU tensors.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # core tests run without torch
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------------------------------
# Shared builders. Test modules import the plain functions (``from conftest import png_bytes``) and
# request the fixtures by name; one definition each, so two tests never disagree on what "a PNG" or
# "bf16 bits" means.
import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def png_bytes(colour=(200, 30, 30), size=(8, 6), fmt: str = "PNG") -> bytes:
    """Encoded bytes of a solid ``size`` = (width, height) RGB image in ``colour``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, tuple(colour)).save(buf, format=fmt)
    return buf.getvalue()


def png_file(path, colour=(200, 30, 30), size=(8, 6)):
    """Write :func:`png_bytes` to ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour, size))
    return path


def write_parquet(path, rows: list[dict], schema=None):
    """One Parquet file of ``rows``; without a schema the columns are the union over all rows (pyarrow
    infers from row 0 only), missing values null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        rows = [{k: r.get(k) for k in keys} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def bf16_bits(x) -> np.ndarray:
    """float32 -> bfloat16 bit patterns as uint16: round to nearest, ties to even; NaN -> quiet NaN
    0x7FC0 (rounding a NaN's bits could carry it into infinity)."""
    x = np.asarray(x, dtype=np.float32)
    u = np.ascontiguousarray(x).view(np.uint32).astype(np.uint64)
    out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Path of a real tiny random-weight LLaVA checkpoint (default depth, seed 0), built once per
    session. Read-only: a test that edits a model copies it first."""
    pytest.importorskip("transformers")
    from scalselect_fast.extract.tiny import build_tiny_model

    return build_tiny_model("llava", tmp_path_factory.mktemp("tiny-llava") / "llava", seed=0)


# --------------------------------------------------------------------------------------------------
# The fallback pass (SCALSELECT_FORCE_FALLBACK=1) exists to run the pure-Python kernels. These modules
# never reach a native kernel (model loading, token roles, pooling, fidelity against the authors' rule,
# the extraction loop); running them again would only repeat the torch/transformers work. The
# classification is checked, not trusted: in the native pass every test of these modules runs with the
# kernels wrapped, and fails if one was called (`_no_native_kernels_here`); a test of such a module that
# does reach one is marked `native_kernels` and runs in both passes. Set
# SCALSELECT_FALLBACK_ALL=1 to run everything in the fallback pass anyway.
NO_NATIVE_KERNEL_MODULES = frozenset({
    "test_extract.py", "test_extract_options.py", "test_extract_roles.py", "test_extract_realsize.py",
    "test_extract_store.py", "test_fidelity.py", "test_instruction_attended_pool.py",
})
_NATIVE_KERNELS = ("center_block", "leverage_block", "top_k_block", "top_k_merge", "arrow_samples", "decode_block")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SCALSELECT_FORCE_FALLBACK") != "1" or os.environ.get("SCALSELECT_FALLBACK_ALL") == "1":
        return
    keep, drop = [], []
    for item in items:
        left_out = item.path.name in NO_NATIVE_KERNEL_MODULES and item.get_closest_marker("native_kernels") is None
        (drop if left_out else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _no_native_kernels_here(request, monkeypatch):
    """In the modules the fallback pass leaves out, fail a test that reaches a native kernel (in this
    process; a kernel called by a subprocess is not seen)."""
    if (request.node.path.name not in NO_NATIVE_KERNEL_MODULES
            or request.node.get_closest_marker("native_kernels") is not None):
        yield
        return
    import sys

    from scalselect_fast import native

    called = []
    for name in _NATIVE_KERNELS:
        orig = getattr(native, name, None)
        if orig is None:
            continue

        def spy(*args, _orig=orig, _name=name, **kwargs):
            called.append(_name)
            return _orig(*args, **kwargs)

        for mod_name, mod in list(sys.modules.items()):
            if mod_name == "scalselect_fast" or mod_name.startswith("scalselect_fast."):
                for attr, val in list(vars(mod).items()):
                    if val is orig:
                        monkeypatch.setattr(mod, attr, spy)
    yield
    assert not called, (f"{request.node.path.name} reached native kernels {sorted(set(called))}: mark the test "
                        f"@pytest.mark.native_kernels so the fallback pass runs it")
