"""``safepoint demo``: a training run is killed with SIGKILL mid-run, resumed, and shown to end bitwise identical.

This module owns both halves of the demo: the small training program that runs in child processes
(``python -m safepoint._demo train RUN_DIR FINAL_DIR --steps N``) and the parent that starts, kills and resumes
those children, narrates what happened and compares the results. The parent writes only inside the demo
directory, and reuses a non-empty one only if an earlier demo marked it as its own; it never leaves a child
running behind it.

The training program is the same for every run: it resumes from the newest valid checkpoint when there is one,
so "resume" is nothing but starting it again on the killed run's directory, as a user would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
import xxhash
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._api import load, save
from ._errors import CheckpointNotFoundError
from ._gc import attempt_ids
from ._layout import join
from ._manager import CheckpointManager
from ._reader import read_manifest
from ._resolve import committed_steps, step_dirs
from ._rng import RNGState
from ._storage import open_storage

__all__ = ["MARKER", "MIN_STEPS", "DemoRefused", "checkpoint_every", "run_demo", "state_digest", "train"]

#: Written into every demo directory: only a directory holding it may be emptied and reused by a later demo.
MARKER = ".safepoint-demo"
_OWNED = ("reference", "interrupted", "final", "logs")
MIN_STEPS = 20
#: The parent waits for the first commit past this fraction of the run, so there is history before the kill
#: and plenty of run after it.
_KILL_AFTER = 0.4
_KEEP_LAST = 3

_FEATURES, _HIDDEN, _CLASSES, _SAMPLES, _BATCH = 32, 64, 10, 2048, 64


class DemoRefused(Exception):
    """The demo will not run with these arguments (a usage error); nothing was written."""


# -- the training program (runs in a child process) ------------------------------------------------------------
def checkpoint_every(steps: int) -> int:
    return max(1, steps // 20)


def _build(steps: int) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The training state and the data set, both the same in every process that builds them."""
    # every generator RNGState captures is seeded: an unseeded one differs between processes by design
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    # The data comes from its own generator: it is part of the program, not of the state to checkpoint.
    data = torch.Generator().manual_seed(1234)
    inputs = torch.randn(_SAMPLES, _FEATURES, generator=data)
    labels = (inputs @ torch.randn(_FEATURES, _CLASSES, generator=data)).argmax(dim=1)
    model = torch.nn.Sequential(
        torch.nn.Linear(_FEATURES, _HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(_HIDDEN, _CLASSES),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        # batches and dropout masks both draw from the global generator: without it a resume would diverge
        "rng": RNGState(),
        "progress": {"step": -1, "samples": 0, "loss": 0.0},
    }
    return state, inputs, labels


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def train(run_dir: str, final_dir: str, steps: int) -> None:
    """Train to ``steps``, resuming from ``run_dir`` if it holds a checkpoint; save the final state to ``final_dir``.

    Reports progress as JSON lines on stdout: fresh | restored, then step and committed events, then done.
    """
    torch.set_num_threads(1)  # one thread and deterministic kernels: the same bits in every process
    torch.use_deterministic_algorithms(True)
    state, inputs, labels = _build(steps)
    model, optimizer, scheduler, progress = state["model"], state["optimizer"], state["scheduler"], state["progress"]
    every = checkpoint_every(steps)
    with CheckpointManager(run_dir, keep_last=_KEEP_LAST) as manager:
        report = manager.restore(state)
        if report is None:
            _emit("fresh")
        else:
            _emit("restored", step=report.step, skipped=[[s.step, s.reason] for s in report.skipped])
        model.train()
        for step in range(report.step + 1 if report else 0, steps):
            batch = torch.randint(0, _SAMPLES, (_BATCH,))
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
            scheduler.step()
            progress.update(step=step, samples=progress["samples"] + _BATCH, loss=loss.item())
            _emit("step", step=step)
            if (step + 1) % every == 0 or step == steps - 1:
                manager.save(step, state, metrics={"loss": loss.item()})
                _emit("committed", step=step)
    save(final_dir, state, step=steps - 1)
    _emit("done")


def _child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m safepoint._demo", description="The demo's training program.")
    commands = parser.add_subparsers(required=True)
    run = commands.add_parser("train", help="train, resuming from RUN_DIR if it holds a checkpoint")
    run.add_argument("run_dir", metavar="RUN_DIR")
    run.add_argument("final_dir", metavar="FINAL_DIR")
    run.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    train(args.run_dir, args.final_dir, args.steps)
    return 0


# -- comparing results -----------------------------------------------------------------------------------------
def state_digest(value: Any) -> str:
    """An xxh3-128 digest of every byte of a loaded state: tensors' raw bytes, dtypes, shapes, keys and scalars."""
    hasher = xxhash.xxh3_128()
    _feed(hasher, value)
    return str(hasher.hexdigest())


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        hasher.update(f"ndarray {value.dtype} {value.shape}:".encode())
        hasher.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        hasher.update(b"{")
        for key in sorted(value, key=repr):
            hasher.update(f"{key!r}:".encode())
            _feed(hasher, value[key])
        hasher.update(b"}")
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{type(value).__name__}[".encode())
        for item in value:
            _feed(hasher, item)
        hasher.update(b"]")
    else:  # scalars: repr is exact for floats, so a one-ulp difference changes the digest
        hasher.update(f"{type(value).__name__}:{value!r};".encode())


# -- the parent ------------------------------------------------------------------------------------------------
@dataclass
class _Kill:
    committed: int  # the commit the parent waited for
    delay: float  # seconds between seeing that commit and sending SIGKILL
    last_step: int  # the last step the child reported before it died
    returncode: int


@dataclass
class _Resume:
    restored: int | None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    first_step: int | None = None
    last_step: int | None = None


class _Failed(Exception):
    """A child did not behave as the demo needs; the message says which and how."""


def run_demo(directory: str | None, steps: int, console: Console) -> int:
    """Run the demo (see the module docstring); 0 when the resumed run ends bitwise identical, 1 otherwise."""
    if steps < MIN_STEPS:
        raise DemoRefused(f"--steps must be at least {MIN_STEPS}, so the run can be killed after a few checkpoints")
    root = _prepare(directory)
    started = time.monotonic()
    every = checkpoint_every(steps)
    say = _Narrator(console)
    say.title(f"safepoint demo: {steps} training steps, a checkpoint every {every}, keep_last={_KEEP_LAST}")
    say.line(f"working in {root}" + ("" if directory else " (a new temporary directory; it is kept)"))
    say.line("model: 2-layer MLP with dropout, AdamW, cosine LR schedule, RNG state and a progress dict")
    try:
        with _children(root) as spawn:
            return _run(root, steps, say, spawn, started)
    except _Failed as err:
        say.bad(str(err))
        return 1


def _run(root: str, steps: int, say: _Narrator, spawn: _Spawner, started: float) -> int:
    say.step(1, "an uninterrupted reference run starts in a child process")
    reference = spawn("reference", _path(root, "reference"), _path(root, "final", "reference"), steps, piped=False)
    say.step(2, "a second run starts in another child process; it will be killed with SIGKILL")
    victim = spawn("interrupted", _path(root, "interrupted"), _path(root, "final", "resumed"), steps, piped=True)
    kill = _kill_mid_run(victim, steps)
    say.line(
        f"SIGKILL sent {kill.delay * 1000:.0f} ms after it committed step {kill.committed}; it had reported "
        f"step {kill.last_step} (pid {victim.pid}, exit status {kill.returncode})"
    )
    leftovers = _describe_disk(say, _path(root, "interrupted"))
    say.step(3, "the run starts again in a new child process, on the killed run's directory")
    resume = _resume(spawn("resumed", _path(root, "interrupted"), _path(root, "final", "resumed"), steps, piped=True))
    if resume.restored is None:
        raise _Failed("the resumed run found nothing to restore and started from scratch")
    for skipped_step, reason in resume.skipped:
        say.warn(f"skipped step {skipped_step}: {reason}")
    skipped = f"{len(resume.skipped)} newer checkpoint(s) skipped" if resume.skipped else "nothing skipped"
    say.line(
        f"restored step {resume.restored} (every byte verified; {skipped}), trained steps {resume.first_step}.."
        f"{resume.last_step} and saved the final state"
    )
    if kill.last_step > resume.restored:
        say.line(
            f"work lost to the kill: steps {resume.restored + 1}..{kill.last_step}, trained again after the resume"
        )
    if leftovers and not _leftovers(_path(root, "interrupted")):
        say.line("the interrupted attempt is gone: the manager collected it when it opened, as its writer was dead")
    _wait(reference, "reference")
    say.line(f"the reference run finished all {steps} steps")
    say.step(4, "comparing the final states byte for byte")
    identical = _compare(say, _path(root, "final", "reference"), _path(root, "final", "resumed"))
    say.line(
        f"finished in {time.monotonic() - started:.1f} s; look around with: safepoint ls {_path(root, 'interrupted')}"
    )
    return 0 if identical else 1


def _path(root: str, *names: str) -> str:
    return os.path.join(root, *names)


def _prepare(directory: str | None) -> str:
    """A directory for the demo: new, empty, or a previous demo's (whose results are removed)."""
    if directory is None:
        root = tempfile.mkdtemp(prefix="safepoint-demo-")
    else:
        root = os.path.abspath(directory)
        if os.path.lexists(root) and not os.path.isdir(root):
            raise DemoRefused(f"{root} exists and is not a directory")
        names = os.listdir(root) if os.path.isdir(root) else []
        if names and MARKER not in names:
            raise DemoRefused(
                f"{root} is not empty and is not a previous demo directory (it has no {MARKER} file); "
                "pass a new or empty directory, or omit --dir to use a temporary one"
            )
        for name in _OWNED:
            owned = os.path.join(root, name)
            try:
                if os.path.lexists(owned):
                    shutil.rmtree(owned)
            except OSError as err:
                raise DemoRefused(f"cannot remove the previous demo's {owned}: {err.strerror or err}") from err
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    with open(os.path.join(root, MARKER), "w", encoding="utf-8") as marker:
        marker.write("created by `safepoint demo`; running the demo here again replaces " + ", ".join(_OWNED) + "\n")
    return root


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[str]
    log: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> Iterator[dict[str, Any]]:
        assert self.process.stdout is not None, "events() needs a piped child"
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event


class _Spawner:
    def __init__(self, root: str) -> None:
        self.root = root
        self.children: list[_Child] = []

    def __call__(self, name: str, run_dir: str, final_dir: str, steps: int, *, piped: bool) -> _Child:
        log = os.path.join(self.root, "logs", f"{name}.log")
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        # the children must run this very safepoint, whether it is installed or imported from a source tree
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "safepoint._demo", "train", run_dir, final_dir, "--steps", str(steps)]
        with open(log, "w", encoding="utf-8") as log_file:
            stdout: int | IO[str] = subprocess.PIPE if piped else log_file
            process = subprocess.Popen(command, stdout=stdout, stderr=log_file, text=True, env=env)
        child = _Child(name, process, log)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()
            child.process.wait()
            if child.process.stdout is not None:
                child.process.stdout.close()


@contextlib.contextmanager
def _children(root: str) -> Iterator[_Spawner]:
    spawner = _Spawner(root)
    try:
        yield spawner
    finally:
        spawner.stop_all()


def _kill_mid_run(child: _Child, steps: int) -> _Kill:
    """Wait for a commit past the kill point, then SIGKILL after a random delay of up to ~1.5 checkpoint intervals.

    The delay is random so the kill lands anywhere: in a training step, or in the middle of writing a checkpoint.
    """
    kill_after = int(steps * _KILL_AFTER)
    last_commit: float | None = None
    interval = 0.0
    committed: int | None = None
    for event in child.events():
        if event.get("event") != "committed":
            continue
        now = time.monotonic()
        if last_commit is not None:
            interval = now - last_commit
        last_commit, committed = now, int(event["step"])
        if committed >= kill_after and interval > 0:
            break
    if committed is None or committed < kill_after:
        raise _Failed(f"the run to be killed ended before its kill point (exit status {child.process.wait()}); "
                      f"see {child.log}")  # fmt: skip
    delay = random.uniform(0.0, 1.5 * interval)
    time.sleep(delay)
    child.process.send_signal(signal.SIGKILL)
    last_step = committed
    for event in child.events():  # what it printed before it died
        if event.get("event") == "step":
            last_step = int(event["step"])
    returncode = child.process.wait()
    if returncode != -signal.SIGKILL:
        raise _Failed(f"the run finished before SIGKILL reached it (exit status {returncode}); try more --steps")
    return _Kill(committed, delay, last_step, returncode)


def _leftovers(run_dir: str) -> list[tuple[int, str]]:
    """(step, attempt) for every save attempt on disk that no manifest names: what an interrupted save left."""
    storage = open_storage(run_dir)
    found = []
    for step_dir in step_dirs(storage):
        step, path = step_dir.step, step_dir.path
        attempts = attempt_ids(storage, path)
        with contextlib.suppress(CheckpointNotFoundError):
            attempts.discard(read_manifest(storage, path).save_id)
        found += [(step, join(path, attempt)) for attempt in sorted(attempts)]
    return found


def _describe_disk(say: _Narrator, run_dir: str) -> list[tuple[int, str]]:
    """Say what the kill left on disk and where it landed; returns the leftover attempts."""
    storage = open_storage(run_dir)
    committed = committed_steps(storage)
    newest = committed[-1] if committed else -1
    say.line(f"on disk after the kill: committed steps {', '.join(map(str, committed)) or 'none'}")
    leftovers = _leftovers(run_dir)
    saving = [path for step, path in leftovers if step > newest]
    retiring = [path for step, path in leftovers if step <= newest]
    if saving:
        say.line(f"the kill landed in the middle of a save: {', '.join(saving)} has no manifest, so no reader will "
                 "ever see it")  # fmt: skip
    if retiring:
        say.line(f"the kill landed while retention removed an old step: {', '.join(retiring)} is already "
                 "unpublished (no manifest), so no reader will ever see it")  # fmt: skip
    if not leftovers and len(committed) > _KEEP_LAST:
        say.line(f"the kill landed just after step {newest} was committed, before retention (keep_last="
                 f"{_KEEP_LAST}) removed the oldest step")  # fmt: skip
    elif not leftovers:
        say.line("the kill landed in a training step, between two checkpoints: no partial save on disk")
    return leftovers


def _resume(child: _Child) -> _Resume:
    result = _Resume(restored=None)
    for event in child.events():
        kind = event.get("event")
        if kind == "restored":
            result.restored = int(event["step"])
            result.skipped = [(int(step), str(reason)) for step, reason in event["skipped"]]
        elif kind == "step":
            result.first_step = int(event["step"]) if result.first_step is None else result.first_step
            result.last_step = int(event["step"])
    _wait(child, "resumed")
    return result


def _wait(child: _Child, what: str) -> None:
    returncode = child.process.wait()
    if returncode != 0:
        with open(child.log, encoding="utf-8", errors="replace") as log:
            tail = "".join(log.readlines()[-15:])
        raise _Failed(f"the {what} run failed with exit status {returncode}; the end of {child.log}:\n{tail}")


def _compare(say: _Narrator, reference_dir: str, resumed_dir: str) -> bool:
    reference, resumed = load(reference_dir), load(resumed_dir)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("component", "uninterrupted (xxh3-128)", "resumed after SIGKILL", ""):
        table.add_column(column)
    identical = True
    for name in sorted(set(reference) | set(resumed)):
        left = state_digest(reference[name]) if name in reference else "absent"
        right = state_digest(resumed[name]) if name in resumed else "absent"
        same = left == right
        identical &= same
        table.add_row(
            Text(name), Text(left), Text(right), Text("same" if same else "DIFFERENT", "green" if same else "bold red")
        )
    say.console.print(table)
    if identical:
        say.good("bitwise identical: the resumed run's final weights and optimizer state (and scheduler, RNG and "
                 "progress) match the uninterrupted run's byte for byte")  # fmt: skip
    else:
        say.bad("DIFFERENT: the resumed run did not end where the uninterrupted run did")
    return identical


class _Narrator:
    def __init__(self, console: Console) -> None:
        self.console = console

    def title(self, text: str) -> None:
        self.console.print(Text(text, style="bold"))

    def step(self, number: int, text: str) -> None:
        self.console.print(Text.assemble((f"{number}. ", "bold cyan"), (text, "bold")))

    def line(self, text: str) -> None:
        self.console.print(Text(f"   {text}"))

    def warn(self, text: str) -> None:
        self.console.print(Text(f"   {text}", style="yellow"))

    def good(self, text: str) -> None:
        self.console.print(Text(text, style="bold green"))

    def bad(self, text: str) -> None:
        self.console.print(Text(text, style="bold red"))


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
