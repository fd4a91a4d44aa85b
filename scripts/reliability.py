#!/usr/bin/env python3
"""Run safepoint's reliability suite and print its figures.

    python scripts/reliability.py --quick          # a minute or so; the same scale CI runs through pytest
    python scripts/reliability.py --full           # >= 1000 kill -9 trials, every fault point x every crash mode
    python scripts/reliability.py --full --markdown docs/reliability-table.md

Each row is one kind of trial: how many ran, how many failed, and what was checked. The two "harness self-test"
rows run deliberately broken writers; they pass when the harness catches them. Exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tests.reliability.suites import SUITES, Result, run_all  # noqa: E402


def _markdown(results: list[Result], command: str, seconds: float) -> str:
    from importlib.metadata import version

    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {version('torch')}, safepoint {version('safepoint')}; {seconds / 60:.1f} minutes.",
        "",
        "| trial | trials | failures | what was checked |",
        "|---|---:|---:|---|",
    ]
    for result in results:
        figure = f"skipped: {result.skipped}" if result.skipped else result.figure
        lines.append(f"| {result.name} | {result.trials} | {result.failures} | {figure} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_const", dest="scale", const="quick", help="the CI scale (default)")
    scale.add_argument("--full", action="store_const", dest="scale", const="full", help="the published scale")
    parser.add_argument("--only", action="append", choices=[s.__name__ for s in SUITES], help="run only this suite")
    parser.add_argument("--work", type=Path, help="where trials write (default: the system temp directory)")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    scale_name = args.scale or "quick"
    logging.getLogger("safepoint").setLevel(logging.ERROR)  # the trials provoke warnings on purpose
    console = Console()
    started = time.monotonic()
    with console.status(f"running the {scale_name} reliability suite..."):
        results = run_all(scale_name, work=args.work, only=args.only, progress=console.log)
    elapsed = time.monotonic() - started
    table = Table(title=f"safepoint reliability suite ({scale_name}, {elapsed / 60:.1f} min)")
    for column in ("trial", "trials", "failures", "what was checked"):
        table.add_column(column, justify="right" if column in ("trials", "failures") else "left")
    for result in results:
        figure = f"skipped: {result.skipped}" if result.skipped else result.figure
        style = "red" if result.failures else None
        table.add_row(result.name, str(result.trials), str(result.failures), figure, style=style)
    console.print(table)
    for result in results:
        for example in result.examples:
            console.print(f"[red]{result.name}[/red]: {example}")
    if args.markdown:
        command = "python scripts/reliability.py " + " ".join(sys.argv[1:])
        args.markdown.write_text(_markdown(results, command, elapsed))
    total = sum(r.trials for r in results)
    failed = sum(r.failures for r in results)
    console.print(f"{total} trials, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
