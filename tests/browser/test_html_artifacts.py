"""Every HTML artifact imgclf writes, opened in headless Chromium: no console error, no broken image, no
empty chart. Screenshots are kept (IMGCLF_SCREENSHOT_DIR, default a pytest temp folder) for a person to look at.

The artifacts come from one small real run: validate -> convert -> train (small_cnn, 16 px, 2 epochs) ->
evaluate, and a real search of three such trials for the tuning report. Where no Chromium is installed
the tier says NOT RUN (Makefile) and these tests skip, unless REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.browser import check_html, require_browser
from tests.support.datasets import make_image_folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """name -> HTML file of each report imgclf writes, from one real run on three classes of pictures."""
    require_browser()  # before the training and the search, which are only worth it with a browser
    from trainer.data import conversion, validation
    from trainer.evaluate import evaluation
    from trainer.hyperparameters import Hyperparameters
    from trainer.train import training
    from trainer.tune import tuning

    root = tmp_path_factory.mktemp("artifacts")
    make_image_folder(root / "data", {"cats": 14, "dogs": 14, "fish": 14}, size=(40, 30), fmt="jpg")
    validation.validate_dataset(str(root / "data"), str(root / "validation"))
    conversion.convert_dataset(str(root / "data"), str(root / "validation" / "validation.json"),
                               str(root / "dataset"), validation_split_ratio=0.2, test_split_ratio=0.3)
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=16, epochs=2, batch_size=8,
                         tflite_quantization="dynamic_range")
    training.train(hp, str(root / "dataset"), str(root / "model"))
    evaluation.evaluate(str(root / "model"), str(root / "dataset"), str(root / "evaluation"))
    history = json.loads((root / "model" / "history.json").read_text())
    curves = root / "training_curves.html"
    curves.write_text(evaluation.training_curves_html(history))
    # A real search of three short trials on the same data set, for the tuning report.
    config = tuning.make_config({"learning_rate": {"min": 0.001, "max": 0.1, "scaling": "Logarithmic"},
                                 "optimizer": ["adam", "sgd"]},
                                {"model": "small_cnn", "weights": "none", "image_size": 16, "epochs": 2,
                                 "batch_size": 8}, strategy="Random", max_trials=3, parallel_trials=1)
    tuning.create_study(config, str(root / "study"))
    tuning.run_lane(str(root / "study"), 0, str(root / "dataset"))
    tuning.select_best(str(root / "study"), str(root / "best_model"), str(root / "tuning"))
    return {"validation_report": root / "validation" / "report.html",
            "evaluation_report": root / "evaluation" / "report.html",
            "training_curves": curves,
            "tuning_report": root / "tuning" / "report.html"}


@pytest.mark.parametrize("name", ["validation_report", "evaluation_report", "training_curves", "tuning_report"])
def test_html_artifact_renders_cleanly(name, artifacts, screenshot_dir):
    require_browser()
    shot, problems = check_html(artifacts[name], screenshot_dir / f"{name}.png")
    assert not problems, f"{name}: " + "; ".join(problems)
    assert shot.stat().st_size > 5_000  # a page with content, not a blank PNG
    print(f"{name}: screenshot {shot}")


def test_evaluation_report_shows_gallery_heat_maps_calibration_and_model_card(artifacts):
    page = artifacts["evaluation_report"].read_text()
    assert 'id="mistakes"' in page or "No image was misclassified" in page
    assert 'id="correct"' in page and "Grad-CAM of test image" in page
    assert 'aria-label="reliability diagram"' in page and "Expected calibration error" in page
    assert "# Model card" in page and "model_dynamic_range.tflite" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # self-contained: data: URIs only
    assert len(page) < 2_000_000


def test_the_checker_catches_what_it_is_for(tmp_path):
    """A page with a console error, an exception, a broken image and an empty chart fails on each."""
    require_browser()
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><p>text</p>'
                   '<img src="missing.png" alt="gone"><svg width="50" height="50"><rect width="50" height="50"/></svg>'
                   "<script>console.error('boom'); notDefined();</script></body></html>")
    _, problems = check_html(bad)
    text = "\n".join(problems)
    for expected in ("broken image", "empty chart", "console error: boom", "notDefined", "missing.png"):
        assert expected in text
