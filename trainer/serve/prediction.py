"""Inference with a trained model: the reference algorithm's JSON answers, batch files and the SavedModel.

``predict`` answers the way the reference endpoint does: ``{"probabilities": [...]}``, or with
``verbose`` also ``"labels"`` and ``"predicted_label"`` (``Accept: application/json;verbose``).
Images are prepared by ``images.model_input_array`` (Pillow's header checks, with messages naming the
file, then ``images.model_input``, the graph the SavedModel's serving signature and the training input
pipeline run) at the model's size and interpolation, so ``predict``, batch prediction, the served model
and training see the same pixels, big JPEGs scaled down while decoding included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import yaml

from trainer import images, layout, storage
from trainer.errors import DataError, HyperparameterError, ImgclfError, ModelError
from trainer.hyperparameters import Hyperparameters
from trainer.layout import HYPERPARAMETERS_FILE, KERAS_MODEL_FILE
from trainer.layout import MODEL_LABEL_MAP_FILE as LABEL_MAP_FILE
from trainer.train import model as model_lib
from trainer.train import tflite

SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "image_bytes"
SERVING_OUTPUT = "probabilities"
IMAGE_EXTENSIONS = tuple(images.SUPPORTED_EXTENSIONS)  # lower case, with the dot
# What ``predict`` can run: the Keras model, or one of the TFLite files export wrote beside it.
ENGINES = {"keras": None, "tflite": tflite.FLOAT_FILE, "tflite_dynamic_range": tflite.DYNAMIC_RANGE_FILE}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained Keras model together with what inference needs from its directory."""

    model: keras.Model
    labels: tuple[str, ...]
    hyperparameters: Hyperparameters
    image_size: int
    binary: bool
    model_dir: str
    _forward: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One traced graph serves every batch (reduce_retracing generalises the batch dimension);
        # calling the model eagerly would be several times slower for large backbones.
        model = self.model
        object.__setattr__(self, "_forward", tf.function(lambda x: model(x, training=False),
                                                         reduce_retracing=True))

    @property
    def interpolation(self) -> str:
        return self.hyperparameters.image_resize_interpolation

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities float32 [B, K] for uint8 images [B, S, S, 3].

        Binary models return one sigmoid output, the probability of index 1; it is widened to
        [1 - p, p] so every answer covers every label, as the SavedModel signature does.
        """
        if batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected images of shape [B, {self.image_size}, {self.image_size}, 3], "
                             f"got {list(batch.shape)}")
        output = self._forward(tf.convert_to_tensor(batch, tf.float32)).numpy()
        if self.binary:
            return np.concatenate([1.0 - output, output], axis=1)
        return output


def load_model(model_dir: str) -> LoadedModel:
    """Load ``model.keras`` (safe mode), its label map and hyperparameters, and check they agree.

    Raises ModelError naming the file when something is missing, unreadable or inconsistent.
    """
    labels = read_labels(model_dir)
    hparams = read_hyperparameters(model_dir)
    model = model_lib.load_model(model_dir)  # safe mode; ModelError naming the file

    input_shape, output_shape = model.input_shape, model.output_shape
    if not (isinstance(input_shape, tuple) and len(input_shape) == 4 and input_shape[-1] == 3):
        raise ModelError(f"{_keras_path(model_dir)}: expected one image input [B, S, S, 3], "
                         f"got {input_shape}")
    if not (isinstance(output_shape, tuple) and len(output_shape) == 2):
        raise ModelError(f"{_keras_path(model_dir)}: expected one output [B, K], got {output_shape}")
    image_size = input_shape[1] or hparams.input_size

    outputs = output_shape[1]
    binary = outputs == 1
    if binary != hparams.binary_mode:
        raise ModelError(
            f"{_keras_path(model_dir)} has {outputs} output(s) but {HYPERPARAMETERS_FILE} says "
            f"binary_mode={hparams.binary_mode}; the two files come from different training runs")
    classes = 2 if binary else outputs
    if classes != len(labels):
        raise ModelError(
            f"{_keras_path(model_dir)} predicts {classes} classes but "
            f"{storage.join(model_dir, LABEL_MAP_FILE)} lists {len(labels)}; "
            "the two files come from different training runs")
    return LoadedModel(model, labels, hparams, int(image_size), binary, model_dir)


def load_tflite_models(model_dir: str) -> dict[str, tflite.TfliteModel]:
    """The TFLite files present in ``model_dir`` by file name (none for a model exported without them)."""
    listed = set(storage.list_files(model_dir)) if storage.is_gcs(model_dir) else None
    found = {}
    for name in (tflite.FLOAT_FILE, tflite.DYNAMIC_RANGE_FILE):
        path = storage.join(model_dir, name)
        if (name in listed) if listed is not None else os.path.isfile(path):
            found[name] = tflite.TfliteModel(storage.read_bytes(path), path)
    return found


def load_tflite_model(model_dir: str, file_name: str) -> tflite.TfliteModel:
    """One TFLite file of the model directory; ModelError saying how to get it when it is missing."""
    path = storage.join(model_dir, file_name)
    try:
        content = storage.read_bytes(path)
    except ImgclfError as err:
        how = ("train with tflite_quantization=dynamic_range" if file_name == tflite.DYNAMIC_RANGE_FILE
               else "train again with this version of imgclf, which exports it")
        raise ModelError(f"cannot read {path} ({err}); {how}, or predict with the Keras model") from None
    return tflite.TfliteModel(content, path)


def read_labels(model_dir: str) -> tuple[str, ...]:
    """Class names in prediction-index order from the model's ``class_label_to_prediction_index.json``.

    Every reader of a model folder starts here (``load_model`` does), so this is where a registry
    version whose push was interrupted is refused (``layout.check_not_interrupted``).
    """
    layout.check_not_interrupted(model_dir)
    path = storage.join(model_dir, LABEL_MAP_FILE)
    try:
        mapping = json.loads(storage.read_bytes(path))
    except ImgclfError as err:
        raise ModelError(f"cannot read the model's label map: {err}; training writes it next to "
                         "model.keras") from None
    except ValueError as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    values = list(mapping.values()) if isinstance(mapping, dict) else []
    if not values or any(type(v) is not int for v in values) or sorted(values) != list(range(len(values))):
        raise ModelError(f"{path}: expected a non-empty mapping of class name to the indices 0..K-1, "
                         f"each once; got {mapping!r}")
    return tuple(sorted(mapping, key=mapping.__getitem__))


def read_hyperparameters(model_dir: str) -> Hyperparameters:
    """The training run's hyperparameters from ``hyperparameters.yaml`` next to the model."""
    path = storage.join(model_dir, HYPERPARAMETERS_FILE)
    try:
        values = yaml.safe_load(storage.read_bytes(path))
    except ImgclfError as err:
        raise ModelError(f"cannot read the model's hyperparameters: {err}; training writes them next "
                         "to model.keras") from None
    except yaml.YAMLError as err:
        raise ModelError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ModelError(f"{path}: expected a mapping of hyperparameter names to values")
    try:
        return Hyperparameters.from_mapping(values)
    except HyperparameterError as err:
        raise ModelError(f"{path}: {err}") from None


