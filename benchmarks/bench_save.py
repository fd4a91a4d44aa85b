"""Synchronous save until durable: safepoint against the raw durable-write limit and its peers, side by side.

Every write method is timed from the call until its data is durable (the file(s) and their directory fsynced):

- ``raw``: the same number of bytes written with ``os.write`` in large slices of a preallocated buffer, then
  ``fsync`` of the file and of its directory. This is the durable-write limit of the disk, measured in the run.
- ``safetensors``: ``safetensors.torch.save_file`` on the state flattened to unique names (+ fsync file and dir).
- ``torch.save``: ``torch.save`` of the state (objects as their state_dicts) to a path (+ fsync file and dir).
- ``safepoint``: ``safepoint.save(path, state)``, which fsyncs everything itself.

Two CPU-only references are timed in the same loop (nothing written): ``xxh3_64`` streams every tensor's bytes
through one hasher in 8 MiB slices (the checksum work safepoint does), ``memcpy`` copies every tensor's bytes into
a reused buffer. Methods and workloads are interleaved within each repeat, in an order rotated per repeat, so drift
hits them all alike; outputs are deleted and ``os.sync()`` called before each timed call.

Run ``.venv/bin/python benchmarks/bench_save.py --help``; see benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import inspect
import io
import json
import math
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
import xxhash
from safetensors.torch import save_file
from torch import nn

import safepoint

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent
RAW_CHUNK = 32 * MIB
HASH_CHUNK = 8 * MIB
WRITE_METHODS = ("raw", "safetensors", "torch.save", "safepoint")
REFERENCES = ("xxh3_64", "memcpy")
WORKLOADS = ("large_f32", "small_f32", "adamw", "large_bf16")


# --------------------------------------------------------------------------------------------------------------
# workloads


@dataclass
class Workload:
    name: str
    description: str
    state: dict[str, Any]  # what safepoint.save gets: tensors, dicts, and objects with state_dict()
    tensors: list[torch.Tensor] = field(default_factory=list)  # every tensor leaf, for the CPU references
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.tensors = _tensor_leaves(torch_state(self.state))
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensor_leaves(v)]
    return []


def _random(numel: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    # random bits, so no file system or page-level trick can shortcut the data
    return torch.empty(numel, dtype=torch.float32).uniform_(-1.0, 1.0, generator=generator).to(dtype)


def _split(total: int, parts: int) -> list[int]:
    base = total // parts
    return [base + (1 if i < total % parts else 0) for i in range(parts)]


def large_workload(nbytes: int, dtype: torch.dtype, count: int, generator: torch.Generator) -> Workload:
    numels = _split(nbytes // torch.empty(0, dtype=dtype).element_size(), count)
    shapes = [(n // 1024, 1024) if n % 1024 == 0 else (n,) for n in numels]
    pairs = enumerate(zip(numels, shapes, strict=True))
    tensors = {f"w{i}": _random(n, dtype, generator).reshape(s) for i, (n, s) in pairs}
    name = "large_bf16" if dtype == torch.bfloat16 else "large_f32"
    return Workload(name, f"{count} {str(dtype).removeprefix('torch.')} tensors", {"tensors": tensors})


def small_workload(nbytes: int, count: int, generator: torch.Generator) -> Workload:
    numels = _split(nbytes // 4, count)
    flat = _random(nbytes // 4, torch.float32, generator)
    # separate storages (clone), as in a real state: views of one buffer would be one tensor's worth of work
    tensors = {f"t{i:05d}": chunk.clone() for i, chunk in enumerate(torch.split(flat, numels))}
    del flat
    size = nbytes // count
    return Workload("small_f32", f"{count} float32 tensors of ~{_human(size)}", {"tensors": tensors})


def adamw_workload(param_bytes: int, generator: torch.Generator) -> Workload:
    """A stack of Linear + LayerNorm blocks with AdamW state after one step (exp_avg, exp_avg_sq, step)."""
    width = 2048 if param_bytes >= 64 * MIB else 512
    per_block = (width * width + 3 * width) * 4
    blocks = max(2, round(param_bytes / per_block))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width)]
    model = nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    description = f"{blocks}x(Linear {width}x{width} + LayerNorm) {_human(params)} params + AdamW state"
    return Workload("adamw", description, {"model": model, "optimizer": optimizer})


def build_workload(name: str, size: int, small_count: int, seed: int, large_count: int = 4) -> Workload:
    generator = torch.Generator().manual_seed(seed)
    if name == "large_f32":
        return large_workload(size, torch.float32, large_count, generator)
    if name == "large_bf16":
        return large_workload(size, torch.bfloat16, large_count, generator)
    if name == "small_f32":
        return small_workload(size, small_count, generator)
    if name == "adamw":
        return adamw_workload(size // 4, generator)  # params + exp_avg + exp_avg_sq ~ 3/4 of size
    raise ValueError(f"unknown workload {name!r}")


# --------------------------------------------------------------------------------------------------------------
# the state in each peer's terms (converted inside the timed region: safepoint does the same work internally)


def torch_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """What torch.save gets: objects replaced by their state_dicts."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}


