"""`monoray` command line: one subcommand per stage, each defined next to its code.

Every subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`.
User errors (`InputError`, missing files) print one line and exit with code 2; a
diverged run prints one line and exits with `DIVERGED_EXIT` (3), a run whose
worker failed otherwise one line and exit 1 (the run contract: `monoray.runs.outcome`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module that defines add_parser/run
COMMANDS = {
    "train": "monoray.train.cli",
    "inspect": "monoray.train.inspect_cli",
    "sweep": "monoray.sweep.cli",
    "pareto": "monoray.sweep.pareto_cli",
    "audit": "monoray.sweep.audit_cli",
    "ui": "monoray.sweep.ui_cli",
    "dashboard": "monoray.sweep.dashboard_cli",
    "export": "monoray.sweep.export_cli",
    "extract": "monoray.extract.cli",
    "finetune": "monoray.finetune.cli",
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (its default prints usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="monoray", description=__doc__.splitlines()[0])
    from monoray import __version__

    parser.add_argument("--version", action="version", version=f"monoray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # Import only the module of the requested command: `monoray train` must not pay for Ray.
    wanted = [a for a in argv if a in COMMANDS][:1] or list(COMMANDS)
    for name in COMMANDS:
        if name in wanted:
            importlib.import_module(COMMANDS[name]).add_parser(sub)
        else:
            sub.add_parser(name, help=f"see `monoray {name} --help`")
    return parser


def main(argv: list[str] | None = None) -> int:
    from monoray.errors import InputError
    from monoray.runs.outcome import (
        DIVERGED_EXIT,
        FAILED_EXIT,
        DivergedError,
        RunFailedError,
        diverged_line,
    )
    from monoray.runs.verbosity import configure as configure_output

    # Before Ray is imported: under `uv run`, Ray would restart workers with `uv run` in a
    # copy of the working dir (no venv there). Workers must use this interpreter.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    configure_output(verbose=getattr(args, "verbose", False))  # only Ray commands have --verbose
    try:
        return int(args.run(args) or 0)
    except InputError as err:
        print(f"monoray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except DivergedError as err:
        print(diverged_line(args.command, err), file=sys.stderr)
        return DIVERGED_EXIT
    except RunFailedError as err:
        print(f"monoray {args.command}: failed: {err}", file=sys.stderr)
        return FAILED_EXIT
    except FileNotFoundError as err:
        print(
            f"monoray {args.command}: error: file not found: {err.filename or err}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(f"monoray {args.command}: interrupted", file=sys.stderr)
        return 130
