"""Benchmark: `imgclf serve` on loopback with the demo model, at concurrency 1, 4 and 16, and under bad requests.

    .venv/bin/python benchmarks/serving.py [--seconds 8] [--epochs 1] [--bad-requests 400]

Trains the demo-size model (small_cnn at 32 px on scikit-learn's 1,797 digits, as `make demo` does, with
fewer epochs), measures the model's own batched speed in-process (the SavedModel's serving signature on
batches of 16 encoded test images: the limit of this machine), then starts the server on 127.0.0.1 and sends
SageMaker `/invocations` requests (one test image each) from 1, 4 and 16 concurrent clients for ``--seconds``
each: requests/s, p50/p95/p99 latency, errors. Then a bounded load test at concurrency 16 with every tenth
request bad (not an image, truncated, a decompression bomb, wrong content type, bad JSON, bad base64): every
bad one must get a 4xx, no request a 5xx, and the server must still be ready. Reports the server's time to
ready and peak memory (VmHWM). The last line is a JSON object with ``concurrency_speedup`` (requests/s at 16
over requests/s at 1), ``errors``, ``p99_ms`` per concurrency and ``limit_ratio`` (the server's images/s at
16 over the in-process batched images/s).
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402  (kserve's dependency)
import numpy as np  # noqa: E402

from trainer.data import conversion, validation  # noqa: E402
from trainer.data.demo_data import write_digits  # noqa: E402
from trainer.hyperparameters import Hyperparameters  # noqa: E402
from trainer.serve import prediction  # noqa: E402
from trainer.serve.infra_validation import running_server, split_images  # noqa: E402
from trainer.train import training  # noqa: E402

CONCURRENCY = (1, 4, 16)
IMAGE = {"Content-Type": "application/x-image"}


def train_demo_model(scratch: str, epochs: int) -> tuple[str, str]:
    data, dataset, model_dir = (os.path.join(scratch, name) for name in ("digits", "dataset", "model"))
    write_digits(data)
    validation.validate_dataset(data, os.path.join(scratch, "validation"), html_report=False)
    conversion.convert_dataset(data, os.path.join(scratch, "validation", "validation.json"), dataset,
                               validation_split_ratio=0.1, test_split_ratio=0.2, random_seed=7)
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=32, epochs=epochs, batch_size=32,
                         learning_rate=0.002, validation_split_ratio=0.1, test_split_ratio=0.2, random_seed=7)
    training.train(hp, dataset, model_dir)
    return dataset, model_dir


def in_process_images_per_second(model_dir: str, blobs: list[bytes], seconds: float = 5.0) -> float:
    signature = prediction.load_serving_signature(model_dir)
    batch = (blobs * 16)[:16]
    signature(batch)  # traced once
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        signature(batch)
        done += len(batch)
    return done / (time.monotonic() - started)


async def load(url: str, requests: list[tuple[str, bytes, dict]], concurrency: int, seconds: float | None) -> dict:
    """Send ``requests`` in turn from ``concurrency`` clients (for ``seconds``, or each once when None)."""
    latencies, statuses = [], {}  # statuses: request position -> HTTP status (0: no answer)
    position = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.monotonic() + (seconds or 1e9)

        async def client():
            nonlocal position
            while time.monotonic() < deadline:
                if seconds is None and position >= len(requests):
                    return
                index = position
                position += 1
                path, body, headers = requests[index % len(requests)]
                began = time.monotonic()
                try:
                    async with session.post(url + path, data=body, headers=headers) as answer:
                        await answer.read()
                        statuses[index] = answer.status
                except aiohttp.ClientError:
                    statuses[index] = 0
                latencies.append(time.monotonic() - began)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    latency_ms = np.array(latencies) * 1000
    return {"requests": len(statuses), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(statuses) / elapsed, 1),
            "p50_ms": round(float(np.percentile(latency_ms, 50)), 2),
            "p95_ms": round(float(np.percentile(latency_ms, 95)), 2),
            "p99_ms": round(float(np.percentile(latency_ms, 99)), 2),
            "statuses": [statuses[i] for i in sorted(statuses)]}


def bad_requests(good: bytes) -> list[tuple[str, tuple[str, bytes, dict]]]:
    from tests.support.datasets import png_header_only

    v1 = "/v1/models/imgclf:predict"
    return [
        ("not an image", ("/invocations", b"GIF89a not what we take", IMAGE)),
        ("truncated", ("/invocations", good[: len(good) // 2], IMAGE)),
        ("decompression bomb", ("/invocations", png_header_only(30_000, 30_000), IMAGE)),
        ("wrong content type", ("/invocations", good, {"Content-Type": "text/plain"})),
        ("bad JSON", (v1, b'{"instances": [{"b64": ', {"Content-Type": "application/json"})),
        ("bad base64", (v1, json.dumps({"instances": [{"b64": "%%%"}]}).encode(),
                        {"Content-Type": "application/json"})),
    ]


def peak_memory_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="load per concurrency level")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--bad-requests", type=int, default=400, help="requests in the load test with bad ones")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        dataset, model_dir = train_demo_model(scratch, args.epochs)
        blobs = [blob for _, blob in split_images(dataset, 64)]
        model_rate = in_process_images_per_second(model_dir, blobs)
        print(f"in-process, batches of 16: {model_rate:.0f} images/s", flush=True)
        good = [("/invocations", blob, IMAGE) for blob in blobs]
        results = {}
        with running_server(model_dir, log_path=os.path.join(scratch, "server.log")) as server:
            print(f"time to ready: {server.seconds_to_ready:.1f} s", flush=True)
            asyncio.run(load(server.url, good[:8], 4, 1.0))  # warm connections and threads
            for concurrency in CONCURRENCY:
                result = asyncio.run(load(server.url, good, concurrency, args.seconds))
                result["errors"] = sum(status != 200 for status in result.pop("statuses"))
                results[concurrency] = result
                print(f"concurrency {concurrency:2d}: {result['requests_per_s']:7.1f} req/s, p50 "
                      f"{result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                      f"{result['errors']} errors", flush=True)

            bad = bad_requests(blobs[0])
            mixed = [bad[(i // 10) % len(bad)][1] if i % 10 == 9 else good[i % len(good)]
                     for i in range(args.bad_requests)]
            mixed_result = asyncio.run(load(server.url, mixed, 16, None))
            statuses = mixed_result.pop("statuses")
            is_bad = [i % 10 == 9 for i in range(len(statuses))]
            server_errors = sum(status >= 500 or status == 0 for status in statuses)
            bad_refused = sum(400 <= s < 500 for s, b in zip(statuses, is_bad, strict=True) if b)
            good_answered = sum(s == 200 for s, b in zip(statuses, is_bad, strict=True) if not b)
            async def ready() -> int:
                async with aiohttp.ClientSession() as session, session.get(server.url + "/v2/health/ready") as r:
                    return r.status
            still_ready = asyncio.run(ready()) == 200
            memory = peak_memory_mb(server.pid)
            ready_seconds = server.seconds_to_ready
        print(f"load test with 10% bad requests: {len(statuses)} requests, {sum(is_bad)} bad: {bad_refused} got a "
              f"4xx; {good_answered} of {len(statuses) - sum(is_bad)} good answered; {server_errors} 5xx or "
              f"dropped; server still ready: {still_ready}", flush=True)
        print(f"server peak memory: {memory:.0f} MB")

    server_images = results[16]["requests_per_s"]  # one image per request
    summary = {
        "concurrency_speedup": round(results[16]["requests_per_s"] / results[1]["requests_per_s"], 2),
        "errors": sum(r["errors"] for r in results.values()),
        "p99_ms": {str(c): r["p99_ms"] for c, r in results.items()},
        "limit_ratio": round(server_images / model_rate, 3),
        "requests_per_s": {str(c): r["requests_per_s"] for c, r in results.items()},
        "p50_ms": {str(c): r["p50_ms"] for c, r in results.items()},
        "p95_ms": {str(c): r["p95_ms"] for c, r in results.items()},
        "in_process_images_per_s": round(model_rate, 1),
        "time_to_ready_s": round(ready_seconds, 2),
        "peak_memory_mb": round(memory),
        "bad_load": {"requests": len(statuses), "bad": sum(is_bad), "bad_refused_4xx": bad_refused,
                     "good_answered": good_answered, "server_errors": server_errors, "still_ready": still_ready},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
