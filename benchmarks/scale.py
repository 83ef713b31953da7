"""Benchmark: how the data path's cost grows with the number of images (time per image, peak memory).

    .venv/bin/python benchmarks/scale.py [--sizes 10000,40000,200000] [--gcs-sizes 300,1500]
                                         [--big-photos 160] [--workdir DIR]

For each size a folder of small generated JPEGs (32x32 pixels, every one distinct, 10 classes) is
written once (not timed), then each step runs in its own process, making the call its pipeline
component makes, so that process start and imports count as they do in a pipeline:

* look:     ``fingerprint.look_at_data`` (components/look_at_data.py): every file's SHA-256 on a volume.
* validate: ``fingerprint.validate_unchanged`` (components/validate_data.py): validation with its
            reports, then the second look.
* convert:  ``conversion.convert_dataset`` (components/convert_to_tfrecords.py).
* epoch:    the first epoch of ``trainer.data.reader.make_dataset``'s training
            input at 32 px (decode, resize, the pixel cache written to local disk: ``cache_bytes=0``,
            so that the deliberate in-memory cache of small data sets does not count as growth), without
            a model: the input side of a first epoch.

For each step and size it prints seconds per 1,000 images and the peak resident memory of the step's
process (``wait4``'s ``ru_maxrss``). With ``--gcs-sizes`` the look, validate and convert steps also
run on a gcp-storage-emulator (a GCS API server on loopback, started here) holding the same kind of
images, at those (smaller) sizes: the emulator answers about 40 requests a second, so its wall time
is the emulator's and its ``cpu_growth`` is ours. The defaults took 4.6 minutes on 2 shared cores with
the images of an earlier run in ``--workdir`` (writing 250,000 small JPEGs adds a few minutes);
``--sizes 10000,100000,1000000`` is the run to a million (about 1M x 4 KB of files on disk).

Measured on the 2-core development machine, defaults, 2026-12-03 after the regroup (load average
0.2-1.6): time_growth look 0.93, validate 1.03, convert 0.95, epoch 0.35; memory_growth 1.09, 1.29,
1.33, 1.18 (peak RSS 56 -> 61, 76 -> 98, 77 -> 102 and 666 -> 784 MiB from 10,000 to 200,000 images);
gs:// 300 -> 1,500 images cpu_growth 0.10, 0.68, 0.69, memory_growth 1.04. To a million
(``--sizes 10000,100000,1000000 --big-photos 0``, 23 minutes with the images written): time_growth
0.96, 1.05, 1.01, 0.53; peak RSS 56 -> 75, 76 -> 168, 77 -> 223 and 662 -> 793 MiB (validation keeps
about 95 bytes per image, conversion about 150: one entry per image; the epoch's cache index was 1.3 KB
an image, 1,932 MiB at a million, before the cache went one file per shard). First epoch on
12-megapixel JPEGs: 1.32 on 160 photos (ours 2.2 s, image_dataset_from_directory 2.9 s), where one
photo's decode and resize on one core is 22.9 ms against 36.4 ms: libjpeg's 1/8 scaling skips the
inverse DCT, colour conversion and resize but must still entropy-decode every coefficient, so 1.59x is
the most decoding can give on such detailed photos (1.9 MB each).

Then, unless ``--big-photos 0``, the first epoch on 12-megapixel JPEGs (4000x3000, photo-like) fed by
``trainer.data.reader.make_dataset`` at 224 px (whatever decode trainer.data.reader does) against
``keras.utils.image_dataset_from_directory`` at 224 px, same images, each in its own process, timed
from the dataset's creation to the end of its first epoch (input only, one run each).

The last line is a JSON object: ``time_growth`` (per step, the least-squares slope of log seconds
against log images: 1.0 is linear), ``memory_growth`` (per step, peak RSS at the largest size over the
smallest), ``cpu_growth`` (the slope for the step's CPU seconds, steadier than wall time on a shared
machine), the same for gs:// under ``gcs``, and ``big_photo_first_epoch_speedup`` (reference seconds
over ours). Targets: every time_growth at most 1.1 and memory_growth at most 1.5.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_photos  # noqa: E402

DEFAULT_SIZES = "10000,40000,200000"
TIME_TARGET, MEMORY_TARGET = 1.1, 1.5
CLASSES = 10
STEPS = ("look", "validate", "convert", "epoch")
GCS_STEPS = ("look", "validate", "convert")

# What each component calls, as a child process: argv = [data, work].
CHILD = {
    "look": ("import sys; from trainer.data.fingerprint import look_at_data; "
             "open(sys.argv[2] + '/look.txt', 'w').write(look_at_data(sys.argv[1]).fingerprint)"),
    "validate": ("import sys; from trainer.data.fingerprint import validate_unchanged; "
                 "validate_unchanged(sys.argv[1], sys.argv[2] + '/validation', "
                 "open(sys.argv[2] + '/look.txt').read())"),
    "convert": ("import sys; from trainer.data.conversion import convert_dataset; "
                "convert_dataset(sys.argv[1], sys.argv[2] + '/validation/validation.json', sys.argv[2] + '/dataset')"),
    "epoch": ("import sys, time; from trainer.data import reader; "
              "d = reader.make_dataset(sys.argv[2] + '/dataset', 'train', batch_size=64, training=True, seed=0, "
              "num_classes=10, binary_mode=False, image_size=32, interpolation='bilinear', cache_bytes=0); "
              "n = sum(int(b[0].shape[0]) for b in d); print('epoch images', n)"),
}
# Both children import TensorFlow before the clock starts (trainer.data.reader imports it lazily, on first use), so
# both times are building the input pipeline and its first epoch.
BIG_OURS = ("import sys, time, json, tensorflow as tf; from trainer.data import reader; t = time.perf_counter(); "
            "d = reader.make_dataset(sys.argv[1], 'train', batch_size=16, training=True, seed=0, num_classes=2, "
            "binary_mode=False, image_size=224, interpolation='bilinear'); "
            "n = sum(int(b[0].shape[0]) for b in d); print(json.dumps([n, time.perf_counter() - t]))")
BIG_REFERENCE = ("import sys, time, json, keras, tensorflow as tf; t = time.perf_counter(); "
                 "d = keras.utils.image_dataset_from_directory(sys.argv[1], image_size=(224, 224), batch_size=16, "
                 "label_mode='categorical', shuffle=True, seed=0, verbose=False).prefetch(tf.data.AUTOTUNE); "
                 "n = sum(int(b[0].shape[0]) for b in d); print(json.dumps([n, time.perf_counter() - t]))")


# One core, one photo at a time: what a photo's decode-and-resize costs each side (ours: the one preparation,
# images.model_input, with its DCT-scaled decode; the reference: Keras's load_image, decode_image then
# resize). Their ratio is the most the first epoch could gain from decoding alone.
BIG_DECODE = ("import sys, glob, time, json, tensorflow as tf; from trainer import images; "
              "tf.config.threading.set_inter_op_parallelism_threads(1); "
              "tf.config.threading.set_intra_op_parallelism_threads(1); "
              "files = sorted(glob.glob(sys.argv[1] + '/*/*.jpg'))[:20]; "
              "blobs = [open(f, 'rb').read() for f in files]; "
              "ours = tf.function(lambda b: images.model_input(b, 224, 'bilinear')); "
              "ref = tf.function(lambda b: tf.image.resize(tf.io.decode_image(b, channels=3, expand_animations=False), "
              "(224, 224))); spent = {'ours': 0.0, 'reference': 0.0}; "
              "[f(tf.constant(blobs[0])).numpy() for f in (ours, ref)]\n"
              "for blob in blobs:\n"
              " for name, f in (('ours', ours), ('reference', ref)):\n"
              "  t = time.perf_counter(); f(tf.constant(blob)).numpy(); spent[name] += time.perf_counter() - t\n"
              "print(json.dumps({k: 1000 * v / len(blobs) for k, v in spent.items()}))")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(code: str, args: list[str], log: Path,
              env: dict[str, str] | None = None) -> tuple[float, int, str, float]:
    """Run ``python -c code args`` as its own process: (seconds from start to exit, peak RSS bytes, stdout,
    CPU seconds of the process and its threads)."""
    with open(log, "a") as err, tempfile.TemporaryFile("w+") as out:
        err.write(f"$ python -c {code[:60]!r}... {' '.join(args)}\n")
        err.flush()
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err,
                                   env=env or _env(), cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    if process.returncode != 0:
        sys.exit(f"step failed (exit {process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, stdout, usage.ru_utime + usage.ru_stime


def write_small_images(folder: Path, count: int) -> None:
    """``count`` distinct 32x32 JPEGs in 10 class folders (reused when the folder already holds them)."""
    stamp = folder.with_name(folder.name + ".done")
    if stamp.exists() and stamp.read_text() == f"{count} v2":
        return
    shutil.rmtree(folder, ignore_errors=True)
    for c in range(CLASSES):
        (folder / f"class_{c:02d}").mkdir(parents=True)
    base = np.random.default_rng(0).integers(0, 256, (CLASSES, 32, 32, 3), dtype=np.uint8)

    def chunk(start: int) -> None:
        for i in range(start, min(start + 1000, count)):
            c = i % CLASSES
            # Grain of the image's own: no two files alike (JPEG would map close pixel values to equal files).
            grain = np.random.default_rng(i).integers(-24, 25, base[c].shape)
            pixels = np.clip(base[c].astype(np.int16) + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{c:02d}" / f"img_{i:07d}.jpg", "JPEG", quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(chunk, range(0, count, 1000)))
    stamp.write_text(f"{count} v2")


def growth(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(images)."""
    x, y = np.log(sizes), np.log(seconds)
    return float(np.polyfit(x, y, 1)[0])


