"""Benchmark: our TFRecord input pipeline against the reference's image_dataset_from_directory.

    .venv/bin/python benchmarks/input_pipeline.py [--images 1000] [--image-size 224] [--batch-size 32] [--rounds 3]

Both read the same synthetic photo-like JPEGs (about 500x375) with the same batch size and image
size, and each is iterated for ``--epochs`` epochs in this one process:

* reference: ``keras.utils.image_dataset_from_directory`` over the class folders, as the reference
  script does: every epoch reads, decodes and resizes every file again (with prefetch, to be fair),
  and yields float32 batches.
* ours: ``trainer.data.reader.make_dataset`` over the shards ``trainer.data.conversion`` wrote (the original
  files' bytes): the first epoch reads, decodes (the serving signature's pixels; for these upright
  JPEGs ``images.decode_upright_jpeg_tensor``) and resizes every image, streams it into the batches
  and caches the resized pixels; later epochs read the cache, shuffle, batch and prefetch. Its batches
  are uint8: the model casts them to float32 in its training step (on the GPU, when there is one),
  which this benchmark, like the reference's pipeline, does not include.

With ``--rounds N`` (default 3) both pipelines are built afresh and run N times, alternating, each
after the previous one's memory is collected and the machine has settled, so a busy moment of another
process on a shared machine does not decide the result: the fastest first epoch of each counts
(``first_epoch_speedup``; the ratio of the medians is printed too), and the steady rate is over all
later epochs. The conversion is timed once.

``first_epoch_speedup`` compares first epochs (tracing included for both; for ours decoding, resizing
and filling the cache); ``first_epoch_cpu_speedup`` compares their CPU time (all threads of this
process), which another process's load on a shared machine moves far less. ``speedup`` compares
steady-state epochs. ``speedup_whole_run`` compares
everything over ``--epochs`` epochs, ours including the conversion, and ``break_even_epochs`` says
after how many epochs ours is ahead. The last line is a JSON object with these figures. Validation,
the step before conversion, is run but not timed (``benchmarks/data_path.py`` times it).
"""

from __future__ import annotations

import argparse
import gc
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

from synthetic import write_photos  # noqa: E402
from trainer.data import conversion, reader, validation  # noqa: E402

TARGET = 3.0
TARGET_FIRST_EPOCH = 1.0


def epoch_seconds(dataset: tf.data.Dataset, epochs: int, cpu: list[float] | None = None) -> list[float]:
    """Iterate ``epochs`` times; return each epoch's duration (images are counted to force the work).
    ``cpu`` gets the first epoch's CPU seconds (this process, all threads) appended."""
    durations = []
    for epoch in range(epochs):
        started, cpu_started, count = time.perf_counter(), time.process_time(), 0
        for images, _ in dataset:
            count += int(images.shape[0])
        durations.append(time.perf_counter() - started)
        if epoch == 0 and cpu is not None:
            cpu.append(time.process_time() - cpu_started)
    return durations


def steady_rate(durations: list[float], images: int) -> float:
    later = durations[1:] or durations
    return images * len(later) / sum(later)


def best_run(runs: list[list[float]]) -> list[float]:
    """The fastest first epoch of all runs, then every later epoch of all runs."""
    return [min(run[0] for run in runs)] + [t for run in runs for t in run[1:]]


def settle() -> None:
    """Between two pipelines: collect the last one's garbage (its buffers, a cache of pixels) and let the
    machine's background work drain, so that neither pipeline pays for the one before it."""
    gc.collect()
    time.sleep(0.5)


def break_even(ours: list[float], reference: list[float], conversion_seconds: float) -> int | None:
    """The first epoch count at which our total time (conversion included) is below the reference's."""
    ours_total, ref_total = conversion_seconds + ours[0], reference[0]
    ours_next, ref_next = ours[-1], reference[-1]
    for epochs in range(1, 1000):
        if ours_total < ref_total:
            return epochs
        ours_total, ref_total = ours_total + ours_next, ref_total + ref_next
    return None


