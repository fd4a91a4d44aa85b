"""Starting a benchmark's gloo group: one process per rank on 127.0.0.1, with the env:// variables torchrun sets,
all of them killed if any fails or the caller is interrupted."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

_T = TypeVar("_T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_ranks(command: list[str], world: int, what: str) -> None:
    """Run ``command`` once per rank of a ``world``-rank group; SystemExit naming ``what`` if a rank fails."""
    port = free_port()
    processes = []
    try:
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
            processes.append(subprocess.Popen(command, env=env))
        for process in processes:
            process.wait(timeout=3600)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [p.returncode for p in processes if p.returncode != 0]
    if failed:
        raise SystemExit(f"a rank of the {world}-rank {what} failed (exit codes {failed})")


def timed_afresh(target: Path, call: Callable[[], _T]) -> tuple[_T, float]:
    """Inside a rank of the group: rank 0 removes ``target`` (and syncs), so every round writes anew; ``call`` is
    then timed between two barriers, so the time is the slowest rank's. Returns its result and the seconds."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)
        os.sync()
    dist.barrier()
    start = time.perf_counter()
    result = call()
    dist.barrier()
    return result, time.perf_counter() - start


def end_rank() -> NoReturn:
    """Inside a rank of the group, once its results are written: end the process without finalizing the
    interpreter, as the tests' workers do (``tests/distributed/worker.py``).

    A gloo worker thread releases a collective's work, and the tensors it holds, only after the caller has been
    woken and gone on. Tensors whose Python objects the caller dropped meanwhile (``all_gather_object`` drops its
    buffers on return) are then released by that thread, and releasing their Python objects takes the GIL; while
    the interpreter finalizes, CPython ends such a thread with ``pthread_exit``, whose unwinding through torch's
    noexcept destructor calls ``std::terminate`` ("terminate called without an active exception", SIGABRT). A
    core of the rank that aborted in bench_fsdp.py's 4-rank save group shows exactly that: ``runLoop`` ->
    ``~AsyncAllgatherWork`` -> ``TensorImpl::decref_pyobject`` -> ``gil_scoped_acquire`` -> ``take_gil`` ->
    ``pthread_exit`` -> ``std::terminate``, while the main thread was in ``Py_FinalizeEx``. safepoint itself
    starts no gloo collectives (its ranks exchange through the store)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