def flatten_for_safetensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors under unique dotted names (shared storage cloned, non-contiguous made contiguous); every other
    leaf goes into the metadata as one JSON string, so the file holds the same information."""
    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen and tensor.numel():
                tensor = tensor.clone()
            seen.add(pointer)
            tensors[prefix] = tensor if tensor.is_contiguous() else tensor.contiguous()
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{prefix}.{index}")
        else:
            others[prefix] = value

    walk(torch_state(state), "")
    return tensors, {"others": json.dumps(others, default=repr)}


# --------------------------------------------------------------------------------------------------------------
# the methods: each writes ``target`` and returns once it is durable


def fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_raw(view: memoryview, target: Path) -> tuple[float, float]:
    """Returns the seconds spent in os.write (copying into the page cache) and in the two fsyncs."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        start = time.perf_counter()
        for offset in range(0, view.nbytes, RAW_CHUNK):
            chunk = view[offset : offset + RAW_CHUNK]
            while chunk.nbytes:
                chunk = chunk[os.write(fd, chunk) :]
        written = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(target.parent, directory=True)
    return written - start, time.perf_counter() - written


def write_safetensors(state: Mapping[str, Any], target: Path) -> None:
    tensors, metadata = flatten_for_safetensors(state)
    save_file(tensors, target, metadata=metadata)
    fsync_path(target)
    fsync_path(target.parent, directory=True)


def write_torch(state: Mapping[str, Any], target: Path) -> None:
    torch.save(torch_state(state), target)
    fsync_path(target)
    fsync_path(target.parent, directory=True)


def write_safepoint(state: Mapping[str, Any], target: Path) -> None:
    safepoint.save(target, state)


def hash_only(views: Sequence[memoryview]) -> int:
    hasher = xxhash.xxh3_64()
    for view in views:
        for start in range(0, view.nbytes, HASH_CHUNK):
            hasher.update(view[start : start + HASH_CHUNK])
    return int(hasher.intdigest())


def memcpy_only(views: Sequence[memoryview], into: memoryview) -> None:
    # plain single-threaded memcpy (memoryview slice assignment), like safepoint's coalescing of small tensors;
    # torch's copy_ would use its intra-op thread pool, which stalls badly on a shared 2-core machine
    offset = 0
    for view in views:
        into[offset : offset + view.nbytes] = view
        offset += view.nbytes