def _keras_path(model_dir: str) -> str:
    return storage.join(model_dir, KERAS_MODEL_FILE)


# ---------------------------------------------------------------------------------------------
# Online-style prediction
# ---------------------------------------------------------------------------------------------

def predict(model_dir: str, image_uris: list[str], *, verbose: bool = False,
            batch_size: int = 32, engine: str = "keras") -> list[dict]:
    """Answer for each image as the reference endpoint does, in the order given.

    ``engine``: "keras" runs model.keras; "tflite" and "tflite_dynamic_range" run model.tflite or
    model_dynamic_range.tflite on the same decoded and resized pixels.

    Each answer is ``{"probabilities": [...]}`` (Python floats in label-index order, summing to 1);
    with ``verbose`` it also has ``"labels"`` and ``"predicted_label"``. Images are local paths or
    gs:// URIs of jpg/jpeg/png files of any size. A file that cannot be read or decoded raises a
    DataError (or StorageError) naming it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not image_uris:
        return []
    loaded = load_model(model_dir)
    run = loaded.probabilities
    if ENGINES[engine]:
        lite = load_tflite_model(model_dir, ENGINES[engine])
        if lite.image_size != loaded.image_size:
            raise ModelError(f"{lite.name} takes {lite.image_size}-pixel images but {KERAS_MODEL_FILE} takes "
                             f"{loaded.image_size}; the files come from different training runs")
        run = lite.probabilities
    answers: list[dict] = []
    for chunk in _chunks(list(image_uris), batch_size):
        batch = np.stack([preprocess(uri, storage.read_bytes(uri), loaded) for uri in chunk])
        answers.extend(_answer(row, loaded.labels, verbose) for row in run(batch))
    return answers


def preprocess(name: str, data: bytes, loaded: LoadedModel) -> np.ndarray:
    """One encoded image as the model's uint8 [S, S, 3] input, as training and the SavedModel prepare it
    (``images.model_input_array``: ImageRejected naming the file when it cannot be used)."""
    return images.model_input_array(data, name, loaded.image_size, loaded.interpolation)


def _answer(probabilities: np.ndarray, labels: Sequence[str], verbose: bool) -> dict:
    answer: dict[str, Any] = {"probabilities": [float(p) for p in probabilities]}
    if verbose:
        answer["labels"] = list(labels)
        answer["predicted_label"] = labels[int(np.argmax(probabilities))]
    return answer


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------
# Batch prediction over a folder
# ---------------------------------------------------------------------------------------------

def batch_predict(model_dir: str, data_uri: str, output_path: str, *, batch_size: int = 32) -> dict:
    """Predict every jpg/jpeg/png under ``data_uri`` (recursively) into a JSON Lines file.

    Each line is ``{"file": path relative to data_uri, "probabilities": [...], "labels": [...],
    "predicted_label": "..."}``, in sorted file order. An image that cannot be read or decoded gets
    ``{"file": ..., "error": "..."}`` instead and the run goes on. Returns the counts
    ``{"images", "predicted", "errors", "skipped", "output"}`` (skipped: files of other types).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    loaded = load_model(model_dir)
    files = storage.list_files(data_uri)  # relative, sorted
    image_files = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not image_files:
        raise DataError(
            f"{data_uri}: no .jpg, .jpeg or .png files found (searched recursively, {len(files)} "
            "other files); check the path")

    results: dict[str, dict] = {}
    for chunk in _chunks(image_files, batch_size):
        decoded: dict[str, np.ndarray] = {}
        for relative in chunk:
            uri = storage.join(data_uri, relative)
            try:
                decoded[relative] = preprocess(uri, storage.read_bytes(uri), loaded)
            except ImgclfError as err:
                # One bad file in a large batch job is reported in its place, not fatal to the rest.
                results[relative] = {"file": relative, "error": str(err)}
        if decoded:
            rows = loaded.probabilities(np.stack(list(decoded.values())))
            for relative, row in zip(decoded, rows, strict=True):
                results[relative] = {"file": relative, **_answer(row, loaded.labels, verbose=True)}

    # One write at the end: a gs:// object cannot be appended to, and readers never see half a file.
    text = "".join(json.dumps(results[relative]) + "\n" for relative in image_files)
    storage.write_bytes(output_path, text.encode("utf-8"))
    errors = sum("error" in result for result in results.values())
    return {"images": len(image_files), "predicted": len(image_files) - errors, "errors": errors,
            "skipped": len(files) - len(image_files), "output": output_path}


