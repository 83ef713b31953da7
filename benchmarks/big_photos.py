"""Benchmark: big photos decoded scaled down in the DCT domain against decoded in full, same model, same data.

    .venv/bin/python benchmarks/big_photos.py [--images 300] [--upscale 4] [--image-size 96] [--epochs 20]

The synthetic photos of ``synthetic.py`` (about 500x375, 10 classes) are enlarged ``--upscale`` times (4:
about 2000x1500, 3 megapixels; 8: about 4000x3000, 12 megapixels), given fresh sensor noise at the new
size and saved as JPEGs, then validated and converted (80/10/10 split, seeded). The same small model
(``small_cnn``, seeded) is then trained twice, for ``--epochs`` epochs, and evaluated on the test split:

* scaled: as imgclf trains (``images.jpeg_scale``: a photo at least twice the model input in both sides
  is decoded at 1/2, 1/4 or 1/8 by libjpeg, then resized),
* full: every photo decoded in full, then resized (the rule replaced by one that always answers 1), the
  reference's way.

It prints the test accuracy of each (``accuracy_scaled`` and ``accuracy_full``: the same within noise is
what "the pixels are as good" means here) and the first epoch's decode of the training split alone
(read, decode, resize, no model) for each, fastest of ``--rounds``: ``first_epoch_speedup``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from synthetic import write_photos  # noqa: E402
from trainer import images  # noqa: E402
from trainer.data import conversion, reader, validation  # noqa: E402
from trainer.hyperparameters import Hyperparameters  # noqa: E402
from trainer.train import model, training  # noqa: E402


def enlarge(source: Path, target: Path, upscale: int) -> None:
    """Every photo of ``source`` enlarged ``upscale`` times (bicubic, then fresh noise) into ``target``."""
    files = sorted(source.rglob("*.jpg"))

    def one(path: Path) -> None:
        out = target / path.relative_to(source)
        if out.exists():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.open(path)
        big = picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.BICUBIC)
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        pixels = np.asarray(big, np.int16) + rng.normal(0, 4, (big.height, big.width, 3)).astype(np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, files))


def first_epoch_seconds(dataset_dir: str, image_size: int) -> float:
    """Read, decode and resize the training split once (the first epoch's input work), no model."""
    started = time.perf_counter()
    for _ in reader.read_split(dataset_dir, "train", image_size=image_size, interpolation="bilinear"):
        pass
    return time.perf_counter() - started


def train_and_evaluate(dataset_dir: str, hp: Hyperparameters, classes: int) -> float:
    keras.utils.set_random_seed(0)
    network = model.build_model(hp, classes)
    network.compile(optimizer=training.make_optimizer(hp), loss=training.make_loss(hp), metrics=["accuracy"])
    network.fit(reader.make_dataset(dataset_dir, "train", batch_size=hp.batch_size, training=True, seed=0,
                                  num_classes=classes, binary_mode=False, image_size=hp.input_size,
                                  interpolation=hp.image_resize_interpolation), epochs=hp.epochs, verbose=0)
    test = reader.make_dataset(dataset_dir, "test", batch_size=hp.batch_size, training=False, seed=None,
                             num_classes=classes, binary_mode=False, image_size=hp.input_size,
                             interpolation=hp.image_resize_interpolation)
    return float(network.evaluate(test, verbose=0, return_dict=True)["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--upscale", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="timed first epochs of each, alternating")
    parser.add_argument("--workdir", help="keep the photos and data set here (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-big-photos-"))
    write_photos(work / "small", args.images)
    folder = work / f"big-x{args.upscale}"
    enlarge(work / "small", folder, args.upscale)
    validation.validate_dataset(str(folder), str(work / "validation"))
    dataset_dir = str(work / "dataset")
    conversion.convert_dataset(str(folder), str(work / "validation" / "validation.json"), dataset_dir,
                               validation_split_ratio=0.1, test_split_ratio=0.1, random_seed=0)
    classes = len(reader.read_label_map(dataset_dir))
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=args.image_size, epochs=args.epochs,
                         batch_size=32, learning_rate=0.002)
    with Image.open(next(folder.rglob("*.jpg"))) as sample:
        size = sample.size
    scale = int(images.jpeg_scale(size[1], size[0], hp.input_size))
    print(f"{args.images} photos of about {size[0]}x{size[1]}; model input {hp.input_size} px: decoded at 1/{scale}",
          flush=True)

    full_rule = mock.patch.object(images, "jpeg_scale", lambda height, width, image_size: tf.constant(1, tf.int64))
    seconds: dict[str, list[float]] = {"scaled": [], "full": []}
    for _ in range(args.rounds):
        seconds["scaled"].append(first_epoch_seconds(dataset_dir, hp.input_size))
        with full_rule:
            seconds["full"].append(first_epoch_seconds(dataset_dir, hp.input_size))
    accuracy = {"scaled": train_and_evaluate(dataset_dir, hp, classes)}
    with full_rule:
        accuracy["full"] = train_and_evaluate(dataset_dir, hp, classes)
    for name in seconds:
        print(f"{name}: first epoch's decode {min(seconds[name]):.2f} s (fastest of {args.rounds}); test accuracy "
              f"{accuracy[name]:.4f}", flush=True)
    print(json.dumps({
        "first_epoch_speedup": round(min(seconds["full"]) / min(seconds["scaled"]), 2),
        "accuracy_scaled": round(accuracy["scaled"], 4), "accuracy_full": round(accuracy["full"], 4),
        "test_images": reader.split_count(dataset_dir, "test"), "photo_size": list(size), "scale": scale,
        "image_size": hp.input_size, "epochs": hp.epochs,
    }))


if __name__ == "__main__":
    main()
