"""Sharded (FSDP2) training state with 2 and 4 ranks: safepoint against torch.distributed.checkpoint (issue 13).

The state: an FSDP2 model (``fully_shard`` per layer on ``init_device_mesh("cpu", (world,))``) of square float32
linear layers and its AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``), ``--size-mib`` in total over all
ranks (parameters + moments; the default 256 MiB suits a 2-core development machine, ``--size-mib 1024`` is the
issue's ~1 GiB). Every rank saves ``{"model": model.state_dict(), "optim": optimizer.state_dict()}``: DTensors
whose local shards that rank holds. One gloo process group per world size on 127.0.0.1 runs every method on the
same state, side by side, interleaved within each repeat in an order rotated per repeat:

- ``save``: ``safepoint`` (``CheckpointManager.save``, durable when it returns) against ``dcp``
  (``torch.distributed.checkpoint.save``, then an fsync of every file and directory it wrote and of the
  checkpoint's parent: ``benchmarks/_durable.py``, the rule of every benchmark here). Timed from a barrier before
  the call to a barrier after it: until every rank is done and the data is durable.
- ``stall``: the time the training loop is blocked, on each rank: ``safepoint`` with ``blocking=False`` until the
  call returns (one manager for every repeat, as in training: its staging buffers are reused), against
  ``dcp.async_save`` until it returns its future; the slowest rank's time of each repeat. The save is then
  waited for (and fsynced, for DCP), untimed.
- ``load``: the resharded load: the checkpoints the ``--load-from`` group (default 4 ranks) saved last, restored
  by a ``--load-to`` group (default 2) into a fresh FSDP2 model and optimizer of the same shapes, in place:
  ``manager.restore(state)`` against ``dcp.load(state)`` (with ``--into objects``, safepoint restores
  ``{"model": model, "optim": optimizer}`` instead). Before each timed call every rank syncs and drops the
  checkpoint files' pages (``posix_fadvise(DONTNEED)``), so the reads are cold, and runs a full garbage
  collection, so that no call pays for collections made due by the garbage of earlier calls (safepoint's restore
  pauses the collector and leaves its garbage to whatever runs next; DCP's loads leave theirs too): without it,
  DCP's timed loads, alone or beside safepoint's, took 0.40-0.50 s instead of 0.25-0.31 s in some repeats.
  ``--load-only`` times only this (the ``--load-from`` group then saves the checkpoints once, untimed);
  ``--profile FILE`` writes a cProfile of rank 0's timed safepoint loads.
- ``limit``, timed beside the loads in every repeat, the same way: the physical limit of the load. Each rank reads
  its equal share of the safepoint checkpoint's payload bytes (as many as it needs on this resharded load of
  fully sharded state), cold, in 8 MiB ``preadv`` calls into memory it touched beforehand, and checks nothing.
  ``dcp / limit`` is then the most any reader could gain on DCP on this machine.
- ``bytes read``: on each rank of the load, the bytes read during the call, from ``/proc/self/io``:
  ``read_bytes`` (what the rank made the kernel fetch from the disk; readahead included, so it is what the disk
  had to deliver) and ``rchar`` (bytes returned by ``read``-family system calls, whatever the source: page
  cache, and gloo's socket reads if it uses them; pages of a memory-mapped file are not in it). Both against the
  bytes that rank needs: the sum of its local shards. The ranks share one page cache: bytes two ranks read are in
  the ``read_bytes`` of the first only, so ``rchar`` is the per-rank figure unless the reader maps its files.

Until safepoint saves sharded state, its methods are dropped after the first attempt with the line
``safepoint: sharded state not supported by this build`` and the table shows dcp alone.

    .venv/bin/python benchmarks/bench_fsdp.py --quick          # smoke test: 64 MiB, 2 repeats
    .venv/bin/python benchmarks/bench_fsdp.py                  # 256 MiB, 5 repeats, 2 and 4 ranks, load 4 -> 2
    .venv/bin/python benchmarks/bench_fsdp.py --size-mib 1024 --repeats 5

Medians and ratios are printed and written to ``benchmarks/out/bench_fsdp.md`` (every timing in ``.json``): ``dcp /
safepoint`` is the ratio of the two medians, ``paired`` the median of each repeat's own ratio (the two methods ran
back to back in it, so a slow spell of the shared disk weighs on both; on this project's VM one run's ratio of
medians swings by 20 % or more from the next's).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _durable import evict_tree, fsync_tree
from _ranks import end_rank, run_ranks, timed_afresh

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent
WIDTH = 1024  # each layer a WIDTH x WIDTH float32 weight and a bias: 4 MiB of parameters, 12 MiB with AdamW's state
UNSUPPORTED = "safepoint: sharded state not supported by this build"


# -- one rank -----------------------------------------------------------------------------------------------------
def build(layers: int, seed: int) -> tuple[Any, Any]:
    """An FSDP2 model and AdamW with state, every local shard filled with random values (``seed``, this rank)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.to_local().normal_(generator=generator)
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # lr 0: creates the state, leaves the parameters
        optimizer.zero_grad()
        for values in optimizer.state.values():
            values["exp_avg"].to_local().normal_(generator=generator)
            values["exp_avg_sq"].to_local().uniform_(generator=generator)
    return model, optimizer


