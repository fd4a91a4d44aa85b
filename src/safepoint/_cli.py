"""The ``safepoint`` command-line tool: list, inspect, verify, compare and clean checkpoint directories, migrate,
import and export them, and run the demo.

This module owns argument parsing, presentation (rich tables on a terminal, plain lines in logs) and the mapping
of :class:`~safepoint.SafepointError` to one ``error: ...`` line and an exit code. It reads through the same
functions as the library and modifies a checkpoint only where asked to remove one: ``gc`` only calls the
collector; ``rm`` unpublishes then collects, as retention does, after a confirmation, and never the newest valid
checkpoint without ``--force``; ``migrate`` and ``import`` write new checkpoint directories, ``export`` a new
file, each refusing a destination that exists.

Exit codes: 0 success; 1 a checkpoint is invalid or damaged (verification failure), or cannot be migrated;
2 a usage error or a path that does not exist. ``diff`` follows diff(1): 0 identical, 1 different, 2 trouble
(a bad path, or a checkpoint that does not verify).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ._codec import DTYPE_NAMES, key_path
from ._diff import Difference, diff_checkpoints, diff_trees, tree_children, truncate
from ._errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    MigrationError,
    RestoreError,
    SafepointError,
)
from ._gc import attempt_ids, collect, remove_checkpoint
from ._interop import FORMATS, export_checkpoint, import_checkpoint, locate_checkpoint, write_new_checkpoint
from ._layout import MANIFEST_NAME, join, parse_attempt, step_dir
from ._manifest import EntryRecord, Manifest
from ._migrations import Migrations, copy_containers
from ._reader import LoadedCheckpoint, read_checkpoint, read_manifest, verify_checkpoint
from ._resolve import Kind, Location, committed_steps, is_committed, resolve
from ._restore import plain_values
from ._storage import LocalStorage, Storage, open_storage
from ._verify import CheckpointStatus, VerifyReport, verify_storage

__all__ = ["main"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

# Logs and pipes have no width: wrapping there would split paths and error messages across lines.
_PLAIN_WIDTH = 200
# A progress bar for one checkpoint would flash and vanish; below this it only adds noise.
_BAR_MIN_CHECKPOINTS = 2


class UsageError(Exception):
    """A request the CLI refuses before touching anything (exit 2); raised by the subcommands."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit code instead of exiting, so tests and wrappers can call it."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    command: Callable[[argparse.Namespace, Console], int] = args.run
    try:
        return command(args, _console(sys.stdout))
    except UsageError as err:
        return _fail(str(err), EXIT_USAGE)
    except (CorruptCheckpointError, RestoreError, MigrationError) as err:
        return _fail(str(err), EXIT_INVALID)
    except SafepointError as err:
        return _fail(str(err), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _console(file: IO[str]) -> Console:
    console = Console(file=file, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = _PLAIN_WIDTH
    return console


# -- parsing ---------------------------------------------------------------------------------------------------
def _package_version() -> str:
    try:
        return version("safepoint")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safepoint",
        description="See, verify and clean safepoint checkpoints, or watch a killed training run resume exactly.",
        epilog="Run `safepoint COMMAND --help` for what each command does, with an example.",
    )
    parser.add_argument("--version", action="version", version=f"safepoint {_package_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, summary: str, details: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=f"{summary}\n\n{details}",
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    ls = command(
        "ls",
        "List the checkpoints of a manager directory (or one checkpoint directory).",
        "Shows step, creation time, size, metrics and a status. By default the status is cheap and says so:\n"
        "'committed (not verified)' when the manifest parses and every file it lists is there with the right\n"
        "size, otherwise 'damaged: <reason>'; payloads are not read, so a flipped byte still shows as committed.\n"
        "--verify reads and checks every byte, like `safepoint verify`, and the status becomes 'valid (verified)'\n"
        "or 'INVALID: <reason>'. Uncommitted saves are listed as notes below the table.\n"
        "Exits 0 whenever the directory could be listed, damaged or not (`safepoint verify` exits 1).",
        "safepoint ls runs/exp1\n  safepoint ls runs/exp1 --verify",
    )
    ls.add_argument("directory", metavar="DIR", help="a manager directory or one checkpoint directory (path or URL)")
    ls.add_argument("--verify", action="store_true", help="read and check every byte (default: sizes only)")
    _location_options(ls)
    ls.set_defaults(run=_cmd_ls)

    inspect = command(
        "inspect",
        "Show what one checkpoint holds: header, files and every entry (key, kind, dtype, shape, bytes, value).",
        "CKPT is a checkpoint directory, or a manager directory with --step (default: the newest committed\n"
        "step). Every entry of the state is listed by key path: tensors and arrays with dtype, shape and bytes;\n"
        "numbers, strings, bools, None and bytes with their value (long ones cut short); empty dicts and lists as\n"
        "{} and []; lists of plain values (a Python RNG state) as one row. Only the manifest and file sizes are\n"
        "read; exits 1 if the checkpoint is damaged.",
        "safepoint inspect runs/exp1 --step 1200",
    )
    inspect.add_argument("checkpoint", metavar="CKPT", help="a checkpoint or manager directory (path or URL)")
    inspect.add_argument("--step", type=_step, help="the step to show, in a manager directory (default: newest)")
    _location_options(inspect)
    inspect.set_defaults(run=_cmd_inspect)

    verify = command(
        "verify",
        "Check every byte of every committed checkpoint against its manifest's sizes and checksums.",
        "Exits 0 only if every committed checkpoint is valid, 1 if any is not (each bad one is printed with the\n"
        "file to blame), 2 if the path does not exist. Leftovers of uncommitted saves are printed as notes and\n"
        "are not failures. A progress bar is drawn on stderr when it is a terminal.",
        "safepoint verify runs/exp1 && echo all good",
    )
    verify.add_argument("path", metavar="DIR|CKPT", help="a manager or one checkpoint directory (path or URL)")
    _location_options(verify)
    verify.set_defaults(run=_cmd_verify)
    _diff_command(command)

    gc = command(
        "gc",
        "Remove what crashed or failed saves left behind, where their writer is certainly gone.",
        "An attempt is removed only when no live process holds its lock and no manifest names it; attempts of\n"
        "a running save are listed and left alone. Committed checkpoints are never touched. DIR must be a\n"
        "safepoint directory: gc refuses one with no step directories, manifest or attempt lock files.\n"
        "On object stores there are no process locks: an attempt counts as dead once its lock object has not\n"
        "been refreshed for --grace-period seconds (a live writer refreshes it every quarter of that).",
        "safepoint gc runs/exp1\n  safepoint gc s3://bucket/runs/exp1 --grace-period 600",
    )
    gc.add_argument("directory", metavar="DIR", help="a manager directory or one checkpoint directory (path or URL)")
    _location_options(gc)
    gc.add_argument(
        "--grace-period",
        type=_seconds,
        metavar="SECONDS",
        help="object stores: age after which an unfinished save's lock counts as dead (default: 3600)",
    )
    gc.set_defaults(run=_cmd_gc)
    _rm_command(command)

    demo = command(
        "demo",
        "Train a small model, SIGKILL it mid-run, resume it, and show the result is bitwise identical.",
        "Runs an uninterrupted reference run and a second run in child processes, kills the second with SIGKILL\n"
        "at a random moment after it has committed some checkpoints, resumes it from the newest valid one, and\n"
        "compares final weights, optimizer, scheduler, RNG and progress with the reference, byte for byte.\n"
        "Exits 0 when identical, 1 otherwise. --dir must be new, empty, or a previous demo directory (its\n"
        "earlier results are replaced); without --dir a fresh temporary directory is used and kept.",
        "safepoint demo --dir /tmp/sp-demo --steps 400",
    )
    demo.add_argument("--dir", dest="directory", help="where the runs write (default: a new temporary directory)")
    demo.add_argument("--steps", type=_step, default=400, help="training steps per run (at least 20; default 400)")
    demo.set_defaults(run=_cmd_demo)
    _conversion_commands(command)
    return parser


def _diff_command(command: Callable[[str, str, str, str], argparse.ArgumentParser]) -> None:
    diff = command(
        "diff",
        "Compare two checkpoints: entries added, removed and changed, and metrics; exit 0 identical, 1 different.",
        "A and B are each a checkpoint directory, or a manager directory with --step-a / --step-b (default: its\n"
        "newest committed step); A and B may be the same manager directory. Both are read and verified first:\n"
        "a checkpoint that does not verify is an error naming the bad file. Tensors and arrays are compared\n"
        "bitwise (so -0.0 differs from 0.0 and equal NaNs are equal); a change says how many elements differ and,\n"
        "for floating dtypes, the largest absolute difference; dtype and shape changes are named. Numbers,\n"
        "strings and other values are compared exactly, with their type; pickled entries by their bytes (never\n"
        "unpickled). Metrics and state_version are compared too; step, save id and time are shown, not compared.\n"
        "Exit codes follow diff(1): 0 identical, 1 different, 2 trouble (a bad path, a damaged checkpoint).\n"
        "Local checkpoints are memory-mapped, so comparing two large ones does not need their size in RAM.",
        "safepoint diff runs/exp1 runs/exp1 --step-a 1000 --step-b 1200\n"
        "  safepoint diff runs/exp1 runs/exp2   # the newest step of each\n"
        "  safepoint diff runs/exp1/step-000000001200 imported-1200 && echo same",
    )
    diff.add_argument("a", metavar="A", help="a checkpoint or manager directory (path or URL)")
    diff.add_argument("b", metavar="B", help="a checkpoint or manager directory (path or URL)")
    for side in ("a", "b"):
        diff.add_argument(f"--step-{side}", type=_step, metavar="N",
                          help=f"the step of {side.upper()}, in a manager directory (default: newest)")  # fmt: skip
    _location_options(diff)
    diff.set_defaults(run=_cmd_diff)


def _rm_command(command: Callable[[str, str, str, str], argparse.ArgumentParser]) -> None:
    rm = command(
        "rm",
        "Remove one committed checkpoint, damaged or healthy: unpublish its manifest first, then delete its data.",
        "DIR is a manager directory with --step N (required: rm never picks a step for you), or one checkpoint\n"
        "directory. The removal follows retention's order: the manifest is removed and the directory synced, so\n"
        "no reader sees the checkpoint any more, then its data is deleted; an interrupted rm leaves only what\n"
        "`safepoint gc` collects. A checkpoint whose manifest is damaged is removed too (this is the way to clean\n"
        "up what `safepoint verify` reports INVALID). The newest valid checkpoint is refused unless --force:\n"
        "rm verifies the newer steps first (newest first, stopping at the first valid one), and the asked step\n"
        "itself when no newer one is valid; a step written by a newer safepoint version counts as valid.\n"
        "On a terminal rm asks for confirmation; elsewhere it needs --yes. A save of the same step still in\n"
        "progress keeps its files (listed as left). Exits 0 when removed or declined, 2 when refused.",
        "safepoint rm runs/exp1 --step 1200\n  safepoint rm runs/exp1 --step 1200 --yes   # in a script",
    )
    rm.add_argument("directory", metavar="DIR", help="a manager directory (with --step) or one checkpoint directory")
    rm.add_argument("--step", type=_step, metavar="N", help="the step to remove, in a manager directory")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    rm.add_argument("--force", action="store_true", help="remove it even if it is the newest valid checkpoint")
    _location_options(rm)
    rm.set_defaults(run=_cmd_rm)


def _conversion_commands(command: Callable[[str, str, str, str], argparse.ArgumentParser]) -> None:
    migrate = command(
        "migrate",
        "Upgrade a checkpoint's user state to a newer state_version: show the changes, or write a new checkpoint.",
        "Runs the migration chain of --migrations MODULE:ATTR (a safepoint.Migrations; MODULE is importable from\n"
        "the current directory, or is a path to a .py file) on the checkpoint's data, from its saved state_version\n"
        "to N. --dry-run prints what would change (keys added, removed and changed, with their values) and writes\n"
        "nothing. Otherwise the migrated state is written as a NEW checkpoint directory at --output DIR, which\n"
        "must not exist (same step and metrics, state_version N): the source checkpoint is never modified. To\n"
        "resume training from it, restore it with safepoint.restore(), or let CheckpointManager(...,\n"
        "state_version=N, migrations=...) migrate old steps itself on restore. CKPT is a checkpoint directory or a\n"
        "manager directory (--step, default: the newest committed step). Importing MODULE runs its code.\n"
        "Exits 1 if a migration fails or the checkpoint is newer than N.",
        "safepoint migrate runs/exp1 --to 3 --migrations mytrain.migrations:migrations --dry-run",
    )
    migrate.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory or a manager directory")
    migrate.add_argument("--to", dest="to_version", type=_step, required=True, metavar="N",
                         help="the state_version to upgrade to")  # fmt: skip
    migrate.add_argument("--migrations", metavar="MODULE:ATTR", help="where the safepoint.Migrations object is")
    migrate.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    migrate.add_argument("--output", metavar="DIR", help="the new checkpoint directory to write (must not exist)")
    migrate.add_argument("--step", type=_step, help="the step to migrate, in a manager directory (default: newest)")
    _location_options(migrate)
    migrate.set_defaults(run=_cmd_migrate)

    importer = command(
        "import",
        "Turn a torch.save file, a .safetensors file, a Transformers checkpoint-N folder or a DCP directory into a\n"
        "checkpoint.",
        "SRC's kind is recognised from its content. torch.save files are loaded with weights_only=True only: a\n"
        "file that needs arbitrary pickle is refused (exit 1) and nothing in it runs. A Transformers folder\n"
        "becomes model (model.safetensors, pytorch_model.bin or their shards), optimizer, scheduler, scaler,\n"
        "rng_state, trainer_state, config and generation_config entries; its step is trainer_state's global_step.\n"
        "training_args.bin (pickled code) and tokenizer files are listed as skipped, never opened. A\n"
        "torch.distributed.checkpoint directory (.metadata + *.distcp, as torchtitan and Lightning's FSDP write)\n"
        "becomes full tensors in its nested structure: .metadata is read by an unpickler that resolves only DCP's\n"
        "metadata classes, every chunk is checked against it (bounds, exact coverage, byte ranges, CRC-32, dtype,\n"
        "shape) and decoded with weights_only=True; a Lightning meta.pt is merged in. DEST becomes a\n"
        "new checkpoint directory with the same nested structure; it must not exist, and is removed again if the\n"
        "import fails. Restore it with safepoint.restore() or read it with safepoint.load(); or make DEST a step\n"
        "of a manager directory (runs/exp1/step-000000000500, named after the imported step) to resume there.",
        "safepoint import output/checkpoint-500 runs/imported-500",
    )
    importer.add_argument("source", metavar="SRC", help="a torch.save, .safetensors file, checkpoint-N or DCP folder")
    importer.add_argument("dest", metavar="DEST", help="the new checkpoint directory (must not exist)")
    importer.add_argument("--step", type=_step, help="the step to record (default: the source's, else 0)")
    importer.add_argument("--state-version", type=_step, default=1, help="the state_version to record (default 1)")
    importer.set_defaults(run=_cmd_import)

    exporter = command(
        "export",
        "Write a checkpoint as one plain file other tools read: torch.save or safetensors.",
        "Every byte is verified first. --format torch writes a file torch.load(weights_only=True) reads, with the\n"
        "nested structure kept (numpy values become tensors). --format safetensors writes tensors only, named by\n"
        "key path (optimizer/state/0/exp_avg); any other value is an error naming its key: pick a subtree of\n"
        "tensors with --key (e.g. --key model for a plain state_dict). DEST must not exist; it is written under a\n"
        "temporary name and appears complete or not at all. CKPT is a checkpoint directory or a manager\n"
        "directory (--step, default: the newest committed step).",
        "safepoint export runs/exp1 model.safetensors --format safetensors --key model",
    )
    exporter.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory or a manager directory")
    exporter.add_argument("dest", metavar="DEST", help="the file to write (must not exist)")
    exporter.add_argument("--format", dest="file_format", choices=FORMATS, required=True, help="the file format")
    exporter.add_argument("--key", help="export only this subtree, e.g. model")
    exporter.add_argument("--step", type=_step, help="the step to export, in a manager directory (default: newest)")
    exporter.set_defaults(run=_cmd_export)


def _location_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        "-o",
        dest="storage_options",
        action="append",
        type=_storage_option,
        default=[],
        metavar="KEY=VALUE",
        help="for a URL (s3://bucket/run, gs://..., any fsspec protocol): an option of its file system, repeatable; "
        'VALUE is read as JSON when it parses (true, 3, {"endpoint_url": ...}), else as a string. '
        "Example: -o endpoint_url=http://127.0.0.1:9000 -o anon=true",
    )


def _storage_option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number of seconds")
    return value


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


# -- helpers ---------------------------------------------------------------------------------------------------
def _open_existing(path: str, args: argparse.Namespace) -> tuple[Storage, Location]:
    """The directory at ``path`` and what it holds; UsageError if there is none."""
    grace = getattr(args, "grace_period", None)
    storage = open_storage(path, dict(args.storage_options) or None, grace_period=grace)
    location = resolve(storage)
    if location.kind is Kind.MISSING:
        raise UsageError(f"{storage.describe('')} does not exist")
    if location.kind is Kind.FILE:
        raise UsageError(f"{storage.describe('')} is not a directory")
    return storage, location


def _relative(storage: Storage, text: str) -> str:
    """Messages name absolute paths; inside a listing of one directory the part below it is what matters."""
    return text.replace(storage.describe("") + "/", "")


def _human_size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} PiB"


