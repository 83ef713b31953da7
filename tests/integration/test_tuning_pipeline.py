"""`imgclf tune` runs the compiled tuning pipeline through kfp.local on a small generated data set."""

import json
import os

import pytest
import yaml

from pipelines.cli import main as imgclf
from tests.support.datasets import make_image_folder
from trainer import hyperparameters as hps

pytestmark = pytest.mark.integration


def test_tune_runs_parallel_trials_survives_a_failing_one_and_releases_the_best(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"circles": 12, "squares": 12, "stripes": 12}, size=(48, 40))
    params = tmp_path / "fixed.yaml"
    params.write_text("model: small_cnn\nweights: none\nepochs: 1\nbatch_size: 8\n"
                      "validation_split_ratio: 0.2\ntest_split_ratio: 0.2\n")
    # image_size 8 is below small_cnn's 16 pixels: that trial fails, and the search must go on.
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps({"CategoricalParameterRanges": [{"Name": "image_size", "Values": ["8", "32"]}]}))
    registry = tmp_path / "registry"
    out = tmp_path / "run"

    assert imgclf(["tune", "--data", str(data), "--output", str(out), "--params", str(params),
                   "--ranges", str(ranges), "--strategy", "Grid", "--max-trials", "2", "--parallel-trials", "2",
                   "--set", f"model_registry_uri={registry}"]) == 0

    tuning = json.loads((out / "tuning.json").read_text())
    assert (tuning["objective"], tuning["direction"], tuning["strategy"]) == ("validation:accuracy", "maximize",
                                                                              "Grid")
    by_size = {t["hyperparameters"]["image_size"]: t for t in tuning["trials"]}
    assert by_size[8]["status"] == "failed" and by_size[8]["error"].startswith(
        "invalid hyperparameters: image_size: got 8, but small_cnn needs at least 16 pixels")
    assert by_size[32]["status"] == "completed" and by_size[32]["epochs"] == 1 and by_size[32]["seconds"] > 0
    assert {by_size[8]["slot"], by_size[32]["slot"]} == {0, 1}
    assert tuning["best"]["trial"] == by_size[32]["trial"]
    assert tuning["best"]["value"] == by_size[32]["value"]
    # The best hyperparameters go back into --params as they are.
    best = hps.Hyperparameters.resolve(files=[str(out / "best_hyperparameters.yaml")])
    assert best.image_size == 32 and best.model == "small_cnn" and best.epochs == 1
    # The best model went through evaluate, the gate and push, as in the main pipeline.
    evaluation = tuning["evaluation"]
    assert evaluation["eval_metric"] == "accuracy" and 0.0 <= evaluation["eval_value"] <= 1.0
    assert evaluation["blessed"] is True
    assert (registry / "000001" / "saved_model.pb").is_file()
    assert yaml.safe_load((registry / "000001" / "hyperparameters.yaml").read_text())["image_size"] == 32
    page = open(tuning["report_html"], encoding="utf-8").read()
    assert page.count("<svg") == 2 and "small_cnn needs at least 16 pixels" in page
    assert os.path.getsize(os.path.join(os.path.dirname(tuning["report_html"]), "report.md")) > 0
    assert "tuning succeeded" in capsys.readouterr().out