def measure(data_uri: str, work: Path, count: int, steps: tuple[str, ...], log: Path,
            env: dict[str, str] | None, label: str) -> dict[str, tuple[float, int, float]]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    found = {}
    for step in steps:
        seconds, rss, _, cpu = run_child(CHILD[step], [data_uri, str(work)], log, env)
        found[step] = (seconds, rss, cpu)
        print(f"{label:5s} {count:>8,d} images  {step:8s} {1000 * seconds / count:8.3f} s/1,000 images  "
              f"peak RSS {rss / 2**20:7.0f} MiB  ({seconds:.1f} s; CPU {1000 * cpu / count:.3f} s/1,000)", flush=True)
    return found


def summarise(sizes: list[int], results: dict[int, dict[str, tuple[float, int, float]]],
              steps: tuple[str, ...]) -> dict:
    return {
        "time_growth": {s: round(growth(sizes, [results[n][s][0] for n in sizes]), 3) for s in steps},
        # The same slope for CPU seconds: what the work costs, whatever share of the cores others take.
        "cpu_growth": {s: round(growth(sizes, [results[n][s][2] for n in sizes]), 3) for s in steps},
        "memory_growth": {s: round(results[sizes[-1]][s][1] / results[sizes[0]][s][1], 3) for s in steps},
        "seconds_per_1000": {s: {n: round(1000 * results[n][s][0] / n, 3) for n in sizes} for s in steps},
        "peak_rss_mib": {s: {n: round(results[n][s][1] / 2**20) for n in sizes} for s in steps},
    }


