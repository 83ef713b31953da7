"""Benchmark: a training epoch fed by our TFRecords against one fed by image_dataset_from_directory.

    .venv/bin/python benchmarks/train_throughput.py [--images 640] [--model mobilenet_v2] [--full-network]

The same model (``trainer.model.build_model``, random weights: no download needed), optimizer, loss
and batch size are trained for one epoch on each input, in this process, after a warm-up epoch that
traces the training step. By default only the head is trained (``train_only_top_layer``, which AWS
advises for large backbones): the backbone's forward pass remains, and the input pipeline's share of
each step is what differs. ``--full-network`` trains every layer.

On a GPU machine it runs unchanged, over all visible GPUs (the global batch is split across them),
and reports images/s per GPU too.

It also reports, for each input, the share of step time spent waiting for input: one more epoch is
run step by step (``train_on_batch``), timing how long each step waits for its batch (``next()`` on
the dataset's iterator) against the whole step. TensorFlow's profiler calls a step input-bound when
more than 5% of it is spent waiting for input; above that a faster accelerator would wait on the
input pipeline (``input_bound``). The step-by-step epoch pays Python's per-step call, which
``fit`` does not, so its images/s are not reported: only the share.

The last line is a JSON object with ``speedup`` (ours over the reference) and
``input_wait_share`` per input.
"""

from __future__ import annotations

import argparse
import json
import os
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
from trainer import data, model, training  # noqa: E402
from trainer.hyperparameters import Hyperparameters  # noqa: E402


def epoch_rate(network: keras.Model, dataset: tf.data.Dataset, count: int) -> float:
    """Images/s of one epoch, after a warm-up epoch that traces the step and fills caches."""
    network.fit(dataset, epochs=1, verbose=0)
    started = time.perf_counter()
    network.fit(dataset, epochs=1, verbose=0)
    return count / (time.perf_counter() - started)


INPUT_BOUND_SHARE = 0.05


def input_wait_share(network: keras.Model, dataset: tf.data.Dataset) -> float:
    """Share of one epoch's step time spent waiting for the next batch (the model is already traced)."""
    iterator = iter(dataset)
    waiting = total = 0.0
    while True:
        started = time.perf_counter()
        try:
            inputs, targets = next(iterator)
        except StopIteration:
            break
        got = time.perf_counter()
        network.train_on_batch(inputs, targets)
        done = time.perf_counter()
        waiting += got - started
        total += done - started
    return waiting / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--full-network", action="store_true", help="train the backbone too")
    parser.add_argument("--workdir", help="keep the data set here (default: a temporary folder)")
    args = parser.parse_args()

    hp = Hyperparameters(model=args.model, weights="none", image_size=args.image_size, batch_size=args.batch_size,
                         train_only_top_layer=not args.full_network)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-train-bench-"))
    folder = work / "photos"
    write_photos(folder, args.images)
    dataset_dir, _ = convert(folder, work)
    classes = len(data.read_label_map(str(dataset_dir)))

    strategy = training.choose_strategy()
    replicas = strategy.num_replicas_in_sync
    size = (hp.input_size, hp.input_size)
    inputs = {
        "reference": keras.utils.image_dataset_from_directory(
            str(folder), image_size=size, batch_size=hp.batch_size, label_mode="categorical", shuffle=True,
            seed=0, verbose=False).prefetch(tf.data.AUTOTUNE),
        "ours": data.make_dataset(str(dataset_dir), "train", batch_size=hp.batch_size, training=True, seed=0,
                                  num_classes=classes, binary_mode=False, image_size=hp.input_size,
                                  interpolation=hp.image_resize_interpolation),
    }
    rates, waits = {}, {}
    for name, dataset in inputs.items():
        keras.utils.set_random_seed(0)
        with strategy.scope():
            network = model.build_model(hp, classes)  # freezes the backbone when train_only_top_layer
            network.compile(optimizer=training.make_optimizer(hp), loss=training.make_loss(hp),
                            metrics=["accuracy"])
        rates[name] = epoch_rate(network, dataset, args.images)
        waits[name] = input_wait_share(network, dataset)
        print(f"{name}: {rates[name]:.1f} images/s ({rates[name] / replicas:.1f} per replica, {replicas} "
              f"replica(s), {'whole network' if args.full_network else 'head only'}); "
              f"{waits[name]:.1%} of step time waiting for input"
              f"{' (input-bound)' if waits[name] > INPUT_BOUND_SHARE else ''}", flush=True)

    print(json.dumps({
        "speedup": round(rates["ours"] / rates["reference"], 2),
        "input_wait_share": {name: round(share, 4) for name, share in waits.items()},
        "input_bound": {name: share > INPUT_BOUND_SHARE for name, share in waits.items()},
        "ours_images_per_second": round(rates["ours"], 1),
        "reference_images_per_second": round(rates["reference"], 1),
        "ours_images_per_second_per_replica": round(rates["ours"] / replicas, 1),
        "replicas": replicas, "devices": [d.name for d in tf.config.list_logical_devices("GPU")] or ["CPU"],
        "model": args.model, "image_size": hp.input_size, "batch_size": hp.batch_size,
        "trained": "whole network" if args.full_network else "head only",
    }))


if __name__ == "__main__":
    main()
