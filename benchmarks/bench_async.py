"""Saves that do not stall training: safepoint's sync and background saves against the limits and the peers.

One process, one state per workload, every method timed to the same point (the data durable: files and their
directory fsynced), methods interleaved within each repeat in a rotated order:

- limits: ``raw`` (os.write + fsync of the same bytes: the durable-write limit), ``memcpy`` (the state's bytes
  copied into a reused, already-touched buffer: the floor of a background save's stall on the CPU);
- peers: ``torch.save`` and ``safetensors`` (+ fsync), ``dcp.save`` and ``dcp.async_save``
  (torch.distributed.checkpoint, + fsync of what it wrote), ``torchsnapshot.take`` and ``torchsnapshot.async_take``
  when torchsnapshot imports (+ fsync of what it wrote: it does not fsync);
- ``safepoint`` (``safepoint.save``) and ``safepoint.async`` (``CheckpointManager.save(blocking=False)``, one
  manager per workload, so its staging buffers are reused as in a training run).

For each: the blocking time (until the call returns and the tensors may change), the time until durable, the
fraction of the durable-write limit, and the peak extra RSS during the call. Then: loads, cold (page cache
dropped) and warm, against the cold-read limit; and the slowdown of real training steps (the adamw model,
forward + backward + AdamW) while a background save runs. ``--plot`` draws the results to a PNG.

Run ``.venv/bin/python benchmarks/bench_async.py --help``; benchmarks/README.md explains the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_save import (
    MIB,
    ROOT,
    Workload,
    _fmt,
    _human,
    _median,
    _min,
    _proc_status_kib,
    build_workload,
    byte_view,
    environment,
    flatten_for_safetensors,
    fsync_path,
    memcpy_only,
    remove,
    render_markdown,
    render_text,
    write_raw,
    write_safetensors,
    write_torch,
)
from safetensors.torch import load_file

import safepoint

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process says so each call

try:
    import torchsnapshot
except ImportError:  # optional: pip install -c constraints.txt torchsnapshot
    torchsnapshot = None

SAVE_METHODS = (
    "raw", "memcpy", "torch.save", "safetensors", "dcp.save", "dcp.async_save", "torchsnapshot.take",
    "torchsnapshot.async_take", "safepoint", "safepoint.async",
)  # fmt: skip
LOAD_METHODS = ("raw", "torch.load", "safetensors", "safepoint", "safepoint.mmap")
WORKLOADS = ("large_f32", "small_f32", "adamw", "large_bf16")


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (for the peers that do not, or not all of it)."""
    for directory, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory), directory=True)
    fsync_path(path.parent, directory=True)


def dcp_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """DCP wants a flat-ish dict of tensors and primitives: the safetensors flattening, metadata dropped."""
    return dict(flatten_for_safetensors(state)[0])