def start_emulator(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                                f"--port={port}", "--in-memory", "--quiet"], stdout=open(log, "a"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    sys.exit(f"gcp-storage-emulator did not start; see {log}")


def stage_on_gcs(folder: Path, bucket: str, prefix: str) -> str:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="imgclf-bench", credentials=AnonymousCredentials())
    if client.lookup_bucket(bucket) is None:
        client.create_bucket(bucket)
    ref = client.bucket(bucket)
    files = sorted(p for p in folder.rglob("*.jpg"))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: ref.blob(f"{prefix}/{p.relative_to(folder).as_posix()}").upload_from_filename(
            str(p)), files))
    return f"gs://{bucket}/{prefix}"


def write_big_photos(folder: Path, count: int) -> None:
    """``count`` 12-megapixel photo-like JPEGs (4000x3000) in 2 classes: synthetic photos scaled up, with grain."""
    stamp = folder.with_name(folder.name + ".done")
    if stamp.exists() and stamp.read_text() == str(count):
        return
    small = folder.with_name(folder.name + "-small")
    write_photos(small, max(count, 10))
    shutil.rmtree(folder, ignore_errors=True)
    sources = sorted(small.rglob("*.jpg"))[:count]

    def enlarge(index: int) -> None:
        target = folder / f"class_{index % 2}"
        target.mkdir(parents=True, exist_ok=True)
        with Image.open(sources[index]) as image:
            big = np.asarray(image.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = np.random.default_rng(index).integers(-6, 7, big.shape, dtype=np.int16)
        Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(
            target / f"photo_{index:04d}.jpg", "JPEG", quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(enlarge, range(count)))
    stamp.write_text(str(count))


def big_photo_speedup(work: Path, count: int, log: Path) -> dict:
    folder = work / "big-photos"
    write_big_photos(folder, count)
    converted = work / "big-work"
    shutil.rmtree(converted, ignore_errors=True)
    converted.mkdir(parents=True)
    for step in ("look", "validate"):  # not timed: the steps before training
        run_child(CHILD[step], [str(folder), str(converted)], log)
    run_child("import sys; from trainer.data.conversion import convert_dataset; convert_dataset(sys.argv[1], "
              "sys.argv[2] + '/validation/validation.json', sys.argv[2] + '/dataset', validation_split_ratio=0, "
              "test_split_ratio=0)", [str(folder), str(converted)], log)
    out = run_child(BIG_OURS, [str(converted / "dataset")], log)[2]
    ours_n, ours_s = json.loads(out.strip().splitlines()[-1])
    out = run_child(BIG_REFERENCE, [str(folder)], log)[2]
    ref_n, ref_s = json.loads(out.strip().splitlines()[-1])
    if ours_n != ref_n:
        sys.exit(f"the two first epochs saw {ours_n} and {ref_n} images")
    print(f"12-megapixel JPEGs, first epoch at 224 px: ours {ours_n / ours_s:.1f} images/s ({ours_s:.1f} s), "
          f"image_dataset_from_directory {ref_n / ref_s:.1f} images/s ({ref_s:.1f} s)", flush=True)
    decode_ms = json.loads(run_child(BIG_DECODE, [str(folder)], log)[2].strip().splitlines()[-1])
    ceiling = decode_ms["reference"] / decode_ms["ours"]
    print(f"one photo's decode and resize on one core: ours {decode_ms['ours']:.1f} ms, the reference's "
          f"{decode_ms['reference']:.1f} ms: decoding alone can gain at most {ceiling:.2f}x", flush=True)
    return {"big_photo_first_epoch_speedup": round(ref_s / ours_s, 2), "big_photos": ours_n,
            "big_photo_seconds": {"ours": round(ours_s, 2), "reference": round(ref_s, 2)},
            "big_photo_decode_ms": {k: round(v, 1) for k, v in decode_ms.items()},
            "big_photo_decode_ceiling": round(ceiling, 2)}


def _sizes(text: str) -> list[int]:
    sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    if sizes and sizes[0] < CLASSES * 10:
        raise SystemExit(f"sizes must be at least {CLASSES * 10} images, got {sizes[0]}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"images per run on a volume (default {DEFAULT_SIZES})")
    parser.add_argument("--gcs-sizes", default="300,1500",
                        help="images per run on the GCS emulator (it serves about 40 objects/s); '' for none")
    parser.add_argument("--big-photos", type=int, default=160, help="12-megapixel JPEGs for the speedup; 0 for none")
    parser.add_argument("--workdir", help="keep the images here between runs (default: a temporary folder)")
    args = parser.parse_args()
    sizes, gcs_sizes = _sizes(args.sizes), _sizes(args.gcs_sizes)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="imgclf-scale-")))
        print(json.dumps(run(work.resolve(), sizes, gcs_sizes, args.big_photos)))


