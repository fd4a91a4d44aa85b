"""Running a real torch.distributed (gloo) group of worker processes on 127.0.0.1, and always stopping it.

``run_group`` starts one ``python -m tests.distributed.worker SCENARIO DIR OUT`` per rank (``worker`` names another
module; an empty scenario is left out) with the env:// variables torchrun would set (RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), waits for all of them within a deadline, kills whatever is still
running when it expires or the test fails, and returns each rank's exit code, output and JSON results. The package
never imports this module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def loopback_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SAFEPOINT_FAULTS", None)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        # the source tree under test first: an installed safepoint (e.g. an editable one of another checkout)
        # must not stand in for it
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    )
    return env


@dataclass
class RankResult:
    returncode: int
    output: str
    results: dict[str, Any]


def run_group(
    scenario: str,
    world: int,
    directory: Path,
    out: Path,
    *,
    extra_env: Mapping[int, Mapping[str, str]] | None = None,
    deadline: float = 150.0,
    worker: str = "tests.distributed.worker",
) -> list[RankResult]:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[str]] = []
    logs = [out / f"rank{rank}.log" for rank in range(world)]
    try:
        for rank in range(world):
            env = loopback_env(rank, world, port)
            env.update((extra_env or {}).get(rank, {}))
            with logs[rank].open("w") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", worker, *([scenario] if scenario else []), str(directory), str(out)],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
        end = time.monotonic() + deadline
        for process in processes:
            process.wait(timeout=max(0.1, end - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    ranks = []
    for rank, process in enumerate(processes):
        path = out / f"rank{rank}.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        ranks.append(RankResult(process.returncode, logs[rank].read_text(), results))
    return ranks