def local_bytes(state: dict[str, Any]) -> int:
    """The bytes of the tensors this rank holds in ``state`` (local shards of DTensors, whole plain tensors)."""
    import torch
    from torch.distributed.tensor import DTensor

    total = 0
    stack: list[Any] = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, DTensor):
            local = node.to_local()
            total += local.numel() * local.element_size()
        elif isinstance(node, torch.Tensor):
            total += node.numel() * node.element_size()
    return total


def io_counters() -> dict[str, int]:
    counters = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        name, value = line.split(":")
        counters[name] = int(value)
    return counters


class Methods:
    """Each method's save, background save and load on one rank; safepoint's are dropped on this build's
    InvalidStateError (the same on every rank: the state is refused before any rank writes)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.notes: list[str] = []
        self.background_manager: Any = None  # one for every background save, as in training: staging reused
        self.share: Any = None  # the limit's target: a tensor of this rank's share of the payload bytes, touched
        self.pieces: list[tuple[Path, int, int]] = []  # the limit's (file, offset, length) to read

    def unsupported(self, error: Exception) -> None:
        self.names = [n for n in self.names if n != "safepoint"]
        self.notes.append(f"{UNSUPPORTED} ({type(error).__name__}: {str(error)[:160]})")

    def save(self, method: str, target: Path, step: int, state: dict[str, Any]) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict_saver import save

        if method == "safepoint":
            import safepoint

            with safepoint.CheckpointManager(target, timeout=600) as manager:
                manager.save(step, state)
        else:
            save(state, checkpoint_id=target / f"step-{step:012d}")
            dist.barrier()
            if dist.get_rank() == 0:
                fsync_tree(target / f"step-{step:012d}")

    def background(self, method: str, target: Path, step: int, state: dict[str, Any]) -> tuple[float, Any]:
        """The blocking time, and a wait that finishes the save (durable)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict_saver import async_save

        if method == "safepoint":
            import safepoint

            if self.background_manager is None:
                self.background_manager = safepoint.CheckpointManager(target, keep_last=1, timeout=600)
            start = time.perf_counter()
            try:
                handle = self.background_manager.save(step, state, blocking=False)
            except Exception:
                self.close()
                raise
            stalled = time.perf_counter() - start
            return stalled, functools.partial(handle.result, timeout=600)
        start = time.perf_counter()
        future = async_save(state, checkpoint_id=target / f"step-{step:012d}")
        stalled = time.perf_counter() - start

        def finish_dcp() -> None:
            future.result()
            dist.barrier()
            if dist.get_rank() == 0:
                fsync_tree(target / f"step-{step:012d}")

        return stalled, finish_dcp

    def close(self) -> None:
        if self.background_manager is not None:
            self.background_manager.close()
            self.background_manager = None

    def load(self, method: str, source: Path, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict_loader import load

        if method == "safepoint":
            import safepoint

            with safepoint.CheckpointManager(source, timeout=600) as manager:
                report = manager.restore(state)
            if report is None:
                raise FileNotFoundError(f"no safepoint checkpoint in {source}")
        else:
            step = max(p for p in source.glob("step-*") if (p / ".metadata").exists())
            load(state, checkpoint_id=step)

    def share_of(self, source: Path) -> list[tuple[Path, int, int]]:
        """This rank's equal share of the payload bytes of the checkpoint in ``source`` (every file but the
        manifest, in name order, as one sequence): ``(file, offset, length)`` pieces. On a resharded load of
        fully sharded state every rank needs that many bytes."""
        import torch.distributed as dist

        files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != "manifest.json")
        total = sum(p.stat().st_size for p in files)
        rank, world = dist.get_rank(), dist.get_world_size()
        begin, end = total * rank // world, total * (rank + 1) // world
        pieces, at = [], 0
        for path in files:
            size = path.stat().st_size
            first, last = max(begin, at), min(end, at + size)
            if first < last:
                pieces.append((path, first - at, last - first))
            at += size
        return pieces

    def prepare_limit(self, source: Path) -> None:
        """The limit's pieces and its touched target, found and made once, untimed."""
        import torch

        self.pieces = self.share_of(source)
        self.share = torch.ones(sum(length for *_, length in self.pieces), dtype=torch.uint8)

    def read_limit(self) -> None:
        """The physical limit of the load: this rank's share of the payload bytes read from the files into memory
        already touched, in 8 MiB ``preadv`` calls, nothing parsed, checked or copied."""
        view, done = memoryview(self.share.numpy()), 0
        for path, offset, length in self.pieces:
            fd = os.open(path, os.O_RDONLY)
            try:
                for start in range(0, length, 8 * MIB):
                    count = min(8 * MIB, length - start)
                    if os.preadv(fd, [view[done : done + count]], offset + start) != count:
                        raise OSError(f"{path}: short read")
                    done += count
            finally:
                os.close(fd)


