"""The error gallery: misclassified test images with Grad-CAM heat maps, and correct ones for contrast.

Which images: the mistakes, most confident first, at most ``MISTAKES_PER_CLASS`` per true class and
``MAX_MISTAKES`` in all; then the most confident correct images, ``CORRECT_PER_CLASS`` per class and
``MAX_CORRECT`` in all. Thumbnails are small JPEGs inlined as data: URIs, so the HTML is
self-contained (the Kubeflow UI shows it in a sandbox without network) and its size is bounded by
the caps: about (MAX_MISTAKES + MAX_CORRECT) * 2 thumbnails of a few kB each, whatever the split size.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from trainer.errors import ModelError

log = logging.getLogger(__name__)

MISTAKES_PER_CLASS = 3
MAX_MISTAKES = 48
CORRECT_PER_CLASS = 2
MAX_CORRECT = 24
THUMBNAIL = 112  # pixels per side
JPEG_QUALITY = 80
GRADCAM_BATCH = 16


def select(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray) -> tuple[list[int], list[int]]:
    """Indices of the mistakes and of the correct examples to show, each list in display order."""
    order = np.argsort(-confidence, kind="stable")
    mistakes: list[int] = []
    correct: list[int] = []
    shown_wrong: dict[int, int] = {}
    shown_right: dict[int, int] = {}
    for index in order.tolist():
        true = int(y_true[index])
        if y_pred[index] != true:
            if len(mistakes) < MAX_MISTAKES and shown_wrong.get(true, 0) < MISTAKES_PER_CLASS:
                mistakes.append(index)
                shown_wrong[true] = shown_wrong.get(true, 0) + 1
        elif len(correct) < MAX_CORRECT and shown_right.get(true, 0) < CORRECT_PER_CLASS:
            correct.append(index)
            shown_right[true] = shown_right.get(true, 0) + 1
    # Correct examples grouped by class, so that they read as one row per class.
    correct.sort(key=lambda i: (int(y_true[i]), -float(confidence[i])))
    return mistakes, correct


def build_entries(model, images: dict[int, np.ndarray], indices: Iterable[int], y_true: np.ndarray,
                  y_pred: np.ndarray, confidence: np.ndarray, labels: Sequence[str]) -> tuple[list[dict], str]:
    """One entry per index: thumbnails (data: URIs) of the image and of its Grad-CAM overlay.

    ``images`` maps each index to the uint8 [S, S, 3] pixels the model saw. Returns the entries and a
    note ("" when heat maps were drawn, otherwise why not: e.g. a model that was not built by imgclf).
    """
    from trainer.evaluate import gradcam  # TensorFlow-heavy; imported only when a gallery is drawn.

    indices = list(indices)
    heat: dict[int, np.ndarray] = {}
    note = ""
    if indices:
        try:
            cam = gradcam.GradCam(model)
            for start in range(0, len(indices), GRADCAM_BATCH):
                chunk = indices[start:start + GRADCAM_BATCH]
                maps = cam.heatmaps(np.stack([images[i] for i in chunk]), np.array([y_pred[i] for i in chunk]))
                heat.update(zip(chunk, maps, strict=True))
            note = f"Heat maps: Grad-CAM of the predicted class at the backbone's layer {cam.layer.name!r}."
        except ModelError as err:
            note = f"No heat maps: {err}."
            log.warning("Error gallery without heat maps: %s", err)
    entries = []
    for index in indices:
        entry: dict[str, Any] = {
            "index": int(index), "true": labels[int(y_true[index])], "predicted": labels[int(y_pred[index])],
            "confidence": float(confidence[index]), "image": data_uri(images[index]), "heatmap": None,
        }
        if index in heat:
            entry["heatmap"] = data_uri(gradcam.overlay(images[index], heat[index]))
        entries.append(entry)
    return entries, note


def data_uri(pixels: np.ndarray) -> str:
    """A small JPEG thumbnail of uint8 [H, W, 3] pixels as a data: URI (THUMBNAIL pixels on its longer side)."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    scale = THUMBNAIL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Small images are enlarged without blurring, large ones shrunk smoothly.
    image = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_html(mistakes: Sequence[dict], correct: Sequence[dict], note: str, total_mistakes: int) -> str:
    """The gallery's HTML fragment (two sections of figure cards)."""
    parts = ["<h2>Error gallery</h2>"]
    if total_mistakes:
        parts.append(f"<p>{total_mistakes} images were misclassified; shown: {len(mistakes)}, the most "
                     f"confident mistakes first, at most {MISTAKES_PER_CLASS} per true class. "
                     f"{html.escape(note)}</p>")
        parts.append('<div class="gallery" id="mistakes">' + "".join(_card(e, wrong=True) for e in mistakes)
                     + "</div>")
    else:
        parts.append("<p>No image was misclassified.</p>")
    parts.append("<h2>Correct examples</h2>")
    if correct:
        parts.append(f"<p>For contrast: the most confident correct predictions, at most {CORRECT_PER_CLASS} "
                     "per class.</p>")
        parts.append('<div class="gallery" id="correct">' + "".join(_card(e, wrong=False) for e in correct)
                     + "</div>")
    else:
        parts.append("<p>No image was classified correctly.</p>")
    return "\n".join(parts)


def _card(entry: dict, *, wrong: bool) -> str:
    true, predicted = html.escape(entry["true"]), html.escape(entry["predicted"])
    caption = (f"true <b>{true}</b><br>predicted <b class=\"wrong\">{predicted}</b>" if wrong
               else f"<b>{true}</b>")
    images = f'<img src="{entry["image"]}" alt="test image {entry["index"]}" width="{THUMBNAIL}">'
    if entry["heatmap"]:
        images += (f'<img src="{entry["heatmap"]}" alt="Grad-CAM of test image {entry["index"]}" '
                   f'width="{THUMBNAIL}">')
    return (f'<figure class="card">{images}<figcaption>{caption}<br>confidence '
            f'{entry["confidence"]:.3f}</figcaption></figure>')
