"""report.json / report.html: content, self-containedness, and the summaries they are built from."""
import base64
import json
import re

import numpy as np
import pytest

from scalselect_fast.report import render_html, score_histogram, spectrum_summary, write_report


def _report():
    rng = np.random.default_rng(0)
    sv = np.sort(rng.random(40))[::-1] * 10
    scores = rng.random(500)
    cutoff = float(np.sort(scores)[::-1][79])
    return {"n_samples": 520, "n_valid": 500, "n_skipped": 20, "budget": 80, "n_selected": 80,
            "config_hash": "abc123",
            "spectrum": spectrum_summary(sv, k=12, energy=0.9),
            "scores": score_histogram(scores, cutoff),
            "per_source": {"coco": {"total": 400, "kept": 50}, "ocr": {"total": 100, "kept": 30}},
            "timings": {"extract": 1.5, "fit": 0.2, "score": 0.1},
            "stability": {"overlap_exact_vs_randomized": 0.99},
            "skip_reasons": {"image_missing": 20},
            "versions": {"numpy": np.__version__}, "config": {"budget": "16%"}}


def test_histogram_and_spectrum_summaries():
    s = np.array([0.1, 0.2, 0.2, 0.9])
    h = score_histogram(s, cutoff=0.2, bins=4)
    assert sum(h["histogram"]["counts"]) == 4 and len(h["histogram"]["edges"]) == 5
    assert h["min"] == 0.1 and h["max"] == 0.9 and h["cutoff"] == 0.2
    sp = spectrum_summary([3.0, 2.0, 1.0], k=2, energy=0.9)
    # cumulative energy of σ² = 9, 4, 1 over the total 14
    np.testing.assert_allclose(sp["cumulative_energy"], [9 / 14, 13 / 14, 1.0])
    assert sp["captured_energy"] == sp["cumulative_energy"][1]
    # a solver that computed only some components: fractions are of the given total energy
    sp = spectrum_summary([3.0, 2.0], k=1, energy=None, total_energy=28.0)
    np.testing.assert_allclose(sp["cumulative_energy"], [9 / 28, 13 / 28])
    assert score_histogram(np.array([]), None)["n"] == 0


def test_write_report_is_self_contained(tmp_path):
    rep = _report()
    paths = write_report(tmp_path, rep)
    back = json.loads((tmp_path / "report.json").read_text())
    assert back["spectrum"]["k"] == 12 and back["per_source"]["ocr"]["kept"] == 30
    html = (tmp_path / "report.html").read_text()
    assert paths["html"].endswith("report.html")
    # three plots embedded as PNG data URIs, nothing fetched from elsewhere
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 3
    for u in uris:
        assert base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for needle in ("chosen k", "Stage timings", "Stability certificate", "abc123", "image_missing", "ocr"):
        assert needle in html
    assert not list(tmp_path.glob("*.tmp"))


def test_render_tolerates_missing_sections():
    html = render_html({"n_samples": 3})
    assert "<html>" in html and "n_samples" in html


# --------------------------------------------------------------------------------------------------
# the gallery of a multi-image dataset, through `scalselect run`
# --------------------------------------------------------------------------------------------------
class _Figures:
    """The gallery figures of report.html: per figure, its images' data URIs in page order and the
    "+N more" text."""

    def __init__(self, page: str):
        import html.parser

        figs: list[dict] = []

        class Parser(html.parser.HTMLParser):
            cur, in_more = None, False

            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "figure":
                    self.cur = {"id": None, "imgs": [], "more": ""}
                    figs.append(self.cur)
                elif self.cur is not None and tag == "img":
                    self.cur["id"] = self.cur["id"] or a["alt"]
                    self.cur["imgs"].append(a["src"])
                self.in_more = self.cur is not None and tag == "span" and a.get("class") == "more"

            def handle_data(self, data):
                if self.in_more:
                    self.cur["more"] += data

            def handle_endtag(self, tag):
                self.in_more = False
                if tag == "figure":
                    self.cur = None

        Parser().feed(page)
        self.by_id = {f["id"]: f for f in figs}


def _mean_colour(uri: str) -> tuple:
    import io

    from PIL import Image

    assert uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    return tuple(np.asarray(img, np.float64).reshape(-1, 3).mean(axis=0))