def byte_view(tensor: torch.Tensor) -> memoryview:
    if tensor.numel() == 0:
        return memoryview(b"")
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Runner:
    """Runs one method on one workload: cleans up, syncs, then times the call until durable."""

    def __init__(self, workloads: Sequence[Workload], scratch: Path) -> None:
        self.scratch = scratch
        largest = max(w.nbytes for w in workloads)
        # the raw method's source buffer and the memcpy target, touched once so page faults are not timed
        self.raw = np.random.default_rng(0).integers(0, 256, largest, dtype=np.uint8)
        self.copy_target = np.ones(largest, dtype=np.uint8)
        self.views = {w.name: [byte_view(t) for t in w.tensors] for w in workloads}
        self.raw_phases: dict[str, list[tuple[float, float]]] = {w.name: [] for w in workloads}
        self.keep_phases = False

    def target(self, workload: Workload, method: str) -> Path:
        suffix = {"raw": ".bin", "safetensors": ".safetensors", "torch.save": ".pt", "safepoint": ""}[method]
        return self.scratch / f"{workload.name}-{method.replace('.', '_')}{suffix}"

    def run(self, workload: Workload, method: str) -> float:
        target = self.target(workload, method) if method in WRITE_METHODS else self.scratch / "none"
        remove(target)
        os.sync()  # no dirty pages of an earlier run are flushed inside this one
        gc.collect()
        start = time.perf_counter()
        if method == "raw":
            phases = write_raw(self.raw.data[: workload.nbytes], target)
            if self.keep_phases:
                self.raw_phases[workload.name].append(phases)
        elif method == "safetensors":
            write_safetensors(workload.state, target)
        elif method == "torch.save":
            write_torch(workload.state, target)
        elif method == "safepoint":
            write_safepoint(workload.state, target)
        elif method == "xxh3_64":
            hash_only(self.views[workload.name])
        elif method == "memcpy":
            memcpy_only(self.views[workload.name], self.copy_target.data)
        else:
            raise ValueError(method)
        elapsed = time.perf_counter() - start
        remove(target)
        return elapsed


# --------------------------------------------------------------------------------------------------------------
# peak extra RSS of one save, in a fresh child process


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def child_rss(args: argparse.Namespace) -> None:
    """Child mode: build one workload, save it once with one method, print the peak RSS above the baseline."""
    size = args.size_mib * MIB
    workload = build_workload(args.child_workload, size, args.small_count, seed=1, large_count=args.large_count)
    scratch = Path(args.dir)
    runner = Runner([workload], scratch)
    del runner.copy_target
    tiny = build_workload("large_f32", MIB, 4, seed=2)
    runner.run(tiny, args.child_method)  # imports and first-call set-up are not counted
    gc.collect()
    baseline = _proc_status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        how = "VmHWM after clear_refs"
    except OSError:
        how = "VmHWM (not resettable: an upper bound)"
    runner.run(workload, args.child_method)
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "extra_kib": peak - baseline, "how": how}))


def measure_rss(args: argparse.Namespace, workload: str, method: str, scratch: Path) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child-workload", workload, "--child-method", method,
        "--size-mib", str(args.size_mib), "--small-count", str(args.small_count), "--dir", str(scratch),
        "--large-count", str(args.large_count),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    info: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return info


# --------------------------------------------------------------------------------------------------------------
# profiling (optional): where safepoint.save spends its time


def profile_safepoint(workload: Workload, runner: Runner, out: Path) -> Path:
    target = runner.target(workload, "safepoint")
    remove(target)
    os.sync()
    profiler = cProfile.Profile()
    profiler.enable()
    write_safepoint(workload.state, target)
    profiler.disable()
    remove(target)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    path = out / f"profile-safepoint-{workload.name}.txt"
    path.write_text(text.getvalue())
    return path


PHASES = ("encode", "plan", "payload", "manifest")


class _NullSink:
    def write(self, data: memoryview, /) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


