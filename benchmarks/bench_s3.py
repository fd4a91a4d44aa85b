"""Save throughput to S3 on loopback: safepoint against torch.distributed.checkpoint (dcp), side by side.

The S3 endpoint is moto's server, started by this script in a child process on 127.0.0.1 (so it does not share
the benchmark's interpreter lock) and stopped at the end, whatever happens. Every method saves the same
in-memory state and is timed from the call until it returns, when every object of the checkpoint is completely
written (S3 has no fsync: a completed write is the durable point):

- ``safepoint``: ``safepoint.save("s3://bench/...", state, storage_options=...)``: payload objects under the save
  id, then the manifest with ``If-None-Match: *``.
- ``dcp``: ``torch.distributed.checkpoint.save(state, storage_writer=FsspecWriter(url, **storage_options))``, one
  process, no process group, the writer's defaults (one I/O thread).
- ``dcp-4t``: the same with ``thread_count=4``, as many writer threads as safepoint uses.

With ``--local`` (default on) the same pair is timed on a local directory for context (``safepoint-local``,
``dcp-local``: ``FileSystemWriter`` with ``sync_files=True``).

Methods are interleaved within each repeat, in an order rotated per repeat; each output is deleted before the next
call. Numbers are medians over repeats; ratios are ``method s / safepoint s`` paired within each repeat, then the
median (below 1 = faster than safepoint). Loopback S3 through moto measures the client-side cost of each protocol
(requests, copies, hashing), not a network: moto's own request handling is part of every number.

    .venv/bin/python benchmarks/bench_s3.py --quick       # 32 MiB, 2 repeats: under a minute
    .venv/bin/python benchmarks/bench_s3.py               # 256 MiB, 5 repeats
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

import safepoint

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent
BUCKET = "bench"
S3_METHODS = ("safepoint", "dcp", "dcp-4t")
LOCAL_METHODS = ("safepoint-local", "dcp-local")


def workload(name: str, nbytes: int, small_count: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    count = 4 if name == "large" else small_count
    numel = nbytes // 4 // count
    return {"tensors": {f"w{i}": torch.randn(numel, generator=generator) for i in range(count)}}


def nbytes_of(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state["tensors"].values())


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto's server did not start")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


class Runner:
    def __init__(self, endpoint: str, scratch: Path) -> None:
        self.options: dict[str, Any] = {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        self.scratch = scratch
        import boto3
        import s3fs

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        self.fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)

    def run(self, method: str, state: dict[str, Any]) -> float:
        name = f"{method}-{uuid.uuid4().hex[:8]}"
        url, local = f"s3://{BUCKET}/{name}", self.scratch / name
        save = self.method(method, state, url, local)
        started = time.perf_counter()
        save()
        elapsed = time.perf_counter() - started
        if method.endswith("-local"):
            shutil.rmtree(local)
        else:
            self.fs.rm(f"{BUCKET}/{name}", recursive=True)  # moto keeps objects in memory
        return elapsed

    def method(self, method: str, state: dict[str, Any], url: str, local: Path) -> Callable[[], None]:
        def dcp_save(writer: Any) -> Callable[[], None]:
            return lambda: dcp.save(state, storage_writer=writer)

        methods: dict[str, Callable[[], Callable[[], None]]] = {
            "safepoint": lambda: lambda: _none(safepoint.save(url, state, storage_options=self.options)),
            "dcp": lambda: dcp_save(FsspecWriter(url, **self.options)),
            "dcp-4t": lambda: dcp_save(FsspecWriter(url, thread_count=4, **self.options)),
            "safepoint-local": lambda: lambda: _none(safepoint.save(local, state)),
            "dcp-local": lambda: dcp_save(dcp.FileSystemWriter(str(local), sync_files=True)),
        }
        return methods[method]()


def _none(_: object) -> None:
    return None


def summarize(times: dict[str, list[float]], nbytes: int) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for method, values in times.items():
        base = times["safepoint"] if method in S3_METHODS else times.get("safepoint-local", values)
        summary[method] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "mb_s": nbytes / statistics.median(values) / 1e6,
            "x_safepoint": statistics.median(v / b for v, b in zip(values, base, strict=True)),
        }
    return summary


def render(results: dict[str, Any]) -> str:
    lines = [
        "| workload | method | median s | min s | MB/s | x safepoint |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in results["workloads"].items():
        for method, row in entry["summary"].items():
            lines.append(
                f"| {name} ({entry['mib']:.0f} MiB, {entry['tensors']} tensors) | {method} | {row['median_s']:.3f} "
                f"| {row['min_s']:.3f} | {row['mb_s']:.0f} | {row['x_safepoint']:.2f} |"
            )
    lines.append("")
    lines.append("x safepoint: method time / safepoint time in the same repeat (local methods: / safepoint-local), "
                 "median over repeats; above 1 = slower than safepoint.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="tensor bytes per workload (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--small-count", type=int, default=2000, help="tensors in the 'small' workload")
    parser.add_argument("--workloads", default="large,small", help="comma-separated subset of large,small")
    parser.add_argument("--local", action=argparse.BooleanOptionalAction, default=True, help="also save locally")
    parser.add_argument("--quick", action="store_true", help="32 MiB, 2 repeats: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "out", help="where results go (default benchmarks/out)")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.repeats = 32, 2
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # never a real account: the endpoint is loopback
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")  # "no process group" notices
    methods = list(S3_METHODS) + (list(LOCAL_METHODS) if args.local else [])
    results: dict[str, Any] = {"command": sys.argv, "torch": torch.__version__, "workloads": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    with moto_server() as endpoint, tempfile.TemporaryDirectory(dir=args.out) as scratch:
        runner = Runner(endpoint, Path(scratch))
        for name in args.workloads.split(","):
            state = workload(name, args.size_mib * MIB, args.small_count)
            nbytes = nbytes_of(state)
            for method in methods:  # warm-up: first-call costs (imports, connections) stay out of the numbers
                runner.run(method, state)
            times: dict[str, list[float]] = {method: [] for method in methods}
            for repeat in range(args.repeats):
                order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
                for method in order:
                    times[method].append(runner.run(method, state))
                print(f"{name} repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
            results["workloads"][name] = {
                "mib": nbytes / MIB,
                "tensors": len(state["tensors"]),
                "times": times,
                "summary": summarize(times, nbytes),
            }
    text = render(results)
    print(text)
    suffix = "-quick" if args.quick else ""
    (args.out / f"bench_s3{suffix}.md").write_text(text + "\n")
    (args.out / f"bench_s3{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
