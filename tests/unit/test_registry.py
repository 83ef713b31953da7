"""trainer.registry: the quality gate both ways (threshold, baseline), and pushes that never overwrite a version."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from kfp import dsl

from components.gate import bless_model
from components.push_model import push_model as push_component
from pipelines.cli import main as imgclf
from tests.support.datasets import make_image_folder
from tests.support.gcs import emulator_client, upload_folder
from trainer import conversion, data, evaluation, export, registry, storage, validation
from trainer import model as model_lib
from trainer.errors import HyperparameterError, ModelError, StorageError
from trainer.hyperparameters import Hyperparameters

SIZE = 16
CLASSES = {"cats": 6, "dogs": 4}  # Test split (ratio 0.5): more cats than dogs, so the two constant models differ.
MODEL_FILES = ["class_label_to_prediction_index.json", "history.json", "hyperparameters.yaml", "model.keras",
               "model.tflite",
               "saved_model/fingerprint.pb", "saved_model/saved_model.pb",
               "saved_model/variables/variables.data-00000-of-00001", "saved_model/variables/variables.index"]


def constant_model_dir(path, labels, favourite):
    """A real small_cnn model folder (as training exports it) that predicts ``favourite`` for every image.

    With a zero kernel the head's softmax depends only on its bias, so the model's accuracy on any
    split is exactly the share of ``favourite`` there: known values to gate on, without training.
    """
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, augmentation=False)
    model = model_lib.build_model(hp, len(labels))
    dense = model_lib.head_dense(model)
    kernel, bias = dense.get_weights()
    bias[:] = -4.0
    bias[labels.index(favourite)] = 4.0
    dense.set_weights([np.zeros_like(kernel), bias])
    export.export_model(model, str(path), hp=hp, label_map={label: i for i, label in enumerate(labels)},
                        history={"loss": [0.7, 0.6], "accuracy": [0.5, 0.6]})
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A converted data set and constant models: cats-only, dogs-only, and one trained on other classes."""
    root = tmp_path_factory.mktemp("registry")
    make_image_folder(root / "images", CLASSES, size=(24, 24), fmt="png")
    validation.validate_dataset(str(root / "images"), str(root / "validation"))
    dataset = str(root / "dataset")
    conversion.convert_dataset(str(root / "images"), str(root / "validation" / "validation.json"), dataset,
                               validation_split_ratio=0.0, test_split_ratio=0.5, random_seed=0)
    labels = np.array([int(label) for _, label in data.read_split(dataset, "test", image_size=SIZE,
                                                                  interpolation="bilinear")])
    cats_share = float(np.mean(labels == 0))
    assert 0.5 < cats_share < 1.0, "the test split must be unbalanced for the two models to differ"
    return {
        "dataset": dataset,
        "cats": constant_model_dir(root / "cats", ["cats", "dogs"], "cats"),
        "dogs": constant_model_dir(root / "dogs", ["cats", "dogs"], "dogs"),
        "fish": constant_model_dir(root / "fish", ["cats", "fish"], "cats"),
        "cats_share": cats_share,
    }


def run_value(world, model, tmp_path):
    """The run's eval_value as the evaluation step computes it."""
    return evaluation.evaluate(world[model], world["dataset"], str(tmp_path / f"eval-{model}"))["eval_value"]


def tree(root):
    """{relative path: bytes} of every file below a local folder."""
    return {name: (root / name).read_bytes() for name in storage.list_files(str(root))}


# --- blessing --------------------------------------------------------------------------------------------


def test_no_gate_blesses_any_model(world):
    decision = registry.decide_blessing("accuracy", 0.25, dataset_dir=world["dataset"])
    assert decision == {
        "blessed": True, "reason": "blessed: accuracy 0.2500; no quality gate (min_eval_value 0, no baseline)",
        "eval_metric": "accuracy", "eval_value": 0.25, "min_eval_value": 0.0, "baseline_model_uri": None,
        "baseline_value": None, "model_uri": None, "split": "test"}


