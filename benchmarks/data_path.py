"""Benchmark: the data path a run pays for before training, against the plain loop a user would write.

    .venv/bin/python benchmarks/data_path.py [--images 2000] [--repeat 1] [--workdir DIR]

Both start from the same synthetic photo-like JPEGs (``synthetic.write_photos``: 10 classes, about
500x375 pixels, 30-90 KB) and end with TFRecords of tf.train.Examples holding the original bytes:

* plain: one Python process running the loop of TensorFlow's TFRecord tutorial, single-threaded: read
  a file, decode it with ``tf.io.decode_image`` to check it, write an Example with the original bytes.
* ours: the three steps the pipeline runs before training, each as its own process, making the calls
  the pipeline's components make: look-at-data (``fingerprint.look_at_data``: every file's SHA-256 on
  a volume), validate-data (``fingerprint.validate_unchanged``: validation with its Markdown and HTML
  reports, then the second look that makes sure nothing changed meanwhile), then
  ``python -m trainer convert`` (split, shuffled, sharded, every file's SHA-256 checked).

Each is timed from the moment its process is started to the moment the last one exits, so Python's
start, every import (TensorFlow's included, where a process imports it) and writing the outputs all
count. Not counted, for either: writing the photos, and the page cache (both read files that were
just written, so the comparison is of CPU work, as on a machine whose disks keep up). The pipeline's
own per-step overhead (KFP's launcher, a pod's start) is left out too: it would be paid by the plain
loop as a pipeline step as well.

With ``--repeat N`` the two are run N times, interleaved, and the fastest run of each counts (another
process briefly busy on a shared machine then does not decide the result).

Then, unless ``--no-scaling``, validation alone is timed inside one process (imports done), with one
worker thread and with one per core, on the same images: the steady rate and how it scales.

The last line is a JSON object: ``speedup`` (plain time / ours), the images/s of each, and the
validation rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import plain_loop  # noqa: E402
from synthetic import write_photos  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.resources import available_cores  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.5


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def timed(commands: list[list[str]], log: Path) -> float:
    """Run the commands one after the other, as separate processes; seconds from the first start to the end."""
    started = time.perf_counter()
    with open(log, "a") as out:
        for command in commands:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
            if result.returncode != 0:
                sys.exit(f"{command[:4]} failed (exit {result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def run_plain(data: Path, work: Path, log: Path) -> float:
    out = work / "plain"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seconds = timed([[sys.executable, __file__, "--child-plain", str(data), str(out / "images.tfrecord")]], log)
    shutil.rmtree(out, ignore_errors=True)
    return seconds


# What the look-at-data and validate-data components call (components/look_at_data.py, validate_data.py).
LOOK = ("import sys; from trainer.data.fingerprint import look_at_data; "
        "open(sys.argv[2], 'w').write(look_at_data(sys.argv[1]).fingerprint)")
VALIDATE = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
            "from trainer.data.fingerprint import validate_unchanged; "
            "validate_unchanged(sys.argv[1], sys.argv[2], open(sys.argv[3]).read())")


def run_ours(data: Path, work: Path, log: Path) -> float:
    validation, dataset, look = work / "validation", work / "dataset", work / "fingerprint.txt"
    for folder in (validation, dataset):
        shutil.rmtree(folder, ignore_errors=True)
    seconds = timed([
        [sys.executable, "-c", LOOK, str(data), str(look)],
        [sys.executable, "-c", VALIDATE, str(data), str(validation), str(look)],
        [sys.executable, "-m", "trainer", "convert", "--data", str(data), "--validation",
         str(validation / "validation.json"), "--output", str(dataset)],
    ], log)
    written = json.loads((dataset / "manifest.json").read_text())["written"]
    shutil.rmtree(dataset, ignore_errors=True)
    return seconds if written else float("nan")


def validation_rates(data: Path, work: Path, images: int) -> dict[str, float]:
    """Steady images/s of validation alone (in this process, imports done) with 1 worker and one per core."""
    from trainer.data import validation

    cores = available_cores()
    rates = {}
    validation.validate_dataset(str(data), str(work / "warm"), workers=cores, html_report=False)  # page cache
    for workers in sorted({1, cores}):
        started = time.perf_counter()
        validation.validate_dataset(str(data), str(work / f"v{workers}"), workers=workers, html_report=False)
        rates[f"{workers}_worker{'s' if workers > 1 else ''}"] = images / (time.perf_counter() - started)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts (default 1)")
    parser.add_argument("--no-scaling", action="store_true", help="skip timing validation alone")
    parser.add_argument("--workdir", help="keep the photos here (default: a temporary folder)")
    parser.add_argument("--child-plain", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_plain:
        plain_loop(*args.child_plain)
        return

    temporary = None if args.workdir else tempfile.mkdtemp(prefix="imgclf-data-path-")
    work = Path(args.workdir or temporary).resolve()
    try:
        data = work / "photos"
        write_photos(data, args.images)
        log = work / "children.log"
        log.write_text("")
        load = os.getloadavg()[0]
        plain, ours = [], []
        for _ in range(args.repeat):
            plain.append(run_plain(data, work, log))
            print(f"plain loop, 1 process:                    {args.images / plain[-1]:7.0f} images/s "
                  f"({plain[-1]:.1f} s)", flush=True)
            ours.append(run_ours(data, work, log))
            print(f"ours, look + validate + convert processes: {args.images / ours[-1]:6.0f} images/s "
                  f"({ours[-1]:.1f} s)", flush=True)
        best_plain, best_ours = min(plain), min(ours)
        summary = {
            "speedup": round(best_plain / best_ours, 2),
            "plain_images_per_second": round(args.images / best_plain, 1),
            "ours_images_per_second": round(args.images / best_ours, 1),
            "plain_seconds": round(best_plain, 2), "ours_seconds": round(best_ours, 2),
            "images": args.images, "runs": args.repeat, "cores": available_cores(),
            "target_speedup": TARGET,
        }
        if not args.no_scaling:
            rates = validation_rates(data, work, args.images)
            for name, rate in rates.items():
                print(f"validation alone, steady, {name.replace('_', ' ')}: {rate:7.0f} images/s", flush=True)
            summary["validation_images_per_second"] = {k: round(v, 1) for k, v in rates.items()}
        summary["load_average"] = {"start": round(load, 1), "end": round(os.getloadavg()[0], 1)}
        print(json.dumps(summary))
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
