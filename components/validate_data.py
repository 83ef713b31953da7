"""Pipeline step 1: check an image-folder data set and report what can be trained on."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Markdown, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_data(
    data_uri: str,
    content_fingerprint: str,
    binary_mode: bool,
    max_rejected_fraction: float,
    validation: Output[Artifact],
    report: Output[Markdown],
    report_html: Output[HTML],
    listed_files: int = 0,
) -> NamedTuple("Outputs", [("num_classes", int), ("accepted", int), ("rejected", int), ("fingerprint", str)]):
    """Validates a class-folder data set (local/volume path or gs:// URI).

    Args:
        data_uri: Folder with one sub-folder of .jpg/.jpeg/.png images per class.
        content_fingerprint: What the look at the data found; part of this step's cache key, so the
            step is reused exactly when the content is unchanged. Checked again after validating.
        binary_mode: Whether the run trains a binary model (needs exactly two classes).
        max_rejected_fraction: Largest share of unusable files the run tolerates.
        validation: Folder holding validation.json (classes, counts) and the per-file lists.
        report: Markdown summary shown in the Kubeflow UI.
        report_html: The same with thumbnails of each class and of the rejected files.
        listed_files: How many files the look listed (0: unknown): the total of the progress lines.

    Returns:
        Counts, and the fingerprint of the content: it changes whenever a file does, so the
        cached steps after this one never reuse results computed from other data.
    """
    import collections
    import os
    import shutil

    from trainer import logs
    from trainer.data.fingerprint import validate_unchanged

    logs.configure()
    os.makedirs(validation.path, exist_ok=True)
    try:
        result = validate_unchanged(data_uri, validation.path, content_fingerprint, binary_mode=binary_mode,
                                    max_rejected_fraction=max_rejected_fraction, expected_files=listed_files)
    finally:
        # The reports are worth showing even when the data set is refused.
        for name, target in (("report.md", report.path), ("report.html", report_html.path)):
            if os.path.exists(os.path.join(validation.path, name)):
                shutil.copyfile(os.path.join(validation.path, name), target)
    counts = result["counts"]
    validation.metadata.update({"classes": result["classes"], "accepted": counts["accepted"],
                                "rejected": counts["rejected"], "fingerprint": result["fingerprint"],
                                "content_fingerprint": result["content_fingerprint"]})
    outputs = collections.namedtuple("Outputs", ["num_classes", "accepted", "rejected", "fingerprint"])
    return outputs(len(result["classes"]), counts["accepted"], counts["rejected"], result["fingerprint"])
