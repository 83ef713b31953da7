"""The whole compiled pipeline runs through kfp.local on small generated data sets."""

import json
import os
import re

import numpy as np
import pytest

from pipelines.cli import main as imgclf
from pipelines.local import run_local
from tests.support.datasets import make_image_folder
from trainer import layout
from trainer.hyperparameters import Hyperparameters

pytestmark = pytest.mark.integration

FAST = {"model": "small_cnn", "weights": "none", "image_size": 32, "epochs": 2, "batch_size": 8,
        "validation_split_ratio": 0.2, "test_split_ratio": 0.2}


def _evaluate_outputs(run_dir):
    """What the evaluate step handed to KFP: its metrics artifacts' metadata, as the UI reads them."""
    [executor_output] = list((run_dir / "artifacts").glob("*/evaluate/executor_output.json"))
    artifacts = json.loads(executor_output.read_text())["artifacts"]
    return {name: value["artifacts"][0]["metadata"] for name, value in artifacts.items()}


def _non_empty_files(folder):
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if os.path.getsize(os.path.join(root, f)) > 0]
    return found


# A line the console prints: time, step, what happened (pipelines.local_console).
STEP_LINE = re.compile(r"^\d\d:\d\d:\d\d  (?P<step>[\w.#-]+(?: #\d+)?) +(?P<text>.+)$")
NOISE = ("outputFile", "executor_input", "Streamed logs", "KFP Executor", "oneDNN", "absl", "I0000", "cuda",
         "ms/step", "Assets written")


def _steps_printed(out):
    """{step: [what the terminal said of it]}; fails on any line that is not a step line."""
    said = {}
    for line in out.splitlines():
        match = STEP_LINE.match(line)
        assert match, f"not a step line: {line!r}"
        assert not any(noise in line for noise in NOISE), line
        said.setdefault(match["step"], []).append(match["text"])
    return said


def test_whole_pipeline_succeeds_pushes_and_predicts(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"circles": 12, "squares": 12, "stripes": 12}, size=(48, 40))
    registry = tmp_path / "registry"
    summary = run_local(str(data), str(tmp_path / "run"), Hyperparameters(**FAST),
                        pipeline_args={"model_registry_uri": str(registry), "batch_data_uri": str(data)})

    assert summary["status"] == "succeeded", summary
    # The terminal: a line as each step starts and ends, our progress lines, nothing of the executor or TensorFlow.
    out = capsys.readouterr().out
    said = _steps_printed(out)
    steps = ["look-at-data", "validate-data", "convert-to-tfrecords", "train", "evaluate", "bless-model",
             "push-model", "deploy-model", "batch-predict"]
    # kfp.local runs the steps after the gate in no fixed order (push and batch prediction are siblings).
    assert list(said)[:6] == steps[:6] and sorted(said) == sorted(steps), list(said)
    # No serving namespace on the form: the deploy step is skipped, in one line.
    assert len(said["deploy-model"]) == 1 and said["deploy-model"][0].startswith("skipped"), said["deploy-model"]
    for step in (step for step in steps if step != "deploy-model"):
        assert said[step][0] == "started" and said[step][-1].startswith("succeeded in "), (step, said[step])
    assert [text.split(":")[0] for text in said["train"] if text.startswith("Epoch")] == ["Epoch 1/2", "Epoch 2/2"]
    assert any(text.startswith("validated: 36 files") for text in said["validate-data"])
    assert len(out.splitlines()) <= 2 * len(steps) + 8
    # Everything each step printed is in its log, beside its artifacts.
    for step in (step for step in summary["steps"] if step["name"] != "deploy-model"):
        assert step["status"] == "succeeded" and step["log"] == os.path.join(step["task_dir"], layout.STEP_LOG_FILE)
        log = open(step["log"], encoding="utf-8").read()
        assert "Got executor_input" in log and "finished with status SUCCESS" in log
    assert "40/40" not in out and "Epoch 1/2" in open(summary["steps"][3]["log"], encoding="utf-8").read()
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["classes"] == ["circles", "squares", "stripes"]
    assert sum(summary["counts"].values()) + summary["rejected"] + summary["skipped"] == summary["listed"] == 36
    assert summary["eval_metric"] == "accuracy" and 0.0 <= summary["eval_value"] <= 1.0
    model_dir = summary["model_path"]
    for name in ("model.keras", "class_label_to_prediction_index.json", "hyperparameters.yaml", "history.json"):
        assert os.path.getsize(os.path.join(model_dir, name)) > 0, name
    assert os.path.isdir(os.path.join(model_dir, "saved_model"))
    shown = _evaluate_outputs(tmp_path / "run")
    matrix = shown["confusion_matrix"]["confusionMatrix"]
    assert [spec["displayName"] for spec in matrix["annotationSpecs"]] == summary["classes"]
    assert sum(sum(row["row"]) for row in matrix["rows"]) == summary["counts"]["test"]
    assert "confidenceMetrics" not in shown["confusion_matrix"]  # a ROC curve only in binary mode
    # No threshold and no baseline: blessed, pushed as the registry's first version, and used for batch prediction.
    assert summary["blessed"] is True, summary["blessing"]
    version = registry / "000001"
    pushed = json.loads((version / "blessing.json").read_text())
    assert pushed["blessed"] is True
    # Infra validation: the gate served the model on loopback and every contract answered as it predicts.
    assert "infra validation passed" in summary["blessing"] and pushed["infra_validation"]["passed"] is True
    assert pushed["infra_validation"]["max_abs_diff"] <= 1e-5
    # The version is the SavedModel (a TF Serving base path's version), with the model folder's files beside it.
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    assert (version / "class_label_to_prediction_index.json").is_file()
    [predictions] = list((tmp_path / "run" / "artifacts").glob("*/batch-predict/predictions"))
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 36 and all(abs(sum(line["probabilities"]) - 1) < 1e-5 for line in lines)
    # Every artifact of every step holds something.
    artifacts = tmp_path / "run" / "artifacts"
    for step_dir in artifacts.glob("*/*"):
        for output in step_dir.iterdir():
            assert _non_empty_files(output) or output.stat().st_size > 0, output
    # The evaluation's HTML report (gallery with heat maps, calibration, model card) and the TFLite file.
    assert os.path.getsize(os.path.join(model_dir, "model.tflite")) > 0
    [page] = list(artifacts.glob("*/evaluate/evaluation_report"))
    text = page.read_text()
    assert "Grad-CAM of test image" in text and "reliability diagram" in text and "# Model card" in text
    [card] = list(artifacts.glob("*/evaluate/model_card"))
    assert "## Known weak classes" in card.read_text()


