"""The representation cache (issue 22) through `scalselect run`, `scalselect extract` and `scalselect cache`:
a changed mixture extracts only what is new, reused vectors are the cached bits, a corrupt or missing
entry is extracted again, two processes can share one cache.

Model forward passes are counted by wrapping ``VLM.forward_layer`` (the one place a batch meets the
model), so "extracted nothing" means no sample reached the model, not just a fast run.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

for _mod in ("scalselect_fast.subspace", "scalselect_fast.data.demo", "scalselect_fast.extract.tiny"):
    pytest.importorskip(_mod)

from scalselect_fast import cli  # noqa: E402
from scalselect_fast.run import make_config, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llava):
    """A 36-record demo dataset cut into three LLaVA JSON files A, B, C, and the suite's tiny LLaVA."""
    from scalselect_fast.data.demo import make_demo_dataset

    base = tmp_path_factory.mktemp("cache")
    make_demo_dataset(base / "data", n=36, seed=5)
    records = json.loads((base / "data" / "demo.json").read_text())
    parts = {"A": records[:12], "B": records[12:24], "C": records[24:]}
    files = {}
    for name, recs in parts.items():
        files[name] = base / "data" / f"{name}.json"
        files[name].write_text(json.dumps(recs))
    return {"base": base, "root": base / "data", "model": tiny_llava, "parts": parts, "files": files}


def _content(rec, root: Path) -> str | None:
    """The obvious reference key: conversation + image bytes (None for a text-only record)."""
    if not rec.get("image"):
        return None
    img = (root / rec["image"]).read_bytes()
    return hashlib.sha256(json.dumps(rec["conversations"], sort_keys=True).encode() + img).hexdigest()


@pytest.fixture
def forwards(monkeypatch):
    """Samples that went through the model's truncated forward, per run."""
    from scalselect_fast.extract.model import VLM

    seen = {"samples": 0, "calls": 0}
    orig = VLM.forward_layer

    def counting(self, inputs):
        seen["calls"] += 1
        seen["samples"] += int(inputs["input_ids"].shape[0])
        return orig(self, inputs)

    monkeypatch.setattr(VLM, "forward_layer", counting)
    return seen


def _cfg(env, out, data, **kw):
    args = dict(model=str(env["model"]), data=[str(p) for p in data], image_root=str(env["root"]), out=str(out),
                budget="6", shard_size=5, batch_size=4, quiet=True)
    args.update(kw)
    return make_config(**args)


def _store_rows(out: Path) -> dict[str, np.ndarray]:
    from scalselect_fast.store import StoreSource

    src = StoreSource(out / ".scalselect" / "reps")
    rows = np.concatenate([b for _, b in src.iter_blocks()]) if src.n else np.zeros((0, src.d))
    return dict(zip(src.ids(), rows))


def _renamed(env, name: str) -> Path:
    p = env["base"] / "data" / f"{name}-renamed.json"
    p.write_text(json.dumps([{**r, "id": f"renamed-{r['id']}"} for r in env["parts"][name]]))
    return p


def test_changed_mixture_extracts_only_new_samples(env, forwards, tmp_path):
    root, parts, files = env["root"], env["parts"], env["files"]
    content = {n: [_content(r, root) for r in recs if r.get("image")] for n, recs in parts.items()}
    out = tmp_path / "out"

    r1 = run(_cfg(env, out, [files["A"], files["B"]]))
    n1 = len(content["A"]) + len(content["B"])  # every record with an image runs through the model once
    assert forwards["samples"] == n1 and r1.report["cache"] == {"reused": 0, "extracted": n1}
    rows1 = _store_rows(out)

    # B ∪ C on the same --out: no --force, only C's new content reaches the model
    forwards["samples"] = 0
    r2 = run(_cfg(env, out, [files["B"], files["C"]]))
    seen = set(content["A"]) | set(content["B"])
    new = [c for c in content["C"] if c not in seen]
    assert len(new) >= 8
    assert forwards["samples"] == len(new)
    assert r2.report["cache"] == {"reused": len(content["B"]) + len(content["C"]) - len(new), "extracted": len(new)}
    rows2 = _store_rows(out)
    for rid in (r["id"] for r in parts["B"] if r.get("image")):
        assert rows2[rid].tobytes() == rows1[rid].tobytes()  # reused: the very bits extracted by run 1

    # A ∪ B ∪ C, files in another order, every id renamed: nothing reaches the model
    forwards["samples"] = forwards["calls"] = 0
    r3 = run(_cfg(env, out, [_renamed(env, "C"), _renamed(env, "A"), _renamed(env, "B")]))
    assert forwards["calls"] == 0 and r3.report["cache"]["extracted"] == 0
    rows3 = _store_rows(out)
    both = {**rows1, **rows2}
    for rid, v in rows3.items():
        assert v.tobytes() == both[rid.removeprefix("renamed-")].tobytes()

    # the same selection as with no cache at all (every vector extracted in this run's batches)
    fresh = run(_cfg(env, tmp_path / "fresh", [_renamed(env, "C"), _renamed(env, "A"), _renamed(env, "B")],
                     cache="none"))
    assert "cache" not in fresh.report or fresh.report["cache"] is None
    m3 = {m["id"]: m for m in pq.read_table(r3.manifest_path).to_pylist()}
    mf = {m["id"]: m for m in pq.read_table(fresh.manifest_path).to_pylist()}
    assert {i for i, m in m3.items() if m["kept"]} == {i for i, m in mf.items() if m["kept"]}
    ids = sorted(i for i in m3 if m3[i]["score"] is not None)
    np.testing.assert_allclose([m3[i]["score"] for i in ids], [mf[i]["score"] for i in ids], rtol=1e-3, atol=1e-6)