def _local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.6g}" for name, value in sorted(metrics.items()))


# -- ls --------------------------------------------------------------------------------------------------------
#: The status of a checkpoint whose manifest and file sizes are right, but whose bytes were not read.
COMMITTED = "committed (not verified)"
#: The status of a checkpoint whose every byte was read and checked.
VERIFIED = "valid (verified)"


@dataclass(frozen=True)
class _Row:
    step: int
    manifest: Manifest | None
    status: str  # COMMITTED, VERIFIED, "damaged: <reason>" (sizes) or "INVALID: <reason>" (bytes)

    @property
    def ok(self) -> bool:
        return self.status in (COMMITTED, VERIFIED)


def _cheap_status(storage: Storage, checkpoint: str, step: int | None) -> _Row:
    """What the manifest promises, checked without reading payloads: it parses, and every file has its size."""
    fallback = step if step is not None else -1
    try:
        manifest = read_manifest(storage, checkpoint)
    except SafepointError as err:
        return _Row(fallback, None, f"damaged: {_relative(storage, str(err))}")
    if step is not None and manifest.step != step:
        return _Row(step, manifest, f"damaged: the manifest is for step {manifest.step}")
    for record in manifest.files:
        path = join(checkpoint, record.path)
        try:
            size = storage.size(path)
        except FileNotFoundError:
            return _Row(manifest.step, manifest, f"damaged: {record.path} is missing")
        except SafepointError as err:
            return _Row(manifest.step, manifest, f"damaged: {_relative(storage, str(err))}")
        if size != record.size:
            return _Row(manifest.step, manifest, f"damaged: {record.path} is {size} bytes, the manifest says "
                                                 f"{record.size}")  # fmt: skip
    return _Row(manifest.step, manifest, COMMITTED)