def cpu_phases(workload: Workload, repeats: int) -> dict[str, dict[str, float]]:
    """The CPU work of one safepoint.save with the I/O left out, phase by phase, with the cyclic GC on and off.

    Uses safepoint's internal API (encode_state, plan_save, write_file, Manifest): if that changed, the error is
    reported instead. 'payload' is write_file into a sink that drops the bytes: tensor views, coalescing copies
    and the checksum."""
    from safepoint._codec import encode_state
    from safepoint._commit import plan_save
    from safepoint._manifest import FileRecord, Manifest
    from safepoint._payload import WRITE_BUFFER_BYTES, write_file

    extra: tuple[Any, ...] = ()
    if "budget" in inspect.signature(write_file).parameters:  # since the parallel writers: a copy budget
        from safepoint._budget import ByteBudget

        extra = (ByteBudget(1 << 30),)
    results: dict[str, dict[str, float]] = {}
    for mode in ("on", "off"):
        samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
        for _ in range(repeats):
            gc.collect()
            if mode == "off":
                gc.disable()
            try:
                t0 = time.perf_counter()
                encoded = encode_state(workload.state)
                t1 = time.perf_counter()
                plan = plan_save(encoded, checkpoint="", step=0)
                t2 = time.perf_counter()
                leaves = [leaf.tensor for leaf in encoded.leaves]
                buffer = bytearray(WRITE_BUFFER_BYTES)
                records = [
                    FileRecord(f.path, f.size, write_file(_NullSink(), f, leaves, buffer, *extra)) for f in plan.files
                ]
                t3 = time.perf_counter()
                manifest = Manifest(step=0, save_id=plan.save_id, created=time.time(), files=tuple(records),
                                    entries=plan.entries, tree=dict(plan.tree), metrics=plan.metrics,
                                    state_version=plan.state_version, writer="bench")  # fmt: skip
                manifest.to_json()
                t4 = time.perf_counter()
            finally:
                gc.enable()
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                samples[phase].append(seconds)
        medians = {phase: _median(values) for phase, values in samples.items()}
        results[f"gc {mode}"] = {**medians, "sum": sum(medians.values())}
    return results


# --------------------------------------------------------------------------------------------------------------
# reporting


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _min(values: Sequence[float]) -> float:
    return min(values) if values else math.nan


Times = dict[str, dict[str, list[float]]]


def paired(times: Times, a: tuple[str, str], b: tuple[str, str]) -> float:
    """Median over repeats of time(a) / time(b), each pair taken in the same repeat."""
    first, second = times[a[0]][a[1]], times[b[0]][b[1]]
    return _median([x / y for x, y in zip(first, second, strict=True) if y > 0])


def of_mins(times: Times, a: tuple[str, str], b: tuple[str, str]) -> float:
    """min time(a) / min time(b): the noise here only ever adds time, so the minimum is the least disturbed run."""
    return _min(times[a[0]][a[1]]) / _min(times[b[0]][b[1]])


def summarize(workloads: Sequence[Workload], times: Times, first: dict[str, dict[str, float]],
              raw_phases: Mapping[str, list[tuple[float, float]]]) -> dict[str, Any]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for workload in workloads:
        measured = times[workload.name]
        for method in (m for m in (*WRITE_METHODS, *REFERENCES) if m in measured):
            values = measured[method]
            row: dict[str, Any] = {
                "workload": workload.name,
                "method": method,
                "median_s": _median(values),
                "min_s": _min(values),
                "max_s": max(values),
                "first_s": first.get(workload.name, {}).get(method),
                "gb_per_s": workload.nbytes / _median(values) / 1e9,
                "best_gb_per_s": workload.nbytes / _min(values) / 1e9,
                "runs_s": values,
            }
            if method in WRITE_METHODS and "raw" in measured:
                row["of_limit"] = paired(times, (workload.name, "raw"), (workload.name, method))
                row["of_limit_min"] = of_mins(times, (workload.name, "raw"), (workload.name, method))
            if method != "safepoint" and "safepoint" in measured:
                row["of_safepoint"] = paired(times, (workload.name, method), (workload.name, "safepoint"))
            rows.append(row)
    derived: dict[str, Any] = {}
    for workload in (w for w in workloads if "safepoint" in times[w.name]):
        measured, key = times[workload.name], workload.name
        item: dict[str, Any] = {}
        for ref in (r for r in REFERENCES if r in measured):
            item[f"{ref}_fraction"] = paired(times, (key, ref), (key, "safepoint"))
            item[f"{ref}_fraction_min"] = of_mins(times, (key, ref), (key, "safepoint"))
        for peer in (p for p in ("safetensors", "torch.save") if p in measured):
            item[f"vs_{peer}"] = paired(times, (key, "safepoint"), (key, peer))
            item[f"vs_{peer}_min"] = of_mins(times, (key, "safepoint"), (key, peer))
        derived[key] = item
    small_vs_large: dict[str, dict[str, float]] = {}
    if "small_f32" in times and "large_f32" in times:
        for method in (m for m in WRITE_METHODS if m in times["small_f32"] and m in times["large_f32"]):
            small_vs_large[method] = {
                "ratio_of_medians": _median(times["small_f32"][method]) / _median(times["large_f32"][method]),
                "ratio_of_mins": of_mins(times, ("small_f32", method), ("large_f32", method)),
                "paired_median_ratio": paired(times, ("small_f32", method), ("large_f32", method)),
            }
    phases = {
        name: {
            "write_s": [w for w, _ in values],
            "fsync_s": [f for _, f in values],
        }
        for name, values in raw_phases.items()
        if values
    }
    return {"rows": rows, "safepoint": derived, "small_vs_large": small_vs_large, "raw_phases": phases}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


