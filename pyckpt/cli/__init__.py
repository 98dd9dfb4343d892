"""The command line: ``python -m pyckpt convert | inspect | verify | demo``.

Exit codes: 0 ok, 1 bad input or a failed check, 2 usage. Errors are one line on stderr
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2

DESCRIPTION = "Load, rename and convert PyTorch checkpoints without running pickle."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyckpt", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    from . import demo

    demo.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("pyckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback only on request
        from ..errors import CheckpointError

        if args.debug:
            traceback.print_exc()
        print(f"pyckpt {args.command}: error: {exc}", file=sys.stderr)
        if isinstance(exc, (CheckpointError, OSError)):
            return EXIT_BAD_INPUT
        return EXIT_BAD_INPUT
