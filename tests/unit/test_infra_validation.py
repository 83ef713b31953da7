"""Infra validation in the quality gate: the model served on loopback must answer every contract as it predicts
in-process; a model with a broken serving signature or NaN outputs is not blessed, and so never pushed."""

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.support.datasets import make_image_folder
from tests.support.serving import break_signature, small_model_dir
from trainer import conversion, registry, validation
from trainer.errors import ModelError
from trainer.layout import BLESSING_FILE, INFRA_VALIDATION_LOG, SAVED_MODEL_DIR

LABELS = ["cats", "dogs", "fish"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("infra")
    make_image_folder(root / "images", {label: 4 for label in LABELS}, size=(24, 24), fmt="png")
    validation.validate_dataset(str(root / "images"), str(root / "validation"))
    conversion.convert_dataset(str(root / "images"), str(root / "validation" / "validation.json"),
                               str(root / "dataset"), validation_split_ratio=0.0, test_split_ratio=0.5,
                               random_seed=0)
    return str(root / "dataset")


def gate(dataset, model_dir, output_dir):
    return registry.decide_blessing("accuracy", 0.5, dataset_dir=dataset, model_uri=model_dir,
                                    output_dir=str(output_dir), model_dir=model_dir)


def test_a_servable_model_is_blessed_with_its_infra_validation(dataset, tmp_path):
    model_dir = small_model_dir(tmp_path / "model", LABELS)
    decision = gate(dataset, model_dir, tmp_path / "blessing")
    infra = decision["infra_validation"]
    assert decision["blessed"] is True, decision["reason"]
    assert "; infra validation passed: 6 test images answered alike in tf-serving-v1, sagemaker, " \
           "open-inference-v2" in decision["reason"]
    assert infra["passed"] and infra["images"] == 6 and 0 <= infra["max_abs_diff"] <= 1e-5
    assert set(infra["contracts"]) == {"tf-serving-v1", "sagemaker", "open-inference-v2"}
    assert json.loads((tmp_path / "blessing" / BLESSING_FILE).read_text())["infra_validation"] == infra
    assert "Serving" in (tmp_path / "blessing" / INFRA_VALIDATION_LOG).read_text()


@pytest.mark.parametrize("defect, reason", [
    ("broken signature", r"not blessed: infra validation failed: the model server exited with status 1 before it "
                         r"was ready: .*the 'serving_default' signature takes 'pixels'"),
    ("NaN outputs", r"not blessed: infra validation failed: the model's own probabilities are not finite"),
    ("SavedModel of another model", r"not blessed: infra validation failed: tf-serving-v1: the server's "
                                    r"probabilities differ from the model's by up to [0-9.e-]+ \(tolerance 1e-05\)"),
])
def test_a_model_that_cannot_serve_is_not_blessed_and_not_pushed(dataset, tmp_path, defect, reason):
    model_dir = small_model_dir(tmp_path / "model", LABELS, nan_head=defect == "NaN outputs")
    if defect == "broken signature":
        break_signature(model_dir)
    if defect == "SavedModel of another model":
        other = small_model_dir(tmp_path / "other", LABELS, seed=1)
        shutil.rmtree(Path(model_dir, SAVED_MODEL_DIR))
        shutil.copytree(Path(other, SAVED_MODEL_DIR), Path(model_dir, SAVED_MODEL_DIR))
    decision = gate(dataset, model_dir, tmp_path / "blessing")
    assert decision["blessed"] is False
    assert decision["infra_validation"]["passed"] is False
    assert pytest.approx(0.5) == decision["eval_value"]
    assert re.match(reason, decision["reason"]), decision["reason"]
    with pytest.raises(ModelError, match="refusing to push"):
        registry.push_model(model_dir, str(tmp_path / "registry"), metadata=decision)
    assert not Path(tmp_path / "registry").exists()
