"""Evidence: deleting a partly read tf.data iterator can wait for the autotuning thread's next wake-up.

    .venv/bin/python benchmarks/iterator_release.py [--images 640] [--epochs 6] [--step 0.2]

Keras ends a training epoch after its steps, without reading the data to its end, and the iterator is
deleted then. Each input here is read as Keras reads it (every batch of one epoch, ``--step`` seconds of
"training" after each, never past the last batch) and then deleted, ``--epochs`` times:

* ``ours``: ``trainer.data.reader.make_dataset`` as training builds it (no autotuning: ``reader._pipeline_options``);
* ``ours_autotuned``: the same pipeline with tf.data's autotuning switched back on;
* ``reference``: ``image_dataset_from_directory`` with ``prefetch(AUTOTUNE)`` (autotuned, as tf.data's default).

An autotuned iterator starts a thread that wakes up to re-tune 10 ms after the iterator starts, then after
20, 40, ... ms: at 10 * (2**k - 1) ms (0.63, 1.27, 2.55, 5.11, 10.23, 20.47, 40.95 s). Each line gives how long
the deletion took and, when it waited, the wake-up it ended at. A deletion that takes more than a few
milliseconds and ends just after a wake-up is the wait that held the issue's epochs to exactly 10.24 s
(62.5 images/s for 640 images). The last line is a JSON object with the median and longest deletion per
input. Like all CPU figures here, the waits show more on a busy machine (the thread wakes late).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from input_pipeline import convert  # noqa: E402
from synthetic import write_photos  # noqa: E402
from trainer.data import reader  # noqa: E402

WAKE_UPS = [10 * (2**k - 1) / 1000 for k in range(1, 14)]


def nearest_wake_up(seconds: float) -> float:
    """The autotuning thread's last wake-up at or before ``seconds`` after the iterator started."""
    return max([w for w in WAKE_UPS if w <= seconds], default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--step", type=float, default=0.2, help="seconds of 'training' after each batch")
    parser.add_argument("--workdir", help="keep the data set here (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-release-bench-"))
    write_photos(work / "photos", args.images)
    dataset_dir, _ = convert(work / "photos", work)
    classes = len(reader.read_label_map(str(dataset_dir)))
    ours = reader.make_dataset(str(dataset_dir), "train", batch_size=32, training=True, seed=0, num_classes=classes,
                             binary_mode=False, image_size=224, interpolation="bilinear")
    autotuned = tf.data.Options()
    autotuned.autotune.enabled = True
    inputs = {
        "ours": ours,
        "ours_autotuned": ours.with_options(autotuned),
        "reference": keras.utils.image_dataset_from_directory(
            str(work / "photos"), image_size=(224, 224), batch_size=32, label_mode="categorical", shuffle=True,
            seed=0, verbose=False).prefetch(tf.data.AUTOTUNE),
    }
    for _ in ours:  # fill our cache: later epochs read it, as in training
        pass
    batches = -(-args.images // 32)
    deletions: dict[str, list[float]] = {name: [] for name in inputs}
    for epoch in range(args.epochs):
        for name, dataset in inputs.items():
            started = time.perf_counter()
            iterator = iter(dataset)
            for _ in range(batches):
                next(iterator)
                time.sleep(args.step)
            read = time.perf_counter()
            del iterator
            done = time.perf_counter()
            deletions[name].append(done - read)
            waited = done - read > 0.05
            note = f", ended {done - started - nearest_wake_up(done - started):.3f} s after the wake-up at " \
                   f"{nearest_wake_up(done - started):.2f} s" if waited else ""
            print(f"epoch {epoch + 1} {name}: read in {read - started:.2f} s, deleted in {done - read:.3f} s{note}",
                  flush=True)
    print(json.dumps({name: {"median_deletion_seconds": round(statistics.median(times), 3),
                             "longest_deletion_seconds": round(max(times), 3)}
                      for name, times in deletions.items()}))


if __name__ == "__main__":
    main()
