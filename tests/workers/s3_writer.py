"""One of several processes saving the same steps to one object-store URL at once:
``python -m tests.workers.s3_writer URL OPTIONS_JSON WRITER TRIALS``.

It prints ``ready``, reads a start time and an interval from stdin, then at each ``start + trial * interval`` saves
step ``trial`` with a state that is entirely its own (every value carries its writer number) and prints one JSON
line: the outcome (``won`` / ``exists`` / ``error``), the save id when it won, and the error's first line.
On even trials every writer pauses just before publishing, so that they all reach the exclusive create together
(the race the If-None-Match write decides); on odd ones the late writers find the step committed before writing.
With ``--crash-at POINT`` it instead saves step 0 once with that fault point armed to SIGKILL itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import safepoint
from safepoint import _faults as faults

PAUSE_SECONDS = 0.3


def state_of(writer: int) -> dict[str, object]:
    return {
        "weights": {"a": torch.full((4096,), float(writer)), "b": torch.full((64, 64), float(writer))},
        "progress": {"writer": writer},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("options")
    parser.add_argument("writer", type=int)
    parser.add_argument("trials", type=int)
    parser.add_argument("--crash-at", choices=faults.POINTS)
    args = parser.parse_args()
    options = json.loads(args.options)
    manager = safepoint.CheckpointManager(args.url, storage_options=options)
    state = state_of(args.writer)
    if args.crash_at:
        with faults.armed({args.crash_at: "kill"}):
            manager.save(0, state)
        raise SystemExit("the armed fault point was never reached")
    print("ready", flush=True)
    start, interval = map(float, sys.stdin.readline().split())
    for trial in range(args.trials):
        time.sleep(max(0.0, start + trial * interval - time.time()))
        pause = faults.FaultSpec(lambda name: time.sleep(PAUSE_SECONDS), nth=0)
        try:
            with faults.armed({"commit.publish.before": pause} if trial % 2 == 0 else {}):
                info = manager.save(trial, state)
            outcome = {"step": trial, "outcome": "won", "save_id": info.save_id}
        except safepoint.CheckpointExistsError as err:
            outcome = {"step": trial, "outcome": "exists", "message": str(err).splitlines()[0]}
        except Exception as err:
            outcome = {"step": trial, "outcome": "error", "message": f"{type(err).__name__}: {err}"}
        print(json.dumps(outcome), flush=True)
    manager.close()


if __name__ == "__main__":
    main()