@pytest.mark.parametrize(("value", "threshold", "blessed", "reason"), [
    (0.91, 0.95, False, "not blessed: accuracy 0.9100 < threshold 0.9500"),
    (0.95, 0.95, True, "blessed: accuracy 0.9500 >= threshold 0.9500"),
    (0.97, 0.95, True, "blessed: accuracy 0.9700 >= threshold 0.9500"),
    # Four decimals would print "0.9333 < 0.9333"; the reason shows the digits that differ.
    (0.93333, 0.93334, False, "not blessed: accuracy 0.93333 < threshold 0.93334"),
])
def test_threshold_blesses_only_a_model_that_reaches_it(world, value, threshold, blessed, reason):
    decision = registry.decide_blessing("accuracy", value, min_eval_value=threshold, dataset_dir=world["dataset"])
    assert (decision["blessed"], decision["reason"]) == (blessed, reason)


def test_a_baseline_that_is_worse_blesses(world, tmp_path):
    value = run_value(world, "cats", tmp_path)
    assert value == pytest.approx(world["cats_share"])
    decision = registry.decide_blessing("accuracy", value, min_eval_value=0.5, baseline_model_uri=world["dogs"],
                                        dataset_dir=world["dataset"], output_dir=str(tmp_path / "blessing"))

    dogs_share = 1.0 - world["cats_share"]
    assert decision["blessed"] is True
    assert decision["baseline_value"] == pytest.approx(dogs_share)
    assert decision["reason"] == (f"blessed: accuracy {value:.4f} >= threshold 0.5000 and >= baseline "
                                  f"{dogs_share:.4f} ({world['dogs']})")
    # The decision and the baseline's own evaluation are kept for the pipeline's UI.
    assert json.loads((tmp_path / "blessing" / "blessing.json").read_text()) == decision
    baseline_eval = json.loads((tmp_path / "blessing" / "baseline" / "evaluation.json").read_text())
    assert baseline_eval["eval_value"] == decision["baseline_value"]


def test_a_baseline_that_is_better_does_not_bless(world, tmp_path):
    value = run_value(world, "dogs", tmp_path)
    decision = registry.decide_blessing("accuracy", value, min_eval_value=0.1, baseline_model_uri=world["cats"],
                                        dataset_dir=world["dataset"])
    assert decision["blessed"] is False
    assert decision["baseline_value"] == pytest.approx(world["cats_share"])
    # Only the comparison that failed is named: the threshold was met.
    assert decision["reason"] == (f"not blessed: accuracy {value:.4f} < baseline {world['cats_share']:.4f} "
                                  f"({world['cats']})")


def test_failing_threshold_and_baseline_are_both_named(world):
    decision = registry.decide_blessing("accuracy", 0.3, min_eval_value=0.9, baseline_model_uri=world["cats"],
                                        dataset_dir=world["dataset"])
    assert decision["reason"] == (f"not blessed: accuracy 0.3000 < threshold 0.9000 and < baseline "
                                  f"{world['cats_share']:.4f} ({world['cats']})")


def test_a_model_as_good_as_the_baseline_is_blessed(world, tmp_path):
    value = run_value(world, "cats", tmp_path)
    decision = registry.decide_blessing("accuracy", value, baseline_model_uri=world["cats"],
                                        dataset_dir=world["dataset"])
    assert decision["baseline_value"] == value
    assert decision["blessed"] is True


def test_a_baseline_with_other_classes_is_refused(world):
    with pytest.raises(ModelError) as caught:
        registry.decide_blessing("accuracy", 0.8, baseline_model_uri=world["fish"], dataset_dir=world["dataset"])
    message = str(caught.value)
    assert f"the baseline model {world['fish']} cannot be compared with this run" in message
    assert "predicts the classes [cats, fish]" in message and "has [cats, dogs]" in message
    assert "(it lacks [dogs] and it has [fish] besides)" in message
    assert "or to '' to gate on min_eval_value alone" in message


def test_a_missing_baseline_says_which_setting_to_fix(world, tmp_path):
    with pytest.raises(ModelError, match=r"baseline model: .*set baseline_model_uri to an imgclf model folder"):
        registry.decide_blessing("accuracy", 0.8, baseline_model_uri=str(tmp_path / "nowhere"),
                                 dataset_dir=world["dataset"])