def run(work: Path, sizes: list[int], gcs_sizes: list[int], big_photos: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    log.write_text("")
    load = os.getloadavg()[0]
    summary: dict = {}
    results = {}
    for count in sizes:
        folder = work / f"images-{count}"
        write_small_images(folder, count)
        results[count] = measure(str(folder), work / "run", count, STEPS, log, None, "local")
    if len(sizes) > 1:
        summary.update(summarise(sizes, results, STEPS))
    if len(gcs_sizes) > 1:
        emulator, url = start_emulator(log)
        try:
            env = _env({"STORAGE_EMULATOR_HOST": url})
            os.environ["STORAGE_EMULATOR_HOST"] = url
            gcs_results = {}
            for count in gcs_sizes:
                folder = work / f"images-{count}"
                write_small_images(folder, count)
                uri = stage_on_gcs(folder, "imgclf-scale", f"images-{count}")
                gcs_results[count] = measure(uri, work / "run", count, GCS_STEPS, log, env, "gs://")
            summary["gcs"] = summarise(gcs_sizes, gcs_results, GCS_STEPS)
        finally:
            emulator.terminate()
            emulator.wait()
    if big_photos:
        summary.update(big_photo_speedup(work, big_photos, log))
    targeted = list(STEPS)
    summary["targets"] = {"time_growth": TIME_TARGET, "memory_growth": MEMORY_TARGET, "steps": targeted}
    if "time_growth" in summary:
        summary["met"] = all(summary["time_growth"][s] <= TIME_TARGET and
                             summary["memory_growth"][s] <= MEMORY_TARGET for s in targeted)
    summary.update({"sizes": sizes, "gcs_sizes": gcs_sizes, "cores": os.cpu_count(),
                    "load_average": {"start": round(load, 1), "end": round(os.getloadavg()[0], 1)},
                    "span": round(sizes[-1] / sizes[0], 1) if sizes else None})
    return summary


if __name__ == "__main__":
    main()
