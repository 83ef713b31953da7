"""trainer.layout: the on-disk contracts are stated there and nowhere else, and its one manifest reader."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

from trainer import layout, storage
from trainer.data import conversion, reader
from trainer.errors import DataError
from trainer.serve import prediction
from trainer.train import export
from trainer.train import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCANNED = ("trainer", "components", "pipelines")


def contract_names() -> dict[str, str]:
    """{value: name} of layout's file, folder and record-feature names that look like one.

    Bare words such as "label" and "path" (two record features) are left out: they are also
    ordinary dictionary keys everywhere.
    """
    names: dict[str, str] = {}
    for name, value in vars(layout).items():
        if name.isupper() and isinstance(value, str) and any(c in value for c in "./_"):
            names.setdefault(value, name)  # the first name given to a value is its own
    assert {"manifest.json", "class_label_to_prediction_index.json", "model.keras", "saved_model",
            "hyperparameters.yaml", "history.json", "blessing.json", "image/encoded"} <= set(names)
    return names


def literals_outside_layout(roots: list[pathlib.Path], names: dict[str, str]) -> list[str]:
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if path == ROOT / "trainer" / "layout.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.value!r} "
                                 f"(use trainer.layout.{names[node.value]})")
    return found


def test_contract_names_are_spelled_out_only_in_layout():
    found = literals_outside_layout([ROOT / folder for folder in SCANNED], contract_names())
    assert not found, "on-disk names restated outside trainer/layout.py:\n" + "\n".join(found)


def test_the_check_finds_a_restated_name(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text('MANIFEST = "manifest.json"\nnote = f"see {MANIFEST} here"\n')
    assert literals_outside_layout([tmp_path / "pkg"], contract_names()) == [
        "pkg/mod.py:1: 'manifest.json' (use trainer.layout.MANIFEST_FILE)"]


def test_every_module_uses_the_same_names():
    assert reader.MANIFEST_FILE is conversion.MANIFEST_FILE is layout.MANIFEST_FILE
    assert reader.LABEL_MAP_FILE is export.LABEL_MAP_FILE is layout.LABEL_MAP_FILE
    assert export.KERAS_MODEL_FILE is prediction.KERAS_MODEL_FILE is model_lib.KERAS_MODEL_FILE
    assert reader.read_manifest is layout.read_manifest
    assert sorted(conversion.FEATURES) == sorted(reader.FEATURES) == sorted(layout.RECORD_FEATURES)
    assert layout.SHARD_PATTERN.match(layout.shard_name(3, 12)) and layout.version_name(7) == "000007"


@pytest.fixture(params=["local", "gcs"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "dataset")
    return f"gs://{request.getfixturevalue('gcs_bucket')}/dataset"


def test_manifest_written_read_and_invalidated(folder):
    manifest = {"format_version": layout.FORMAT_VERSION, "accepted": 1,
                "splits": {"train": {"count": 1, "files": [layout.shard_name(0, 1)]}}}
    storage.write_bytes(storage.join(folder, "train", layout.shard_name(0, 1)), b"records")
    layout.write_manifest(folder, manifest)
    assert layout.read_manifest(folder) == layout.read_manifest(folder, check_shards=True) == manifest
    assert json.loads(layout.read_manifest_bytes(folder)) == manifest
    layout.invalidate_manifest(folder)
    with pytest.raises(DataError, match=r"no readable manifest\.json in .*dataset.*missing.*re-run the conversion"):
        layout.read_manifest(folder)
    layout.invalidate_manifest(folder)  # nothing there: no error


@pytest.mark.parametrize(("manifest", "message"), [
    ({"format_version": 1, "splits": {}}, "format version 1"),
    ({"format_version": 2}, "'splits' must map each split"),
    ({"format_version": 2, "splits": {"train": {"files": ["../x.tfrecord"]}}}, "must be a list of shard file names"),
    ([], "expected a JSON object"),
])
def test_the_one_reader_refuses_a_bad_manifest(tmp_path, manifest, message):
    (tmp_path / layout.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        layout.read_manifest(str(tmp_path))


def test_check_shards_notices_a_missing_shard_and_bad_counts(tmp_path):
    manifest = {"format_version": 2, "accepted": 2, "splits": {"train": {"count": 2, "files": ["a.tfrecord"]}}}
    layout.write_manifest(str(tmp_path), manifest)
    with pytest.raises(DataError, match="missing shard.*train/a.tfrecord"):
        layout.read_manifest(str(tmp_path), check_shards=True)
    layout.write_manifest(str(tmp_path), {**manifest, "accepted": 3})
    with pytest.raises(DataError, match="3 accepted images but 2 in the splits"):
        layout.read_manifest(str(tmp_path), check_shards=True)
