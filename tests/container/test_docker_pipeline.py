"""The whole pipeline runs in the project's image through kfp.local.DockerRunner (non-root, no network).

Needs a Docker engine and the image built by `make image`; `make test-container` does both and
says in one loud line when no engine is there.
"""

import json
import os

import pytest

from components._image import IMAGE
from pipelines.local import CONTAINER_USER, run_local
from tests.support.datasets import make_image_folder
from trainer.hyperparameters import Hyperparameters

pytestmark = pytest.mark.container

FAST = Hyperparameters(model="small_cnn", weights="none", image_size=32, epochs=2, batch_size=8,
                       validation_split_ratio=0.2, test_split_ratio=0.2)


@pytest.fixture(scope="module", autouse=True)
def docker_image():
    docker = pytest.importorskip("docker", reason="the docker package is a dev dependency; run `make install`")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as err:
        pytest.fail(f"no Docker engine answers ({err}); start one, or run `make test` which reports this tier as "
                    "not run")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is not built; run `make image`")
    return IMAGE


def test_pipeline_runs_in_the_image_as_non_root(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"circles": 10, "squares": 10}, size=(40, 40))
    summary = run_local(str(data), str(tmp_path / "run"), FAST, runner="docker")
    assert summary["status"] == "succeeded", summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "succeeded"
    assert sum(summary["counts"].values()) == summary["listed"] == 20
    model_file = os.path.join(summary["model_path"], "model.keras")
    assert os.path.getsize(model_file) > 0
    # Written inside the container by its non-root user, not by this (root) test process.
    assert str(os.stat(model_file).st_uid) == CONTAINER_USER


def test_failing_step_in_the_image_is_reported(tmp_path):
    data = tmp_path / "data"
    make_image_folder(str(data), classes={"lonely": 5}, size=(32, 32))
    summary = run_local(str(data), str(tmp_path / "run"), FAST, runner="docker")
    assert summary["status"] == "failed"
    assert summary["failed_step"] == "validate-data"
