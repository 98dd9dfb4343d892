"""``pyckpt verify``: check structure, views and every record's CRC-32."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._units import human_bytes
from ._sources import SOURCES

HELP = "parse a checkpoint and check every view and every record's CRC-32 (torch never does)"
EPILOG = """\
examples:
  pyckpt verify ckpt.pt      # exit 0 when clean, 1 with a list of problems

Legacy, safetensors and DCP files record no checksums: verify checks their structure, sizes
and views (and reads every DCP chunk into its tensor), and says so in a note.
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "verify", help=HELP, description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", metavar="PATH", help="checkpoint to verify: " + SOURCES)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..verification import verify_checkpoint

    report = verify_checkpoint(args.path)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.ok:
        print(
            f"{report.path}: ok ({report.format}, {report.tensors} tensors, {report.records} records, "
            f"{human_bytes(report.bytes_checked)} CRC-checked)"
        )
        return 0
    print(f"{report.path}: {len(report.problems)} problem(s)", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    return 1