# ---------------------------------------------------------------------------------------------
# The exported SavedModel
# ---------------------------------------------------------------------------------------------

class ServingSignature:
    """``saved_model/``'s serving signature, loaded once: encoded images -> float32 probabilities [N, K].

    What a TF Serving or KServe endpoint runs (``imgclf serve`` runs it); built by ``load_serving_signature``.
    """

    def __init__(self, path: str, saved_model: Any, signature: Any):
        self.path = path
        self._saved_model = saved_model  # keeps the signature's variables alive
        self._signature = signature

    def __call__(self, image_bytes_list: Sequence[bytes]) -> np.ndarray:
        outputs = self._signature(**{SERVING_INPUT: tf.constant(list(image_bytes_list), dtype=tf.string)})
        return outputs[SERVING_OUTPUT].numpy()


def load_serving_signature(model_dir: str) -> ServingSignature:
    """Load the SavedModel of a model folder or registry version (local or gs://) and check its signature.

    The SavedModel is found by ``layout.saved_model_dir`` (a model folder's ``saved_model/``, or a registry
    version's top); a registry version whose push was interrupted is refused.

    Raises ModelError naming the folder when it is not a loadable SavedModel, has no
    ``serving_default`` signature, or the signature does not take ``image_bytes`` (tf.string [N]) and
    return ``probabilities``.
    """
    layout.check_not_interrupted(model_dir)
    path = layout.saved_model_dir(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        local = path
        if storage.is_gcs(path):
            local = os.path.join(tmp, "model")
            storage.download_tree(path, local)
        try:
            loaded = tf.saved_model.load(local)
        except (OSError, ValueError, tf.errors.OpError) as err:
            raise ModelError(f"{path}: not a loadable SavedModel ({type(err).__name__}: {err})") from None
    if SERVING_SIGNATURE not in loaded.signatures:
        raise ModelError(f"{path}: no {SERVING_SIGNATURE!r} signature; it has "
                         f"{sorted(loaded.signatures) or 'none'}")
    signature = loaded.signatures[SERVING_SIGNATURE]
    inputs = signature.structured_input_signature[1]
    spec = inputs.get(SERVING_INPUT)
    if spec is None or spec.dtype != tf.string or spec.shape.rank != 1:
        raise ModelError(f"{path}: the {SERVING_SIGNATURE!r} signature takes {_specs(inputs)}, expected "
                         f"{SERVING_INPUT!r} tf.string [N] (encoded images)")
    if SERVING_OUTPUT not in signature.structured_outputs:
        raise ModelError(f"{path}: the {SERVING_SIGNATURE!r} signature returns "
                         f"{sorted(signature.structured_outputs)}, expected {SERVING_OUTPUT!r}")
    return ServingSignature(path, loaded, signature)


def _specs(specs: dict) -> str:
    return ", ".join(f"{name!r} {spec.dtype.name} {spec.shape}" for name, spec in sorted(specs.items())) or "nothing"


def serve_saved_model(model_dir: str, image_bytes_list: list[bytes]) -> np.ndarray:
    """Call the model's SavedModel serving signature on encoded images; float32 probabilities [N, K].

    This is what a TF Serving or Vertex AI endpoint runs, so comparing it with ``predict`` checks
    that the exported pre-processing matches the training pre-processing.
    """
    return load_serving_signature(model_dir)(image_bytes_list)
