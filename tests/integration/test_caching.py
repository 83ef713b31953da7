"""Repeated runs of the committed compiled pipeline with kfp.local's cache: what is reused and what is not.

A scheduled pipeline runs again and again on one data URI. With caching on, a run on unchanged content
must take validation, conversion, training and evaluation from the cache, and still look at the data,
decide at the gate and push; one image added must make everything from validation on run again.
"Ran" is what kfp.local really did: a step that ran has a folder in the new run's folder, a reused one
has none (kfp.local also logs its cache hit) and hands on the earlier run's artifacts.
"""

import pytest

from pipelines.compiler import COMPILED_PIPELINE
from pipelines.local import run_local
from tests.support.datasets import encode, make_image_folder, noise
from trainer.hyperparameters import Hyperparameters

pytestmark = pytest.mark.integration

HP = Hyperparameters(model="small_cnn", weights="none", image_size=16, epochs=1, batch_size=8,
                     validation_split_ratio=0.25, test_split_ratio=0.25)
ALWAYS = {"look-at-data", "bless-model", "push-model"}
CACHEABLE = {"validate-data", "convert-to-tfrecords", "train", "evaluate"}


def test_unchanged_data_reuses_training_and_new_content_retrains(tmp_path):
    data, registry, cache = tmp_path / "data", tmp_path / "registry", tmp_path / "cache"
    make_image_folder(data, classes={"circles": 8, "squares": 8}, size=(24, 24))

    def run(name):
        summary = run_local(str(data), str(tmp_path / name), HP, cache_dir=str(cache),
                            pipeline_file=COMPILED_PIPELINE, pipeline_args={"model_registry_uri": str(registry)})
        assert summary["status"] == "succeeded", summary
        return summary

    first = run("fresh")
    assert set(first["steps_run"]) == ALWAYS | CACHEABLE
    assert first["steps_reused"] == []

    same = run("same-data")
    assert set(same["steps_run"]) == ALWAYS
    assert set(same["steps_reused"]) == CACHEABLE
    # The reused model is the first run's; the gate decided again and blessed it, and the push found the
    # registry already serving it: no second version of the same model.
    assert same["model_path"] == first["model_path"] and same["dataset_path"] == first["dataset_path"]
    assert same["blessed"] is True
    assert sorted(p.name for p in registry.iterdir() if p.name.isdigit()) == ["000001"]

    (data / "squares" / "added.png").write_bytes(encode(noise(24, 24, seed=9), "PNG"))
    changed = run("one-image-added")
    assert set(changed["steps_run"]) == ALWAYS | CACHEABLE
    assert changed["steps_reused"] == []
    assert changed["model_path"] != first["model_path"]
    assert sum(changed["counts"].values()) == sum(first["counts"].values()) + 1
    assert sorted(p.name for p in registry.iterdir() if p.name.isdigit()) == ["000001", "000002"]
