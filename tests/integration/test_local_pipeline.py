"""The whole compiled pipeline runs through kfp.local on small generated data sets."""

import json
import os

import pytest

from pipelines.cli import main as imgclf
from pipelines.local import run_local
from tests.support.datasets import make_image_folder
from trainer.hyperparameters import Hyperparameters

pytestmark = pytest.mark.integration

FAST = {"model": "small_cnn", "weights": "none", "image_size": 32, "epochs": 2, "batch_size": 8,
        "validation_split_ratio": 0.2, "test_split_ratio": 0.2}


def _non_empty_files(folder):
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if os.path.getsize(os.path.join(root, f)) > 0]
    return found


def test_whole_pipeline_succeeds_and_summarises(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"circles": 12, "squares": 12, "stripes": 12}, size=(48, 40))
    summary = run_local(str(data), str(tmp_path / "run"), Hyperparameters(**FAST))

    assert summary["status"] == "succeeded", summary
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["classes"] == ["circles", "squares", "stripes"]
    assert sum(summary["counts"].values()) + summary["rejected"] + summary["skipped"] == summary["listed"] == 36
    assert summary["eval_metric"] == "accuracy" and 0.0 <= summary["eval_value"] <= 1.0
    model_dir = summary["model_path"]
    for name in ("model.keras", "class_label_to_prediction_index.json", "hyperparameters.yaml", "history.json"):
        assert os.path.getsize(os.path.join(model_dir, name)) > 0, name
    assert os.path.isdir(os.path.join(model_dir, "saved_model"))
    # Every artifact of every step holds something.
    artifacts = tmp_path / "run" / "artifacts"
    for step_dir in artifacts.glob("*/*"):
        for output in step_dir.iterdir():
            assert _non_empty_files(output) or output.stat().st_size > 0, output


def test_binary_mode_with_auc(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"cats": 12, "dogs": 12}, size=(40, 40))
    hp = Hyperparameters(**FAST, binary_mode=True, eval_metric="auc")
    summary = run_local(str(data), str(tmp_path / "run"), hp)
    assert summary["status"] == "succeeded", summary
    assert summary["eval_metric"] == "auc"
    assert {"accuracy", "auc", "precision", "recall", "prc"} <= set(summary["metrics"])


def test_failed_step_is_named_with_its_reason(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"only_class": 6}, size=(32, 32))
    code = imgclf(["run-local", "--data", str(data), "--output", str(tmp_path / "run"),
                   "--set", "model=small_cnn", "--set", "weights=none", "--set", "epochs=1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "pipeline failed in step 'validate-data'" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == "validate-data"
    assert "class" in summary["error"].lower()


def test_bad_hyperparameters_stop_before_anything_runs(tmp_path, capsys):
    code = imgclf(["run-local", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                   "--set", "learning_rte=0.1"])
    assert code == 2
    assert "learning_rte: unknown hyperparameter; did you mean 'learning_rate'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
