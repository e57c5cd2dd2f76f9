"""Issue 22 item 4 (and issue 21's edited dataset): every stored row keeps its content key, and
`scalselect run` writes its selection only if every selected record's content (text + image bytes)
still matches that key; otherwise it refuses, naming the record and the file, and the rerun extracts
the changed record again.

Real components throughout: the tiny random-weight LLaVA, the demo dataset's readers and writers, the
store, the representation cache. Records are edited at the stage boundary through the run's own events
sink (the ``select`` stage's start, after extraction, fit and scores), not by patching the code under test.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

for _mod in ("scalselect_fast.subspace", "scalselect_fast.data.demo", "scalselect_fast.extract.tiny"):
    pytest.importorskip(_mod)

from conftest import png_file  # noqa: E402

from scalselect_fast.run import Events, RunError, make_config, run  # noqa: E402
from scalselect_fast.store import KEY_BYTES, StoreError, StoreSource, StoreWriter, read_shard_keys  # noqa: E402

SHARD = 8


class EditAtSelect(Events):
    """The run's events sink: runs ``edit`` when the select stage starts, keeps the warnings."""

    def __init__(self, edit=None):
        super().__init__(quiet=True)
        self.edit, self.warnings = edit, []

    def emit(self, event, **fields):
        if event == "stage_start" and fields.get("stage") == "select" and self.edit is not None:
            self.edit()
        super().emit(event, **fields)

    def warn(self, msg, **fields):
        self.warnings.append(msg)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_llava):
    from scalselect_fast.data.demo import make_demo_dataset

    base = tmp_path_factory.mktemp("outkeys")
    make_demo_dataset(base / "pristine", n=40, seed=3)
    return {"base": base, "model": tiny_llava}