def guarded(methods: Methods, method: str, call: Callable[[], None]) -> bool:
    """Runs ``call``; False (and safepoint dropped) if this build refuses sharded state."""
    try:
        call()
    except Exception as error:
        import safepoint

        if method == "safepoint" and isinstance(error, safepoint.InvalidStateError):
            methods.unsupported(error)
            return False
        raise
    return True


def rotated(names: list[str], repeat: int) -> list[str]:
    shift = repeat % max(1, len(names))
    return names[shift:] + names[:shift]


def save_phase(args: argparse.Namespace, methods: Methods, state: dict[str, Any], found: dict[str, Any]) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    scratch = Path(args.dir) / f"world{world}"
    timed = range(0) if args.load_only else range(-args.warmup, args.repeats)
    for repeat in timed:
        for method in rotated(methods.names, repeat):
            save = functools.partial(methods.save, method, scratch / method, 1, state)
            ok, seconds = timed_afresh(scratch / method, functools.partial(guarded, methods, method, save))
            if ok and repeat >= 0:
                found["save"].setdefault(method, []).append(seconds)
    for repeat in timed:
        for method in rotated(methods.names, repeat):
            target = scratch / f"{method}-bg"
            if rank == 0 and method == "dcp":  # safepoint's manager keeps the last step only
                shutil.rmtree(target, ignore_errors=True)
            if rank == 0:
                os.sync()
            dist.barrier()
            result: dict[str, Any] = {}
            step = repeat + args.warmup + 1

            def call(m: str = method, t: Path = target, r: dict[str, Any] = result, n: int = step) -> None:
                r["stalled"], r["finish"] = methods.background(m, t, n, state)

            ok = guarded(methods, method, call)
            if ok:
                result["finish"]()
            dist.barrier()
            if ok and repeat >= 0:
                found["stall"].setdefault(method, []).append(result["stalled"])
    methods.close()
    if world == args.load_from:  # the checkpoints the resharded load reads
        for method in list(methods.names):
            target = Path(args.dir) / "load-sources" / method
            if rank == 0:
                shutil.rmtree(target, ignore_errors=True)
            dist.barrier()
            guarded(methods, method, functools.partial(methods.save, method, target, 1, state))
            dist.barrier()