def _indistinguishable_classes(root, per_class=10):
    """Two classes whose images differ only on even pixel rows and columns, which a nearest-neighbour
    resize from 64 to 32 px never samples: the model sees the same picture in both classes, so no
    model can be right on every test image."""
    from PIL import Image

    for label, offset in (("left", 0), ("right", 100)):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.full((64, 64), 128, np.uint8)
            pixels[0::2, 0::2] = (offset + index * 7) % 256  # makes every file's bytes unique
            Image.fromarray(pixels).save(root / label / f"{index}.png")


def test_model_below_the_threshold_is_not_pushed_and_the_run_stays_green(tmp_path):
    data = tmp_path / "data"
    _indistinguishable_classes(data)
    registry = tmp_path / "registry"
    hp = Hyperparameters(**{**FAST, "epochs": 1, "image_resize_interpolation": "nearest"})
    summary = run_local(str(data), str(tmp_path / "run"), hp,
                        pipeline_args={"model_registry_uri": str(registry), "min_eval_value": 0.9})
    assert summary["status"] == "succeeded", summary
    assert summary["eval_value"] <= 0.75
    assert summary["blessed"] is False
    assert summary["blessing"].startswith("not blessed: accuracy ") and "< threshold 0.9" in summary["blessing"]
    assert not any(registry.glob("0*/blessing.json"))
    assert not list((tmp_path / "run" / "artifacts").glob("*/push-model"))


def test_binary_mode_with_auc(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"cats": 12, "dogs": 12}, size=(40, 40))
    hp = Hyperparameters(**FAST, binary_mode=True, eval_metric="auc")
    summary = run_local(str(data), str(tmp_path / "run"), hp)
    assert summary["status"] == "succeeded", summary
    assert summary["eval_metric"] == "auc"
    assert {"accuracy", "auc", "precision", "recall", "prc"} <= set(summary["metrics"])
    shown = _evaluate_outputs(tmp_path / "run")
    assert [spec["displayName"] for spec in shown["confusion_matrix"]["confusionMatrix"]["annotationSpecs"]] == [
        "cats", "dogs"]
    roc = shown["confusion_matrix"]["confidenceMetrics"]
    assert roc and {"falsePositiveRate", "recall", "confidenceThreshold"} <= set(roc[0])
    assert shown["metrics"]["auc"] == summary["eval_value"]


def test_failed_step_is_named_with_its_reason_the_tail_of_its_log_and_the_log(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"only_class": 6}, size=(32, 32))
    code = imgclf(["run-local", "--data", str(data), "--output", str(tmp_path / "run"),
                   "--set", "model=small_cnn", "--set", "weights=none", "--set", "epochs=1"])
    assert code == 1
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == "validate-data"
    assert summary["error"].startswith("trainer.errors.DataError: the data set at ")
    assert "only one class folder ('only_class')" in summary["error"]
    # The terminal: the step lines (validation retried as on a cluster, the later steps skipped), then the
    # step, its reason, the last lines of its log and, last, the log's path.
    said = _steps_printed(captured.out.split("\n", 1)[1])  # after the one line that says where the logs go
    assert said["validate-data"][-1].startswith("failed after ")
    assert said["convert-to-tfrecords"] == ["skipped: an earlier step failed"]
    err = captured.err.strip().splitlines()
    assert err[0] == f"pipeline failed in step 'validate-data' after {summary['pipeline_seconds']:.0f} s"
    assert err[err.index(f"reason: {summary['error'].splitlines()[0]}") + 1].strip().startswith("- only one class")
    tail = [line for line in err if line.startswith("  | ")]
    assert 5 <= len(tail) <= 20 and tail[-1] == "  | " + summary["error"].splitlines()[-1]
    assert err[-1] == f"log: {summary['failed_log']}"
    log = open(summary["failed_log"], encoding="utf-8").read()
    assert summary["failed_log"].endswith(f"/validate-data/{layout.STEP_LOG_FILE}") and "Got executor_input" in log
    assert log.count("only one class folder") >= 3  # every attempt's output, appended
    assert os.path.exists(summary["run_page"])


def test_bad_hyperparameters_stop_before_anything_runs(tmp_path, capsys):
    code = imgclf(["run-local", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                   "--set", "learning_rte=0.1"])
    assert code == 2
    assert "learning_rte: unknown pipeline parameter; did you mean 'learning_rate'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