def test_invalid_gate_settings_are_named(world):
    with pytest.raises(HyperparameterError) as caught:
        registry.decide_blessing("f1", 0.8, min_eval_value=95, dataset_dir=world["dataset"])
    assert caught.value.problems == [
        "eval_metric: got 'f1', expected one of accuracy, precision, recall, auc, prc",
        "min_eval_value: got 95, expected a number in [0, 1] (every eval_metric is a share; 0 turns the "
        "threshold off)"]


# --- pushing ----------------------------------------------------------------------------------------------


def test_blessed_model_is_pushed_and_an_unblessed_one_is_not(world, tmp_path):
    registry_dir = tmp_path / "registry"
    blessed = registry.decide_blessing("accuracy", 0.96, min_eval_value=0.95, dataset_dir=world["dataset"],
                                       model_uri="gs://runs/1/model")
    uri = registry.push_model(world["cats"], str(registry_dir), metadata=blessed)

    assert uri == str(registry_dir / "000001")
    version = tree(registry_dir / "000001")
    assert sorted(version) == sorted(MODEL_FILES + ["blessing.json"])
    assert {name: version[name] for name in MODEL_FILES} == tree(Path(world["cats"]))
    record = json.loads(version["blessing.json"])
    assert record["reason"] == "blessed: accuracy 0.9600 >= threshold 0.9500"
    assert (record["version"], record["version_uri"], record["model_uri"]) == ("000001", uri, "gs://runs/1/model")
    assert record["pushed_at"].endswith("+00:00")

    not_blessed = registry.decide_blessing("accuracy", 0.91, min_eval_value=0.95, dataset_dir=world["dataset"])
    before = tree(registry_dir)
    with pytest.raises(ModelError, match=r"refusing to push .*: not blessed: accuracy 0\.9100 < threshold 0\.9500"):
        registry.push_model(world["cats"], str(registry_dir), metadata=not_blessed)
    assert tree(registry_dir) == before


def test_the_pipeline_components_gate_then_push(world, tmp_path):
    """The steps as the pipeline wires them: bless_model, then push_model only when blessed."""
    def gate(value, name):
        blessing = dsl.Artifact(uri=str(tmp_path / name))
        blessed = bless_model.python_func(
            trained_model=dsl.Model(uri=world["cats"]), dataset=dsl.Dataset(uri=world["dataset"]),
            eval_metric="accuracy", eval_value=value, min_eval_value=0.5, baseline_model_uri=world["dogs"],
            blessing=blessing)
        return blessed, blessing.metadata["reason"], blessing

    registry_dir = str(tmp_path / "registry")
    blessed, reason, blessing = gate(0.7, "good")
    assert blessed is True and reason.startswith("blessed: accuracy 0.7000 >= threshold 0.5000 and >= baseline")
    assert blessing.metadata["baseline_value"] == pytest.approx(1 - world["cats_share"])
    uri = push_component.python_func(trained_model=dsl.Model(uri=world["cats"]), registry_uri=registry_dir,
                                     blessing=blessing)
    assert uri == os.path.join(registry_dir, "000001")
    assert json.loads(Path(uri, "blessing.json").read_text())["reason"] == reason

    blessed, reason, blessing = gate(0.3, "bad")
    assert blessed is False and reason.startswith("not blessed: accuracy 0.3000 < threshold 0.5000")
    # The pipeline skips the push; a push that runs anyway (mis-wired) refuses.
    with pytest.raises(ModelError, match="refusing to push"):
        push_component.python_func(trained_model=dsl.Model(uri=world["cats"]), registry_uri=registry_dir,
                                   blessing=blessing)
    assert sorted(os.listdir(registry_dir)) == [".claims", "000001"]