Block = tuple[str, list[str], list[list[str]]]


def tables(workloads: Sequence[Workload], summary: Mapping[str, Any]) -> list[Block]:
    """(title, header, rows) for the plain-text and markdown renderings."""
    by_name = {w.name: w for w in workloads}
    header = ["workload", "method", "median s", "min s", "max s", "GB/s", "best GB/s", "of limit", "of limit (min)",
              "first s", "x safepoint"]  # fmt: skip
    main = [
        [
            f"{row['workload']} ({_human(by_name[row['workload']].nbytes)})",
            row["method"],
            _fmt(row["median_s"]),
            _fmt(row["min_s"]),
            _fmt(row["max_s"]),
            _fmt(row["gb_per_s"], 2),
            _fmt(row["best_gb_per_s"], 2),
            _fmt(row.get("of_limit"), 2),
            _fmt(row.get("of_limit_min"), 2),
            _fmt(row["first_s"]),
            _fmt(row.get("of_safepoint"), 2),
        ]
        for row in summary["rows"]
    ]
    title = "Save until durable ('of limit' = raw s / method s: median of same-repeat pairs, and min / min)"
    out = [(title, header, main)]
    derived = [
        [name]
        + [
            f"{_fmt(item.get(key), 3)} / {_fmt(item.get(key + '_min'), 3)}"
            for key in ("xxh3_64_fraction", "memcpy_fraction", "vs_safetensors", "vs_torch.save")
        ]
        for name, item in summary["safepoint"].items()
    ]
    out.append(
        (
            "safepoint: checksum share and peers (paired median / min over min)",
            ["workload", "xxh3 / safepoint", "memcpy / safepoint", "safepoint / safetensors", "safepoint / torch.save"],
            derived,
        )
    )
    if summary["small_vs_large"]:
        small = [
            [method, _fmt(v["ratio_of_medians"], 2), _fmt(v["ratio_of_mins"], 2), _fmt(v["paired_median_ratio"], 2)]
            for method, v in summary["small_vs_large"].items()
        ]
        out.append(
            (
                "Per-tensor overhead: time of small_f32 / time of large_f32 (target for safepoint: <= 2)",
                ["method", "ratio of medians", "ratio of mins", "paired median ratio"],
                small,
            )
        )
    if summary["raw_phases"]:
        phase_rows = [
            [name] + [f"{_fmt(_median(v[k]))} ({_fmt(_min(v[k]))}-{_fmt(max(v[k]))})" for k in ("write_s", "fsync_s")]
            for name, v in summary["raw_phases"].items()
        ]
        out.append(
            (
                "raw, split: os.write into the page cache vs fsync of file + dir (median (min-max) s); the spread of "
                "the write phase is the machine's noise",
                ["workload", "write phase", "fsync phase"],
                phase_rows,
            )
        )
    if summary.get("rss"):
        rss_rows = []
        for key, info in summary["rss"].items():
            workload, method = key.split(":", 1)
            if "extra_kib" not in info:
                rss_rows.append([workload, method, "-", "-", "-", str(info.get("error", "?"))])
                continue
            extra = info["extra_kib"] * 1024
            rss_rows.append([workload, method, _fmt(extra / MIB, 1), _fmt(info["peak_kib"] / 1024, 1),
                             _fmt(extra / by_name[workload].nbytes, 3) if workload in by_name else "-",
                             info["how"]])  # fmt: skip
        out.append(
            (
                "Peak extra RSS of one save (fresh child process)",
                ["workload", "method", "extra MiB", "peak MiB", "extra / state", "how"],
                rss_rows,
            )
        )
    if summary.get("phases"):
        phase_header = ["workload", "gc", *PHASES, "sum"]
        phase_rows = [
            [name, gc_mode] + [_fmt(values[p] * 1e3, 1) if p in values else "-" for p in (*PHASES, "sum")]
            for name, modes in summary["phases"].items()
            for gc_mode, values in modes.items()
        ]
        out.append(
            (
                "safepoint CPU phases without I/O (median ms; internal API, see --phases)",
                phase_header,
                phase_rows,
            )
        )
    return out