def _copy(demo, tmp_path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(demo["base"] / "pristine", d)
    return d


def _cfg(demo, data: Path, out: Path, **kw):
    args = dict(model=str(demo["model"]), data=str(data / "demo.json"), image_root=str(data), out=str(out),
                budget="25%", shard_size=SHARD, batch_size=4, quiet=True)
    args.update(kw)
    return make_config(**args)


@pytest.fixture(scope="module")
def reference(demo):
    """An undisturbed run on the pristine data: the selection every other run is compared with."""
    data = demo["base"] / "pristine"
    res = run(_cfg(demo, data, demo["base"] / "ref"), events=EditAtSelect())
    return {"res": res, "kept": _kept(demo["base"] / "ref"), "out": demo["base"] / "ref"}


def _kept(out: Path) -> list[str]:
    return [r["id"] for r in json.loads((out / "selected.json").read_text())]


def _nothing_written(out: Path) -> bool:
    return not any((out / n).exists() for n in ("selected.json", "selected.txt", "manifest.parquet", "report.json"))


def _record(data: Path, sid: str) -> dict:
    return next(r for r in json.loads((data / "demo.json").read_text()) if r["id"] == sid)


def _reencode(path: Path) -> None:
    """New bytes, same pixels: a PNG text chunk added (the representation cannot change, the key must)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    with Image.open(path) as im:
        im.load()
        info = PngInfo()
        info.add_text("edited", "yes")
        before = path.read_bytes()
        im.save(path, format="PNG", pnginfo=info)
    assert path.read_bytes() != before


# --------------------------------------------------------------------------------------------------
# the run: unchanged, image edited, text edited
# --------------------------------------------------------------------------------------------------
def test_an_unchanged_run_checks_and_copies_every_selected_record(reference):
    out, res = reference["out"], reference["res"]
    assert len(reference["kept"]) == res.n_selected == 10
    rep = json.loads((out / "report.json").read_text())
    assert rep["output_check"]["checked"] == 10 and rep["output_check"]["unkeyed"] == 0


@pytest.mark.parametrize("cache", ["default", "none"])
def test_an_image_edited_before_the_output_is_refused_and_the_rerun_restores_it(demo, reference, tmp_path, cache):
    """Same pixels, new bytes: the record's key no longer matches, so the run writes nothing and names
    the record and its image; the rerun re-extracts just it (the cache holds the others) and writes the
    reference selection."""
    data = _copy(demo, tmp_path)
    victim = reference["kept"][3]
    image = data / _record(data, victim)["image"]
    kw = {} if cache == "default" else {"cache": "none"}
    out = tmp_path / "out"
    with pytest.raises(RunError) as e:
        run(_cfg(demo, data, out, **kw), events=EditAtSelect(lambda: _reencode(image)))
    msg = str(e.value)
    assert msg.startswith(f"record {victim!r}") and str(image.resolve()) in msg
    assert "the selection was not written" in msg and "Rerun the same command" in msg
    assert _nothing_written(out)

    res2 = run(_cfg(demo, data, out, **kw), events=EditAtSelect())
    assert _kept(out) == reference["kept"]
    assert res2.report["output_check"]["checked"] == 10
    if cache == "default":  # the counts add up over the attempts of one extraction: just the edited record
        assert res2.report["cache"]["extracted"] == reference["res"].report["cache"]["extracted"] + 1


def test_a_visibly_edited_image_is_refused_and_the_rerun_equals_a_fresh_run(demo, reference, tmp_path):
    data = _copy(demo, tmp_path)
    victim = reference["kept"][0]
    image = data / _record(data, victim)["image"]
    out = tmp_path / "out"
    with pytest.raises(RunError, match=f"record {victim!r}"):
        run(_cfg(demo, data, out), events=EditAtSelect(lambda: png_file(image, colour=(7, 200, 90), size=(32, 32))))
    assert _nothing_written(out)
    res = run(_cfg(demo, data, out), events=EditAtSelect())
    assert res.report["cache"]["extracted"] == reference["res"].report["cache"]["extracted"] + 1
    fresh = tmp_path / "fresh"
    run(_cfg(demo, data, fresh, cache="none"), events=EditAtSelect())
    assert (out / "selected.json").read_bytes() == (fresh / "selected.json").read_bytes()


def test_a_record_whose_text_is_edited_before_the_output_is_refused_naming_the_file(demo, reference, tmp_path):
    """The dataset file changes under the run: the run refuses, naming the file (issue 21); the rerun
    starts over through the cache and extracts only the edited record."""
    data = _copy(demo, tmp_path)
    victim = reference["kept"][5]
    path = data / "demo.json"

    def edit():
        records = json.loads(path.read_text())
        for r in records:
            if r["id"] == victim:
                r["conversations"][0]["value"] += " Answer briefly."
        path.write_text(json.dumps(records))

    out = tmp_path / "out"
    with pytest.raises(RunError, match=f"^{path} was edited while this run used --data"):
        run(_cfg(demo, data, out), events=EditAtSelect(edit))
    assert _nothing_written(out)
    res = run(_cfg(demo, data, out), events=EditAtSelect())
    assert res.report["cache"]["extracted"] == 1
    fresh = tmp_path / "fresh"  # the new text has its own representation: selected or not on its merits
    run(_cfg(demo, data, fresh, cache="none"), events=EditAtSelect())
    assert (out / "selected.json").read_bytes() == (fresh / "selected.json").read_bytes()


def test_the_check_streams_and_finds_each_changed_record(demo, reference, tmp_path):
    """``first_changed`` against a slow reference: every selected record re-keyed one by one; for each
    single edited image the streamed check names exactly that record, and a record gone from the input
    is named as gone."""
    from scalselect_fast.data import read_dataset
    from scalselect_fast.extract.cache import sample_key
    from scalselect_fast.output_check import first_changed

    src = StoreSource(reference["out"] / ".scalselect" / "reps")
    ids = src.ids()
    at = {sid: r for r, sid in enumerate(ids)}
    rows = [at[i] for i in reference["kept"]]
    data = _copy(demo, tmp_path)
    changed, checked, unkeyed = first_changed(src, rows, data / "demo.json", image_root=data)
    assert changed is None and checked == 10 and unkeyed == 0
    for victim in (reference["kept"][0], reference["kept"][-1], sorted(reference["kept"])[4]):
        image = data / _record(data, victim)["image"]
        before = image.read_bytes()
        _reencode(image)
        samples = {s.id: s for s in read_dataset(data / "demo.json", image_root=data)}
        slow = [i for i in reference["kept"]
                if sample_key(read_shard_keys(src.shards[0])[1], samples[i]) != _stored_key(src, at[i])]
        changed, _, _ = first_changed(src, rows, data / "demo.json", image_root=data)
        assert slow == [victim] and changed.id == victim and not changed.gone
        image.write_bytes(before)
    gone = reference["kept"][2]
    records = [r for r in json.loads((data / "demo.json").read_text()) if r["id"] != gone]
    (data / "demo.json").write_text(json.dumps(records))
    changed, _, _ = first_changed(src, rows, data / "demo.json", image_root=data)
    assert changed.id == gone and changed.gone


def _stored_key(src, row: int) -> bytes:
    for shard in src.shards:
        if shard.offset <= row < shard.offset + shard.count:
            return read_shard_keys(shard, [row - shard.offset])[0][0].tobytes()
    raise AssertionError(row)


def test_a_store_without_keys_falls_back_to_the_file_level_rule(demo, tmp_path):
    """A store written before the sidecar: nothing to check per record (reported as unkeyed); a dataset
    file edited during the run is then refused as before."""
    data = _copy(demo, tmp_path)
    out = tmp_path / "out"
    run(_cfg(demo, data, out), events=EditAtSelect())
    mpath = out / ".scalselect" / "reps" / "manifest.json"
    m = json.loads(mpath.read_text())
    for rec in m["shards"]:  # what an older version wrote
        for k in ("keys_file", "keys_checksum", "keys_context_file"):
            rec.pop(k)
    mpath.write_text(json.dumps(m))
    res = run(_cfg(demo, data, out), events=EditAtSelect())
    assert res.report["output_check"] == {**res.report["output_check"], "checked": 0, "unkeyed": 10}
    path = data / "demo.json"
    with pytest.raises(RunError, match="was edited while this run used --data"):
        run(_cfg(demo, data, out), events=EditAtSelect(lambda: path.write_text(path.read_text().replace(
            "<image>", "<image> "))))


# --------------------------------------------------------------------------------------------------
# the sidecar
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ref", "nocache"])
def test_the_keys_sidecar_equals_keys_computed_one_by_one(demo, reference, which):
    """Slow reference: every stored row's key is ``sample_key(context, sample)`` of its record, read
    fresh; with the cache on, the context is the cache's and every key finds its cache entry."""
    from scalselect_fast.data import read_dataset
    from scalselect_fast.extract.cache import RepCache, sample_key

    data = demo["base"] / "pristine"
    out = reference["out"]
    if which == "nocache":
        out = demo["base"] / "nocache"
        run(_cfg(demo, data, out, cache="none"), events=EditAtSelect())
    src = StoreSource(out / ".scalselect" / "reps")
    samples = {s.id: s for s in read_dataset(data / "demo.json", image_root=data)}
    ids = src.ids()
    assert len(ids) == 38  # every record with an image
    contexts = set()
    for shard in src.shards:
        keys, ctx = read_shard_keys(shard)
        contexts.add(ctx)
        assert keys.shape == (shard.count, KEY_BYTES) and keys.dtype == np.uint8
        for j in range(shard.count):
            assert keys[j].tobytes() == sample_key(ctx, samples[ids[shard.offset + j]])
    (ctx,) = contexts
    if which == "nocache":
        assert ctx == b"scalselect-store-keys/1"
        return
    context = json.loads(ctx)
    cache = RepCache(out / ".scalselect" / "cache", context, context["d"])
    assert cache.context_bytes == ctx
    allkeys = [k.tobytes() for s in src.shards for k in read_shard_keys(s)[0]]
    assert all(found and ok for found, ok, _ in cache.get_many(allkeys))


def test_a_damaged_keys_file_is_refused_naming_its_shard(tmp_path):
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    keys = [bytes([i]) * KEY_BYTES for i in (1, 2, 3)]
    w = StoreWriter(tmp_path / "s", d=4, dtype="float32")
    w.write_shard(rows, ["a", "b", "c"], keys=[keys[0], None, keys[2]], key_context=b"ctx")
    src = StoreSource(tmp_path / "s")
    (shard,) = src.shards
    got, ctx = read_shard_keys(shard, [2, 0, 1])
    assert ctx == b"ctx" and [k.tobytes() for k in got] == [keys[2], keys[0], bytes(KEY_BYTES)]
    raw = bytearray(Path(shard.keys_path).read_bytes())
    raw[40] ^= 1
    Path(shard.keys_path).write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="shard 'shard-00000': its content keys") as e:
        read_shard_keys(shard)
    assert e.value.shard == "shard-00000"
    with pytest.raises(StoreError, match="content keys"):
        src.check_shard(shard)
    with pytest.raises(StoreError, match="key_context"):
        w.write_shard(rows, ["a", "b", "c"], keys=keys)
    with pytest.raises(StoreError, match="3 content keys for 2 rows"):
        w.write_shard(rows[:2], ["a", "b"], keys=keys, key_context=b"ctx")


