"""Memory flat in N outside extraction (issue 23 item 4): the compact record table, the merge of stored
rows with records, the manifest in bounded batches and the spilled store id check, each against a
slow, obvious in-memory reference defined here; and ``run``'s select stage on a Parquet dataset with
skipped records, ties, quotas and text-only records, against the same job given plain Python lists."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scalselect_fast import rowmap
from scalselect_fast.manifest import INVALID_ROW, manifest_batches
from scalselect_fast.rowmap import CodedColumn, IdColumn, Records, locate_store_rows, row_record, value_codes
from scalselect_fast.store import StoreError, StoreSource, StoreWriter
from scalselect_fast.subspace import SubspaceError


# --------------------------------------------------------------------------------------------------
# slow references: the in-memory code the streaming paths replaced
# --------------------------------------------------------------------------------------------------
def reference_row_record(src, ids) -> np.ndarray:
    """Record index of every stored row by a dict of every id (what the merge replaces)."""
    where = {sid: i for i, sid in enumerate(ids) if sid is not None}
    return np.array([where.get(s, -1) for s in src.ids()], np.int64)


def reference_manifest(src, scores, rank, kept_mask, records, rejected) -> dict:
    """All manifest columns of ``run`` at once, one record at a time (the pre-batching layout)."""
    rec_of = reference_row_record(src, list(records.ids))
    row_of = {int(r): j for j, r in enumerate(rec_of)}
    shard_of, row_in = [], []
    for sh in src.shards:
        shard_of += [sh.name] * sh.count
        row_in += list(range(sh.count))
    cols = {k: [] for k in ("id", "index", "shard", "row", "score", "rank", "kept", "skip_reason")}
    for i in range(len(records.ids)):
        r = row_of.get(i)
        ok = r is not None and not np.isnan(scores[r])
        cols["id"].append(records.ids[i])
        cols["index"].append(i)
        cols["shard"].append(None if r is None else shard_of[r])
        cols["row"].append(None if r is None else row_in[r])
        cols["score"].append(float(scores[r]) if ok else None)
        cols["rank"].append(int(rank[r]) if ok else None)
        cols["kept"].append(bool(i in records.passthrough or (r is not None and kept_mask[r])))
        cols["skip_reason"].append(
            records.skip_reason.get(i, "not extracted (no representation; see skipped.jsonl)") if r is None
            else INVALID_ROW if not ok else rejected.get(r))
    return cols


def _flatten(batches) -> dict:
    cols: dict = {}
    for b in batches:
        v, placed = b["_valid"], b["_placed"]
        n = len(b["id"])
        assert all(len(b[k]) == n for k in ("index", "shard", "row", "score", "rank", "kept", "skip_reason"))
        add = {"id": list(b["id"]), "index": [int(x) for x in b["index"]], "shard": list(b["shard"]),
               "row": [int(b["row"][j]) if placed[j] else None for j in range(n)],
               "score": [float(b["score"][j]) if v[j] else None for j in range(n)],
               "rank": [int(b["rank"][j]) if v[j] else None for j in range(n)],
               "kept": [bool(x) for x in b["kept"]], "skip_reason": list(b["skip_reason"])}
        for k, x in add.items():
            cols.setdefault(k, []).extend(x)
    return cols


def _id_column(ids) -> IdColumn:
    col = IdColumn()
    for s in ids:
        col.append(s)
    return col.finish()


# --------------------------------------------------------------------------------------------------
# compact columns
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spill", [False, True])
def test_id_column_is_the_list_it_was_built_from(spill, tmp_path):
    n = 2 * rowmap.ID_CHUNK + 1001  # three chunks, the last partial
    ids = [None if i % 97 == 5 else f"id-{i}-é" for i in range(n)]
    col = IdColumn(tmp_path if spill else None)
    for s in ids:
        col.append(s)
    col.finish()
    assert len(col) == n and list(col) == ids
    # out of order: a chunk read back from the spill file again after another one was
    for i in (0, 5, rowmap.ID_CHUNK - 1, rowmap.ID_CHUNK, n - 1, 3, -1, rowmap.ID_CHUNK + 7, 2 * rowmap.ID_CHUNK):
        assert col[i] == ids[i]
    for a, b in ((0, 3), (rowmap.ID_CHUNK - 2, rowmap.ID_CHUNK + 3), (n - 5, n + 10), (7, 7), (0, n),
                 (rowmap.ID_CHUNK, 2 * rowmap.ID_CHUNK)):
        assert col[a:b] == ids[a:b]
    with pytest.raises(IndexError, match="out of range"):
        col[n]
    assert list(tmp_path.iterdir()) == []  # the spill file has no name: nothing is left behind


def test_id_column_spills_its_chunks_out_of_memory(tmp_path):
    pool = pa.system_memory_pool()  # where the ids' chunks are allocated

    def held(spill_dir):
        before = pool.bytes_allocated()
        col = IdColumn(spill_dir)
        for i in range(4 * rowmap.ID_CHUNK):
            col.append(f"record-{i:012d}")
        col.finish()
        assert col[2 * rowmap.ID_CHUNK + 1] == f"record-{2 * rowmap.ID_CHUNK + 1:012d}"
        return pool.bytes_allocated() - before, col

    in_memory, _a = held(None)
    spilled, _b = held(tmp_path)
    assert in_memory >= 4 * rowmap.ID_CHUNK * 19  # 19 bytes of UTF-8 per id, all held
    assert spilled < in_memory / 4  # at most the chunk read back


@pytest.mark.parametrize("n_values,dtype", [(1, np.int8), (128, np.int8), (129, np.int16), (32768, np.int16),
                                            (32769, np.int32)])
def test_coded_column_codes_in_the_narrowest_type_that_holds_them(n_values, dtype):
    vals = [None] + [f"v{i}" for i in range(n_values - 1)]
    vals = vals + vals[::-1]  # every value twice, the last one's code the largest
    col = CodedColumn.build(vals)
    assert col.codes.dtype == dtype and len(col.values) == n_values
    assert list(col) == vals and col[n_values - 1] == vals[n_values - 1]
    assert col.codes.max() == n_values - 1


def test_coded_column_round_trips_and_codes_in_first_occurrence_order():
    vals = ["b", None, "a", "b", "<none>", None, "a", "c"]
    col = CodedColumn.build(vals)
    assert list(col) == vals and col[2:5] == vals[2:5] and [col[i] for i in range(len(vals))] == vals
    assert col.values == ["b", None, "a", "<none>", "c"]
    codes, values = value_codes(vals)  # a plain list is coded on the fly, the same way
    assert codes.tolist() == col.codes.tolist() and values == col.values


# --------------------------------------------------------------------------------------------------
# stored rows -> records
# --------------------------------------------------------------------------------------------------
def _store(path, shards):
    w = StoreWriter(path, d=3, dtype="float32")
    for k, ids in enumerate(shards):
        rows = np.arange(len(ids) * 3, dtype=np.float32).reshape(-1, 3) + k
        w.write_shard(rows, ids, index=k)
    return StoreSource(path)


def _records(ids, **kw) -> Records:
    return Records(path="data.jsonl", ids=ids, sources=[None] * len(ids), fields={}, skip_reason={},
                   skip_counts={}, selected_name="selected.jsonl", **kw)


@pytest.mark.parametrize("compact", [False, True])
def test_merge_matches_the_dict_reference_in_order_and_out_of_order(tmp_path, compact):
    ids = [f"r{i}" for i in range(40)]
    ids[3] = None  # no usable id: never matched
    kept = [s for i, s in enumerate(ids) if s is not None and i % 5 != 1]  # records 1, 6, ... skipped
    cases = {"in_order": [kept[:10], kept[10:]],
             "out_of_order": [kept[20:], kept[:20]]}  # a store whose shards are not in record order
    for name, shards in cases.items():
        src = _store(tmp_path / name, shards)
        recs = _records(_id_column(ids) if compact else ids)
        got, missing = locate_store_rows(src, recs)
        assert missing == []
        np.testing.assert_array_equal(got, reference_row_record(src, ids))
        np.testing.assert_array_equal(row_record(src, recs), got)


def test_a_stored_id_missing_from_the_records_is_named(tmp_path):
    src = _store(tmp_path / "s", [["a", "b", "zz", "c"]])
    recs = _records(_id_column(["a", "b", "c"]))
    _rows, missing = locate_store_rows(src, recs)
    assert missing == ["zz"]
    with pytest.raises(SubspaceError, match=r"holds ids not in data.jsonl \(e.g. \['zz'\]\)"):
        row_record(src, recs)


# --------------------------------------------------------------------------------------------------
# the manifest in bounded batches
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_rows", [1, 7, 1 << 16])
@pytest.mark.parametrize("order", ["in_order", "out_of_order"])
def test_manifest_batches_equal_the_reference(tmp_path, batch_rows, order):
    n_rec = 53
    ids = [f"s{i:03d}" for i in range(n_rec)]
    placed = [s for i, s in enumerate(ids) if i % 4 != 2]
    shards = [placed[:15], placed[15:30], placed[30:]]
    if order == "out_of_order":
        shards = [shards[2], shards[0], shards[1]]
    src = _store(tmp_path / "s", shards)
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(src.n), 1)  # many ties
    scores[[4, 9]] = np.nan  # invalid rows (--drop-invalid)
    order_ = np.flatnonzero(~np.isnan(scores))
    order_ = order_[np.lexsort((order_, -scores[order_]))]
    rank = np.zeros(src.n, np.int64)
    rank[order_] = np.arange(1, order_.size + 1)
    kept_mask = np.zeros(src.n, bool)
    kept_mask[order_[:12]] = True
    skip_reason = {i: ("text_only: no image" if i % 8 == 2 else "image_missing: gone") for i in range(2, n_rec, 4)}
    text_only = sorted(i for i, w in skip_reason.items() if w.startswith("text_only"))
    rejected = {int(order_[3]): "near-duplicate of row 0"}
    recs = Records(path="d", ids=_id_column(ids), sources=CodedColumn.build([None] * n_rec), fields={},
                   skip_reason=skip_reason, skip_counts={}, selected_name="s", text_only=text_only,
                   keep_text_only=True)
    got = _flatten(manifest_batches(src, scores, rank, kept_mask, recs, rejected, batch_rows=batch_rows))
    want = reference_manifest(src, scores, rank, kept_mask, recs, rejected)
    assert got == want
    assert sum(1 for _ in manifest_batches(src, scores, rank, kept_mask, recs, rejected,
                                           batch_rows=batch_rows)) == -(-n_rec // batch_rows)


# --------------------------------------------------------------------------------------------------
# the store's id check, spilled to disk
# --------------------------------------------------------------------------------------------------
def test_store_duplicate_id_is_named_with_both_shards(tmp_path):
    src = _store(tmp_path / "s", [["a", "b", "c"], ["d", "b", "e"]])
    with pytest.raises(StoreError, match=r"id 'b' occurs twice in the store \(rows 1 in shard 'shard-00000' "
                                         r"and 4 in shard 'shard-00001'\)"):
        src.check_unique_ids()
    ok = _store(tmp_path / "t", [[f"x{i}" for i in range(70000)], ["y", "z"]])
    ok.check_unique_ids()  # many ids, more than one spill buffer: no false alarm


# --------------------------------------------------------------------------------------------------
# run's select stage end to end: compact table vs the same job on plain lists
# --------------------------------------------------------------------------------------------------
def _dataset(tmp_path, n=60):
    ids = [f"q{i:03d}" for i in range(n)]
    source = [("coco", "gqa", None, "vg")[i % 4] for i in range(n)]
    image = [None if i % 9 == 4 else f"img/{i}.jpg" for i in range(n)]
    conv = [[{"from": "human", "value": f"<image>\nq {i}"}, {"from": "gpt", "value": f"a {i}"}] for i in range(n)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": ids, "image": image, "conversations": conv, "data_source": source}), path)
    return path, ids, image


def _run_select_stage(tmp_path, data, placed, quota):
    from scalselect_fast.run import make_config, stages
    from scalselect_fast.run.events import Events
    from scalselect_fast.run.fingerprints import stage_fingerprints
    from scalselect_fast.run.state import RunState

    out = tmp_path / "out"
    cfg = make_config(model="m", data=str(data), out=str(out), budget="12", quota=quota, html=False, quiet=True,
                      format="parquet", text_only="keep")
    events = Events(True, False)
    state = RunState(out, stage_fingerprints(cfg, "m", "d"), False, events)
    store = stages._store_dir(state)
    rng = np.random.default_rng(3)
    base = rng.standard_normal((8, 6)).astype(np.float32)
    rows = base[np.arange(len(placed)) % 8]  # repeated rows: tied scores
    w = StoreWriter(store, d=6, dtype="float32")
    w.write_shard(rows[:20], [s for _, s in placed[:20]], index=0)
    w.write_shard(rows[20:], [s for _, s in placed[20:]], index=1)
    skips = [json.dumps({"index": i, "id": f"q{i:03d}", "reason": "text_only", "detail": "no image"})
             for i in range(60) if i % 9 == 4]
    (store / "skipped.jsonl").write_text("".join(s + "\n" for s in skips))
    state.mark("extract", n=len(placed))
    src = StoreSource(store)
    stages._publish_skips(state)
    sub = stages._stage_fit(cfg, state, events, src)
    scores = stages._stage_score(cfg, state, events, src, sub)
    res = stages._stage_select(cfg, state, events, src, sub, scores, out, out / "skipped.jsonl")
    return cfg, src, sub, scores, res, out


@pytest.mark.parametrize("quota", [[], ["source=*<=40%,coco>=30%"]])
def test_run_select_stage_equals_the_plain_list_job(tmp_path, quota):
    from scalselect_fast.postselect import parse_quota
    from scalselect_fast.selection import run_selection

    data, ids, image = _dataset(tmp_path)
    placed = [(i, s) for i, (s, im) in enumerate(zip(ids, image)) if im is not None]
    cfg, src, sub, scores, res, out = _run_select_stage(tmp_path, data, placed, quota)
    assert len(np.unique(scores)) < src.n  # ties are exercised
    # the same job with the record table as plain lists (the representation before this change)
    t = pq.read_table(data).to_pylist()
    skip = {i: "text_only: no image" for i in range(60) if i % 9 == 4}
    recs = Records(path=str(data), ids=[r["id"] for r in t], sources=[r["data_source"] for r in t],
                   fields={"source": [r["data_source"] for r in t]} if quota else {}, skip_reason=skip,
                   skip_counts={"text_only": len(skip)}, selected_name="selected.parquet", format="parquet",
                   text_only=sorted(skip), keep_text_only=True)
    ref_out = tmp_path / "ref"
    rep = run_selection(src, ref_out, "12", subspace=sub, scores=scores, records=recs,
                        quotas=[parse_quota(q) for q in quota], html=False)
    assert pq.read_table(out / "manifest.parquet").to_pylist() == pq.read_table(ref_out / "manifest.parquet").to_pylist()
    assert (out / "selected.txt").read_text() == (ref_out / "selected.txt").read_text()
    assert pq.read_table(out / "selected.parquet").equals(pq.read_table(ref_out / "selected.parquet"))
    got = json.loads((out / "report.json").read_text())
    for key in ("per_source", "n_samples", "n_valid", "n_selected", "skip_reasons", "budget_base", "text_only"):
        assert got[key] == json.loads(json.dumps(rep[key])), key
    # and against first principles: every placed record has its row, text-only ones are kept unranked
    man = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["id"] for m in man] == ids
    assert all((m["row"] is None) == (i % 9 == 4) for i, m in enumerate(man))
    assert all(m["kept"] and m["rank"] is None for i, m in enumerate(man) if i % 9 == 4)


def test_ranks_follow_the_tie_rule_against_a_lexsort_reference(tmp_path):
    """Descending score, ties -> lower row, NaN rows unranked: the stable sort of the negated scores
    against the obvious reference (Python's sort on (-score, row))."""
    from scalselect_fast.selection import run_selection

    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 5)).astype(np.float32)
    rows = x[rng.integers(0, 9, size=101)]  # 101 rows from 9 distinct ones: many exact ties
    rows[[7, 50]] = np.nan
    w = StoreWriter(tmp_path / "t", d=5, dtype="float32")
    w.write_shard(rows[:60], [f"r{i}" for i in range(60)], index=0)
    w.write_shard(rows[60:], [f"r{i}" for i in range(60, 101)], index=1)
    rep = run_selection(tmp_path / "t", tmp_path / "o", 17, drop_invalid=True, html=False)
    assert rep["n_selected"] == 17
    scores = np.load(tmp_path / "o" / "scores.npy")
    ref = sorted((i for i in range(101) if not np.isnan(scores[i])), key=lambda i: (-scores[i], i))
    man = pq.read_table(tmp_path / "o" / "manifest.parquet").to_pylist()
    assert [m["rank"] for m in man] == [None if np.isnan(scores[i]) else ref.index(i) + 1 for i in range(101)]
    assert (tmp_path / "o" / "selected.txt").read_text().split() == [f"r{i}" for i in ref[:17]]