def test_cli_summary_and_shared_cache_dir(env, forwards, tmp_path, capsys):
    cache = tmp_path / "shared-cache"
    base = ["run", "--model", str(env["model"]), "--image-root", str(env["root"]), "--budget", "5",
            "--shard-size", "5", "--batch-size", "4", "--quiet", "--cache", str(cache)]
    assert cli.main([*base, "--data", str(env["files"]["A"]), "--out", str(tmp_path / "one")]) == 0
    first = capsys.readouterr().out
    n = forwards["samples"]
    assert f"cache: 0 reused, {n} extracted" in first
    # another --out, same cache: the second dataset's shared part is reused
    forwards["samples"] = 0
    assert cli.main([*base, "--data", str(env["files"]["A"]), str(env["files"]["B"]),
                     "--out", str(tmp_path / "two")]) == 0
    assert f"cache: {n} reused," in capsys.readouterr().out
    assert not (tmp_path / "two" / ".scalselect" / "cache").exists()  # --cache DIR replaces the default
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["cache"]["extracted"] == forwards["samples"] > 0

    assert cli.main(["cache", "info", str(cache)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == n + forwards["samples"] and len(info["contexts"]) == 1
    assert info["contexts"][0]["model"] == str(Path(env["model"]).resolve())
    assert cli.main(["cache", "verify", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["bad_entries"] == 0
    assert cli.main(["cache", "prune", str(cache), "--model", "no-such-model"]) == 0
    assert json.loads(capsys.readouterr().out)["batches"] == 0
    assert cli.main(["cache", "prune", str(cache), "--older-than", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["cache", "info", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 0


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupt_or_missing_entries_are_extracted_again(env, forwards, tmp_path):
    cache = tmp_path / "c"
    data = [env["files"]["A"]]
    run(_cfg(env, tmp_path / "o1", data, cache=str(cache)))
    n = forwards["samples"]
    rows1 = _store_rows(tmp_path / "o1")
    vec_files = sorted(cache.glob("*/*.vec.npy"))
    assert len(vec_files) >= 2  # one batch per store shard
    # a flipped bit inside one vector (the last row of the first batch): that sample only is redone
    _flip_byte(vec_files[0], 3)
    # a batch whose index is gone: its samples are no longer in the cache
    from scalselect_fast.extract.cache import cache_info

    idx = vec_files[-1].with_name(vec_files[-1].name.replace(".vec.npy", ".idx"))
    before = cache_info(cache)["entries"]
    idx.unlink()
    lost = before - cache_info(cache)["entries"]
    assert lost > 0
    assert cli.main(["cache", "verify", str(cache)]) == 1
    forwards["samples"] = 0
    warnings = []
    from scalselect_fast.run import Events

    class Collect(Events):
        def warn(self, msg):
            warnings.append(msg)

    res = run(_cfg(env, tmp_path / "o2", data, cache=str(cache)), events=Collect(quiet=True))
    assert forwards["samples"] == 1 + lost
    assert res.report["cache"] == {"reused": n - 1 - lost, "extracted": 1 + lost}
    assert any("fails its checksum" in w for w in warnings)
    rows2 = _store_rows(tmp_path / "o2")
    assert rows2.keys() == rows1.keys()
    for k in rows1:  # the corrupt value was never returned: every row is the (re)extracted one
        np.testing.assert_allclose(rows2[k].astype(np.float32), rows1[k].astype(np.float32), rtol=1e-2, atol=1e-3)


def test_extract_command_uses_the_cache(env, forwards, tmp_path, capsys):
    cache = tmp_path / "c"
    args = ["extract", "--model", str(env["model"]), "--data", str(env["files"]["B"]), "--image-root",
            str(env["root"]), "--shard-size", "5", "--batch-size", "4", "--quiet", "--cache", str(cache)]
    assert cli.main([*args, "--out", str(tmp_path / "s1")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["cache"]["reused"] == 0 and first["cache"]["extracted"] == forwards["samples"] > 0
    forwards["samples"] = 0
    assert cli.main([*args, "--out", str(tmp_path / "s2")]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert forwards["samples"] == 0 and second["cache"] == {**first["cache"], "reused": first["cache"]["extracted"],
                                                           "extracted": 0}
    # a cache directory that holds something else is refused, nothing is written into it
    other = tmp_path / "not-a-cache"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main([*args, "--out", str(tmp_path / "s3"), "--cache", str(other)]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_two_processes_share_one_cache(env, tmp_path):
    cache = tmp_path / "c"
    cmd = [sys.executable, "-m", "scalselect_fast.cli", "run", "--model", str(env["model"]), "--image-root",
           str(env["root"]), "--budget", "5", "--shard-size", "5", "--batch-size", "4", "--quiet", "--log-json",
           "--cache", str(cache), "--data", str(env["files"]["A"]), str(env["files"]["B"])]
    envv = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"p{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=envv) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert cli.main(["cache", "verify", str(cache)]) == 0
    sel = [sorted(m["id"] for m in pq.read_table(tmp_path / f"p{i}" / "manifest.parquet").to_pylist() if m["kept"])
           for i in range(2)]
    assert sel[0] == sel[1]
    # whatever the interleaving, a third run finds every sample
    res = run(_cfg(env, tmp_path / "p3", [env["files"]["A"], env["files"]["B"]], cache=str(cache), budget="5"))
    assert res.report["cache"]["extracted"] == 0


def test_an_image_edited_during_the_run_is_extracted_as_its_key_says(env, tmp_path, monkeypatch):
    """The key's bytes are the ones extracted: a file rewritten between hashing and decoding cannot
    put the new image's vector under the old image's key."""
    import shutil

    from scalselect_fast.extract.cache import RepCache

    for name in ("live", "pristine"):
        shutil.copytree(env["root"], tmp_path / name)
    victim, donor = [r for r in env["parts"]["A"] if r.get("image")][:2]
    live = tmp_path / "live"
    orig_key = RepCache.key

    def key_then_edit(self, sample, *args):
        k = orig_key(self, sample, *args)
        if str(sample.id) == victim["id"]:  # someone rewrites the image right after it was hashed
            (live / victim["image"]).write_bytes((live / donor["image"]).read_bytes())
        return k

    monkeypatch.setattr(RepCache, "key", key_then_edit)
    kw = dict(model=str(env["model"]), budget="4", shard_size=5, batch_size=4, quiet=True)
    run(make_config(data=str(live / "A.json"), image_root=str(live), out=str(tmp_path / "o"),
                    cache=str(tmp_path / "c"), **kw))
    monkeypatch.undo()
    run(make_config(data=str(tmp_path / "pristine" / "A.json"), image_root=str(tmp_path / "pristine"),
                    out=str(tmp_path / "f"), cache="none", **kw))
    got, want = _store_rows(tmp_path / "o"), _store_rows(tmp_path / "f")
    np.testing.assert_array_equal(got[victim["id"]], want[victim["id"]])  # the bytes that were hashed
    assert not np.array_equal(want[victim["id"]], want[donor["id"]])  # (the edit would have shown)


def test_cache_setting_in_a_config_file_is_relative_to_it(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "run.toml").write_text('cache = "shared/reps"\n')
    assert make_config(tmp_path / "conf" / "run.toml").cache == str(tmp_path / "conf" / "shared" / "reps")
    assert make_config(tmp_path / "conf" / "run.toml", cache="none").cache == "none"


def _reference_messages(messages) -> bytes:
    """The obvious form of :func:`messages_bytes`: length-prefixed role/content pairs, or tagged JSON."""
    if all(isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
           for m in messages):
        text = "".join(f"{len(m['role'])}:{len(m['content'])}:{m['role']}{m['content']}" for m in messages)
        return b"L" + text.encode("utf-8", "surrogatepass")
    return b"J" + json.dumps(messages, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")


def test_sample_key_is_the_documented_digest_and_hands_back_its_stats(env):
    """The fast key (copied prefix hasher, os-level reads, length-prefixed messages) hashes exactly the
    bytes its docstring names; the stats it returns are the file's size and mtime (what the shard's
    ImagesDigest records) and the pinned images the very bytes hashed."""
    from scalselect_fast.data import read_dataset
    from scalselect_fast.extract.cache import sample_key

    context = b'{"model": "m", "layer": 3}'
    for s in read_dataset(env["files"]["A"], image_root=env["root"]):
        ref = hashlib.sha256(b"sample\0" + context)
        ref.update(_reference_messages(s.messages))
        ref.update(f"\0{len(s.images)}\0".encode())
        for img in s.images:
            data = Path(img).read_bytes()
            ref.update(len(data).to_bytes(8, "little") + data)
        stats, pinned = [], []
        assert sample_key(context, s, pinned, stats) == ref.digest()
        assert [(st.st_size, st.st_mtime_ns) for st in stats] == \
            [(os.stat(i).st_size, os.stat(i).st_mtime_ns) for i in s.images]
        assert [p.data for p in pinned] == [Path(i).read_bytes() for i in s.images]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "caf\u00e9 \ud800 \u4e2d"}],  # non-ASCII and a lone surrogate
    [{"role": "user", "content": "x", "name": "extra key"}],  # not a plain pair: the JSON form
    [{"role": "user", "content": ["a", "list"]}],
    [],
])
def test_messages_bytes_matches_its_reference(messages):
    from scalselect_fast.extract.cache import messages_bytes

    assert messages_bytes(messages) == _reference_messages(messages)


def test_messages_bytes_tells_apart_what_a_plain_join_would_not():
    """Equal bytes must mean equal messages: boundaries moved between role and content or between
    messages, and the JSON form of other messages, all give other bytes."""
    from scalselect_fast.extract.cache import messages_bytes

    variants = [
        [{"role": "user", "content": "ab"}],
        [{"role": "use", "content": "rab"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a1:1:userb"}],
        [{"role": "user", "content": "ab", "x": 1}],
        [{"content": "ab", "role": "user"}],  # same dict, other insertion order: same bytes (equal messages)
    ]
    got = [messages_bytes(m) for m in variants]
    assert len(set(got[:5])) == 5
    assert got[5] == got[0]


def test_a_key_version_bump_moves_every_entry_out_of_reach(tmp_path, monkeypatch):
    """Entries keyed the old way live under another context folder: after a bump they are misses,
    never hits under the new key scheme."""
    from scalselect_fast.extract import cache as cache_mod

    old = cache_mod.RepCache(tmp_path, {"m": 1}, 4)
    key = hashlib.sha256(b"k").digest()
    old.put(key, np.ones(4, np.float32))
    old.flush()
    assert cache_mod.RepCache(tmp_path, {"m": 1}, 4).get(key)[0]
    monkeypatch.setattr(cache_mod, "KEY_VERSION", cache_mod.KEY_VERSION + 1)
    new = cache_mod.RepCache(tmp_path, {"m": 1}, 4)
    assert new.dir != old.dir and len(new) == 0 and not new.get(key)[0]


def test_get_many_equals_one_lookup_per_key(tmp_path):
    """Batched lookups against a dict reference: misses, None keys, repeated keys, and a key stored
    twice whose first copy fails its CRC (the second, good copy is returned)."""
    from scalselect_fast.extract.cache import RepCache

    rng = np.random.default_rng(0)
    keys = [hashlib.sha256(bytes([i])).digest() for i in range(40)]
    vecs = {k: rng.standard_normal(7).astype(np.float32) for k in keys}
    c = RepCache(tmp_path, {"m": 1}, 7)
    for k in keys[:30]:
        c.put(k, vecs[k] if k != keys[5] else None)  # keys[5]: a sample without representation
    c.flush()
    first = sorted(tmp_path.glob("*/*.vec.npy"))[0]
    raw = bytearray(first.read_bytes())
    raw[-7 * 4 * 20] ^= 0xFF  # corrupt one byte of row 10 (keys[10])
    first.write_bytes(bytes(raw))
    c.put(keys[10], vecs[keys[10]])  # ... extracted again into a second batch
    c.flush()
    warned: list = []
    c = RepCache(tmp_path, {"m": 1}, 7, warn=warned.append)
    asked = [keys[10], None, keys[35], keys[5], keys[0], keys[0], keys[29]]
    got = c.get_many(asked)
    assert len(warned) == 1 and "checksum" in warned[0]  # the corrupt copy was seen and passed over
    for k, (found, ok, vec) in zip(asked, got):
        want = vecs.get(k) if k in keys[:30] else None
        assert found == (k in keys[:30])
        assert ok == (found and k != keys[5])
        if ok:
            np.testing.assert_array_equal(vec, want)
        assert (found, ok) == c.get(k)[:2]


def test_a_cached_rerun_killed_between_shards_resumes(env, tmp_path):
    """Shards served whole from the cache share one manifest update: ``kill -9`` after some are written
    but before it leaves a store that resumes (those shards are redone from the cache) and ends with
    the rows of an uninterrupted run."""
    cache = tmp_path / "c"
    cmd = [sys.executable, "-m", "scalselect_fast.cli", "extract", "--model", str(env["model"]), "--data",
           str(env["files"]["A"]), str(env["files"]["B"]), "--image-root", str(env["root"]), "--shard-size", "3",
           "--batch-size", "4", "--quiet", "--cache", str(cache)]
    envv = {**os.environ, "PYTHONPATH": str(ROOT)}
    envv.pop("SCALSELECT_CRASH_AT", None)
    first = subprocess.run([*cmd, "--out", str(tmp_path / "s1")], capture_output=True, text=True, env=envv)
    assert first.returncode == 0, first.stderr
    from scalselect_fast.store import StoreSource

    for n in (1, 5):  # killed at the first shard written, and after some were committed
        out = tmp_path / f"k{n}"
        killed = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True,
                                env={**envv, "SCALSELECT_CRASH_AT": f"extract.shard:{n}"})
        assert killed.returncode == -9, killed.stderr
        committed = json.loads((out / "manifest.json").read_text())["shards"]
        assert len(committed) < len(list(out.glob("shard-*.npy")))  # written shards waited for their commit
        resumed = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=envv)
        assert resumed.returncode == 0, resumed.stderr
        summary = json.loads(resumed.stdout.strip().splitlines()[-1])
        assert summary["cache"]["extracted"] == 0  # what the killed run had not committed came from the cache
        want, got = StoreSource(tmp_path / "s1"), StoreSource(out)
        assert got.ids() == want.ids()
        np.testing.assert_array_equal(np.concatenate([b for _, b in got.iter_blocks()]),
                                      np.concatenate([b for _, b in want.iter_blocks()]))


def test_index_files_damaged_or_written_the_old_way(tmp_path):
    """A truncated index makes its batch unusable (a warning; its samples are extracted again), a
    damaged ``.npy`` header leaves the rows (located from the file's end, CRC-checked) usable, and a
    batch indexed the old way (``.idx.npz``) is still counted and verified by ``cache info|verify``."""
    from scalselect_fast.extract.cache import RepCache, cache_info, verify_cache

    rng = np.random.default_rng(1)
    keys = [hashlib.sha256(bytes([i, 7])).digest() for i in range(9)]
    vecs = {k: rng.standard_normal(5).astype(np.float32) for k in keys}
    c = RepCache(tmp_path, {"m": 2}, 5)
    for k in keys[:6]:
        c.put(k, vecs[k])
    c.flush()
    for k in keys[6:]:
        c.put(k, vecs[k])
    c.flush()
    idx_files = sorted(c.dir.glob("*.idx"), key=lambda p: -p.stat().st_size)  # the six-entry batch first
    assert len(idx_files) == 2 and cache_info(tmp_path)["entries"] == 9
    # the first batch's .npy header: flip a byte of its dtype/shape text (not the rows)
    first_vec = idx_files[0].with_name(idx_files[0].name[:-4] + ".vec.npy")
    data = bytearray(first_vec.read_bytes())
    data[20] ^= 0x01
    first_vec.write_bytes(bytes(data))
    # the second batch's index loses its last byte
    idx_files[1].write_bytes(idx_files[1].read_bytes()[:-1])
    warned: list = []
    c = RepCache(tmp_path, {"m": 2}, 5, warn=warned.append)
    assert len(warned) == 1 and "unusable" in warned[0] and idx_files[1].name in warned[0]
    got = c.get_many(keys)
    for k, (found, ok, vec) in zip(keys, got):
        assert found == (k in keys[:6]) and ok == found
        if found:
            np.testing.assert_array_equal(vec, vecs[k])
    # an old-style batch beside them: keys/ok/crc/vec_bytes in an .npz
    import zlib

    old_keys = np.frombuffer(b"".join(keys[6:]), np.uint8).reshape(-1, 32)
    old_vecs = np.stack([vecs[k] for k in keys[6:]])
    old_vec = c.dir / "old.vec.npy"
    np.save(old_vec, old_vecs)
    crc = [zlib.crc32(v.tobytes(), zlib.crc32(k + b"\1")) for k, v in zip(keys[6:], old_vecs)]
    np.savez(c.dir / "old.idx.npz", keys=old_keys, ok=np.ones(3, bool), crc=np.asarray(crc, np.uint32),
             vec_bytes=np.int64(old_vec.stat().st_size))
    assert cache_info(tmp_path)["entries"] == 6 + 3
    rep = verify_cache(tmp_path)  # what a run reads: the damaged header's rows pass, the truncated index not
    assert rep["entries"] == 9 and rep["bad_entries"] == 0
    assert [b["batch"] for b in rep["bad_batches"]] == [str(idx_files[1])]


def _model_digest_reference(folder: Path) -> str:
    """The model digest by its documented rule, spelled out: per file (sorted, dot-files left out) its
    name and size, then its bytes: whole for config/tokenizer files and files up to 4 MiB, the first
    and last MiB of a bigger weight file. No modification time: a copied checkpoint keeps its digest."""
    h = hashlib.sha256(b"model\0")
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        data = f.read_bytes()
        h.update(f"{f.name}\0{len(data)}\0".encode())
        weight = f.suffix in (".safetensors", ".bin")
        h.update(data if not weight or len(data) <= 4 << 20 else data[:1 << 20] + data[-(1 << 20):])
    return h.hexdigest()[:32]


def test_model_digest_follows_its_rule_and_survives_a_copy(tmp_path):
    """The model's fingerprint (cache context, run fingerprint) hashes a big weight file by size, head
    and tail; unlike the data's digest it leaves the modification time out, so a copied or
    re-downloaded checkpoint keeps its cache entries."""
    import shutil

    from scalselect_fast.extract.cache import model_digest
    from scalselect_fast.run import model_fingerprint

    rng = np.random.default_rng(0)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llava"}')
    (model / "model.safetensors").write_bytes(rng.integers(0, 256, (5 << 20) + 3, dtype=np.uint8).tobytes())
    (model / "small.bin").write_bytes(b"\x01" * 1000)
    digest = model_digest(model)
    assert digest == _model_digest_reference(model) == model_fingerprint(model)
    copy = tmp_path / "copy" / "m"
    shutil.copytree(model, copy, copy_function=shutil.copyfile)  # new modification times
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert model_digest(copy) == digest
    w = bytearray((copy / "model.safetensors").read_bytes())
    w[-5] ^= 0xFF  # the tail is read
    (copy / "model.safetensors").write_bytes(bytes(w))
    assert model_digest(copy) == _model_digest_reference(copy) != digest


def test_extraction_freezes_the_loaded_objects_only_while_it_runs(env, tmp_path):
    """The loop keeps the objects alive before it out of full collections (gc.freeze) and gives them
    back after, even when it fails; a caller's own freeze is left as it is."""
    import gc

    from scalselect_fast.extract import extract_to_store

    seen = []
    kw = dict(image_root=env["root"], shard_size=5, batch_size=4, progress=False, dtype="fp32", device="cpu",
              cache=tmp_path / "c", on_progress=lambda done, total: seen.append(gc.get_freeze_count()))
    assert gc.get_freeze_count() == 0
    extract_to_store(str(env["model"]), str(env["files"]["A"]), tmp_path / "s1", **kw)
    assert seen and min(seen) > 0  # frozen while the loop ran
    assert gc.get_freeze_count() == 0  # and unfrozen after it

    def failing(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        extract_to_store(str(env["model"]), str(env["files"]["B"]), tmp_path / "s2", **{**kw, "on_progress": failing})
    assert gc.get_freeze_count() == 0

    gc.freeze()  # a caller that froze its own objects (before forking, say) keeps exactly that freeze
    try:
        mine, seen[:] = gc.get_freeze_count(), []
        extract_to_store(str(env["model"]), str(env["files"]["C"]), tmp_path / "s3", **kw)
        # nothing added to it, nothing given back (frozen objects freed by refcount leave it, a few)
        assert seen and max(seen) <= mine and min(seen) > mine // 2 and mine // 2 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()