def test_a_truncated_keys_file_makes_the_rerun_extract_its_shard_again(demo, reference, tmp_path):
    data = _copy(demo, tmp_path)
    out = tmp_path / "out"
    run(_cfg(demo, data, out), events=EditAtSelect())
    keys = out / ".scalselect" / "reps" / "shard-00002.keys"
    keys.write_bytes(keys.read_bytes()[:-KEY_BYTES])
    ev = EditAtSelect()
    res = run(_cfg(demo, data, out), events=ev)
    assert any(w.startswith("shard shard-00002 of") and "content keys" in w for w in ev.warnings), ev.warnings
    assert _kept(out) == reference["kept"] and res.report["output_check"]["unkeyed"] == 0
    assert len(keys.read_bytes()) % KEY_BYTES == 0 and len(keys.read_bytes()) > 0


def test_an_embedded_image_edited_in_a_parquet_file_is_refused_naming_the_file(demo, tmp_path):
    """Images inside the dataset (Parquet ``Image`` structs): the key covers their bytes as read, so a
    re-encoded image in a rewritten file stops the run naming the file; the rerun extracts just its record."""
    import io

    import pyarrow.parquet as pq_
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from scalselect_fast.data.demo import make_demo_dataset

    truth = make_demo_dataset(tmp_path / "pq", n=40, seed=3, layout="parquet", shard_size=40)
    data = tmp_path / "pq" / truth["data"]
    (path,) = sorted(Path(tmp_path / "pq").rglob("*.parquet"))
    cfg = dict(model=str(demo["model"]), data=str(data), out=str(tmp_path / "ref"), budget="25%",
               shard_size=SHARD, batch_size=4, quiet=True)
    ref = run(make_config(**cfg), events=EditAtSelect())
    kept = (tmp_path / "ref" / "selected.txt").read_text().split()
    assert ref.report["output_check"]["checked"] == len(kept) == 10
    victim = kept[2]

    def edit():
        t = pq_.read_table(path).to_pylist()
        for r in t:
            if r["id"] == victim:
                im = Image.open(io.BytesIO(r["images"][0]["bytes"]))
                info = PngInfo()
                info.add_text("edited", "yes")
                buf = io.BytesIO()
                im.save(buf, format="PNG", pnginfo=info)
                r["images"][0]["bytes"] = buf.getvalue()
        import pyarrow as pa

        pq_.write_table(pa.Table.from_pylist(t, schema=pq_.read_schema(path)), path)

    out = tmp_path / "out"
    with pytest.raises(RunError, match=f"^{path} was edited while this run used --data"):
        run(make_config(**{**cfg, "out": str(out)}), events=EditAtSelect(edit))
    assert _nothing_written(out)
    res = run(make_config(**{**cfg, "out": str(out)}), events=EditAtSelect())
    assert res.report["cache"]["extracted"] == 1 and res.report["output_check"]["checked"] == 10
