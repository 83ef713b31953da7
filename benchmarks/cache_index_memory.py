"""Benchmark: the memory tf.data's cache file holds until it is complete, in one file and in pieces.

    .venv/bin/python benchmarks/cache_index_memory.py [--elements 300000] [--piece 50000]

Why training caches its decoded pixels one file per shard (``trainer.data.reader._records``) and
conversion caps shards at ``TARGET_SHARD_IMAGES``: a tf.data cache file keeps an index entry per
element in memory until the file is complete. Each case runs in its own process and passes
``--elements`` elements shaped like the scale benchmark's pixels (uint8 32x32x3 and an int64 label)
once through: no cache, one cache file, or one cache file per ``--piece`` elements read one after the
other (as training reads shards). It prints each process's peak RSS (TensorFlow's import included:
the ``none`` case is that floor) and, last, a JSON object with the extra MiB over ``none`` and the
bytes per element the single file holds.

Measured on the 2-core development machine (2026-12-03, 300,000 elements, 52 s): none 607 MiB, one file
975 MiB (1,284 bytes per element), pieces of 50,000 675 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import resource, sys, tempfile
import tensorflow as tf
mode, n, piece = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def elements(start, stop):
    return tf.data.Dataset.range(start, stop).map(lambda i: (tf.zeros([32, 32, 3], tf.uint8), i))

if mode == "none":
    ds = elements(0, n)
elif mode == "file":
    ds = elements(0, n).cache(tempfile.mkdtemp() + "/pixels")
else:
    starts = tf.data.Dataset.range(0, n, piece)
    folder = tempfile.mkdtemp()
    ds = starts.flat_map(lambda s: elements(s, tf.minimum(s + piece, n)).cache(
        tf.strings.join([folder, "/piece-", tf.strings.as_string(s)])))
for _ in ds.batch(256):
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(mode: str, elements: int, piece: int) -> int:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(elements), str(piece)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=300_000)
    parser.add_argument("--piece", type=int, default=50_000)
    args = parser.parse_args()
    peaks = {}
    for mode in ("none", "file", "pieces"):
        peaks[mode] = peak_rss(mode, args.elements, args.piece)
        print(f"{mode:7s} peak RSS {peaks[mode] / 2**20:6.0f} MiB", flush=True)
    extra = {mode: round((peaks[mode] - peaks["none"]) / 2**20) for mode in ("file", "pieces")}
    print(json.dumps({"elements": args.elements, "piece": args.piece, "extra_mib": extra,
                      "file_bytes_per_element": round((peaks["file"] - peaks["none"]) / args.elements)}))


if __name__ == "__main__":
    main()
