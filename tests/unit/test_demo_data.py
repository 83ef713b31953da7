"""write_digits writes scikit-learn's real digits as a valid image-folder data set."""

import sys

import numpy as np
import pytest
from PIL import Image

from trainer.data.demo_data import write_digits
from trainer.data.validation import validate_dataset

datasets = pytest.importorskip("sklearn.datasets")


def test_digits_written_exactly_and_validate(tmp_path):
    counts = write_digits(str(tmp_path / "digits"), scale=2)
    digits = datasets.load_digits()
    assert list(counts) == [str(d) for d in range(10)]
    assert sum(counts.values()) == 1797
    assert counts == {str(d): int((digits.target == d).sum()) for d in range(10)}
    index = 17
    image = Image.open(tmp_path / "digits" / str(digits.target[index]) / f"{index:04d}.png")
    assert image.mode == "L" and image.size == (16, 16)
    pixels = np.asarray(image)
    # Nearest-neighbour enlargement keeps the grid: each 2x2 block is one original value, scaled to 255.
    np.testing.assert_array_equal(pixels[::2, ::2], np.rint(digits.images[index] * 255 / 16))
    np.testing.assert_array_equal(pixels[1::2, 1::2], pixels[::2, ::2])
    assert pixels.max() == 255 or digits.images[index].max() < 16

    result = validate_dataset(str(tmp_path / "digits"), str(tmp_path / "validation"))
    assert result["counts"]["accepted"] == 1797 and result["classes"] == [str(d) for d in range(10)]


def test_bad_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scale must be a positive"):
        write_digits(str(tmp_path), scale=0)


def test_missing_scikit_learn_is_explained(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        write_digits(str(tmp_path))
