"""``pyckpt convert``: rename keys into a new checkpoint file, streaming and atomically."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._sources import SOURCES

HELP = "write a checkpoint with renamed keys (pt, safetensors, sharded or DCP), streaming, with flat memory"
EPILOG = """\
examples:
  pyckpt convert ddp.pt plain.pt                          # strip module./_orig_mod./FSDP wrappers
  pyckpt convert ddp.pt plain.pt --strip-prefix module.   # only this prefix
  pyckpt convert ckpt.pt out.pt --rename '^encoder\\.=backbone.'
  pyckpt convert train.pt model.safetensors --key model   # the state dict under 'model'
  pyckpt convert model_pickle.pt sd.pt --extract-state-dict  # torch.save(model) -> state dict
  pyckpt convert ckpt.pt ckpt.pt --force                  # in place: replaced only when complete
  pyckpt convert ddp.pt hf_dir --max-shard-size 5GB       # sharded safetensors + index.json
  pyckpt convert model.safetensors plain.pt               # safetensors in, pt out
  pyckpt convert hf_dir merged.pt                         # every shard of a sharded directory
  pyckpt convert dcp_dir model.safetensors                # a torch.distributed.checkpoint in
  pyckpt convert ddp.pt dcp_dir --format dcp              # DCP out: dcp.load reads it
  pyckpt convert fp32.pt model.safetensors --dtype bf16   # cast floating-point tensors

Storage bytes are copied as they are (no decode/re-encode; pt output rewrites only data.pkl);
with --dtype, floating-point storages are cast on the way, a chunk at a time.
Objects of classes beyond torch's weights_only allowlist (argparse.Namespace, configs,
pickled modules) are never imported or run: pt output writes them back exactly as read.
The output appears at DST only when complete; an existing DST needs --force.
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "convert", help=HELP, description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint to read, never modified: " + SOURCES)
    parser.add_argument("dst", metavar="DST", help="file to write (a directory with --max-shard-size or --format dcp)")
    parser.add_argument(
        "--strip-prefix",
        default="auto",
        metavar="auto|none|PREFIX",
        help="'auto' (default): leading module./_orig_mod. runs and every _fsdp_wrapped_module./"
        "_checkpoint_wrapped_module. segment; 'none': keep keys; or a prefix to remove",
    )
    parser.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="REGEX=REPL",
        help="re.sub rule applied to every key after --strip-prefix; repeatable, applied in order",
    )
    parser.add_argument(
        "--format",
        choices=["pt", "safetensors", "dcp"],
        help="output format (default: from DST's extension, else pt); dcp: a torch.distributed.checkpoint "
        "directory that dcp.load reads with no process group"
    )
    parser.add_argument(
        "--key", metavar="NAME", help="the entry holding the state dict or pickled module (default: found)"
    )
    parser.add_argument(
        "--extract-state-dict",
        action="store_true",
        help="write only the model's state dict, also from a pickled module (implied by safetensors)",
    )
    parser.add_argument(
        "--drop-extra",
        action="store_true",
        help="safetensors: drop entries that cannot be kept as metadata instead of refusing",
    )
    parser.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="write DST as a Hugging Face sharded directory (model-00001-of-0000N.safetensors and "
        "model.safetensors.index.json; with --format pt, pytorch_model-*.bin) of shards of at most SIZE "
        "(5GB, 500MB: decimal as Hugging Face counts; 2GiB: binary); the state dict only",
    )
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
        help="cast floating-point tensors (float64/32/16, bfloat16, float8) to this dtype, as torch's "
        ".to() rounds; integer, bool, complex and quantized tensors are written as they are",
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    parser.set_defaults(run=run)


def parse_rules(rules: list[str]) -> list[tuple[str, str]]:
    parsed = []
    for rule in rules:
        if "=" not in rule:
            raise UsageError(f"--rename takes REGEX=REPL, got {rule!r}")
        pattern, replacement = rule.split("=", 1)
        import re

        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--rename pattern {pattern!r} is not a valid regex: {exc}") from None
        parsed.append((pattern, replacement))
    return parsed


class UsageError(Exception):
    """A command-line mistake: exit code 2."""


def run(args: argparse.Namespace) -> int:
    import pyckpt

    from .progress import ProgressBar

    strip_prefix = None if args.strip_prefix == "none" else args.strip_prefix
    bar = ProgressBar("converting", enabled=None if not args.quiet else False)
    try:
        report = pyckpt.convert(
            args.src,
            args.dst,
            strip_prefix=strip_prefix,
            rename=parse_rules(args.rename),
            format=args.format,
            key=args.key,
            overwrite=args.force,
            drop_extra=args.drop_extra,
            extract_state_dict=args.extract_state_dict,
            progress=bar.update,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
        )
    finally:
        bar.close()
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
        if report.dropped:
            print(f"dropped entries: {', '.join(report.dropped)}", file=sys.stderr)
    return 0