def render_text(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for title, header, rows in blocks:
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
        lines += ["", title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(blocks: Sequence[Block], preamble: str) -> str:
    lines = [preamble]
    for title, header, rows in blocks:
        lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _safepoint_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safepoint")
    except PackageNotFoundError:
        return "?"


def environment(scratch: Path) -> dict[str, Any]:
    """Versions, machine and the git revision of the code under test (taken when the run starts: the modules
    are imported then, whatever the working tree holds later)."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "xxhash": xxhash.VERSION,
        "safepoint": _safepoint_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "scratch": str(scratch),
    }
    with contextlib.suppress(ValueError, OSError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    best = ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if str(scratch.resolve()).startswith(parts[1]) and len(parts[1]) >= len(best):
                best, info["filesystem"] = parts[1], f"{parts[2]} on {parts[0]} ({parts[1]})"
    reporting = Path("/sys/module/page_reporting/parameters/reported_kib")
    if reporting.exists():
        info["free_page_reporting"] = "active: freed memory is handed to the host, first touch of it is slow"
    git = subprocess.run(["git", "-C", str(ROOT.parent), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    info["git"] = git.stdout.strip() or "?"
    return info


# --------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 2 repeats, no warm-up round")
    parser.add_argument("--size-mib", type=int, default=None, help="bytes of each workload (default 768; quick 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; quick 0)")
    parser.add_argument("--small-count", type=int, default=10_000, help="tensors in the small_f32 workload")
    parser.add_argument("--large-count", type=int, default=4, help="tensors in the large_f32 and large_bf16 workloads")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--methods", default=",".join((*WRITE_METHODS, *REFERENCES)), help="subset of methods")
    parser.add_argument("--busy-core", action="store_true",
                        help="keep one core busy in another process during the runs (a data loader)")  # fmt: skip
    parser.add_argument("--dir", default=None, help="scratch directory for outputs (default benchmarks/out/scratch)")
    parser.add_argument("--out", default=str(ROOT / "out"), help="where the JSON and markdown results go")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=None,
                        help="peak extra RSS per save in child processes (default: on, off with --quick)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="also cProfile safepoint.save on each workload")
    parser.add_argument(
        "--phases",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time safepoint's CPU phases without I/O, GC on/off (default: on, off with --quick)",
    )
    parser.add_argument("--child-workload", help=argparse.SUPPRESS)
    parser.add_argument("--child-method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size_mib = args.size_mib or (64 if args.quick else 768)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.rss = args.rss if args.rss is not None else not args.quick
    args.phases = args.phases if args.phases is not None else not args.quick
    return args


def measure(workloads: Sequence[Workload], methods: list[str], runner: Runner, args: argparse.Namespace,
            began: float) -> tuple[Times, dict[str, dict[str, float]]]:  # fmt: skip
    """All rounds: warm-up rounds (the first one's times kept as 'first'), then the timed repeats."""
    times: Times = {w.name: {m: [] for m in methods} for w in workloads}
    first: dict[str, dict[str, float]] = {w.name: {} for w in workloads}
    for round_index in range(args.warmup + args.repeats):
        timed = round_index >= args.warmup
        shift = round_index % len(methods)
        order = methods[shift:] + methods[:shift]  # rotate, so no method always runs after the same one
        runner.keep_phases = timed
        for workload in workloads:
            for method in order:
                elapsed = runner.run(workload, method)
                if timed:
                    times[workload.name][method].append(elapsed)
                elif round_index == 0:
                    first[workload.name][method] = elapsed
        label = f"repeat {round_index - args.warmup + 1}/{args.repeats}" if timed else "warm-up round"
        print(f"  {label} done ({time.perf_counter() - began:.0f} s)", flush=True)
    return times, first


def report(args: argparse.Namespace, argv: Sequence[str] | None, workloads: Sequence[Workload],
           result: dict[str, Any]) -> None:  # fmt: skip
    """Print the tables and write <out>/bench_save[-quick].{json,md}."""
    out = Path(args.out)
    blocks = tables(workloads, result)
    command = "python benchmarks/bench_save.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = result["environment"]
    preamble = (
        f"## bench_save ({'quick' if args.quick else 'full'}): {args.size_mib} MiB per workload, "
        f"{args.repeats} repeats, {args.warmup} warm-up round(s)\n\n`{command.strip()}`\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in env.items())
        + "\n\n" + "\n".join(f"- {w.name}: {w.description}, {len(w.tensors)} tensors, {_human(w.nbytes)}"
                             for w in workloads)
    )  # fmt: skip
    print(render_text(blocks))
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_save-quick" if args.quick else "bench_save"
    result = {
        "command": command.strip(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "workloads": [
            {"name": w.name, "description": w.description, "tensors": len(w.tensors), "bytes": w.nbytes}
            for w in workloads
        ],
        **result,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(blocks, preamble))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    scratch = Path(args.dir) if args.dir else out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    if args.child_workload:
        args.dir = str(scratch)
        child_rss(args)
        return 0
    names = [n for n in args.workloads.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(names) - set(WORKLOADS) | set(methods) - set(WRITE_METHODS) - set(REFERENCES)
    if unknown:
        raise SystemExit(f"unknown workloads or methods: {sorted(unknown)}")
    began = time.perf_counter()
    print(f"building workloads of {args.size_mib} MiB: {', '.join(names)}", flush=True)
    workloads = [build_workload(name, args.size_mib * MIB, args.small_count, seed=i, large_count=args.large_count)
                 for i, name in enumerate(names)]  # fmt: skip
    for workload in workloads:
        print(f"  {workload.name}: {workload.description}; {len(workload.tensors)} tensors, "
              f"{_human(workload.nbytes)}", flush=True)  # fmt: skip
    env = environment(scratch)
    busy = start_busy_core() if args.busy_core else None
    env["busy core"] = "a separate process spins on one core during the runs" if busy else "no"
    try:
        return run_all(args, argv, names=names, methods=methods, workloads=workloads, env=env, scratch=scratch,
                       began=began)  # fmt: skip
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def start_busy_core() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy (as a data loader does on a training machine), until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_all(args: argparse.Namespace, argv: Sequence[str] | None, *, names: list[str], methods: list[str],
            workloads: list[Workload], env: dict[str, Any], scratch: Path, began: float) -> int:  # fmt: skip
    out = Path(args.out)
    runner = Runner(workloads, scratch)
    # warm the disk: the first writes to fresh blocks (and fresh page-cache pages) are much slower
    for _ in range(3):
        runner.run(max(workloads, key=lambda w: w.nbytes), "raw")
    times, first = measure(workloads, methods, runner, args, began)
    rss: dict[str, Any] = {}
    if args.rss:
        for name in (w for w in ("large_f32", "adamw") if w in names):
            for method in (m for m in ("safetensors", "torch.save", "safepoint") if m in methods):
                rss[f"{name}:{method}"] = measure_rss(args, name, method, scratch)
    profiles = [str(profile_safepoint(w, runner, out)) for w in workloads] if args.profile else []
    phases: dict[str, Any] = {}
    if args.phases:
        for workload in workloads:
            try:
                phases[workload.name] = cpu_phases(workload, repeats=max(3, args.repeats))
            except Exception as err:  # the internal API moved: say so, keep the rest of the results
                phases[workload.name] = {"error": {"message": repr(err)}}
                print(f"  --phases failed on {workload.name}: {err!r}", flush=True)
    result = {
        "environment": env,
        **summarize(workloads, times, first, runner.raw_phases),
        "first_round_s": first if args.warmup else {},
        "rss": rss,
        "phases": phases,
        "profiles": profiles,
        "elapsed_s": time.perf_counter() - began,
    }
    report(args, argv, workloads, result)
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"done in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
