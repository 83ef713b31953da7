"""trainer.serve.registry: the quality gate both ways (threshold, baseline); pushes never overwrite a version."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from kfp import dsl
from PIL import Image

from components.gate import bless_model
from components.push_model import push_model as push_component
from pipelines.cli import main as imgclf
from tests.support.datasets import make_image_folder
from tests.support.gcs import emulator_client, upload_folder
from trainer import layout, storage
from trainer.data import conversion, reader, validation
from trainer.errors import HyperparameterError, ModelError, StorageError
from trainer.evaluate import evaluation
from trainer.hyperparameters import Hyperparameters
from trainer.serve import prediction, registry
from trainer.train import export, training
from trainer.train import model as model_lib

SIZE = 16
CLASSES = {"cats": 6, "dogs": 4}  # Test split (ratio 0.5): more cats than dogs, so the two constant models differ.
MODEL_FILES = ["class_label_to_prediction_index.json", "history.json", "hyperparameters.yaml", "model.keras",
               "model.tflite",
               "saved_model/fingerprint.pb", "saved_model/saved_model.pb",
               "saved_model/variables/variables.data-00000-of-00001", "saved_model/variables/variables.index"]
# A version holds the same files, its SavedModel at the top (a TF Serving model base path's version).
VERSION_OF = {name: name.removeprefix("saved_model/") for name in MODEL_FILES}
SAVED_MODEL_FILES = ["fingerprint.pb", "variables/variables.data-00000-of-00001", "variables/variables.index"]


def constant_model_dir(path, labels, favourite, *, binary=False, bias_value=4.0):
    """A real small_cnn model folder (as training exports it) that predicts ``favourite`` for every image.

    With a zero kernel the head's softmax depends only on its bias, so the model's accuracy on any
    split is exactly the share of ``favourite`` there: known values to gate on, without training.
    In binary mode every image gets the same score, sigmoid(``bias_value``) (NaN for a NaN bias).
    """
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, augmentation=False,
                         binary_mode=binary, eval_metric="auc" if binary else "accuracy")
    model = model_lib.build_model(hp, len(labels))
    dense = model_lib.head_dense(model)
    kernel, bias = dense.get_weights()
    if binary:
        bias[:] = bias_value
    else:
        bias[:] = -bias_value
        bias[labels.index(favourite)] = bias_value
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
    labels = np.array([int(label) for _, label in reader.read_split(dataset, "test", image_size=SIZE,
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
    assert sorted(version) == sorted([*VERSION_OF.values(), "blessing.json"])
    assert {name: version[VERSION_OF[name]] for name in MODEL_FILES} == tree(Path(world["cats"]))
    record = json.loads(version["blessing.json"])
    assert record["reason"] == "blessed: accuracy 0.9600 >= threshold 0.9500"
    assert (record["version"], record["version_uri"], record["model_uri"]) == ("000001", uri, "gs://runs/1/model")
    assert record["pushed_at"].endswith("+00:00")
    assert record["model_digest"] == registry.model_digest(world["cats"]) == registry.model_digest(uri)

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

    # The path a TF Serving model base path implies: <registry>/<version>/saved_model.pb, as it is.
    signature = tf.saved_model.load(uri).signatures[export.SERVING_SIGNATURE]
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image)
    served = signature(**{export.SERVING_INPUT: tf.constant([image.read_bytes()])})[export.SERVING_OUTPUT].numpy()
    [answer] = prediction.predict(uri, [str(image)])
    np.testing.assert_allclose(served[0], answer["probabilities"], atol=1e-5)


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
    assert names == {f"models/pets/000001/{name}" for name in [*VERSION_OF.values(), "blessing.json"]}
    assert storage.read_bytes(f"{first}/model.keras") == Path(world["cats"], "model.keras").read_bytes()
    assert json.loads(storage.read_bytes(f"{first}/blessing.json"))["model_uri"] == source

    # A registry version is a complete model folder: the next run can gate on it.
    value = run_value(world, "cats", tmp_path)
    gated = registry.decide_blessing("accuracy", value, baseline_model_uri=first, dataset_dir=world["dataset"])
    assert gated["blessed"] is True and gated["baseline_value"] == value

    # The digest from the listing's MD5s is the one computed from the local files.
    assert registry.model_digest(first) == registry.model_digest(world["cats"]) == registry.model_digest(source)
    # A version whose push stopped before its blessing.json is refused on gs:// too.
    assert layout.is_registry_version(second) and not layout.is_registry_version(source)
    storage.delete(f"{second}/blessing.json")
    with pytest.raises(ModelError, match=r"000002 is a registry version without blessing\.json"):
        prediction.read_labels(second)


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


# --- a version is a model base path, written in an order a watching server can follow ---------------------


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_version_is_written_saved_model_first_and_blessing_last(world, tmp_path, monkeypatch, request, where):
    """TF Serving loads a version once its saved_model.pb is there (tensorflow_serving's file-system storage
    path source polls the base path), so every other SavedModel file must land before it."""
    registry_uri = (str(tmp_path / "registry") if where == "local"
                    else f"gs://{request.getfixturevalue('gcs_bucket')}/registry")
    written = []
    upload_file, write_bytes = storage.upload_file, storage.write_bytes

    def record(write):
        def wrapper(*args):
            target = args[-1] if write is upload_file else args[0]
            if "/000001/" in target:
                written.append(target.split("/000001/")[1])
            return write(*args)
        return wrapper

    monkeypatch.setattr(storage, "upload_file", record(upload_file))
    monkeypatch.setattr(storage, "write_bytes", record(write_bytes))
    registry.push_model(world["cats"], registry_uri, metadata={})

    assert sorted(written) == sorted([*VERSION_OF.values(), "blessing.json"])
    proto = written.index("saved_model.pb")
    assert sorted(written[:proto]) == SAVED_MODEL_FILES
    assert written[-1] == "blessing.json"


def test_every_numbered_child_of_the_registry_is_a_saved_model(world, tmp_path):
    """TF Serving's rule for a model base path: each child whose name parses as an int64 is a version and
    must itself be a SavedModel; other children (.claims) are skipped."""
    registry_dir = tmp_path / "registry"
    for name in ("cats", "dogs"):
        registry.push_model(world[name], str(registry_dir), metadata={})
    versions = [child for child in registry_dir.iterdir() if child.name.isdigit()]
    assert [child.name for child in sorted(versions)] == ["000001", "000002"]
    for version in versions:
        assert (version / "saved_model.pb").is_file() and (version / "variables" / "variables.index").is_file()
        assert layout.saved_model_dir(str(version)) == str(version)
        assert "serving_default" in tf.saved_model.load(str(version)).signatures
    assert layout.saved_model_dir(world["cats"]) == os.path.join(world["cats"], "saved_model")


def copy_tree(source, target):
    for name, content in tree(Path(source)).items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(content)
    return str(target)


def test_already_pushed_is_decided_by_the_models_content_not_its_path(world, tmp_path):
    """A run that writes another model to the same folder (same model_uri) is pushed; the same model
    from another folder is recognised as the newest version."""
    registry_dir = str(tmp_path / "registry")
    run = tmp_path / "runs" / "model"
    copy_tree(world["cats"], run)
    first = registry.push_model(str(run), registry_dir, metadata={"model_uri": "gs://runs/model"})

    for name in MODEL_FILES:
        (run / name).unlink()
    copy_tree(world["dogs"], run)  # A different model at the same path.
    second = registry.push_model(str(run), registry_dir, metadata={"model_uri": "gs://runs/model"})
    assert [Path(uri).name for uri in (first, second)] == ["000001", "000002"]
    assert Path(second, "model.keras").read_bytes() == Path(world["dogs"], "model.keras").read_bytes()

    # The same model elsewhere, even the version itself: the newest version already holds it.
    assert registry.push_model(world["dogs"], registry_dir, metadata={"model_uri": "gs://other/model"}) == second
    assert registry.push_model(second, registry_dir, metadata={}) == second
    assert sorted(os.listdir(registry_dir)) == [".claims", "000001", "000002"]


@pytest.mark.parametrize("nested", [False, True], ids=["saved-model-at-the-top", "saved-model-one-level-down"])
def test_a_version_pushed_before_the_digest_was_recorded_is_recognised_by_its_files(world, tmp_path, nested):
    """blessing.json of a version pushed before 2026-12-03 has no model_digest: the same model pushed again
    after the upgrade (a scheduled run reused from the cache) is that version, not a new one."""
    registry_dir = tmp_path / "registry"
    version = registry_dir / "000001"
    if nested:  # the layout of the first pushes: the model folder as training wrote it
        copy_tree(world["cats"], version)
    else:
        for target, source in registry.version_files(world["cats"]).items():
            (version / target).parent.mkdir(parents=True, exist_ok=True)
            (version / target).write_bytes(Path(world["cats"], source).read_bytes())
    (version / "blessing.json").write_text(json.dumps({"model_uri": "gs://runs/1/model", "blessed": True,
                                                       "version": "000001"}))
    (registry_dir / ".claims").mkdir()
    (registry_dir / ".claims" / "000001").write_text("{}")
    before = tree(registry_dir)

    again = registry.push_model(world["cats"], str(registry_dir), metadata={"model_uri": "gs://runs/2/model"})
    assert again == str(version) and tree(registry_dir) == before
    # Another model is still pushed, and its record carries the digest.
    other = registry.push_model(world["dogs"], str(registry_dir), metadata={})
    assert Path(other).name == "000002"
    assert json.loads(Path(other, "blessing.json").read_text())[layout.MODEL_DIGEST_KEY] == \
        registry.model_digest(world["dogs"])


# --- readers: an interrupted push is refused, old versions still read --------------------------------------


def interrupted_version(world, registry_dir):
    """A version whose push stopped before blessing.json: claimed, files copied, no record."""
    uri = registry.push_model(world["cats"], str(registry_dir), metadata={})
    os.remove(os.path.join(uri, "blessing.json"))
    return uri


def test_readers_refuse_an_interrupted_push_but_read_a_training_folder(world, tmp_path):
    uri = interrupted_version(world, tmp_path / "registry")
    image = tmp_path / "picture.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    label_map = reader.read_label_map(world["dataset"])
    interrupted = rf"{uri} is a registry version without blessing\.json: its push was interrupted"
    readers = {
        "predict": lambda model: prediction.predict(model, [str(image)]),
        "batch-predict": lambda model: prediction.batch_predict(model, str(tmp_path), str(tmp_path / "out.jsonl")),
        "serve": lambda model: prediction.serve_saved_model(model, [image.read_bytes()]),
        "baseline": lambda model: registry.decide_blessing("accuracy", 0.5, baseline_model_uri=model,
                                                           dataset_dir=world["dataset"]),
        "initial model": lambda model: training.load_initial_model(model, label_map, world["dataset"]),
    }
    for read in readers.values():
        with pytest.raises(ModelError, match=interrupted):
            read(uri)
    # A training run's folder has no blessing.json and needs none; nor does a numbered folder nobody claimed.
    unclaimed = copy_tree(world["cats"], tmp_path / "runs" / "000001")
    for model in (world["cats"], unclaimed):
        assert not layout.is_registry_version(model)
        for read in readers.values():
            read(model)
    assert layout.is_registry_version(uri)


def test_versions_pushed_with_the_saved_model_one_level_down_still_work(world, tmp_path):
    """The layout pushed before 2026-12-03: 000001/saved_model/ beside the rest, claimed and blessed."""
    registry_dir = tmp_path / "registry"
    old = copy_tree(world["cats"], registry_dir / "000001")
    (registry_dir / "000001" / "blessing.json").write_text(json.dumps({"model_uri": world["cats"]}))
    (registry_dir / ".claims").mkdir()
    (registry_dir / ".claims" / "000001").write_text("{}")
    assert layout.is_registry_version(old) and layout.saved_model_dir(old) == os.path.join(old, "saved_model")

    image = tmp_path / "picture.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    [answer] = prediction.predict(old, [str(image)])
    np.testing.assert_allclose(prediction.serve_saved_model(old, [image.read_bytes()])[0],
                               answer["probabilities"], atol=1e-5)
    value = run_value(world, "cats", tmp_path)
    assert registry.decide_blessing("accuracy", value, baseline_model_uri=old,
                                    dataset_dir=world["dataset"])["baseline_value"] == value
    training.load_initial_model(old, reader.read_label_map(world["dataset"]), world["dataset"])
    # Pushed on (e.g. to another registry), it becomes a version of today's layout with the same digest.
    copied = registry.push_model(old, str(tmp_path / "other"), metadata={})
    assert (Path(copied) / "saved_model.pb").is_file() and not (Path(copied) / "saved_model").exists()
    assert registry.model_digest(copied) == registry.model_digest(old) == registry.model_digest(world["cats"])


# --- the gate on degenerate models -----------------------------------------------------------------------


def test_a_constant_binary_baseline_has_auc_one_half_and_prc_the_positive_share(world, tmp_path):
    constant = constant_model_dir(tmp_path / "constant", ["cats", "dogs"], "dogs", binary=True, bias_value=0.3)
    auc = registry.decide_blessing("auc", 0.6, baseline_model_uri=constant, dataset_dir=world["dataset"])
    assert auc["baseline_value"] == 0.5 and auc["blessed"] is True
    prc = registry.decide_blessing("prc", 0.6, baseline_model_uri=constant, dataset_dir=world["dataset"])
    assert prc["baseline_value"] == pytest.approx(1 - world["cats_share"])  # dogs, index 1, are the positives


def test_a_baseline_that_answers_nan_is_refused_not_compared(world, tmp_path):
    broken = constant_model_dir(tmp_path / "nan", ["cats", "dogs"], "dogs", binary=True, bias_value=np.nan)
    with pytest.raises(ModelError, match=r"cannot be compared with this run: .*model\.keras answers non-finite"):
        registry.decide_blessing("auc", 0.6, baseline_model_uri=broken, dataset_dir=world["dataset"],
                                 output_dir=str(tmp_path / "blessing"))
    assert not (tmp_path / "blessing" / "blessing.json").exists()


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