def load_phase(
    args: argparse.Namespace, methods: Methods, state: dict[str, Any], found: dict[str, Any], objects: dict[str, Any]
) -> None:
    """The resharded load of the ``--load-from`` group's checkpoints into this group's fresh state (safepoint into
    ``objects`` instead, the model and optimizer themselves, with ``--into objects``)."""
    import torch.distributed as dist

    sources = Path(args.dir) / "load-sources"
    present = [m for m in methods.names if (sources / m).exists() and any((sources / m).glob("step-*"))]
    if "safepoint" in methods.names and "safepoint" not in present:
        methods.notes.append(f"{UNSUPPORTED} (no safepoint checkpoint was saved to load)")
    methods.names = present + (["limit"] if "safepoint" in present else [])
    if "limit" in methods.names:
        methods.prepare_limit(sources / "safepoint")
    profiler = cProfile.Profile() if args.profile and dist.get_rank() == 0 else None
    for repeat in range(-args.warmup, args.repeats):
        for method in rotated(methods.names, repeat):
            source = sources / ("safepoint" if method == "limit" else method)
            evict_tree(source)
            target = objects if method == "safepoint" and args.into == "objects" else state
            gc.collect()  # neither method pays for the collections earlier calls' garbage made due
            dist.barrier()
            before = io_counters()
            start = time.perf_counter()
            if method == "limit":
                methods.read_limit()
            elif profiler is not None and method == "safepoint" and repeat >= 0:
                profiler.runcall(methods.load, method, source, target)
            else:
                methods.load(method, source, target)
            seconds = time.perf_counter() - start
            after = io_counters()
            dist.barrier()
            if repeat >= 0:
                found["load"].setdefault(method, []).append(seconds)
                reads = found["read"].setdefault(method, {"read_bytes": [], "rchar": []})
                reads["read_bytes"].append(after["read_bytes"] - before["read_bytes"])
                reads["rchar"].append(after["rchar"] - before["rchar"])
    if profiler is not None:
        profiler.dump_stats(args.profile)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=1800))
    methods = Methods(list(args.methods))
    found: dict[str, Any] = {"save": {}, "stall": {}, "load": {}, "read": {}}
    model, optimizer = build(args.layers, seed=1 if args.phase == "save" else 2)
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    found["local_bytes"] = local_bytes(state)
    if args.phase == "save":
        save_phase(args, methods, state, found)
    else:
        load_phase(args, methods, state, found, {"model": model, "optim": optimizer})
    found["notes"] = methods.notes
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, found)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(gathered))
    dist.destroy_process_group()


