"""Pipeline step 2: split the validated images and write them as sharded TFRecords."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def convert_to_tfrecords(
    data_uri: str,
    validation: Input[Artifact],
    validation_split_ratio: float,
    test_split_ratio: float,
    random_seed: int,
    model: str,
    image_size: int,
    image_resize_interpolation: str,
    dataset: Output[Dataset],
) -> str:
    """Splits the accepted images (stratified, seeded) and writes train/validation/test shards.

    Args:
        data_uri: The data set validated by the previous step.
        validation: The validation step's output (the list of accepted files).
        validation_split_ratio: Share of each class held out for validation.
        test_split_ratio: Share of each class held out for the final evaluation.
        random_seed: Seed of the split and of the shuffling.
        model: Backbone name, used to resolve image_size 0 to the backbone's own size.
        image_size: Side of the square images stored in the records (0: the backbone's).
        image_resize_interpolation: Interpolation used to resize images once, here.
        dataset: Folder of TFRecord shards, the label map and manifest.json.

    Returns:
        The content fingerprint of the converted data, so caching never reuses other data.
    """
    import logging
    import os

    from trainer.backbones import input_size
    from trainer.conversion import convert_dataset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = convert_dataset(
        data_uri, os.path.join(validation.path, "validation.json"), dataset.path,
        validation_split_ratio=validation_split_ratio, test_split_ratio=test_split_ratio,
        random_seed=random_seed, image_size=input_size(model, image_size),
        image_resize_interpolation=image_resize_interpolation)
    dataset.metadata.update({split: info["count"] for split, info in manifest["splits"].items()})
    dataset.metadata["fingerprint"] = manifest["fingerprint"]
    return manifest["fingerprint"]