# --------------------------------------------------------------------------------------------------
# the selected dataset, streamed
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["original", "score"])
def test_parquet_selection_streamed_equals_one_table_write(tmp_path, monkeypatch, order):
    """Kept rows written row group by row group equal (byte for byte) one table of every kept row
    written with the same row-group size, the writer's layout before streaming."""
    from scalselect_fast.data import writers
    from scalselect_fast.data import write_selected

    n = 500
    t = pa.table({"id": [f"p{i}" for i in range(n)], "image": [f"img/{i}.jpg" for i in range(n)],
                  "text": [("x" * (i % 37)) + str(i) for i in range(n)]})
    data = tmp_path / "d.parquet"
    pq.write_table(t, data, row_group_size=64)
    monkeypatch.setattr(writers, "ROW_GROUP_BYTES", 700)  # small output row groups, cut across input ones
    monkeypatch.setattr(writers, "_READ_BATCH_ROWS", 5)  # input row groups read in several batches
    keep = [f"p{i}" for i in range(n - 1, -1, -1) if i % 3 != 1 and i % 7 != 0]  # "best first"
    got = tmp_path / "sel.parquet"
    write_selected(data, got, keep=keep if order == "score" else set(keep), order=order)
    pf = pq.ParquetFile(data)
    row_bytes = sum(pf.metadata.row_group(g).total_byte_size for g in range(pf.num_row_groups)) / n
    group_rows = int(min(65536, max(1, 700 // max(1.0, row_bytes))))
    want_rows = [int(k[1:]) for k in keep] if order == "score" else sorted(int(k[1:]) for k in keep)
    ref = tmp_path / "ref.parquet"
    with pq.ParquetWriter(ref, pf.schema_arrow) as w:
        w.write_table(t.take(pa.array(want_rows)), row_group_size=group_rows)
    out = pq.ParquetFile(got)
    assert 1 < group_rows < len(keep) and out.num_row_groups == -(-len(keep) // group_rows)
    assert out.read().equals(pq.read_table(ref))
    assert got.read_bytes() == ref.read_bytes()


def test_selection_writer_names_a_duplicate_id_outside_the_kept_ones(tmp_path):
    """The digests on disk find a repeated id the selection does not keep; the exact rerun names it
    with both records, as the in-memory table of every id did."""
    from scalselect_fast.data import DatasetError, write_selected

    ids = [f"u{i}" for i in range(300)]
    ids[250] = "u17"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": s, "image": "a.jpg"}) + "\n" for s in ids))
    with pytest.raises(DatasetError, match=r"duplicate id 'u17': record 17 and record 250"):
        write_selected(data, tmp_path / "o.jsonl", keep={"u1", "u2"})
    ids[250] = "u250"
    data.write_text("".join(json.dumps({"id": s, "image": "a.jpg"}) + "\n" for s in ids))
    assert write_selected(data, tmp_path / "o.jsonl", keep={"u1", "u2"}) == 2
    assert [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["u1", "u2"]


def test_ids_of_matches_indexing_every_id(tmp_path):
    src = _store(tmp_path / "s", [[f"a{i}" for i in range(7)], [], [f"b{i}" for i in range(5)], ["c0"]])
    every = src.ids()
    rows = np.array([12, 0, 8, 8, 3, 7, 11, 0], np.int64)  # any order, repeats
    assert rowmap.ids_of(src, rows) == [every[r] for r in rows.tolist()]
    assert rowmap.ids_of(src, np.zeros(0, np.int64)) == []


def test_selection_writer_names_kept_ids_missing_from_the_input(tmp_path):
    from scalselect_fast.data import DatasetError, write_selected

    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [f"m{i}" for i in range(50)], "image": ["a.jpg"] * 50}), data)
    with pytest.raises(DatasetError, match=r"2 selected id\(s\) are not in .*\(e.g. 'nope1', 'nope2'\)"):
        write_selected(data, tmp_path / "o.parquet", keep={"m3", "nope1", "nope2"})
    assert write_selected(data, tmp_path / "o.parquet", keep={"m3", "m49"}) == 2
    assert pq.read_table(tmp_path / "o.parquet")["id"].to_pylist() == ["m3", "m49"]
