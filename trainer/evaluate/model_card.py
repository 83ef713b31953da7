"""A Markdown model card: what the model was trained on, how, how well it does, and what to fill in.

Written by the evaluation step beside its report (``model_card.md``). The facts come from the data
set's manifest, the model's hyperparameters.yaml and the evaluation; the intended-use sections are
placeholders a person must complete before the model is shipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.hyperparameters import DEFAULTS, Hyperparameters

WEAK_CLASSES = 5  # at most this many classes are listed as weak
WEAK_F1_MARGIN = 0.05  # a class is weak when its F1 is this far below the macro average (or lower)


def model_card(result: Mapping[str, Any], hp: Hyperparameters, manifest: Mapping[str, Any], model_dir: str) -> str:
    """The card as Markdown text."""
    labels = result["labels"]
    lines = [f"# Model card: {hp.model} image classifier ({len(labels)} classes)", "",
             f"Model folder: `{model_dir}`", ""]
    lines += _data(manifest, labels)
    lines += _training(hp)
    lines += _evaluation(result)
    lines += _weak_classes(result)
    lines += [
        "## Intended use (to fill in)", "",
        "- Intended use and users: _what the model is for, who relies on its answers._",
        "- Out of scope: _inputs and decisions it must not be used for (e.g. images unlike the training "
        "data: other cameras, lighting, classes it has never seen; it always answers one of its classes)._",
        "- Risks and limitations: _who is harmed by a wrong answer, which errors matter most, how "
        "representative the data set is._",
        "- Decision threshold and human review: _what confidence the application acts on, and what it "
        "does below it (see the calibration above)._",
        "- Owner and contact: _who maintains the model and answers questions._", ""]
    return "\n".join(lines)


def _data(manifest: Mapping[str, Any], labels: list[str]) -> list[str]:
    splits = manifest.get("splits", {})
    names = [s for s in ("train", "validation", "test") if s in splits]
    lines = ["## Data", "", f"Source: `{manifest.get('data_uri', 'unknown')}`; "
             f"{manifest.get('accepted', '?')} images accepted, {manifest.get('rejected', 0)} rejected by "
             f"validation, split with random seed {manifest.get('random_seed', '?')}.", "",
             "| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label in labels:
        counts = [str(splits[s].get("class_counts", {}).get(label, "?")) for s in names]
        lines.append(f"| {markdown_cell(label)} | " + " | ".join(counts) + " |")
    totals = [str(splits[s].get("count", "?")) for s in names]
    lines += ["| **all** | " + " | ".join(totals) + " |", ""]
    return lines


def _training(hp: Hyperparameters) -> list[str]:
    changed = {name: value for name, value in hp.to_dict().items() if value != DEFAULTS[name]}
    lines = ["## Training", "", f"Backbone `{hp.model}` at {hp.input_size} px, weights `{hp.weights}`.", ""]
    if changed:
        lines += ["Hyperparameters that differ from the defaults:", "", "| hyperparameter | value | default |",
                  "|---|---|---|"]
        lines += [f"| {name} | {value} | {DEFAULTS[name]} |" for name, value in changed.items()]
    else:
        lines.append("All hyperparameters at their defaults.")
    return lines + [""]


def _evaluation(result: Mapping[str, Any]) -> list[str]:
    lines = ["## Evaluation", "", f"On the {result['split']} split ({result['count']} images):", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in result["metrics"].items()]
    table = result.get("calibration")
    if table:
        lines += ["", "### Calibration", "",
                  f"Expected calibration error {table['ece']:.4f} (maximum {table['mce']:.4f}): on average "
                  f"the stated confidence is {table['ece'] * 100:.1f} percentage points away from the share "
                  "of answers with that confidence that are right (0 would be perfectly calibrated)."]
    for name, row in (result.get("tflite") or {}).items():
        lines += ["", f"TFLite `{name}`: top-1 agreement with the Keras model {row['top1_agreement']:.2%}, "
                  f"largest probability difference {row['max_abs_difference']:.2e}."]
    return lines + [""]


def _weak_classes(result: Mapping[str, Any]) -> list[str]:
    per_class = result["per_class"]
    mean_f1 = sum(row["f1"] for row in per_class.values()) / max(len(per_class), 1)
    weak = sorted((row["f1"], label) for label, row in per_class.items() if row["f1"] < mean_f1 - WEAK_F1_MARGIN)
    lines = ["## Known weak classes", ""]
    if not weak:
        lines.append(f"No class's F1 is more than {WEAK_F1_MARGIN} below the average ({mean_f1:.4f}).")
        return lines + [""]
    confused = {}
    for pair in result.get("most_confused", []):
        confused.setdefault(pair["true"], pair)
    lines += ["| class | F1 | recall | most often taken for |", "|---|---:|---:|---|"]
    for f1, label in weak[:WEAK_CLASSES]:
        pair = confused.get(label)
        taken = f"{markdown_cell(pair['predicted'])} ({pair['count']} images)" if pair else "-"
        lines.append(f"| {markdown_cell(label)} | {f1:.4f} | {per_class[label]['recall']:.4f} | {taken} |")
    return lines + ["", f"(F1 more than {WEAK_F1_MARGIN} below the average of {mean_f1:.4f}; from the "
                    "confusion matrix of the evaluation.)", ""]


def markdown_cell(text: str) -> str:
    """Text as one Markdown table cell: '|' and '\\' kept literal, line breaks of any kind made spaces.

    Class names are folder names; a trial's error may be a multi-line exception message.
    """
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").splitlines())