# -- the launcher -------------------------------------------------------------------------------------------------
def launch(world: int, phase: str, args: argparse.Namespace, result: Path) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--worker", "--phase", phase, "--result", str(result), "--dir", args.dir]
    command += ["--layers", str(args.layers), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    command += ["--methods", ",".join(args.methods), "--load-from", str(args.load_from)]
    command += ["--load-only"] if args.load_only else []
    command += ["--into", args.into]
    command += ["--profile", args.profile] if args.profile else []
    run_ranks(command, world, f"{phase} group")
    ranks: list[dict[str, Any]] = json.loads(result.read_text())
    return ranks


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _versus(timings: dict[str, list[float]]) -> str:
    """``dcp / safepoint`` of the medians (above 1: safepoint faster), then the median of the per-repeat ratios
    (the two ran back to back in each repeat, so a slow spell of the disk or of the machine weighs on both); ``-``
    when one of them is missing."""
    if "safepoint" not in timings or "dcp" not in timings:
        return "- | -"
    of_medians = f"{_median(timings['dcp']) / _median(timings['safepoint']):.2f}"
    if len(timings["dcp"]) != len(timings["safepoint"]):
        return f"{of_medians} | -"
    ratios = [d / s for d, s in zip(timings["dcp"], timings["safepoint"], strict=True) if s > 0]
    return f"{of_medians} | {_median(ratios):.2f}"


def tables(saves: dict[int, list[dict[str, Any]]], loads: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| ranks | what | method | median s | dcp / safepoint | paired |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for world, ranks in saves.items():
        first = ranks[0]
        saved = first["save"]  # barrier to barrier: the same on every rank
        for method, seconds in saved.items():
            lines.append(f"| {world} | save until durable | {method} | {_median(seconds):.3f} | {_versus(saved)} |")
        # the stall of a repeat is its slowest rank's
        stalls = {
            m: [max(r["stall"][m][i] for r in ranks) for i in range(len(first["stall"][m]))] for m in first["stall"]
        }
        for method, seconds in stalls.items():
            lines.append(f"| {world} | background stall | {method} | {_median(seconds):.4f} | {_versus(stalls)} |")
    if loads:
        label = f"load {args.load_from} -> {len(loads)}"
        loaded = loads[0]["load"]
        versus = {m: t for m, t in loaded.items() if m != "limit"}
        for method, seconds in versus.items():
            lines.append(f"| {len(loads)} | {label} | {method} | {_median(seconds):.3f} | {_versus(versus)} |")
        if "limit" in loaded:
            limit = _median(loaded["limit"])
            against = ", ".join(f"{m} / limit {_median(t) / limit:.2f}" for m, t in versus.items())
            lines += [
                "",
                f"Physical limit of the {label} load: {limit:.3f} s (median), each rank reading its share of the",
                "payload bytes cold in 8 MiB preads into touched memory, nothing checked. "
                + against
                + "; DCP's time over the limit is the most any reader could be faster than DCP on this machine.",
            ]
        lines += [
            "",
            f"Bytes read per rank on the {label} load (medians over repeats, MiB):",
            "",
            "| rank | needs | method | read_bytes | read_bytes / needs | rchar | rchar / needs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for rank, found in enumerate(loads):
            needs = found["local_bytes"]
            for method, reads in found["read"].items():
                disk, chars = _median(reads["read_bytes"]), _median(reads["rchar"])
                lines.append(
                    f"| {rank} | {needs / MIB:.1f} | {method} | {disk / MIB:.1f} | {disk / needs:.2f} | "
                    f"{chars / MIB:.1f} | {chars / needs:.2f} |"
                )
    notes = sorted({note for ranks in [*saves.values(), loads] for found in ranks for note in found["notes"]})
    return "\n".join([*notes, *([""] if notes else []), *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="FSDP2 state over all ranks: params + AdamW moments")
    parser.add_argument("--ranks", default="2,4", help="world sizes of the save and stall runs, comma-separated")
    parser.add_argument("--load-from", type=int, default=4, help="the world size whose checkpoints are loaded")
    parser.add_argument("--load-to", type=int, default=2, help="the world size that loads them (0: no load)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--methods", default="safepoint,dcp", help="subset of safepoint,dcp")
    parser.add_argument("--dir", default=str(ROOT / "out" / "scratch-fsdp"), help="scratch directory")
    parser.add_argument("--out", default=str(ROOT / "out"), help="where results are written")
    parser.add_argument(
        "--load-only",
        action="store_true",
        help="time only the resharded load (the --load-from group saves its checkpoints once, untimed)",
    )
    parser.add_argument(
        "--into",
        choices=("state-dicts", "objects"),
        default="state-dicts",
        help="what safepoint restores into: the state dicts DCP loads into, or the model and optimizer themselves",
    )
    parser.add_argument("--profile", help="cProfile rank 0's timed safepoint loads into this file (pstats)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 2 repeats, no warmup")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="save", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - {"safepoint", "dcp"}:
        parser.error("--methods: choose from safepoint,dcp")
    if args.worker:
        worker(args)
        end_rank()  # not a normal exit: see end_rank
    if args.quick:
        args.size_mib, args.repeats, args.warmup = 64, 2, 0
    args.layers = max(1, round(args.size_mib * MIB / (3 * 4 * (WIDTH * WIDTH + WIDTH))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    worlds = [] if args.load_only else [int(w) for w in args.ranks.split(",")]
    if args.load_to and args.load_from not in worlds:
        worlds.append(args.load_from)
    total = args.layers * 3 * 4 * (WIDTH * WIDTH + WIDTH) / MIB
    saves: dict[int, list[dict[str, Any]]] = {}
    for world in worlds:
        doing = "the checkpoints to load" if args.load_only else f"save and stall, {args.repeats} repeats"
        print(f"{world} ranks: {doing}, {total:.0f} MiB of FSDP2 state ...", flush=True)
        saves[world] = launch(world, "save", args, out / f"bench_fsdp-{world}.json")
    loads: list[dict[str, Any]] = []
    if args.load_to:
        print(f"{args.load_to} ranks: load of the {args.load_from}-rank checkpoints ...", flush=True)
        loads = launch(args.load_to, "load", args, out / "bench_fsdp-load.json")
    shutil.rmtree(args.dir, ignore_errors=True)
    text = tables(saves, loads, args)
    print(text)
    load = os.getloadavg()
    header = (
        f"# bench_fsdp ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cpus, "
        f"load average {load[0]:.1f} at the end)\n\n`{' '.join(sys.argv)}`\n\n{total:.0f} MiB of FSDP2 state "
        f"({args.layers} layers of {WIDTH}x{WIDTH} float32 + AdamW moments); medians of {args.repeats} repeats\n\n"
    )
    (out / "bench_fsdp.md").write_text(header + text + "\n")
    results = {"argv": sys.argv, "saves": saves, "loads": loads}
    (out / "bench_fsdp.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
