"""Benchmark: what a tuning run costs beyond its trials' own training time, on the digits data.

    .venv/bin/python benchmarks/tuning.py [--trials 4] [--parallel 2] [--epochs 2]

Runs the compiled tuning pipeline through kfp.local (``imgclf tune``'s path) on scikit-learn's
1,797 digits (small_cnn at 32 px, Random search of learning_rate and optimizer) and compares its
wall time with the trials' own time: each trial's seconds, as the study recorded them (asking the
study, training, exporting the model, telling the result), summed per lane; lanes run side by side,
so the trials' share of the wall time is the longest lane. Everything else is overhead: validating
and converting the data once, setting up the study, starting each step's process, the journal,
selecting the best trial, and evaluating it. The last line is a JSON object with
``overhead_seconds`` and ``overhead_ratio`` (overhead over the whole run).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.tuning_local import run_tuning_local  # noqa: E402
from trainer.data.demo_data import write_digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        data = os.path.join(scratch, "digits")
        write_digits(data)
        ranges = {"learning_rate": {"min": 0.0005, "max": 0.01, "scaling": "Logarithmic"},
                  "optimizer": ["adam", "rmsprop"]}
        arguments = {"model": "small_cnn", "weights": "none", "image_size": 32, "epochs": args.epochs,
                     "validation_split_ratio": 0.1, "test_split_ratio": 0.2, "random_seed": 7,
                     "ranges": json.dumps(ranges), "strategy": "Random", "max_trials": args.trials,
                     "parallel_trials": args.parallel, "early_stopping_type": "Off"}
        started = time.monotonic()
        summary = run_tuning_local(data, os.path.join(scratch, "run"), arguments)
        wall = time.monotonic() - started
    if summary["status"] != "succeeded":
        sys.exit(f"the tuning run failed in {summary['failed_step']}: {summary['error']}")

    lanes: dict[int, float] = {}
    for trial in summary["trials"]:
        lane = trial["slot"] % args.parallel
        lanes[lane] = lanes.get(lane, 0.0) + trial["seconds"]
    trials_seconds = max(lanes.values())
    overhead = wall - trials_seconds
    print(f"tuning run: {wall:.1f} s for {len(summary['trials'])} trials in {len(lanes)} lanes; trial time "
          f"{sum(lanes.values()):.1f} s in all, {trials_seconds:.1f} s on the longest lane; overhead "
          f"{overhead:.1f} s ({overhead / wall:.0%} of the run)", flush=True)
    print(json.dumps({
        "wall_seconds": round(wall, 1),
        "trials": len(summary["trials"]),
        "parallel_trials": args.parallel,
        "epochs": args.epochs,
        "trial_seconds_per_lane": {str(k): round(v, 1) for k, v in sorted(lanes.items())},
        "trial_seconds_longest_lane": round(trials_seconds, 1),
        "best_value": summary["best"]["value"],
        "overhead_seconds": round(overhead, 1),
        "overhead_ratio": round(overhead / wall, 3),
    }))


if __name__ == "__main__":
    main()
