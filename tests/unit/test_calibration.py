"""trainer.evaluate.calibration: ECE against a hand computation, and the reliability diagram draws every bin."""

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from trainer.evaluate import calibration


def test_ece_of_a_hand_worked_example():
    # Bin 0.6-0.7: two images at confidence 0.6, one right -> gap |0.5 - 0.6| = 0.1.
    # Bin 0.9-1.0: two images at confidence 0.9 and 1.0, both right -> gap |1 - 0.95| = 0.05.
    probabilities = np.array([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1], [0.0, 1.0]])
    y_true = np.array([0, 0, 0, 1])
    result = calibration.calibration(y_true, probabilities)
    assert result["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.05)
    assert result["mce"] == pytest.approx(0.1)
    filled = [row for row in result["bins"] if row["count"]]
    assert [(row["low"], row["count"]) for row in filled] == [(0.6, 2), (0.9, 2)]
    assert filled[1]["confidence"] == pytest.approx(0.95)
    assert sum(row["count"] for row in result["bins"]) == 4


def test_a_calibrated_model_has_a_small_ece_and_an_overconfident_one_a_large_one():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20000)
    right = rng.uniform(size=confidence.size) < confidence  # right exactly as often as it says
    y_true = np.where(right, 0, 1)
    calibrated = np.stack([confidence, 1 - confidence], axis=1)
    assert calibration.calibration(y_true, calibrated)["ece"] < 0.02
    y_overconfident = np.where(rng.uniform(size=confidence.size) < 0.6, 0, 1)  # 60% right whatever it says
    assert calibration.calibration(y_overconfident, calibrated)["ece"] == pytest.approx(0.75 - 0.6, abs=0.02)


def test_reliability_diagram_has_a_bar_per_filled_bin():
    probabilities = np.array([[0.55, 0.45], [0.75, 0.25], [0.95, 0.05], [0.96, 0.04]])
    result = calibration.calibration(np.array([0, 1, 0, 0]), probabilities)
    svg = ET.fromstring(calibration.reliability_svg(result))
    bars = svg.findall("{http://www.w3.org/2000/svg}rect[@class='bin']")
    assert len(bars) == 3
    # The 0.7-0.8 bin is always wrong: accuracy 0, a bar of no height.
    heights = sorted(float(bar.get("height")) for bar in bars)
    assert heights[0] == 0 and heights[-1] > 0