def test_run_gallery_shows_every_image_of_a_multi_image_sample(tmp_path):
    """`scalselect run` on a LLaVA JSON dataset whose samples have 2, 3 or 6 images: each sample's figure
    in report.html shows its images in order (the first large, the rest small), up to
    IMAGES_PER_SAMPLE, and counts the rest."""
    pytest.importorskip("scalselect_fast.extract.tiny")
    from PIL import Image

    from scalselect_fast import cli
    from scalselect_fast.extract.tiny import build_tiny_model
    from scalselect_fast.gallery import IMAGES_PER_SAMPLE

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    rng = np.random.default_rng(7)
    records, colours = [], {}
    for i in range(10):
        n_img = (2, 3, 6)[i % 3]
        paths = []
        for j in range(n_img):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            path = f"img/s{i}-{j}.png"
            Image.new("RGB", (24 + 4 * j, 24), colour).save(data / path)
            paths.append(path)
            colours[path] = colour
        records.append({"id": f"s{i}", "image": paths, "conversations": [
            {"from": "human", "value": "<image>\n" * n_img + f"Which of these {n_img} differ?"},
            {"from": "gpt", "value": "The last."}]})
    (data / "multi.json").write_text(json.dumps(records))
    model = build_tiny_model("llava", tmp_path / "tiny", seed=0)
    out = tmp_path / "o"
    assert cli.main(["run", "--model", str(model), "--data", str(data / "multi.json"), "--image-root", str(data),
                     "--out", str(out), "--budget", "4", "--shard-size", "8", "--batch-size", "4", "--quiet",
                     "--no-plan-check"]) == 0

    figs = _Figures((out / "report.html").read_text()).by_id
    selected = (out / "selected.txt").read_text().split()
    assert len(selected) == 4 and set(selected) <= set(figs)
    assert set(figs) == {r["id"] for r in records}  # 10 samples: every one is in some group
    for rec in records:
        fig, paths = figs[rec["id"]], rec["image"]
        shown = paths[:IMAGES_PER_SAMPLE]
        assert len(fig["imgs"]) == len(shown)
        for uri, path in zip(fig["imgs"], shown):  # each image, in the sample's order
            np.testing.assert_allclose(_mean_colour(uri), colours[path], atol=8)
        left = len(paths) - len(shown)
        assert fig["more"] == (f"+{left} more" if left else "")
    rep = json.loads((out / "report.json").read_text())
    assert rep["gallery"]["note"] is None


@pytest.mark.parametrize("n,nan_rows", [(101, ()), (100, ()), (57, (3, 10, 11)), (58, (3, 10, 11)), (9, ()), (8, ())])
def test_report_median_from_the_ranks_is_np_median(tmp_path, n, nan_rows):
    """The selection's report reads the median at the middle ranks; np.median of the written scores is
    the reference (odd and even counts, ties, rows without a score)."""
    from scalselect_fast.selection import run_selection

    rng = np.random.default_rng(n)
    X = np.round(rng.standard_normal((n, 4)), 1)  # rounded: repeated rows, so tied scores
    X[1::5] = X[0]
    if nan_rows:
        X[list(nan_rows)] = np.nan
    rep = run_selection(X, tmp_path / "out", 1, html=False, drop_invalid=bool(nan_rows), k=2, stability_seeds=None)
    scores = np.load(tmp_path / "out" / "scores.npy")
    valid = scores[~np.isnan(scores)]
    assert valid.size == n - len(nan_rows)
    assert rep["scores"]["median"] == float(np.median(valid))
    assert rep["scores"]["sum"] == float(valid.sum()) and rep["scores"]["mean"] == float(valid.mean())


def reference_gallery_groups(scores, kept_mask, g):
    """The gallery's groups by slicing the whole order (one stable sort of every scored row)."""
    n_scored = int((~np.isnan(scores)).sum())
    order = np.argsort(-scores, kind="stable")[:n_scored]
    kept_order, rej_order = order[kept_mask[order]], order[~kept_mask[order]]
    return {"top kept": kept_order[:g], "last kept (cut-off)": kept_order[-g:],
            "first rejected (cut-off)": rej_order[:g], "lowest scored": order[::-1][:g][::-1]}


@pytest.mark.parametrize("n,g", [(1, 12), (5, 12), (40, 12), (1001, 12), (1001, 3)])
@pytest.mark.parametrize("post_selected", [False, True])
def test_gallery_groups_from_the_ranks_match_the_whole_order(n, g, post_selected):
    from scalselect_fast.gallery import gallery_groups
    from scalselect_fast.scoring import rank_scores, score_order

    rng = np.random.default_rng(n + g)
    scores = rng.integers(0, 9, n).astype(np.float64) / 4  # ties
    scores[rng.random(n) < 0.1] = np.nan
    order = score_order(scores)
    m = max(order.size // 3, min(order.size, 1))
    kept = order[:m] if not post_selected else rng.choice(order, size=m, replace=False)  # a post-selection
    kept_mask = np.zeros(n, bool)
    kept_mask[kept] = True
    got = gallery_groups(rank_scores(scores, 1), kept_mask, g)
    ref = reference_gallery_groups(scores, kept_mask, g)
    assert list(got) == list(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
