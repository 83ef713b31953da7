"""Calibration of predicted probabilities: expected calibration error and a reliability diagram (inline SVG).

A model is calibrated when, of the images it predicts with confidence about 0.9, about 90% are
right. Confidence here is the probability of the predicted class (the arg-max, "top-label"
calibration); the images are put into ``bins`` equal-width confidence bins over [0, 1] and

    ECE = sum over bins of (images in bin / all images) * |accuracy in bin - mean confidence in bin|

so 0 is perfect and, say, 0.05 means the stated confidence is off by 5 points on average. The
maximum calibration error (MCE) is the largest gap of a non-empty bin.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import numpy as np

BINS = 10


def calibration(y_true: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """ECE, MCE and the per-bin table of a classifier's top-label confidences.

    Args:
      y_true: true class indices, int [N] (N > 0).
      probabilities: float [N, K], one row per image (binary mode: [1 - p, p]).
      bins: number of equal-width confidence bins.

    Returns:
      ``{"ece", "mce", "bins": [{"low", "high", "count", "accuracy", "confidence"}, ...]}`` with
      accuracy and confidence None for an empty bin. A confidence of exactly 1 falls in the last bin.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if y_true.size == 0:
        raise ValueError("calibration needs at least one image")
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y_true).astype(np.float64)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    table, ece, mce = [], 0.0, 0.0
    for b in range(bins):
        member = index == b
        count = int(member.sum())
        row: dict[str, Any] = {"low": b / bins, "high": (b + 1) / bins, "count": count,
                               "accuracy": None, "confidence": None}
        if count:
            accuracy, mean_confidence = float(correct[member].mean()), float(confidence[member].mean())
            row.update(accuracy=accuracy, confidence=mean_confidence)
            gap = abs(accuracy - mean_confidence)
            ece += count / y_true.size * gap
            mce = max(mce, gap)
        table.append(row)
    return {"ece": float(ece), "mce": float(mce), "bins": table}


_SIZE, _MARGIN = 300, 44


def reliability_svg(result: Mapping[str, Any]) -> str:
    """The reliability diagram of ``calibration(...)``: accuracy per confidence bin against the diagonal.

    Bars are the accuracy of each non-empty bin, a dot marks its mean confidence, and the diagonal is
    perfect calibration; a bar below the diagonal means over-confidence.
    """
    plot = _SIZE - 2 * _MARGIN

    def x(value: float) -> float:
        return _MARGIN + plot * value

    def y(value: float) -> float:
        return _MARGIN + plot * (1 - value)

    parts = [f'<rect x="{_MARGIN}" y="{_MARGIN}" width="{plot}" height="{plot}" fill="#fff" stroke="#ccc"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{_MARGIN}" x2="{_MARGIN + plot}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{_MARGIN - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
        parts.append(f'<text x="{x(tick):.1f}" y="{_MARGIN + plot + 16}" text-anchor="middle">{tick:g}</text>')
    for row in result["bins"]:
        if not row["count"]:
            continue
        left, right = x(row["low"]), x(row["high"])
        top = y(row["accuracy"])
        tip = (f"confidence {row['low']:.1f}-{row['high']:.1f}: {row['count']} images, accuracy "
               f"{row['accuracy']:.3f}, mean confidence {row['confidence']:.3f}")
        parts.append(f'<rect class="bin" x="{left + 1:.1f}" y="{top:.1f}" width="{right - left - 2:.1f}" '
                     f'height="{y(0) - top:.1f}" fill="#4c78a8" fill-opacity="0.8">'
                     f"<title>{html.escape(tip)}</title></rect>")
        parts.append(f'<circle cx="{x(row["confidence"]):.1f}" cy="{top:.1f}" r="3" fill="#d62728"/>')
    parts.append(f'<line x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(1):.1f}" y2="{y(1):.1f}" stroke="#888" '
                 'stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{_SIZE / 2}" y="{_SIZE - 8}" text-anchor="middle">confidence (predicted class)</text>')
    parts.append(f'<text x="12" y="{_SIZE / 2}" text-anchor="middle" transform="rotate(-90 12 {_SIZE / 2})">'
                 "accuracy</text>")
    parts.append(f'<text x="{_MARGIN}" y="{_MARGIN - 10}">ECE {result["ece"]:.4f}, MCE {result["mce"]:.4f}</text>')
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{_SIZE}" height="{_SIZE}" '
            f'viewBox="0 0 {_SIZE} {_SIZE}" role="img" aria-label="reliability diagram">'
            + "".join(parts) + "</svg>")
