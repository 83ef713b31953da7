"""`imgclf predict` and `imgclf batch-predict`: the reference JSON answers, printed and written."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main as imgclf
from tests.support.datasets import make_image_folder
from trainer.hyperparameters import Hyperparameters
from trainer.serve import prediction
from trainer.train import export
from trainer.train import model as model_lib

SIZE = 16
LABELS = ["daisy", "roses", "tulips"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real exported small_cnn model folder (random weights: the answers only need to be well-formed)."""
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, random_seed=3)
    model = model_lib.build_model(hp, len(LABELS))
    path = tmp_path_factory.mktemp("model") / "model"
    export.export_model(model, str(path), hp=hp, label_map={label: i for i, label in enumerate(LABELS)},
                        history={"loss": [1.0]})
    return str(path)


@pytest.fixture
def images(tmp_path):
    """Images in sub-folders (jpg and png), a broken jpg, and a file of another type."""
    root = tmp_path / "images"
    make_image_folder(root / "2024-06-01", {"daisy": 2, "tulips": 1}, size=(40, 30), fmt="jpg")
    make_image_folder(root, {"roses": 2}, size=(20, 32), fmt="png", seed=1)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def check_answer(answer, verbose):
    assert set(answer) == ({"probabilities", "labels", "predicted_label"} if verbose else {"probabilities"})
    probabilities = answer["probabilities"]
    assert len(probabilities) == len(LABELS) and all(type(p) is float and 0.0 <= p <= 1.0 for p in probabilities)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    if verbose:
        assert answer["labels"] == LABELS
        assert answer["predicted_label"] == LABELS[int(np.argmax(probabilities))]


def test_batch_predict_writes_one_verbose_line_per_image(model_dir, images, tmp_path, capsys):
    output = tmp_path / "out" / "predictions.jsonl"
    assert imgclf(["batch-predict", "--model", model_dir, "--data", str(images), "--output", str(output)]) == 0

    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"images": 6, "predicted": 5, "errors": 1, "skipped": 1,
                                        "output": str(output)}
    assert "1 of 6 images could not be read" in captured.err
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["file"] for line in lines] == [
        "2024-06-01/daisy/daisy_000.jpg", "2024-06-01/daisy/daisy_001.jpg", "2024-06-01/tulips/tulips_000.jpg",
        "broken.jpg", "roses/roses_000.png", "roses/roses_001.png"]
    broken = lines.pop(3)
    assert set(broken) == {"file", "error"} and "broken.jpg" in broken["error"]
    for line in lines:
        check_answer({key: value for key, value in line.items() if key != "file"}, verbose=True)

    # The same images through `imgclf predict --verbose` get the same answers.
    paths = [str(images / line["file"]) for line in lines]
    assert imgclf(["predict", "--verbose", "--model", model_dir, *paths]) == 0
    printed = [json.loads(row) for row in capsys.readouterr().out.splitlines()]
    for answer, line in zip(printed, lines, strict=True):
        assert answer["predicted_label"] == line["predicted_label"]
        assert answer["probabilities"] == pytest.approx(line["probabilities"], abs=1e-6)


def test_predict_prints_the_reference_answer_and_matches_the_served_model(model_dir, images, capsys):
    paths = [images / "2024-06-01" / "daisy" / "daisy_000.jpg", images / "roses" / "roses_001.png"]
    assert imgclf(["predict", "--model", model_dir, *map(str, paths)]) == 0
    answers = [json.loads(row) for row in capsys.readouterr().out.splitlines()]
    assert len(answers) == 2
    for answer in answers:
        check_answer(answer, verbose=False)
    # What KServe / TF Serving answers for the same bytes (the saved_model/ signature) is the same.
    served = prediction.serve_saved_model(model_dir, [Path(path).read_bytes() for path in paths])
    np.testing.assert_allclose(served, [answer["probabilities"] for answer in answers], atol=1e-5)


def test_batch_predict_without_images_fails_and_says_why(model_dir, tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    output = tmp_path / "predictions.jsonl"
    assert imgclf(["batch-predict", "--model", model_dir, "--data", str(empty), "--output", str(output)]) == 1
    assert "no .jpg, .jpeg or .png files found" in capsys.readouterr().err
    assert not output.exists()