def _verified_status(storage: Storage, row: _Row, checkpoint: str, step: int | None) -> _Row:
    """A row whose sizes are right, after reading every byte."""
    try:
        verify_checkpoint(storage, checkpoint, step=step)
    except SafepointError as err:
        return _Row(row.step, row.manifest, f"INVALID: {_relative(storage, str(err))}")
    return _Row(row.step, row.manifest, VERIFIED)


def _cmd_ls(args: argparse.Namespace, console: Console) -> int:
    storage, location = _open_existing(args.directory, args)
    notes: list[str] = []
    single = location.is_committed_checkpoint
    targets = [(None, "")] if single else [(found.step, found.path) for found in location.steps]
    committed: list[tuple[int | None, str, _Row]] = []
    for step, path in targets:
        attempts = attempt_ids(storage, path)
        name = path or "."
        if not is_committed(storage, path):
            notes.append(f"{name}: uncommitted ({len(attempts)} save attempt(s) in progress or crashed; "
                         "invisible to restore; `safepoint gc` removes dead ones)")  # fmt: skip
            continue
        row = _cheap_status(storage, path, step)
        committed.append((step, path, row))
        extra = attempts - {row.manifest.save_id} if row.manifest else set()
        if extra:
            notes.append(f"{name}: {len(extra)} leftover attempt(s) besides the committed one; `safepoint gc`")
    rows = _verify_rows(storage, committed) if args.verify else [row for *_, row in committed]
    console.print(Text(storage.describe(""), style="bold"))
    if not rows:
        console.print("no committed checkpoints")
    else:
        console.print(_ls_table(rows))
        bad = sum(not row.ok for row in rows)
        total = sum(row.manifest.nbytes for row in rows if row.manifest)
        summary = f"{len(rows)} checkpoint(s), {_human_size(total)}"
        console.print(summary + (f", [red]{bad} {'invalid' if args.verify else 'damaged'}[/red]" if bad else ""))
        if not args.verify:
            console.print("statuses check manifests and file sizes only; `safepoint ls --verify` reads every byte")
    for note in notes:
        console.print(Text(f"note: {note}", style="yellow"))
    return EXIT_OK


