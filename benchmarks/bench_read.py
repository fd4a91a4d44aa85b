"""Cold reads: safepoint's load and restore against the cold-read limit of the disk and safetensors, in one run.

Every method reads a checkpoint whose pages were evicted from the page cache just before the timed call:

- ``limit``: the bytes of safepoint's own payload files read with ``readinto`` into one fresh ``torch.empty``
  buffer per file, in 64 MiB slices, nothing else (no parsing, no checksum): the cold-read limit.
- ``limit-touched``: the same reads into buffers allocated and touched before the timing, for context: the disk
  alone, without the page faults that any reader returning new memory pays (on the VM this was written on, first
  touch of fresh memory costs about as much as reading it from the page cache).
- ``load``: ``safepoint.load(path)``, every byte verified, tensors owned.
- ``restore``: ``safepoint.restore(path, state)`` into live tensors of the same shapes.
- ``safetensors``: ``safetensors.torch.load_file`` of the same tensors, then ``copy_`` into the live tensors.

Workloads: ``large`` is ``--size-mib`` of float32 in ``--tensors`` tensors; ``small`` the same bytes in
``--small-count`` tensors; ``one`` the same bytes in one tensor (the reference the small-tensor target uses);
``module`` the ``large`` tensors as a module's parameters (``{"model": module}``, as most states hold weights),
where ``safetensors`` is ``load_file`` then the module's ``load_state_dict``.

Eviction (``--evict``): ``fadvise`` (the default) syncs, then calls ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every
file the method reads, which drops exactly those pages and leaves the other processes on the machine alone;
``sysctl`` writes 3 to ``/proc/sys/vm/drop_caches`` (root only, drops every clean page of the machine); ``none``
measures warm reads.

Threads (``--torch-threads``, default 1): on a small machine shared with other busy processes, torch's OpenMP
``copy_`` of 64 MiB took 0.65 s with 2 threads and 0.013 s with 1 (the threads wait for each other at every
barrier); restore and safetensors' ``copy_`` both pay it, so the default pins one thread to measure the read path
rather than the machine's load. ``--torch-threads 0`` keeps torch's default.

Repeats interleave the methods in an order rotated per repeat; medians (and minima) are reported.

    .venv/bin/python benchmarks/bench_read.py --quick       # 64 MiB, 3 repeats: well under a minute
    .venv/bin/python benchmarks/bench_read.py               # 512 MiB in 64 tensors, 5 repeats
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import safepoint

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent
SLICE = 64 * MIB
METHODS = ("limit", "limit-touched", "load", "restore", "safetensors")


def make_state(total: int, count: int) -> dict[str, torch.Tensor]:
    numel = total // 4 // count
    generator = torch.Generator().manual_seed(0)
    return {f"t{i:05d}": torch.randn(numel, generator=generator) for i in range(count)}


class Case:
    """One workload on disk in both formats, with the live tensors that restore and copy_ write into."""

    def __init__(self, scratch: Path, name: str, state: dict[str, torch.Tensor]) -> None:
        self.name, self.nbytes = name, sum(t.numel() * 4 for t in state.values())
        self.checkpoint = scratch / f"{name}.safepoint"
        self.safetensors = scratch / f"{name}.safetensors"
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        self.module = (
            torch.nn.ParameterDict({k: torch.zeros_like(v) for k, v in state.items()}) if name == "module" else None
        )
        safepoint.save(
            self.checkpoint, {"model": torch.nn.ParameterDict(state)} if self.module is not None else {"tensors": state}
        )
        save_file(state, str(self.safetensors))
        self.payloads = sorted(p for p in self.checkpoint.rglob("*") if p.is_file() and p.name != "manifest.json")
        self.live = (
            dict(self.module.items()) if self.module is not None else {k: torch.zeros_like(v) for k, v in state.items()}
        )
        self.touched = [torch.zeros(path.stat().st_size, dtype=torch.uint8) for path in self.payloads]
        self.expected = state

    def files(self, method: str) -> list[Path]:
        if method == "safetensors":
            return [self.safetensors]
        return [*self.payloads, self.checkpoint / "manifest.json"]

    def run(self, method: str) -> None:
        if method == "limit":
            for path in self.payloads:
                read_plain(path, torch.empty(path.stat().st_size, dtype=torch.uint8))
        elif method == "limit-touched":
            for path, buffer in zip(self.payloads, self.touched, strict=True):
                read_plain(path, buffer)
        elif method == "load":
            loaded = safepoint.load(self.checkpoint)["tensors"]
            assert len(loaded) == len(self.live)
        elif method == "restore":
            safepoint.restore(
                self.checkpoint, {"model": self.module} if self.module is not None else {"tensors": self.live}
            )
        elif self.module is not None:
            self.module.load_state_dict(load_file(str(self.safetensors)))
        else:
            loaded = load_file(str(self.safetensors))
            for key, tensor in self.live.items():
                tensor.copy_(loaded[key])

    def check(self) -> None:
        for key, tensor in self.live.items():
            assert torch.equal(tensor, self.expected[key]), key
            with torch.no_grad():
                tensor.zero_()  # the next restore must write every byte again


def read_plain(path: Path, buffer: torch.Tensor) -> None:
    size = buffer.numel()
    view = memoryview(buffer.numpy()).cast("B")
    with open(path, "rb", buffering=0) as file:
        offset = 0
        while offset < size:
            count = file.readinto(view[offset : offset + SLICE])
            assert count, path
            offset += count


def evict(paths: list[Path], how: str) -> None:
    if how == "none":
        return
    os.sync()
    if how == "sysctl":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: list[Path]) -> float:
    """The share of the files' pages that are in the page cache (``mincore``): checks that eviction works here."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        with open(path, "rb") as file:
            mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)  # mapping reads no page
            anchor = ctypes.c_char.from_buffer(mapping)
            libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vector)
            del anchor
            mapping.close()
        resident += sum(v & 1 for v in vector)
        total += pages
    return resident / total if total else 0.0


