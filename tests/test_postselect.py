"""Post-selection (near-duplicate removal within the selection, quotas) vs obvious references."""
import numpy as np
import pytest

from scalselect_fast.postselect import PostSelectError, parse_quota, select_ranked


def _greedy_dedup_reference(order, budget, X, eps):
    """The obvious O(budget²) sequential greedy on exact cosine similarities."""
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    kept = []
    for r in order:
        if len(kept) == budget:
            break
        if kept and (U[kept] @ U[r]).max() >= 1.0 - eps:
            continue
        kept.append(int(r))
    return np.array(kept, dtype=np.int64)


def _planted(n=997, d=24, n_dups=150, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    src = rng.choice(n - n_dups, n_dups, replace=False)
    X[n - n_dups:] = X[src] + 1e-3 * rng.standard_normal((n_dups, d)).astype(np.float32)
    return X


@pytest.mark.parametrize("chunk", [1, 7, 2048])
@pytest.mark.parametrize("budget", [1, 160, 700])
def test_dedup_matches_sequential_greedy(chunk, budget):
    X = _planted()
    scores = np.random.default_rng(1).random(X.shape[0])
    order = np.lexsort((np.arange(X.shape[0]), -scores))
    kept, info = select_ranked(order, budget, vectors=lambda rows: X[rows], dedup_eps=0.01, chunk=chunk)
    ref = _greedy_dedup_reference(order, budget, X, 0.01)
    np.testing.assert_array_equal(kept, ref)
    assert kept.size == budget
    # nothing kept is within eps of anything else kept
    U = X[kept] / np.linalg.norm(X[kept], axis=1, keepdims=True)
    S = U @ U.T
    np.fill_diagonal(S, -1)
    assert S.max() < 0.99
    assert info["n_dedup_dropped"] == sum("near-duplicate" in v for v in info["rejected"].values())


def test_dedup_refills_from_next_ranked():
    X = np.eye(6, dtype=np.float32)
    X[1] = X[0]  # row 1 duplicates row 0
    order = np.arange(6)
    kept, info = select_ranked(order, 3, vectors=lambda r: X[r], dedup_eps=0.05)
    np.testing.assert_array_equal(kept, [0, 2, 3])
    assert "near-duplicate of row 0" in info["rejected"][1]


def test_no_options_is_plain_top():
    order = np.array([5, 3, 1, 0, 2, 4])
    kept, _ = select_ranked(order, 4)
    np.testing.assert_array_equal(kept, [5, 3, 1, 0])


def _quota_reference(order, budget, labels, mins, maxs):
    kept, cnt = [], {}
    need = {g: int(np.ceil(s * budget - 1e-9)) for g, s in mins.items()}
    cap = {g: int(np.floor(s * budget + 1e-9)) for g, s in maxs.items()}
    for r in order:  # phase 1
        g = labels[r]
        if cnt.get(g, 0) < need.get(g, 0) and cnt.get(g, 0) < cap.get(g, budget) and len(kept) < budget:
            kept.append(r)
            cnt[g] = cnt.get(g, 0) + 1
    for r in order:
        g = labels[r]
        if len(kept) == budget:
            break
        if r not in kept and cnt.get(g, 0) < cap.get(g, budget):
            kept.append(r)
            cnt[g] = cnt.get(g, 0) + 1
    pos = {r: i for i, r in enumerate(order)}
    return np.array(sorted(kept, key=pos.get), dtype=np.int64)


def test_quota_min_and_max_match_reference():
    rng = np.random.default_rng(3)
    n = 503
    labels = rng.choice(["coco", "ocr", "chart"], n, p=[0.7, 0.25, 0.05]).tolist()
    scores = rng.random(n)
    # make coco dominate the top so that the cap binds and chart's minimum needs phase 1
    scores[np.array(labels) == "coco"] += 1.0
    order = np.lexsort((np.arange(n), -scores))
    q = parse_quota("source=coco<=50%,chart>=10%")
    kept, info = select_ranked(order, 100, labels={"source": labels}, quotas=[q])
    ref = _quota_reference(order, 100, labels, {"chart": 0.10}, {"coco": 0.5})
    np.testing.assert_array_equal(kept, ref)
    got = {g: sum(labels[r] == g for r in kept) for g in ("coco", "ocr", "chart")}
    assert got["coco"] == 50 and got["chart"] >= 10 and sum(got.values()) == 100
    assert info["n_quota_skipped"] > 0
    assert any(v.startswith("quota: source=coco") for v in info["rejected"].values())


def test_quota_shortfall_reported_and_caps_infeasible_refused():
    labels = ["a"] * 10 + ["b"] * 2
    order = np.arange(12)
    kept, info = select_ranked(order, 10, labels={"source": labels}, quotas=[parse_quota("source=b>=50%")])
    assert info["quota_shortfalls"] == {"source=b": {"wanted": 5, "got": 2}}
    assert kept.size == 10
    with pytest.raises(PostSelectError, match="raise the maximum shares"):
        select_ranked(order, 10, labels={"source": labels}, quotas=[parse_quota("source=a<=50%")])


@pytest.mark.parametrize("bad", ["source", "source=", "source=a>=x", "source=a>=150%", "source=a>=60%,b>=60%",
                                 "source=a=0.5", "source=a=0.6:0.2"])
def test_quota_parse_errors(bad):
    with pytest.raises(PostSelectError, match="--quota"):
        parse_quota(bad)


def test_quota_parse_forms():
    q = parse_quota("task=vqa=10%:40%,*<=0.3")
    assert q.field == "task"
    assert q.bounds("vqa") == (0.1, 0.4)
    assert q.bounds("other") == (0.0, 0.3)


def test_unknown_quota_field_and_bad_eps():
    with pytest.raises(PostSelectError, match="no such field"):
        select_ranked(np.arange(3), 2, labels={}, quotas=[parse_quota("task=a<=50%")])
    with pytest.raises(PostSelectError, match="cosine-distance"):
        select_ranked(np.arange(3), 2, vectors=lambda r: np.ones((len(r), 2)), dedup_eps=3.0)


def test_dedup_hnsw_index_finds_planted_duplicates():
    # well-separated planted duplicates: the approximate HNSW index must resolve them like the exact one
    X = _planted(n=997, d=24, n_dups=150, seed=5)
    order = np.arange(X.shape[0])[::-1]  # duplicates (highest rows) ranked first
    kept, info = select_ranked(order, 400, vectors=lambda r: X[r], dedup_eps=0.01, index="hnsw", chunk=256)
    ref = _greedy_dedup_reference(order, 400, X, 0.01)
    np.testing.assert_array_equal(kept, ref)
    assert info["index"] == "hnsw" and info["n_dedup_dropped"] > 0
