"""report.json / report.html: content, self-containedness, and the summaries they are built from."""
import base64
import json
import re

import numpy as np

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