def time_one(case: Case, method: str, how: str) -> float:
    evict(case.files(method), how)
    gc.collect()
    start = time.perf_counter()
    case.run(method)
    elapsed = time.perf_counter() - start
    if method in ("restore", "safetensors"):
        case.check()
    gc.collect()
    return elapsed


def measure(cases: list[Case], methods: dict[str, tuple[str, ...]], repeats: int, how: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {f"{c.name}/{m}": [] for c in cases for m in methods[c.name]}
    plan = [(c, m) for c in cases for m in methods[c.name]]
    for case, method in plan:  # one untimed round: imports, allocator, first-touch costs
        time_one(case, method, how)
    for repeat in range(repeats):
        shift = repeat % len(plan)
        for case, method in plan[shift:] + plan[:shift]:
            times[f"{case.name}/{method}"].append(time_one(case, method, how))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 repeats, 2 000 small tensors")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--small-count", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--evict", choices=("fadvise", "sysctl", "none"), default="fadvise")
    parser.add_argument("--workloads", default="large,small,one")
    parser.add_argument("--dir", type=Path, default=ROOT / "out" / "scratch-read")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.quick:
        args.size_mib, args.repeats, args.small_count = 64, 3, 2_000
    total = args.size_mib * MIB
    args.dir.mkdir(parents=True, exist_ok=True)
    shapes = {"large": args.tensors, "small": args.small_count, "one": 1, "module": args.tensors}
    wanted = args.workloads.split(",")
    cases = [Case(args.dir, name, make_state(total, shapes[name])) for name in wanted]
    methods: dict[str, tuple[str, ...]] = {
        "large": METHODS,
        "small": ("restore", "safetensors"),
        "one": ("restore",),
        "module": ("restore", "safetensors"),
    }
    probe = cases[0]
    evict(probe.files("load"), args.evict)
    print(f"eviction {args.evict!r}: {cached_fraction(probe.files('load')):.0%} of the files' pages cached after it")
    times = measure(cases, methods, args.repeats, args.evict)
    medians = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{args.size_mib} MiB float32, {args.repeats} repeats, eviction {args.evict}, "
          f"torch threads {torch.get_num_threads()}; median seconds, GB/s")  # fmt: skip
    for key, seconds in medians.items():
        case = next(c for c in cases if key.startswith(c.name + "/"))
        print(f"  {key:22s} {seconds:8.3f} s  {case.nbytes / seconds / 1e9:6.2f} GB/s  min {min(times[key]):.3f}  "
              f"(all: {' '.join(f'{t:.3f}' for t in times[key])})")  # fmt: skip
    ratios: dict[str, tuple[float, float]] = {}

    def ratio(name: str, numerator: str, denominator: str) -> None:
        """The ratio of the medians, and the median of the ratios within each repeat (paired: taken in the same
        round, so drift on a shared machine hits both sides alike)."""
        if numerator in medians and denominator in medians:
            paired = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
            ratios[name] = (medians[numerator] / medians[denominator], statistics.median(paired))

    ratio("load speed vs limit (>= 0.8)", "large/limit", "large/load")
    ratio("restore speed vs limit (>= 0.8)", "large/limit", "large/restore")
    ratio("restore speed vs safetensors+copy_ (>= 1.3)", "large/safetensors", "large/restore")
    ratio("small restore time / one tensor (<= 2)", "small/restore", "one/restore")
    ratio("small restore time / safetensors (<= 1.2)", "small/restore", "small/safetensors")
    ratio("module restore speed vs safetensors+load_state_dict", "module/safetensors", "module/restore")
    ratio("module restore speed vs limit", "large/limit", "module/restore")
    print("\nratios (targets from issue 10): ratio of medians, median of paired ratios")
    for name, (of_medians, of_pairs) in ratios.items():
        print(f"  {name:46s} {of_medians:5.2f}  {of_pairs:5.2f}")
    out = ROOT / "out" / ("bench_read-quick.json" if args.quick else "bench_read.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times,
                               "medians": medians, "ratios": ratios}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