def test_versions_follow_the_highest_and_never_overwrite(world, tmp_path):
    registry_dir = tmp_path / "registry"
    (registry_dir / "000007").mkdir(parents=True)
    (registry_dir / "000007" / "model.keras").write_bytes(b"version 7")
    (registry_dir / "3").mkdir()
    (registry_dir / "3" / "model.keras").write_bytes(b"version 3, unpadded")
    (registry_dir / "latest").mkdir()  # Not a version: ignored, and left alone.
    (registry_dir / "latest" / "VERSION").write_text("7")
    (registry_dir / "99").write_text("a file, not a version folder")
    before = tree(registry_dir)

    first = registry.push_model(world["cats"], str(registry_dir), metadata={})
    second = registry.push_model(world["dogs"], str(registry_dir), metadata={})

    assert (first, second) == (str(registry_dir / "000008"), str(registry_dir / "000009"))
    after = tree(registry_dir)
    assert {name: after[name] for name in before} == before
    assert after["000008/model.keras"] != after["000009/model.keras"]


def test_pushing_the_newest_versions_model_again_writes_nothing(world, tmp_path):
    """A scheduled run reused from the cache (or a retried push) hands the push the model it pushed last time."""
    registry_dir = tmp_path / "registry"
    first = registry.push_model(world["cats"], str(registry_dir), metadata={"model_uri": "gs://runs/1/model"})
    before = tree(registry_dir)
    again = registry.push_model(world["cats"], str(registry_dir), metadata={"model_uri": "gs://runs/1/model"})
    assert again == first and tree(registry_dir) == before
    # Another model in between: the first one is no longer what the registry serves, so it is pushed anew.
    other = registry.push_model(world["dogs"], str(registry_dir), metadata={"model_uri": "gs://runs/2/model"})
    back = registry.push_model(world["cats"], str(registry_dir), metadata={"model_uri": "gs://runs/1/model"})
    assert [Path(uri).name for uri in (first, other, back)] == ["000001", "000002", "000003"]
    # An interrupted push (no blessing.json yet) of the newest number does not count as pushed.
    (registry_dir / "000004").mkdir()
    (registry_dir / "000004" / "model.keras").write_bytes(b"half a push")
    assert Path(registry.push_model(world["cats"], str(registry_dir),
                                    metadata={"model_uri": "gs://runs/1/model"})).name == "000003"


@pytest.mark.parametrize("rival", ["000001/model.keras", ".claims/000001/rival", ".claims/000001"])
def test_a_version_taken_while_pushing_is_skipped(world, tmp_path, monkeypatch, rival):
    """Another push takes version 1 between this push's listing and its reservation."""
    registry_dir = tmp_path / "registry"
    write = storage.write_bytes
    raced = []

    create = storage.create_if_absent

    def racing_create(uri, payload):
        if uri.endswith("/.claims/000001") and not raced:
            raced.append(uri)
            write(str(registry_dir / rival), b"the other push")
        return create(uri, payload)

    monkeypatch.setattr(storage, "create_if_absent", racing_create)
    uri = registry.push_model(world["cats"], str(registry_dir), metadata={})

    assert raced and uri == str(registry_dir / "000002")
    assert (registry_dir / rival).read_bytes() == b"the other push"
    assert not (registry_dir / "000001" / "blessing.json").exists()