def _verify_rows(storage: Storage, committed: list[tuple[int | None, str, _Row]]) -> list[_Row]:
    """Every byte of the rows whose sizes are right, with a progress bar on a terminal (stderr)."""
    errors = _console(sys.stderr)
    todo = sum(row.ok for *_, row in committed)
    with _progress("verifying", errors, todo) as advance:
        rows = []
        for step, path, cheap in committed:
            if not cheap.ok:
                rows.append(cheap)  # its sizes are already wrong: reading its bytes would say no more
                continue
            rows.append(_verified_status(storage, cheap, path, step))
            advance(f"step {cheap.step}")
    return rows


@contextlib.contextmanager
def _progress(what: str, errors: Console, total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr for ``total`` pieces of work when it is a terminal and the work is not tiny;
    yields ``advance(description)``. Results are printed after it, so stdout is the same with or without."""
    if not errors.is_terminal or total < _BAR_MIN_CHECKPOINTS:
        yield lambda _description: None
        return
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"))
    with Progress(*columns, TimeElapsedColumn(), console=errors, transient=True,
                  redirect_stdout=False, redirect_stderr=False) as progress:  # fmt: skip
        task = progress.add_task("", total=total)
        yield lambda description: progress.update(task, advance=1, description=description)


def _ls_table(rows: list[_Row]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("step", justify="right")
    table.add_column("time")
    table.add_column("size", justify="right")
    table.add_column("metrics", overflow="fold")
    table.add_column("status", overflow="fold")
    for row in rows:
        manifest = row.manifest
        ok = row.ok
        table.add_row(
            Text(str(row.step) if row.step >= 0 else "?"),
            Text(_local_time(manifest.created) if manifest else "-"),
            Text(_human_size(manifest.nbytes) if manifest else "-"),
            Text(_format_metrics(manifest.metrics) if manifest else ""),
            Text(row.status, style="green" if ok else "red"),
        )
    return table


# -- inspect ---------------------------------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    storage, _ = _open_existing(args.checkpoint, args)
    checkpoint = locate_checkpoint(storage, args.step)
    manifest = read_manifest(storage, checkpoint)
    cheap = _cheap_status(storage, checkpoint, None)
    status, ok = cheap.status, cheap.ok
    header = (
        ("checkpoint", storage.describe(checkpoint)),
        ("step", str(manifest.step)),
        ("save id", manifest.save_id),
        ("created", _local_time(manifest.created)),
        ("format version", str(manifest.format_version)),
        ("state_version", str(manifest.state_version)),
        ("world size", str(manifest.world_size)),
        ("writer", manifest.writer or "-"),
        ("metrics", _format_metrics(manifest.metrics) or "-"),
        ("state", _top_level(manifest)),
        ("size", f"{_human_size(manifest.nbytes)} in {len(manifest.files)} file(s)"),
        (
            "status",
            "committed (sizes checked, not verified; `safepoint verify` checks every byte)" if ok else status,
        ),
    )
    for name, value in header:
        console.print(Text.assemble((f"{name:<16}", "bold"), value), soft_wrap=True)
    console.print()
    console.print(Text("files", style="bold"))
    files = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("path", "size", "bytes", "checksum"):
        files.add_column(column, justify="right" if column in ("size", "bytes") else "left")
    for record in manifest.files:
        files.add_row(Text(record.path), Text(_human_size(record.size)), Text(str(record.size)), Text(record.checksum))
    console.print(files)
    console.print()
    rows = _entry_rows(manifest)
    stored = sum(bool(row.dtype) for row in rows)
    console.print(Text(f"entries ({len(rows)}: {stored} in payload files, {len(rows) - stored} in the manifest)",
                       style="bold"))  # fmt: skip
    console.print(_entries_table(rows))
    return EXIT_OK if ok else EXIT_INVALID


def _top_level(manifest: Manifest) -> str:
    """The top-level keys and, for objects saved through state_dict, their recorded class."""
    parts = []
    for key, node in manifest.tree["v"]:
        kind = node["k"]
        label = {"object": node.get("type"), "typed": node.get("t")}.get(kind) or kind
        parts.append(f"{key} ({label})")
    return ", ".join(parts) or "-"


_SCALAR_KINDS = ("int", "bool", "str", "float", "bytes", "none")
_EMPTY = {"dict": "{}", "list": "[]", "tuple": "()"}


@dataclass(frozen=True)
class _EntryRow:
    key: str
    kind: str
    dtype: str = ""
    shape: str = ""
    nbytes: str = ""
    value: str = ""


def _entry_rows(manifest: Manifest) -> list[_EntryRow]:
    """One row per value of the state in tree order: tensors, arrays and pickles from their manifest entry,
    everything else (progress counters, scheduler values, strings, empty containers) with its value."""
    rows: list[_EntryRow] = []
    stack: list[tuple[tuple[str | int, ...], Mapping[str, Any]]] = [((), manifest.tree)]
    while stack:
        path, node = stack.pop()
        key, kind = key_path(path), str(node.get("k"))
        leaf = node.get("e")
        if isinstance(leaf, int) and 0 <= leaf < len(manifest.entries):
            rows.append(_leaf_row(key, kind, node, manifest.entries[leaf]))
            continue
        if kind in _SCALAR_KINDS:
            rows.append(_EntryRow(key, kind, value=_scalar_text(node)))
            continue
        if kind == "sharded":
            rows.append(_sharded_row(key, node, manifest))
            continue
        children = tree_children(path, node)
        if path and not children:
            rows.append(_EntryRow(key, kind, value=_EMPTY.get(kind, "(empty)")))
        elif path and kind in ("list", "tuple") and all(child.get("k") in _SCALAR_KINDS for _, child in children):
            # a list of plain numbers (a Python RNG state has 625) is one value, not hundreds of rows
            items = ", ".join(_scalar_text(child) for _, child in children)
            text = f"[{items}]" if kind == "list" else f"({items})"
            rows.append(_EntryRow(key, f"{kind}[{len(children)}]", value=truncate(text)))
        else:
            stack.extend(reversed(children))
    return rows


def _leaf_row(key: str, kind: str, node: Mapping[str, Any], entry: EntryRecord) -> _EntryRow:
    dtype = str(DTYPE_NAMES[entry.dtype]).removeprefix("torch.") if entry.kind != "pickle" else "-"
    shape = node.get("shape", entry.shape)
    text = "[" + ", ".join(map(str, shape)) + "]" if isinstance(shape, (list, tuple)) else "?"
    if key != entry.key:  # a view of another entry's storage (tied weights): its bytes are counted there
        return _EntryRow(key, kind, dtype, text, "-", f"shares storage with {entry.key}")
    return _EntryRow(key, kind, dtype, text, str(entry.nbytes))


def _sharded_row(key: str, node: Mapping[str, Any], manifest: Manifest) -> _EntryRow:
    """A DTensor: its global dtype and shape, its bytes, and how it is split (boxes, and the ranks that wrote them:
    the ``r<rank>-`` prefix of their files)."""
    boxes = node["boxes"]
    files = [manifest.files[manifest.entries[box["e"]].file].path.rsplit("/", 1)[-1] for box in boxes]
    writers = {name.split("-", 1)[0] if re.fullmatch(r"r\d{5}-.*", name) else name for name in files}
    nbytes = sum(manifest.entries[box["e"]].nbytes for box in boxes)
    dims = "[" + ", ".join(map(str, node["shape"])) + "]"
    dtype = str(DTYPE_NAMES[node["dtype"]]).removeprefix("torch.")
    split = (
        f"{len(boxes)} box{'es' if len(boxes) != 1 else ''} over {len(writers)} rank{'s' if len(writers) != 1 else ''}"
    )
    return _EntryRow(key, "sharded", dtype, dims, str(nbytes), split)


def _scalar_text(node: Mapping[str, Any]) -> str:
    kind, value = node.get("k"), node.get("v")
    if kind == "none":
        return "None"
    if kind == "float":
        return repr(float(value)) if isinstance(value, (int, float)) else str(value)
    if kind == "bytes" and isinstance(value, str):
        data = base64.b64decode(value)
        return truncate(repr(data)) + (f" ({len(data)} bytes)" if len(data) > 16 else "")
    return truncate(repr(value) if kind == "str" else str(value))


def _entries_table(rows: list[_EntryRow]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("key", overflow="fold")
    table.add_column("kind")
    table.add_column("dtype")
    table.add_column("shape")
    table.add_column("bytes", justify="right")
    table.add_column("value", overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in (row.key, row.kind, row.dtype, row.shape, row.nbytes, row.value)))
    return table


# -- verify ----------------------------------------------------------------------------------------------------
def _cmd_verify(args: argparse.Namespace, console: Console) -> int:
    storage, location = _open_existing(args.path, args)
    single = location.is_committed_checkpoint
    total = 1 if single else len(committed_steps(storage, location))
    errors = _console(sys.stderr)
    if errors.is_terminal and total >= _BAR_MIN_CHECKPOINTS:
        report = _verify_with_bar(storage, location, total, errors)
        for status in report.checkpoints:
            _print_status(console, storage, status)
    else:
        report = verify_storage(storage, lambda status: _print_status(console, storage, status), location=location)
    for note in report.notes:
        console.print(Text(f"note: {_relative(storage, note)}", style="yellow"))
    if not report.checkpoints:
        console.print(f"no committed checkpoint in {storage.describe('')}: nothing to verify")
        return EXIT_OK
    if report.ok:
        console.print(Text(f"all {len(report.checkpoints)} committed checkpoint(s) are valid", style="green"))
        return EXIT_OK
    console.print(Text(f"{len(report.bad)} of {len(report.checkpoints)} committed checkpoint(s) are INVALID",
                       style="bold red"))  # fmt: skip
    for status in report.bad:
        console.print(Text(f"to remove step {_status_step(storage, status)}: {_rm_hint(storage, single, status)}"),
                      soft_wrap=True)  # fmt: skip
    return EXIT_INVALID


def _rm_hint(storage: Storage, single: bool, status: CheckpointStatus) -> str:
    """The command that removes a checkpoint verify found bad (it asks before removing anything)."""
    where = shlex.quote(storage.describe(""))
    return f"safepoint rm {where}" if single else f"safepoint rm {where} --step {status.step}"


def _verify_with_bar(storage: Storage, location: Location, total: int, errors: Console) -> VerifyReport:
    bad = 0
    with _progress("verifying", errors, total) as step_done:

        def advance(status: CheckpointStatus) -> None:
            nonlocal bad
            bad += not status.ok
            step_done(f"step {status.step}" + (f", {bad} bad" if bad else ""))

        return verify_storage(storage, advance, location=location)


def _manifest_step(storage: Storage) -> str:
    """A failed single checkpoint is reported without a step; its manifest may still say which one it is."""
    try:
        return str(read_manifest(storage, "").step)
    except SafepointError:
        return "?"


def _status_step(storage: Storage, status: CheckpointStatus) -> str:
    return str(status.step) if status.step >= 0 else _manifest_step(storage)


def _print_status(console: Console, storage: Storage, status: CheckpointStatus) -> None:
    step = _status_step(storage, status)
    if status.ok:
        line = Text.assemble(("valid  ", "green"), f"step {step}  {_human_size(status.nbytes)}")
        if status.metrics:
            line.append(f"  {_format_metrics(status.metrics)}")
        console.print(line)
        return
    console.print(Text.assemble(("INVALID", "bold red"), f" step {step}: {_relative(storage, status.error or '')}"))
    if status.bad_file:
        console.print(Text(f"         bad file: {status.bad_file}"))


# -- gc --------------------------------------------------------------------------------------------------------
def _cmd_gc(args: argparse.Namespace, console: Console) -> int:
    storage, location = _open_existing(args.directory, args)
    # The collector removes any attempt-shaped name it finds unlocked; in a directory that is not ours such a
    # name is someone else's data, so it is not offered the chance.
    if not location.is_ours:
        raise UsageError(
            f"{storage.describe('')} does not look like a safepoint directory (no step directories, manifest or "
            "attempt locks); refusing to collect anything in it"
        )
    report = collect(storage)
    for path in report.removed:
        what = "dead save attempt" if parse_attempt(path.rsplit("/", 1)[-1]) else "empty uncommitted step directory"
        console.print(Text.assemble(("removed  ", "green"), f"{path}  ({what})"))
    for path in report.in_progress:
        console.print(Text.assemble(("left     ", "yellow"), f"{path}  (its writer is alive: a save in progress)"))
    if not report.removed and not report.in_progress:
        console.print(f"nothing to collect in {storage.describe('')}")
    else:
        console.print(f"{len(report.removed)} removed, {len(report.in_progress)} left because a writer is alive")
    return EXIT_OK


# -- rm --------------------------------------------------------------------------------------------------------
def _cmd_rm(args: argparse.Namespace, console: Console) -> int:
    storage, location = _open_existing(args.directory, args)
    checkpoint, step = _rm_target(storage, location, args.step)
    where = storage.describe(checkpoint)
    what = f"step {step} ({where})" if checkpoint else f"the checkpoint at {where}"
    condition = _rm_condition(storage, location, checkpoint, step, force=args.force)
    if not args.yes and not _confirm(f"remove {what}, {condition}?"):
        console.print("nothing removed")
        return EXIT_OK
    report = remove_checkpoint(storage, checkpoint)
    console.print(Text.assemble(("unpublished  ", "green"), join(checkpoint, MANIFEST_NAME) or MANIFEST_NAME))
    for path in report.removed:
        console.print(Text.assemble(("removed      ", "green"), path))
    for path in report.in_progress:
        console.print(Text.assemble(("left         ", "yellow"), f"{path}  (its writer is alive: a save in progress)"))
    if not checkpoint and storage.remove_empty_dir(""):
        console.print(Text.assemble(("removed      ", "green"), storage.describe("")))
    elif checkpoint and not report.in_progress and storage.exists(checkpoint):
        # rm only ever deletes safepoint's own names (layout.py): anything else in the directory is someone's
        console.print(Text.assemble(("left         ", "yellow"), f"{checkpoint}  (it holds files safepoint did not "
                                    "write)"))  # fmt: skip
    console.print(f"removed {what}")
    return EXIT_OK


def _rm_target(storage: Storage, location: Location, step: int | None) -> tuple[str, int | None]:
    """(checkpoint directory, step) to remove. The manifest is only looked at, never trusted: it may be the
    damaged part."""
    root = storage.describe("")
    if location.is_committed_checkpoint:
        if step is not None:
            try:
                saved: int | None = read_manifest(storage, "").step
            except SafepointError:
                saved = None  # damaged: its step cannot be checked, and the path says which checkpoint is meant
            if saved is not None and saved != step:
                raise UsageError(f"{root} is a single checkpoint of step {saved}, not of step {step}")
        return "", step
    committed = committed_steps(storage, location)
    shown = ", ".join(map(str, committed[-10:])) or "none"
    if step is None:
        raise UsageError(f"{root} is not a checkpoint directory: name the step to remove with --step N "
                         f"(committed: {shown})")  # fmt: skip
    path = step_dir(step)
    if not is_committed(storage, path):
        if storage.exists(path):
            raise UsageError(f"step {step} in {root} is not committed: there is nothing to unpublish; "
                             "`safepoint gc` removes what an unfinished save left")  # fmt: skip
        raise UsageError(f"step {step} is not committed in {root} (committed: {shown})")
    return path, step


def _rm_condition(storage: Storage, location: Location, checkpoint: str, step: int | None, *, force: bool) -> str:
    """What the checkpoint is, for the confirmation; UsageError if it is the newest valid one and not forced."""
    cheap = _cheap_status(storage, checkpoint, step).status
    if force:
        return cheap
    later = [found for found in location.steps if checkpoint and step is not None and found.step > step]
    newer = [found.step for found in later if is_committed(storage, found.path)]
    for candidate in reversed(newer):
        with _busy(f"verifying step {candidate}, to be sure a valid checkpoint remains"):
            if _damage(storage, step_dir(candidate), candidate) is None:
                return f"{cheap}; step {candidate} is newer and valid"
    with _busy(f"verifying {storage.describe(checkpoint)}"):
        damage = _damage(storage, checkpoint, step)
    if damage is None:
        what = f"step {step}" if checkpoint else storage.describe(checkpoint)
        raise UsageError(
            f"{what} is the newest valid checkpoint in {storage.describe('')} (every byte verified): removing it "
            "would make a resume start from an older step, or from scratch; pass --force to remove it anyway"
        )
    return f"damaged: {_relative(storage, damage)}"


def _damage(storage: Storage, checkpoint: str, step: int | None) -> str | None:
    """Why the checkpoint does not verify, or None when it does. A newer format counts as valid: a newer
    safepoint reads it, so it is nobody's to remove as damaged."""
    try:
        verify_checkpoint(storage, checkpoint, step=step)
    except FormatVersionError:
        return None
    except (CorruptCheckpointError, CheckpointNotFoundError) as err:
        return str(err)
    return None


def _confirm(question: str) -> bool:
    """Ask on the terminal; without one, refuse: a removal nobody confirmed is a usage error."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        raise UsageError(f"not removing without confirmation: {question.rstrip('?')}; pass --yes to remove it "
                         "(stdin is not a terminal to ask on)")  # fmt: skip
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return stdin.readline().strip().lower() in ("y", "yes")


# -- diff ------------------------------------------------------------------------------------------------------
def _cmd_diff(args: argparse.Namespace, console: Console) -> int:
    sides: list[tuple[str, LoadedCheckpoint]] = []
    for label, location, step in (("A", args.a, args.step_a), ("B", args.b, args.step_b)):
        storage, _ = _open_existing(location, args)
        try:
            checkpoint = locate_checkpoint(storage, step)
            where = storage.describe(checkpoint)
            with _busy(f"reading and verifying {label}: {where}"):
                # mapped, not copied: two large checkpoints compared side by side need page cache, not RAM
                loaded = read_checkpoint(storage, checkpoint, mmap=isinstance(storage, LocalStorage))
        except SafepointError as err:  # like diff(1) on a file it cannot read: trouble, exit 2
            raise UsageError(f"{label}: {err}") from err
        sides.append((where, loaded))
    (where_a, a), (where_b, b) = sides
    with _busy("comparing"):
        result = diff_checkpoints(a, b)
    for mark, where, loaded in (("---", where_a, a), ("+++", where_b, b)):
        manifest = loaded.manifest
        console.print(f"{mark} {where} (step {manifest.step}, {_local_time(manifest.created)})", soft_wrap=True)
    for difference in result.entries:
        console.print(_difference_line(difference), soft_wrap=True)
    if result.state_version is not None:
        console.print(_difference_line(result.state_version), soft_wrap=True)
    if result.metrics:
        console.print(Text("metrics", style="bold"))
        for difference in result.metrics:
            console.print(_difference_line(difference), soft_wrap=True)
    if result.identical:
        console.print(Text(f"identical: {result.compared} value(s) compared bitwise, and every metric",
                           style="green"))  # fmt: skip
        return EXIT_OK
    counts = Counter(d.kind for d in result.entries)
    summary = ", ".join(f"{counts[kind]} {kind}" for kind in ("changed", "added", "removed") if counts[kind])
    parts = [f"entries: {summary}" if summary else "", f"metrics: {len(result.metrics)} differ" if result.metrics
             else "", "state_version differs" if result.state_version else ""]  # fmt: skip
    console.print(Text("different: " + "; ".join(part for part in parts if part), style="bold yellow"))
    return EXIT_INVALID


def _difference_line(difference: Difference) -> Text:
    """``+ key: new``, ``- key: old`` or ``~ key: old -> new``, as diff and migrate --dry-run print them."""
    if difference.kind == "changed" and difference.before == difference.after:
        # same kind, dtype and shape: the detail says how the contents differ
        return _marked_line("changed", difference.key, f"{difference.before}: {difference.detail}")
    if difference.kind == "added":
        return _marked_line(difference.kind, difference.key, difference.after)
    if difference.kind == "removed":
        return _marked_line(difference.kind, difference.key, difference.before)
    return _marked_line(difference.kind, difference.key, f"{difference.before} -> {difference.after}")


# -- demo ------------------------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from ._demo import DemoRefused, run_demo  # the demo's machinery is only needed here

    try:
        return run_demo(args.directory, args.steps, console)
    except DemoRefused as err:
        raise UsageError(str(err)) from err


# -- migrate, import, export -----------------------------------------------------------------------------------
def _cmd_migrate(args: argparse.Namespace, console: Console) -> int:
    if not args.dry_run and not args.output:
        raise UsageError("--output DIR is required without --dry-run: migrate writes a new checkpoint, never in place")
    migrations = _load_migrations(args.migrations) if args.migrations else Migrations()
    migrations.check()  # a gap is the code's fault: said before any checkpoint is read
    storage, _ = _open_existing(args.checkpoint, args)
    location = locate_checkpoint(storage, args.step)
    where = storage.describe(location)
    with _busy(f"reading and verifying {where}"):
        loaded = read_checkpoint(storage, location)
    manifest = loaded.manifest
    console.print(Text.assemble(("checkpoint      ", "bold"), f"{where} (step {manifest.step})"), soft_wrap=True)
    console.print(Text.assemble(("state_version   ", "bold"), f"{manifest.state_version} -> {args.to_version}"))
    if manifest.state_version == args.to_version:
        console.print(f"already at state_version {args.to_version}: nothing to migrate, nothing written")
        return EXIT_OK
    if args.migrations is None and manifest.state_version < args.to_version:
        raise UsageError(f"--migrations MODULE:ATTR is needed to upgrade from state_version "
                         f"{manifest.state_version} to {args.to_version}")  # fmt: skip
    before = plain_values(loaded)
    after, applied = migrations.run(copy_containers(before), manifest.state_version, args.to_version, where)
    console.print(Text.assemble(("migrations      ", "bold"), ", ".join(applied)), soft_wrap=True)
    changes, _ = diff_trees(before, after)
    console.print(Text(f"changes ({len(changes)})", style="bold"))
    for change in changes:
        console.print(_difference_line(change), soft_wrap=True)
    if args.dry_run:
        console.print("dry run: nothing written")
        return EXIT_OK
    with _busy(f"writing {args.output}"):
        info = write_new_checkpoint(args.output, after, step=manifest.step, state_version=args.to_version,
                                    source=where, metrics=manifest.metrics)  # fmt: skip
    console.print(Text.assemble(("wrote ", "green"), f"{info.path} (step {info.step}, state_version "
                                f"{args.to_version}, {_human_size(info.nbytes)}); {where} is unchanged"))  # fmt: skip
    return EXIT_OK


def _busy(what: str) -> contextlib.AbstractContextManager[object]:
    """A spinner on stderr while one long step runs (reading, converting, writing GBs), only on a terminal."""
    errors = _console(sys.stderr)
    return errors.status(what) if errors.is_terminal else contextlib.nullcontext()


_MARKS = {"added": ("  + ", "green"), "removed": ("  - ", "red"), "changed": ("  ~ ", "yellow")}


def _marked_line(kind: str, key: str, text: str) -> Text:
    mark, style = _MARKS[kind]
    return Text.assemble((mark, style), (key, style), f": {text}")


def _load_migrations(spec: str) -> Migrations:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"--migrations takes MODULE:ATTR (e.g. mytrain.migrations:migrations), not {spec!r}")
    try:
        if module_name.endswith(".py"):
            found = importlib.util.spec_from_file_location("safepoint_user_migrations", module_name)
            if found is None or found.loader is None:
                raise UsageError(f"--migrations: cannot load {module_name}")
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` does: modules next to the user are found
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as err:  # the user's module failed to import: say which, and why
        raise UsageError(f"--migrations: importing {module_name!r} failed: {err!r}") from err
    value = getattr(module, attr, None)
    if not isinstance(value, Migrations):
        raise UsageError(f"--migrations: {spec} is {type(value).__name__}, not a safepoint.Migrations")
    return value


def _cmd_import(args: argparse.Namespace, console: Console) -> int:
    with _busy(f"importing {args.source}"):
        report = import_checkpoint(args.source, args.dest, step=args.step, state_version=args.state_version)
    info = report.checkpoint
    console.print(Text.assemble(("imported ", "green"), f"{report.kind} {report.source} -> {info.path}"),
                  soft_wrap=True)  # fmt: skip
    console.print(f"step {info.step}, {_human_size(info.nbytes)}, entries: {', '.join(report.entries) or '-'}")
    for skipped in report.skipped:
        console.print(Text(f"note: skipped {skipped}", style="yellow"))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace, console: Console) -> int:
    with _busy(f"exporting {args.checkpoint}"):
        path = export_checkpoint(args.checkpoint, args.dest, format=args.file_format, step=args.step, key=args.key)
    console.print(Text.assemble(("exported ", "green"), f"{path} ({args.file_format}, "
                                f"{_human_size(os.path.getsize(path))})"), soft_wrap=True)  # fmt: skip
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
