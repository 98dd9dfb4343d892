"""``pyckpt inspect``: what a checkpoint holds, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from .._units import human_bytes
from ._sources import SOURCES

HELP = (
    "show format, tensors, dtypes, wrapper prefixes, entries and unknown globals of a checkpoint "
    "(reads no tensor, runs nothing)"
)
EPILOG = """\
examples:
  pyckpt inspect ddp.pt            # summary and the first 40 tensors
  pyckpt inspect ddp.pt --all      # every tensor
  pyckpt inspect ddp.pt --json     # one JSON document (schema in the README)
  pyckpt inspect hf_dir            # a sharded directory: every shard, in the index's order
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect", help=HELP, description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", metavar="PATH", help="checkpoint to inspect: " + SOURCES)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--all", action="store_true", help="list every tensor (default: the first 40)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..inspection import DEFAULT_ROWS, inspect_checkpoint

    info = inspect_checkpoint(args.path, rows=None if args.all else DEFAULT_ROWS)
    if args.json:
        sys.stdout.write(to_json(info))
    else:
        sys.stdout.write(render(info))
    return 0


def to_json(info: dict[str, Any]) -> str:
    """The document indented, except the tensor table: one compact row per line.

    json's indenting encoder is pure Python; with 50,000 rows it would take longer than
    reading the checkpoint, while the C encoder writes a row in microseconds.
    """
    table = info["table"]
    if not table:
        return json.dumps(info, indent=2) + "\n"
    placeholder = f"pyckpt-table-{uuid.uuid4().hex}"  # cannot occur anywhere else in the document
    head = json.dumps({**info, "table": placeholder}, indent=2)
    rows = ",\n".join("    " + json.dumps(row) for row in table)
    return head.replace(json.dumps(placeholder), "[\n" + rows + "\n  ]", 1) + "\n"


def render(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']}",
        f"  format      {info['format']}" + (f" (top folder '{info['top_folder']}')" if info["top_folder"] else "")
        + (f", {len(info['files'])} files" if info["files"] else ""),
        f"  byte order  {info['byteorder']}",
        f"  tensors     {info['tensors']} over {info['storages']} storages, {human_bytes(info['storage_bytes'])}",
    ]
    if info["metadata"]:
        lines.append("  metadata    " + ", ".join(f"{name}={value!r}" for name, value in info["metadata"].items()))
    if info["compressed_storages"]:
        lines.append(
            f"  warning     {info['compressed_storages']} compressed storages: they are inflated and read, never "
            "mapped (torch.load(mmap=True) would return garbage for them)"
        )
    if info["unaligned_storages"]:
        lines.append(
            f"  note        {info['unaligned_storages']} storages are not aligned for a mapping: they are read, "
            "not mapped"
        )
    lines.append("  dtypes      " + ", ".join(
        f"{name}: {d['tensors']} ({human_bytes(d['bytes'])})" for name, d in info["dtypes"].items()
    ))
    for sd in info["state_dicts"]:
        where = f"'{sd['entry']}'" if sd["entry"] else "the root"
        if sd.get("module_class"):
            where += f" (a pickled {sd['module_class']})"
        prefixes = ", ".join(f"{p} x{n}" for p, n in sd["wrapper_prefixes"].items()) or "none"
        lines.append(f"  state dict  {where}: {sd['keys']} keys; wrapper prefixes: {prefixes}")
        auto = sd["auto_strip"]
        if auto["renamed"]:
            example = auto["examples"][0]
            lines.append(f"              --strip-prefix auto renames {auto['renamed']} keys, e.g. {example[0]} -> {example[1]}")
        if auto["collisions"]:
            lines.append(f"              auto stripping would collide on: {', '.join(auto['collisions'][:5])}")
    for unknown in info["unknown_globals"]:
        places = ", ".join(p or "(root)" for p in unknown["where"]) or "not in the loaded object"
        status = "refused always (blocked module)" if unknown["blocked"] else "opaque"
        lines.append(f"  global      {unknown['name']} [{status}] at {places}")
    if info["unknown_globals"] and not all(u["blocked"] for u in info["unknown_globals"]):
        lines.append(
            "              beyond torch's weights_only allowlist: pyckpt.load(..., unknown_globals='opaque') "
            "keeps them as inert records; load_state_dict and convert read them that way"
        )
    if info["entries"]:
        lines.append("  entries     " + ", ".join(
            f"{e['key']}={e['value']}" if "value" in e else f"{e['key']} ({e['type']})" for e in info["entries"]
        ))
    if info["table"]:
        width = min(max(len(row["key"]) for row in info["table"]), 70)
        lines.append("")
        lines.append(f"  {'key':<{width}}  {'dtype':<14} {'shape':<22} {'bytes':>12}")
        for row in info["table"]:
            key = row["key"] if len(row["key"]) <= width else "..." + row["key"][-(width - 3):]
            shape = "x".join(map(str, row["shape"])) or "scalar"
            lines.append(f"  {key:<{width}}  {row['dtype']:<14} {shape:<22} {row['bytes']:>12}")
        if info["table_omitted"]:
            lines.append(f"  ... {info['table_omitted']} more tensors (--all shows every one)")
    return "\n".join(lines) + "\n"
