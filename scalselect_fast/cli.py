"""The ``scalselect`` command line. Thin: parse arguments, call the API, print.

Each command group lives in its own ``add_*`` function so it can grow without touching the others.
"""
from __future__ import annotations

import argparse
import sys


def add_core_commands(sub: argparse._SubParsersAction) -> None:
    """fit | score | select over a store or .npy (core engine)."""


def add_extract_command(sub: argparse._SubParsersAction) -> None:
    """extract: representations from a VLM into a store."""


def add_baseline_command(sub: argparse._SubParsersAction) -> None:
    """baseline --method NAME, and bench."""


def add_run_command(sub: argparse._SubParsersAction) -> None:
    """run: the end-to-end job (extract -> fit -> score -> select -> write dataset and report)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="scalselect",
        description="Training-free, linear-time selection of visual instruction-tuning data (ScalSelect).")
    parser.add_argument("--version", action="version", version=f"scalselect-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_core_commands(sub)
    add_extract_command(sub)
    add_baseline_command(sub)
    add_run_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
