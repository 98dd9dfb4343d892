"""The command line: ``python -m pyckpt convert | inspect | verify | demo``.

Exit codes: 0 ok, 1 bad input or a failed check, 2 usage. Errors are one line on stderr
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import signal
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
    from . import convert, demo, inspect_command, verify

    convert.register(commands)
    inspect_command.register(commands)
    verify.register(commands)
    demo.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .convert import UsageError

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.run(args) or EXIT_OK)
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"pyckpt {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print(f"pyckpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback only on request
        if args.debug:
            traceback.print_exc()
        print(f"pyckpt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def _terminate(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C, so temporary files are removed on the way out.
    raise KeyboardInterrupt


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or text}"
    return " ".join(text.split())