def test_an_incomplete_model_folder_is_not_pushed(world, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.keras").write_bytes(Path(world["cats"], "model.keras").read_bytes())
    with pytest.raises(ModelError, match=r"not a complete imgclf model folder: class_label_to_prediction_index"
                                         r"\.json, hyperparameters\.yaml, saved_model/saved_model\.pb missing"):
        registry.push_model(str(model_dir), str(tmp_path / "registry"), metadata={})
    assert not (tmp_path / "registry").exists()  # No version number was used up.


def test_push_from_the_command_line(world, tmp_path, capsys):
    registry_dir = tmp_path / "new" / "registry"
    assert imgclf(["push", "--model", world["cats"], "--registry", str(registry_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(registry_dir / "000001")
    record = json.loads((registry_dir / "000001" / "blessing.json").read_text())
    assert "blessed" not in record and "no quality gate was applied" in record["reason"]


def test_push_to_gcs_and_use_a_version_as_the_next_baseline(world, gcs_bucket, tmp_path):
    source = upload_folder(world["cats"], gcs_bucket, "runs/1/model")
    registry_uri = f"gs://{gcs_bucket}/models/pets"  # Nothing there yet: the first push creates it.
    decision = registry.decide_blessing("accuracy", 0.9, dataset_dir=world["dataset"], model_uri=source)

    first = registry.push_model(source, registry_uri, metadata=decision)  # gs:// to gs://
    second = registry.push_model(world["dogs"], registry_uri, metadata={})  # local to gs://

    assert (first, second) == (f"{registry_uri}/000001", f"{registry_uri}/000002")
    names = {blob.name for blob in emulator_client().list_blobs(gcs_bucket, prefix="models/pets/000001/")}
    assert names == {f"models/pets/000001/{name}" for name in MODEL_FILES + ["blessing.json"]}
    assert storage.read_bytes(f"{first}/model.keras") == Path(world["cats"], "model.keras").read_bytes()
    assert json.loads(storage.read_bytes(f"{first}/blessing.json"))["model_uri"] == source

    # A registry version is a complete model folder: the next run can gate on it.
    value = run_value(world, "cats", tmp_path)
    gated = registry.decide_blessing("accuracy", value, baseline_model_uri=first, dataset_dir=world["dataset"])
    assert gated["blessed"] is True and gated["baseline_value"] == value


def test_push_to_a_missing_bucket_says_so(world, gcs_emulator):
    with pytest.raises(StorageError, match=r"bucket 'imgclf-no-such-bucket' does not exist .*create it or fix"):
        registry.push_model(world["cats"], "gs://imgclf-no-such-bucket/models", metadata={})


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_concurrent_pushes_get_distinct_versions(world, tmp_path, monkeypatch, request, where):
    """Two blessed runs push to one registry at the same moment: both listings see the same registry."""
    import contextlib
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if where == "gcs":
        request.getfixturevalue("gcs_proxy")  # GCS's create-only-if-absent precondition (the emulator lacks it)
        registry_uri = f"gs://{request.getfixturevalue('gcs_bucket')}/models"
    else:
        registry_uri = str(tmp_path / "registry")
    list_files = storage.list_files
    together = threading.Barrier(2, timeout=5)

    def list_in_step(root):
        if root == registry_uri:  # both pushes look at the registry at the same moment, every time
            with contextlib.suppress(threading.BrokenBarrierError):  # unless the other one is done
                together.wait()
        return list_files(root)

    monkeypatch.setattr(storage, "list_files", list_in_step)
    with ThreadPoolExecutor(2) as pool:
        pushes = [pool.submit(registry.push_model, world[name], registry_uri, metadata={"reason": name})
                  for name in ("cats", "dogs")]
        uris = [push.result() for push in pushes]
    monkeypatch.setattr(storage, "list_files", list_files)

    assert sorted(uris) == [storage.join(registry_uri, "000001"), storage.join(registry_uri, "000002")]
    for uri, name in zip(uris, ("cats", "dogs"), strict=True):
        assert json.loads(storage.read_bytes(storage.join(uri, "blessing.json")))["reason"] == name
        assert storage.read_bytes(storage.join(uri, "model.keras")) == Path(world[name], "model.keras").read_bytes()


def test_a_claim_whose_reply_was_lost_keeps_its_version(gcs_bucket, gcs_proxy):
    """The proxy stands in for GCS: it applies ifGenerationMatch=0 and loses the reply to the first claim
    upload, so the library's retry meets 412 against the claim that landed. The push keeps version 1."""
    registry_uri = f"gs://{gcs_bucket}/registry"
    gcs_proxy.inject("POST", r"^/upload/", "lost", times=1)
    claim = b'{"model_uri": "gs://runs/1/model", "claim_id": "a1"}'
    assert registry._claim_version(registry_uri, claim, []) == "000001"
    assert len(gcs_proxy.seen("POST", r"^/upload/")) == 2
    # A rival's claim on the same number is still a rival's: the next push takes version 2.
    assert registry._claim_version(registry_uri, claim.replace(b"a1", b"b2"), []) == "000002"
