"""Benchmark: training epochs fed by our TFRecords against epochs fed by image_dataset_from_directory.

    .venv/bin/python benchmarks/train_throughput.py [--images 640] [--rounds 5] [--model mobilenet_v2] [--full-network]

The same model (``trainer.train.model.build_model``, random weights: no download needed), optimizer, loss
and batch size are trained on each input, in this process: one network per input, each after a warm-up
epoch that traces its step (and fills our cache), then ``--rounds`` rounds of one timed epoch of each,
alternating which input goes first. By default only the head is trained (``train_only_top_layer``, which
AWS advises for large backbones): the backbone's forward pass remains, and the input pipeline's share of
each step is what differs. ``--full-network`` trains every layer.

Each epoch also reports where its time went, so a slow round can be told from a busy machine: this
process's CPU seconds (its threads, Linux schedstat), its threads' seconds waiting for a CPU, and the
cores the machine's other processes used meanwhile. A round below 0.75 of its input's fastest round is
counted in ``slow_rounds`` (on a shared machine another process's load is enough). The slow mode the
issue saw, exactly 62.5 images/s for 640 images, was epochs held to 10.24 s by tf.data's autotuning
thread (see ``trainer.data.reader._pipeline_options`` and ``benchmarks/iterator_release.py``): an epoch that ends
within 0.15 s after one of that thread's wake-ups (2.55, 5.11, 10.23, 20.47, 40.95, ... s) is counted in
``pinned_rounds``.

On a GPU machine it runs unchanged, over all visible GPUs (the global batch is split across them),
and reports images/s per GPU too.

It also reports, for each input, the share of step time spent waiting for input: one more epoch is
run step by step (``train_on_batch``), timing how long each step waits for its batch (``next()`` on
the dataset's iterator) against the whole step. TensorFlow's profiler calls a step input-bound when
more than 5% of it is spent waiting for input; above that a faster accelerator would wait on the
input pipeline (``input_bound``). The step-by-step epoch pays Python's per-step call, which
``fit`` does not, so its images/s are not reported: only the share.

The last line is a JSON object with ``speedup`` (the median images/s of ours over the reference's),
``speedup_per_round``, ``slow_rounds``, ``pinned_rounds`` and each input's median, min, max and spread,
and ``input_wait_share`` per input.
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
from trainer.hyperparameters import Hyperparameters  # noqa: E402
from trainer.train import model, training  # noqa: E402

# A round whose rate is below this share of the input's fastest round is counted as a slow round (on a shared
# machine, another process's load is enough for that: see each epoch's "other processes" cores).
SLOW_ROUND_SHARE = 0.75
# tf.data's autotuning thread wakes up 10 * (2**k - 1) ms after an iterator starts; an epoch held back by it
# (see trainer.data.reader._pipeline_options) ends just after one of these: such a round is counted as pinned.
TUNER_WAKE_UPS = [10 * (2**k - 1) / 1000 for k in range(8, 14)]  # 2.55 s ... 81.91 s
PINNED_WITHIN = 0.15  # seconds after a wake-up (measured: 0.01-0.13 s; a wider window catches chance epochs)


def thread_times() -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) summed over this process's threads (Linux
    schedstat); None where the kernel does not report them."""
    running = waiting = 0.0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as handle:
                on_cpu, on_queue = handle.read().split()[:2]
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        running += int(on_cpu) / 1e9
        waiting += int(on_queue) / 1e9
    return running, waiting


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def timed_epoch(network: keras.Model, dataset: tf.data.Dataset, count: int) -> dict:
    """One epoch of ``fit``: images/s, and where the time went (this process's CPU seconds, its threads' time
    waiting for a CPU, and the CPU the machine's other processes used meanwhile, in cores)."""
    threads, busy, started = thread_times(), machine_busy_seconds(), time.perf_counter()
    network.fit(dataset, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    epoch = {"images_per_second": count / seconds, "seconds": seconds}
    threads_after, busy_after = thread_times(), machine_busy_seconds()
    if threads is not None and threads_after is not None:
        epoch["cpu_seconds"] = threads_after[0] - threads[0]
        epoch["cpu_queue_seconds"] = threads_after[1] - threads[1]
        if busy is not None and busy_after is not None:
            epoch["other_processes_cores"] = max(0.0, busy_after - busy - epoch["cpu_seconds"]) / seconds
    return epoch


def pinned(seconds: float) -> bool:
    """Whether an epoch of ``seconds`` ended just after a wake-up of tf.data's autotuning thread."""
    return any(0 <= seconds - wake_up <= PINNED_WITHIN for wake_up in TUNER_WAKE_UPS)


def summary(epochs: list[dict]) -> dict:
    rates = [e["images_per_second"] for e in epochs]
    median = statistics.median(rates)
    result = {"median": round(median, 1), "min": round(min(rates), 1), "max": round(max(rates), 1),
              "spread": round((max(rates) - min(rates)) / median, 3),
              "slow_rounds": sum(rate < SLOW_ROUND_SHARE * max(rates) for rate in rates),
              "pinned_rounds": sum(pinned(e["seconds"]) for e in epochs)}
    for key in ("cpu_seconds", "cpu_queue_seconds", "other_processes_cores"):
        if all(key in e for e in epochs):
            result[f"median_{key}"] = round(statistics.median(e[key] for e in epochs), 2)
    return result


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
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs of each input, alternating")
    parser.add_argument("--workdir", help="keep the data set here (default: a temporary folder)")
    args = parser.parse_args()

    hp = Hyperparameters(model=args.model, weights="none", image_size=args.image_size, batch_size=args.batch_size,
                         train_only_top_layer=not args.full_network)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-train-bench-"))
    folder = work / "photos"
    write_photos(folder, args.images)
    dataset_dir, _ = convert(folder, work)
    classes = len(reader.read_label_map(str(dataset_dir)))

    strategy = training.choose_strategy()
    replicas = strategy.num_replicas_in_sync
    size = (hp.input_size, hp.input_size)
    inputs = {
        "reference": keras.utils.image_dataset_from_directory(
            str(folder), image_size=size, batch_size=hp.batch_size, label_mode="categorical", shuffle=True,
            seed=0, verbose=False).prefetch(tf.data.AUTOTUNE),
        "ours": reader.make_dataset(str(dataset_dir), "train", batch_size=hp.batch_size, training=True, seed=0,
                                  num_classes=classes, binary_mode=False, image_size=hp.input_size,
                                  interpolation=hp.image_resize_interpolation),
    }
    networks = {}
    for name, dataset in inputs.items():
        keras.utils.set_random_seed(0)
        with strategy.scope():
            network = model.build_model(hp, classes)  # freezes the backbone when train_only_top_layer
            network.compile(optimizer=training.make_optimizer(hp), loss=training.make_loss(hp),
                            metrics=["accuracy"])
        network.fit(dataset, epochs=1, verbose=0)  # warm-up: traces the step, fills our cache
        networks[name] = network
    epochs: dict[str, list[dict]] = {name: [] for name in inputs}
    for round_number in range(args.rounds):
        # Alternate which input goes first, so neither always follows the other.
        order = list(inputs) if round_number % 2 == 0 else list(reversed(list(inputs)))
        for name in order:
            epoch = timed_epoch(networks[name], inputs[name], args.images)
            epochs[name].append(epoch)
            where = (f"; {epoch['cpu_seconds']:.1f} s CPU, {epoch['cpu_queue_seconds']:.1f} s waiting for a CPU, other "
                     f"processes {epoch.get('other_processes_cores', float('nan')):.2f} cores"
                     if "cpu_seconds" in epoch else "")
            print(f"round {round_number + 1} {name}: {epoch['images_per_second']:.1f} images/s "
                  f"({epoch['seconds']:.2f} s{where})", flush=True)
    waits = {name: input_wait_share(networks[name], dataset) for name, dataset in inputs.items()}
    summaries = {name: summary(epochs[name]) for name in inputs}
    for name in inputs:
        median, bound = summaries[name]["median"], waits[name] > INPUT_BOUND_SHARE
        print(f"{name}: median {median:.1f} images/s ({median / replicas:.1f} per replica, {replicas} replica(s), "
              f"{'whole network' if args.full_network else 'head only'}), {summaries[name]['min']:.1f}-"
              f"{summaries[name]['max']:.1f} over {args.rounds} rounds; {waits[name]:.1%} of step time waiting "
              f"for input{' (input-bound)' if bound else ''}", flush=True)
    per_round = [o["images_per_second"] / r["images_per_second"]
                 for o, r in zip(epochs["ours"], epochs["reference"], strict=True)]
    print(json.dumps({
        "speedup": round(summaries["ours"]["median"] / summaries["reference"]["median"], 2),
        "speedup_per_round": [round(x, 2) for x in per_round],
        "slow_rounds": {name: summaries[name]["slow_rounds"] for name in inputs},
        "pinned_rounds": {name: summaries[name]["pinned_rounds"] for name in inputs},
        "ours": summaries["ours"], "reference": summaries["reference"],
        "input_wait_share": {name: round(share, 4) for name, share in waits.items()},
        "input_bound": {name: share > INPUT_BOUND_SHARE for name, share in waits.items()},
        "ours_images_per_second_per_replica": round(summaries["ours"]["median"] / replicas, 1),
        "replicas": replicas, "devices": [d.name for d in tf.config.list_logical_devices("GPU")] or ["CPU"],
        "model": args.model, "image_size": hp.input_size, "batch_size": hp.batch_size, "rounds": args.rounds,
        "trained": "whole network" if args.full_network else "head only",
    }))


if __name__ == "__main__":
    main()
