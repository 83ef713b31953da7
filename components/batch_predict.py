"""Batch prediction: classify every image in a folder with a trained model, one JSON line per image."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def batch_predict(
    trained_model: Input[Model],
    data_uri: str,
    predictions: Output[Dataset],
) -> NamedTuple("Outputs", [("images", int), ("errors", int)]):
    """Predicts every .jpg, .jpeg and .png below data_uri (recursively).

    Args:
        trained_model: A model folder written by training (or a registry version).
        data_uri: gs:// URI or mounted path of the images; sub-folders are searched too.
        predictions: JSON Lines, one line per image in file-name order: {"file", "probabilities",
            "labels", "predicted_label"}, or {"file", "error"} for an image that cannot be read.
    """
    import collections

    from trainer import logs
    from trainer.serve.prediction import batch_predict as predict_folder

    logs.configure()
    result = predict_folder(trained_model.path, data_uri, predictions.path)
    predictions.metadata.update({"format": "jsonl", "images": result["images"], "errors": result["errors"],
                                 "skipped": result["skipped"]})
    outputs = collections.namedtuple("Outputs", ["images", "errors"])
    return outputs(result["images"], result["errors"])
