"""Save throughput with 1, 2 and 4 ranks on one machine: safepoint against torch.distributed.checkpoint.save.

Every rank holds the same replicated state (a few large float32 tensors, identical on every rank). For each world
size, one gloo process group on 127.0.0.1 runs every method on the same state, side by side, interleaved within
each repeat in an order rotated per repeat:

- ``raw``: rank 0 writes the state's bytes with ``os.write`` in 32 MiB slices, then fsyncs the file and its
  directory: the durable-write limit of the disk, measured in the same run.
- ``safepoint``: ``CheckpointManager.save(step, state)`` on every rank; replicated entries are written once, by
  rank 0 (the library's default).
- ``safepoint-split``: the same, with the replicated files split across the ranks (file ``i`` written by rank
  ``i % world``, as torchsnapshot does): the measurement behind that default.
- ``dcp``: ``torch.distributed.checkpoint.save(state, checkpoint_id=dir)`` on every rank (its planner writes each
  replicated tensor once, spreading them across ranks; files are fsynced), then an fsync of the directory.
- ``stall`` (``--stall``): the background-save stall on each rank. The state gains a per-rank entry
  (``--own-mib`` of float32 in ``--tensors`` tensors, wrapped in ``safepoint.PerRank``); one manager saves it
  with ``blocking=False`` every repeat (reusing its staging buffers), and each rank times its own call, from a
  barrier to its return; ``manager.wait()`` then runs untimed. The reference is each rank's ``memcpy``: one
  memoryview slice assignment per tensor of the bytes that rank stages (rank 0 the replicated and its own
  entries, the others their own) into a buffer allocated once, as ``bench_async`` does. The two calls of a
  repeat alternate which goes first, and each is timed both by the wall clock and by the calling thread's CPU
  time (``time.thread_time``): with more ranks than cores, the wall clock of a ~10 ms call is mostly where the
  scheduler put the ranks, which the CPU time is not (see docs/performance.md). Ratios are given as the ratio
  of the medians and as the median of the per-repeat ratios (``paired``).

Each timing runs from a barrier before the call on every rank to a barrier after it: until every rank is done
and the data is durable. Outputs are removed and ``os.sync()`` called before each timed call.

Run ``.venv/bin/python benchmarks/bench_distributed.py --help``; medians and ratios are printed and written to
``benchmarks/out/bench_distributed.md`` (every timing in ``bench_distributed.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from _durable import fsync_path
from _ranks import end_rank, run_ranks, timed_afresh

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent
METHODS = ("raw", "safepoint", "safepoint-split", "dcp")
RAW_CHUNK = 32 * MIB


# -- one rank -----------------------------------------------------------------------------------------------------
def build_state(size: int, tensors: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)  # the same bytes on every rank: the state is replicated
    numel = size // 4 // tensors
    return {"model": {f"layer{i}": torch.randn(numel, generator=generator) for i in range(tensors)}}


def write_raw(state: dict[str, Any], target: Path) -> None:
    target.mkdir(parents=True)
    fd = os.open(target / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for tensor in state["model"].values():
            view = memoryview(tensor.numpy()).cast("B")
            for start in range(0, len(view), RAW_CHUNK):
                os.write(fd, view[start : start + RAW_CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(target)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import safepoint
    from safepoint import _pipeline as pipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    state = build_state(args.size_mib * MIB, args.tensors)
    scratch = Path(args.dir) / f"world{world}"
    timings: dict[str, list[float]] = {method: [] for method in args.methods}

    def run(method: str, target: Path, step: int) -> None:
        if method == "raw":
            if rank == 0:
                write_raw(state, target)
        elif method in ("safepoint", "safepoint-split"):
            pipeline.SPLIT_REPLICATED = method == "safepoint-split"
            with safepoint.CheckpointManager(target, timeout=600) as manager:
                manager.save(step, state)
        else:
            dcp.save(state, checkpoint_id=str(target))
            if rank == 0:
                fsync_path(target)

    if args.stall:
        stall(args, state, rank, world, scratch)
        dist.destroy_process_group()
        return
    for repeat in range(-args.warmup, args.repeats):
        order = list(args.methods)
        shift = repeat % len(order)
        for method in order[shift:] + order[:shift]:
            call = functools.partial(run, method, scratch / method, step=repeat + args.warmup)
            _, seconds = timed_afresh(scratch / method, call)
            if repeat >= 0:
                timings[method].append(seconds)
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        Path(args.result).write_text(json.dumps(timings))
    dist.destroy_process_group()


def stall(args: argparse.Namespace, state: dict[str, Any], rank: int, world: int, scratch: Path) -> None:
    """Per rank: the stall of background saves of replicated + per-rank state, and the memcpy of its bytes."""
    import torch
    import torch.distributed as dist

    import safepoint

    generator = torch.Generator().manual_seed(1 + rank)
    numel = args.own_mib * MIB // 4 // args.tensors
    own = {f"shard{i}": torch.randn(numel, generator=generator) for i in range(args.tensors)}
    full = {"model": state["model"], "own": safepoint.PerRank(own)}
    staged = [*(state["model"].values() if rank == 0 else ()), *own.values()]
    views = [memoryview(tensor.numpy()).cast("B") for tensor in staged]
    target = memoryview(bytearray(sum(view.nbytes for view in views)))
    timings: dict[str, list[float]] = {"memcpy": [], "stall": [], "memcpy_cpu": [], "stall_cpu": []}
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier()

    def copy() -> None:
        offset = 0
        for view in views:
            target[offset : offset + view.nbytes] = view
            offset += view.nbytes

    with safepoint.CheckpointManager(scratch / "stall", keep_last=1, timeout=600) as manager:
        for repeat in range(-args.warmup, args.repeats):
            step = repeat + args.warmup
            # the two calls alternate which goes first: neither always follows the other's side effects
            for method in ("memcpy", "stall") if step % 2 == 0 else ("stall", "memcpy"):
                dist.barrier()
                start, cpu = time.perf_counter(), time.thread_time()
                if method == "memcpy":
                    copy()
                else:
                    manager.save(step, full, blocking=False)
                seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
                manager.wait()  # untimed; no writer thread is busy during the next timed call
                if repeat >= 0:
                    timings[method].append(seconds)
                    timings[f"{method}_cpu"].append(cpu)
            dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, timings)
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        Path(args.result).write_text(json.dumps({f"rank{r}": t for r, t in enumerate(gathered)}))


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of the per-repeat ratios a[i] / b[i]: each pair ran back to back, in the same conditions."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def stall_table(results: dict[int, dict[str, dict[str, list[float]]]]) -> str:
    lines = [
        "| ranks | rank | memcpy s | stall s | stall / memcpy | paired | memcpy cpu s | stall cpu s | paired (cpu) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for world, ranks in results.items():
        for name, t in ranks.items():
            copy, stalled = statistics.median(t["memcpy"]), statistics.median(t["stall"])
            copy_cpu, stalled_cpu = statistics.median(t["memcpy_cpu"]), statistics.median(t["stall_cpu"])
            lines.append(
                f"| {world} | {name[4:]} | {copy:.4f} | {stalled:.4f} | {stalled / copy:.2f} "
                f"| {paired_ratio(t['stall'], t['memcpy']):.2f} | {copy_cpu:.4f} | {stalled_cpu:.4f} "
                f"| {paired_ratio(t['stall_cpu'], t['memcpy_cpu']):.2f} |"
            )
    return "\n".join(lines)


# -- the launcher -------------------------------------------------------------------------------------------------
def launch(world: int, args: argparse.Namespace, result: Path) -> dict[str, list[float]]:
    command = [sys.executable, __file__, "--worker", "--result", str(result), "--dir", args.dir]
    command += ["--size-mib", str(args.size_mib), "--tensors", str(args.tensors), "--repeats", str(args.repeats)]
    # with one rank there is nothing to split: safepoint-split would time safepoint twice
    methods = [m for m in args.methods if world > 1 or m != "safepoint-split"]
    command += ["--warmup", str(args.warmup), "--methods", ",".join(methods), "--own-mib", str(args.own_mib)]
    command += ["--stall"] if args.stall else []
    run_ranks(command, world, "group")
    timings: dict[str, list[float]] = json.loads(result.read_text())
    return timings


def table(results: dict[int, dict[str, list[float]]], nbytes: int) -> str:
    lines = [
        "| ranks | method | median s | GB/s | x raw limit | time / safepoint's |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for world, timings in results.items():
        medians = {method: statistics.median(values) for method, values in timings.items()}
        for method, median in medians.items():
            limit = f"{medians['raw'] / median:.2f}" if "raw" in medians else "-"
            versus = f"{median / medians['safepoint']:.2f}" if "safepoint" in medians else "-"
            lines.append(f"| {world} | {method} | {median:.3f} | {nbytes / median / 1e9:.2f} | {limit} | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="bytes of replicated state per rank (MiB)")
    parser.add_argument("--tensors", type=int, default=8, help="the state is this many equal float32 tensors")
    parser.add_argument("--ranks", default="1,2,4", help="world sizes to run, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--dir", default=str(ROOT / "out" / "scratch-distributed"), help="scratch directory")
    parser.add_argument("--out", default=str(ROOT / "out"), help="where results are written")
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 2 repeats, no warmup")
    parser.add_argument("--stall", action="store_true", help="measure the background-save stall per rank instead")
    parser.add_argument("--own-mib", type=int, default=64, help="with --stall: bytes of each rank's PerRank entry")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.worker:
        worker(args)
        end_rank()  # not a normal exit: see end_rank
    if args.quick:
        args.size_mib, args.repeats, args.warmup = 64, 2, 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, list[float]]] = {}
    for world in (int(w) for w in args.ranks.split(",")):
        print(f"{world} rank(s): {args.size_mib} MiB replicated, {args.repeats} repeats ...", flush=True)
        results[world] = launch(world, args, out / f"bench_distributed-{world}.json")
    nbytes = args.size_mib * MIB
    if args.stall:
        text = stall_table(results)  # type: ignore[arg-type]
        print(text)
        (out / "bench_distributed-stall.md").write_text(f"`{' '.join(sys.argv)}`\n\n{text}\n")
        return
    text = table(results, nbytes)
    print(text)
    header = (
        f"# bench_distributed ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} cpus)\n\n`{' '.join(sys.argv)}`\n\n{args.size_mib} MiB of replicated float32 in "
        f"{args.tensors} tensors; medians of {args.repeats} repeats\n\n"
    )
    (out / "bench_distributed.md").write_text(header + text + "\n")
    (out / "bench_distributed.json").write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))


if __name__ == "__main__":
    main()