class Saver:
    """Runs one save method on one workload; returns (blocking s, durable s) and keeps what needs keeping."""

    def __init__(self, workloads: Sequence[Workload], scratch: Path, staging_mib: int | None) -> None:
        self.scratch = scratch
        largest = max(w.nbytes for w in workloads)
        self.raw = np.random.default_rng(0).integers(0, 256, largest, dtype=np.uint8)
        self.copy_target = np.ones(largest, dtype=np.uint8)
        self.views = {w.name: [byte_view(t) for t in w.tensors] for w in workloads}
        budget = staging_mib * MIB if staging_mib else None
        self.managers = {w.name: safepoint.CheckpointManager(scratch / f"mgr-{w.name}", max_staging_bytes=budget)
                         for w in workloads}  # fmt: skip
        self.steps = dict.fromkeys(self.managers, 0)

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()

    def target(self, workload: Workload, method: str) -> Path:
        return self.scratch / f"{workload.name}-{method.replace('.', '_')}"

    def run(self, workload: Workload, method: str) -> tuple[float, float, int, float]:
        """(blocking s, durable s, peak extra RSS bytes during the call, CPU s of the calling thread while it
        blocked: unlike the wall time, not lengthened by other processes taking the core away)."""
        target = self.target(workload, method)
        remove(target)
        os.sync()
        gc.collect()
        baseline = _proc_status_kib("VmRSS")
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        start, cpu = time.perf_counter(), time.thread_time()
        returned = self._call(workload, method, target)
        blocking, cpu = time.perf_counter() - start, time.thread_time() - cpu
        self._finish(method, returned, target)
        durable = time.perf_counter() - start
        extra = (_proc_status_kib("VmHWM") - baseline) * 1024
        remove(target)
        if method == "safepoint.async":
            shutil.rmtree(self.managers[workload.name].directory, ignore_errors=True)
        return blocking, durable, extra, cpu

    def _call(self, workload: Workload, method: str, target: Path) -> Any:
        state = workload.state
        if method == "raw":
            return write_raw(self.raw.data[: workload.nbytes], target)
        if method == "memcpy":
            return memcpy_only(self.views[workload.name], self.copy_target.data)
        if method == "torch.save":
            return write_torch(state, target)
        if method == "safetensors":
            return write_safetensors(state, target)
        if method == "safepoint":
            return safepoint.save(target, state)
        if method == "safepoint.async":
            self.steps[workload.name] += 1
            return self.managers[workload.name].save(self.steps[workload.name], state, blocking=False)
        import torch.distributed.checkpoint as dcp

        if method == "dcp.save":
            return dcp.save(dcp_state(state), checkpoint_id=str(target))
        if method == "dcp.async_save":
            return dcp.async_save(dcp_state(state), checkpoint_id=str(target))
        if torchsnapshot is None:
            raise RuntimeError("torchsnapshot is not installed")
        app_state = {"state": torchsnapshot.StateDict(**dcp_state(state))}
        if method == "torchsnapshot.take":
            return torchsnapshot.Snapshot.take(path=str(target), app_state=app_state)
        if method == "torchsnapshot.async_take":
            return torchsnapshot.Snapshot.async_take(path=str(target), app_state=app_state)
        raise ValueError(method)

    @staticmethod
    def _finish(method: str, returned: Any, target: Path) -> None:
        """Wait until durable: the background part, then an fsync of whatever the method left unsynced."""
        if method == "safepoint.async":
            returned.result()
        elif method == "dcp.async_save":
            response = returned if isinstance(returned, Future) else returned.upload_completion
            response.result()
        elif method == "torchsnapshot.async_take":
            returned.wait()
        if method.startswith(("dcp.", "torchsnapshot.")):
            fsync_tree(target)


# --------------------------------------------------------------------------------------------------------------
# loads


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True


def prepare_loads(workload: Workload, saver: Saver, into: Path) -> dict[str, Path]:
    paths = {m: into / f"{workload.name}-{m}" for m in LOAD_METHODS}
    with paths["raw"].open("wb") as file:
        file.write(saver.raw.data[: workload.nbytes])
    write_torch(workload.state, paths["torch.load"])
    write_safetensors(workload.state, paths["safetensors"])
    safepoint.save(paths["safepoint"], workload.state)
    paths["safepoint.mmap"] = paths["safepoint"]
    return paths