def convert(folder: Path, work: Path) -> tuple[Path, float]:
    """Validate (not timed: the pipeline's previous step) and convert everything into one training split."""
    validation.validate_dataset(str(folder), str(work / "validation"))
    started = time.perf_counter()
    conversion.convert_dataset(str(folder), str(work / "validation" / "validation.json"), str(work / "dataset"),
                               validation_split_ratio=0.0, test_split_ratio=0.0)
    return work / "dataset", time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per pipeline; the first is dropped")
    parser.add_argument("--rounds", type=int, default=3, help="fresh runs of each pipeline, alternating")
    parser.add_argument("--workdir", help="keep the data set here (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-input-bench-"))
    folder = work / "photos"
    write_photos(folder, args.images)
    dataset_dir, conversion_seconds = convert(folder, work)
    print(f"conversion (once): {args.images} images in {conversion_seconds:.1f} s "
          f"({args.images / conversion_seconds:.0f} images/s)", flush=True)

    size = (args.image_size, args.image_size)
    num_classes = len(reader.read_label_map(str(dataset_dir)))
    ref_runs, ours_runs, ref_cpu, ours_cpu = [], [], [], []
    for _ in range(args.rounds):
        reference = keras.utils.image_dataset_from_directory(
            str(folder), image_size=size, batch_size=args.batch_size, label_mode="categorical", shuffle=True,
            seed=0, verbose=False).prefetch(tf.data.AUTOTUNE)
        ref_runs.append(epoch_seconds(reference, args.epochs, ref_cpu))
        print(f"reference image_dataset_from_directory: first epoch {args.images / ref_runs[-1][0]:.0f} images/s,"
              f" then {steady_rate(ref_runs[-1], args.images):.0f}", flush=True)
        del reference
        settle()
        ours = reader.make_dataset(str(dataset_dir), "train", batch_size=args.batch_size, training=True, seed=0,
                                 num_classes=num_classes, binary_mode=False, image_size=args.image_size,
                                 interpolation="bilinear")
        ours_runs.append(epoch_seconds(ours, args.epochs, ours_cpu))
        print(f"ours (TFRecords of original files, pixels cached in the first epoch): first epoch "
              f"{args.images / ours_runs[-1][0]:.0f} images/s, then {steady_rate(ours_runs[-1], args.images):.0f}",
              flush=True)
        del ours  # frees its pixel cache before the next round, not during it
        settle()
    ref_times, ours_times = best_run(ref_runs), best_run(ours_runs)
    ref_rate, ours_rate = steady_rate(ref_times, args.images), steady_rate(ours_times, args.images)
    first_epoch = ref_times[0] / ours_times[0]
    first_epoch_median = statistics.median(run[0] for run in ref_runs) / statistics.median(run[0] for run in ours_runs)
    # CPU time per image of the first epoch: what the work costs, whatever share of the cores another
    # process takes meanwhile (on a shared machine the wall-clock ratio moves with it).
    first_epoch_cpu = min(ref_cpu) / min(ours_cpu)
    print(f"first epoch CPU per image: reference {min(ref_cpu) / args.images * 1e3:.2f} ms, ours "
          f"{min(ours_cpu) / args.images * 1e3:.2f} ms", flush=True)
    print(f"first epoch, ours against the reference: {first_epoch:.2f}x (fastest of each), "
          f"{first_epoch_median:.2f}x (medians)", flush=True)

    # One run of --epochs epochs each: the best first epoch, then later epochs at the steady rate.
    later = args.epochs - 1
    whole_run = (ref_times[0] + later * args.images / ref_rate) / (
        conversion_seconds + ours_times[0] + later * args.images / ours_rate)
    even = break_even(ours_times, ref_times, conversion_seconds)
    print(f"whole run of {args.epochs} epochs, conversion included: ours {whole_run:.2f}x the reference; "
          f"ahead from epoch {even}", flush=True)
    print(json.dumps({
        "speedup": round(ours_rate / ref_rate, 2),
        "first_epoch_speedup": round(first_epoch, 2),
        "first_epoch_speedup_median": round(first_epoch_median, 2),
        "first_epoch_cpu_speedup": round(first_epoch_cpu, 2),
        "speedup_whole_run": round(whole_run, 2),
        "break_even_epochs": even,
        "ours_images_per_second": round(ours_rate, 1),
        "ours_first_epoch_images_per_second": round(args.images / ours_times[0], 1),
        "reference_images_per_second": round(ref_rate, 1),
        "reference_first_epoch_images_per_second": round(args.images / ref_times[0], 1),
        "conversion_images_per_second": round(args.images / conversion_seconds, 1),
        "images": args.images, "image_size": args.image_size, "batch_size": args.batch_size,
        "epochs": args.epochs, "rounds": args.rounds, "target_speedup": TARGET,
        "target_first_epoch_speedup": TARGET_FIRST_EPOCH,
    }))


if __name__ == "__main__":
    main()
