"""Pipeline step 2: split the validated images and write them as sharded TFRecords."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def convert_to_tfrecords(
    data_uri: str,
    validation: Input[Artifact],
    data_fingerprint: str,
    validation_split_ratio: float,
    test_split_ratio: float,
    random_seed: int,
    dataset: Output[Dataset],
) -> str:
    """Splits the accepted images (stratified, seeded) and writes train/validation/test shards.

    Records hold each file's original bytes, so one conversion serves every backbone and image size.

    Args:
        data_uri: The data set validated by the previous step.
        validation: The validation step's output (the list of accepted files).
        data_fingerprint: The content fingerprint from validation; part of this step's cache key.
        validation_split_ratio: Share of each class held out for validation.
        test_split_ratio: Share of each class held out for the final evaluation.
        random_seed: Seed of the split and of the shuffling.
        dataset: Folder of TFRecord shards, the label map and manifest.json.

    Returns:
        The fingerprint of the converted data (content and split parameters).
    """
    import os

    from trainer import logs
    from trainer.data.conversion import convert_dataset
    from trainer.layout import VALIDATION_FILE

    logs.configure()
    manifest = convert_dataset(
        data_uri, os.path.join(validation.path, VALIDATION_FILE), dataset.path,
        validation_split_ratio=validation_split_ratio, test_split_ratio=test_split_ratio,
        random_seed=random_seed, data_fingerprint=data_fingerprint)
    dataset.metadata.update({split: info["count"] for split, info in manifest["splits"].items()})
    dataset.metadata["fingerprint"] = manifest["fingerprint"]
    return manifest["fingerprint"]