def touch(value: Any) -> int:
    """Read one byte of every page of every tensor: ``safetensors.torch.load_file`` maps the file and reads
    nothing until the tensors are used, so it is timed with this touch. The others read every byte before they
    return (safepoint's mmap load too: it verifies the checksum), so they are not touched."""
    if isinstance(value, torch.Tensor):
        flat = value.reshape(-1).view(torch.uint8) if value.is_contiguous() and value.numel() else value.reshape(-1)
        return int(flat[::4096].to(torch.int64).sum()) if flat.numel() else 0
    if isinstance(value, Mapping):
        return sum(touch(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(touch(v) for v in value)
    return 0


def load_once(method: str, path: Path, buffer: np.ndarray[Any, Any]) -> float:
    start = time.perf_counter()
    if method == "raw":
        with path.open("rb", buffering=0) as file:
            view, offset = memoryview(buffer), 0
            while count := file.readinto(view[offset:]):
                offset += count
    elif method == "torch.load":
        torch.load(path, weights_only=True)
    elif method == "safetensors":
        touch(load_file(path))
    elif method == "safepoint":
        safepoint.load(path)
    elif method == "safepoint.mmap":
        safepoint.load(path, mmap=True)
    return time.perf_counter() - start


def measure_loads(workloads: Sequence[Workload], saver: Saver, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=saver.scratch) as scratch:
        for workload in workloads:
            paths = prepare_loads(workload, saver, Path(scratch))
            buffer = np.ones(workload.nbytes, dtype=np.uint8)
            cold: dict[str, list[float]] = {m: [] for m in LOAD_METHODS}
            warm: dict[str, list[float]] = {m: [] for m in LOAD_METHODS}
            for index in range(repeats):
                order = LOAD_METHODS[index % len(LOAD_METHODS) :] + LOAD_METHODS[: index % len(LOAD_METHODS)]
                for method in order:
                    gc.collect()
                    if drop_caches():
                        cold[method].append(load_once(method, paths[method], buffer))
                    load_once(method, paths[method], buffer)  # page cache filled
                    warm[method].append(load_once(method, paths[method], buffer))
            results[workload.name] = {"cold": cold, "warm": warm}
            for path in set(paths.values()):
                remove(path)
    return results


# --------------------------------------------------------------------------------------------------------------
# training-step slowdown during a background save


def training_slowdown(workload: Workload, saver: Saver, saves: int, batch: int) -> dict[str, Any]:
    """Median step time of the adamw model alone, then while a background save of its state runs."""
    model, optimizer = workload.state["model"], workload.state["optimizer"]
    width = model[0].in_features
    data = torch.randn(batch, width)

    def step() -> float:
        start = time.perf_counter()
        model(data).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(3):
        step()
    baseline = [step() for _ in range(12)]
    results: dict[str, Any] = {"baseline_step_s": baseline}
    for method in ("safepoint.async", "dcp.async_save"):
        during: list[float] = []
        stalls: list[float] = []
        for _ in range(saves):
            target = saver.target(workload, method)
            remove(target)
            os.sync()
            start = time.perf_counter()
            returned = saver._call(workload, method, target)
            stalls.append(time.perf_counter() - start)
            done = returned.done if method == "safepoint.async" else _dcp_done(returned)
            while not done():
                during.append(step())
            saver._finish(method, returned, target)
            remove(target)
            shutil.rmtree(saver.managers[workload.name].directory, ignore_errors=True)
        results[method] = {"during_step_s": during, "stall_s": stalls}
    return results


def _dcp_done(returned: Any) -> Callable[[], bool]:
    future = returned if isinstance(returned, Future) else returned.upload_completion
    return future.done  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------------------
# reporting


Times = dict[str, dict[str, list[tuple[float, float, int, float]]]]


def paired_ratio(a: list[float], b: list[float]) -> float:
    return _median([x / y for x, y in zip(a, b, strict=True) if y > 0])


def save_rows(workloads: Sequence[Workload], times: Times, first: Mapping[str, Mapping[str, tuple[float, ...]]],
              saver: Saver) -> list[list[str]]:  # fmt: skip
    rows = []
    for workload in workloads:
        measured = times[workload.name]
        raw = [r[1] for r in measured.get("raw", [])]
        memcpy = [r[1] for r in measured.get("memcpy", [])]
        memcpy_cpu = [r[3] for r in measured.get("memcpy", [])]
        for method, runs in measured.items():
            blocking, durable, extra, cpu = ([r[i] for r in runs] for i in range(4))
            held = saver.managers[workload.name]._saver.background.pool.held if method == "safepoint.async" else 0
            rows.append([
                f"{workload.name} ({_human(workload.nbytes)})",
                method,
                _fmt(_median(blocking)),
                _fmt(_median(durable)),
                _fmt(_min(durable)),
                _fmt(workload.nbytes / _median(durable) / 1e9, 2),
                _fmt(paired_ratio(raw, durable), 2) if raw and method != "memcpy" else "-",
                _fmt(paired_ratio(blocking, memcpy), 2) if memcpy and method != "raw" else "-",
                _fmt(paired_ratio(cpu, memcpy_cpu), 2) if memcpy and method != "raw" else "-",
                _fmt(first.get(workload.name, {}).get(method, (None,))[0]),
                _fmt(statistics.median(extra) / MIB, 0),
                _fmt(held / MIB, 0) if held else "-",
            ])  # fmt: skip
    return rows


def load_rows(workloads: Sequence[Workload], loads: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for workload in workloads:
        if workload.name not in loads:
            continue
        cold, warm = loads[workload.name]["cold"], loads[workload.name]["warm"]
        for method in LOAD_METHODS:
            rows.append([
                f"{workload.name} ({_human(workload.nbytes)})",
                method,
                _fmt(_median(cold[method])) if cold[method] else "-",
                _fmt(paired_ratio(cold["raw"], cold[method]), 2) if cold[method] else "-",
                _fmt(_median(warm[method])),
                _fmt(paired_ratio(warm["raw"], warm[method]), 2),
            ])  # fmt: skip
    return rows


def slowdown_rows(slowdown: Mapping[str, Any]) -> list[list[str]]:
    base = _median(slowdown["baseline_step_s"])
    rows = [["none", _fmt(base), "-", "-", "-"]]
    for method in ("safepoint.async", "dcp.async_save"):
        during = slowdown[method]["during_step_s"]
        rows.append([method, _fmt(_median(during)), f"{(_median(during) / base - 1) * 100:+.1f} %", str(len(during)),
                     _fmt(_median(slowdown[method]["stall_s"]))])  # fmt: skip
    return rows


def plot(workloads: Sequence[Workload], times: Times, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 4.6), squeeze=False)
    for axis, workload in zip(axes[0], workloads, strict=True):
        measured = times[workload.name]
        methods = list(measured)
        durable = [_median([r[1] for r in measured[m]]) for m in methods]
        blocking = [_median([r[0] for r in measured[m]]) for m in methods]
        positions = range(len(methods))
        axis.barh(positions, durable, color="#9ecae1", label="until durable")
        axis.barh(positions, blocking, color="#08519c", height=0.45, label="blocking (training stalled)")
        axis.set_yticks(list(positions), methods, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("seconds (median)")
        axis.set_title(f"{workload.name}, {_human(workload.nbytes)}", fontsize=10)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle("safepoint vs limits and peers: blocking time and time until durable", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# main


def measure_saves(workloads: Sequence[Workload], methods: list[str], saver: Saver, repeats: int,
                  began: float) -> tuple[Times, dict[str, dict[str, tuple[float, float, int, float]]]]:  # fmt: skip
    times: Times = {w.name: {m: [] for m in methods} for w in workloads}
    first: dict[str, dict[str, tuple[float, float, int, float]]] = {w.name: {} for w in workloads}
    for round_index in range(1 + repeats):  # round 0: first calls in this process, kept apart
        shift = round_index % len(methods)
        order = methods[shift:] + methods[:shift]
        for workload in workloads:
            for method in order:
                result = saver.run(workload, method)
                if round_index:
                    times[workload.name][method].append(result)
                else:
                    first[workload.name][method] = result
        print(f"  round {round_index}/{repeats} done ({time.perf_counter() - began:.0f} s)", flush=True)
    return times, first


def build_blocks(workloads: Sequence[Workload], times: Times, first: Mapping[str, Mapping[str, tuple[float, ...]]],
                 saver: Saver, *, loads: Mapping[str, Any], slowdown: Mapping[str, Any],
                 batch: int) -> list[tuple[str, list[str], list[list[str]]]]:  # fmt: skip
    blocks = [(
        "Saves: blocking = until the call returns; durable = until data and directory are fsynced "
        "(x limit = raw s / durable s, x memcpy = blocking s / memcpy s; x memcpy (cpu): the same with the "
        "calling thread's CPU time, which other processes on a shared machine do not lengthen; paired medians)",
        ["workload", "method", "blocking s", "durable s", "min durable s", "GB/s", "x limit", "x memcpy",
         "x memcpy (cpu)", "first-call s", "extra RSS MiB", "staging held MiB"],
        save_rows(workloads, times, first, saver),
    )]  # fmt: skip
    if loads:
        blocks.append((
            "Loads: cold = page cache dropped first; x limit = raw readinto s / method s (paired medians)",
            ["workload", "method", "cold s", "cold x limit", "warm s", "warm x limit"],
            load_rows(workloads, loads),
        ))  # fmt: skip
    if slowdown:
        blocks.append((
            f"Training steps (adamw model, batch {batch}) while a background save runs",
            ["save running", "median step s", "slowdown", "steps measured", "stall s"],
            slowdown_rows(slowdown),
        ))  # fmt: skip
    return blocks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 32 MiB, 1 repeat, no loads/training")
    parser.add_argument("--size-mib", type=int, default=None, help="bytes of each workload (default 1024; quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; quick 1)")
    parser.add_argument("--small-count", type=int, default=10_000, help="tensors in the small_f32 workload")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--methods", default=",".join(SAVE_METHODS), help="subset of save methods")
    parser.add_argument("--staging-mib", type=int, default=None, help="safepoint.async max_staging_bytes in MiB")
    parser.add_argument("--loads", action=argparse.BooleanOptionalAction, default=None, help="cold/warm loads")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=None,
                        help="training-step slowdown during background saves (adamw)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=16, help="batch size of the training steps")
    parser.add_argument("--dir", default=None, help="scratch directory (default benchmarks/out/scratch)")
    parser.add_argument("--out", default=str(ROOT / "out"), help="where the JSON and markdown results go")
    parser.add_argument("--plot", default=None, help="write a PNG of the save results here")
    args = parser.parse_args(argv)
    args.size_mib = args.size_mib or (32 if args.quick else 1024)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.loads = args.loads if args.loads is not None else not args.quick
    args.training = args.training if args.training is not None else not args.quick
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    scratch = Path(args.dir) if args.dir else out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.workloads.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    if torchsnapshot is None:
        methods = [m for m in methods if not m.startswith("torchsnapshot")]
        print("torchsnapshot is not installed: its methods are left out", flush=True)
    unknown = set(names) - set(WORKLOADS) | set(methods) - set(SAVE_METHODS)
    if unknown:
        raise SystemExit(f"unknown workloads or methods: {sorted(unknown)}")
    began = time.perf_counter()
    workloads = [build_workload(name, args.size_mib * MIB, args.small_count, seed=i) for i, name in enumerate(names)]
    for workload in workloads:
        print(f"  {workload.name}: {workload.description}; {len(workload.tensors)} tensors, "
              f"{_human(workload.nbytes)}", flush=True)  # fmt: skip
    env = environment(scratch)
    env["torchsnapshot"] = getattr(torchsnapshot, "__version__", "installed") if torchsnapshot else "not installed"
    env["torch threads"] = torch.get_num_threads()
    saver = Saver(workloads, scratch, args.staging_mib)
    try:
        for _ in range(2):  # warm the disk
            saver.run(max(workloads, key=lambda w: w.nbytes), "raw")
        times, first = measure_saves(workloads, methods, saver, args.repeats, began)
        loads = measure_loads(workloads, saver, args.repeats) if args.loads else {}
        adamw = next((w for w in workloads if w.name == "adamw"), None)
        slowdown = training_slowdown(adamw, saver, args.repeats, args.batch) if args.training and adamw else {}
        blocks = build_blocks(workloads, times, first, saver, loads=loads, slowdown=slowdown, batch=args.batch)
    finally:
        saver.close()
    command = "python benchmarks/bench_async.py " + " ".join(argv if argv is not None else sys.argv[1:])
    preamble = f"## bench_async\n\n`{command.strip()}`\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items())
    preamble += "\n\n" + "\n".join(f"- {w.name}: {w.description}, {len(w.tensors)} tensors, {_human(w.nbytes)}"
                                   for w in workloads)  # fmt: skip
    print(render_text(blocks))
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_async-quick" if args.quick else "bench_async"
    raw_results = {"command": command.strip(), "environment": env, "times": times, "first": first,
                   "loads": loads, "training": slowdown}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps(raw_results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(blocks, preamble))
    if args.plot:
        plot(workloads, times, Path(args.plot))
    print(f"wrote {out / (stem + '.md')}; done in {time.perf_counter() - began:.0f} s")
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
