"""``pyckpt inspect``: what a checkpoint holds, from its index alone (no tensor is read).

The result is one JSON-able dict; its schema is documented in the README.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ._collector import without_collector
from ._backend import current_backend
from .errors import CheckpointError
from .index import index_any, index_checkpoint
from .index.opaque import Opaque
from .index.policy import BLOCKED_MODULES, UNKNOWN_OPAQUE, GlobalsPolicy, policy_for
from .index.records import METHOD_STORED, TensorRecord, describe_value
from .index.source import FileArg
from .pickled_module import detach_record, is_pickled_module, module_state_dict
from .plan import iter_records
from .rename import INNER_WRAPPERS, LEADING_WRAPPERS, is_state_dict, strip_auto

SCHEMA_VERSION = 1
DEFAULT_ROWS = 40
MAX_PLACES = 10  # paths listed per unknown global


@without_collector
def inspect_checkpoint(path: str | os.PathLike[str], *, rows: int | None = DEFAULT_ROWS) -> dict[str, Any]:
    """What the checkpoint holds, from its index; never refuses a well-formed file.

    It is read in opaque mode with blocked modules listed too: a global that loading would
    refuse is reported (``unknown_globals``), never imported.
    """
    backend = current_backend()
    # The files of a sharded or DCP checkpoint are described as one checkpoint.
    with index_any(path, backend, policy=_inspection_policy()) as index:
        try:
            return _describe(index, rows, backend.name)
        except CheckpointError as exc:
            raise exc.located(path=index.display)


@without_collector
def unknown_globals(f: FileArg) -> list[str]:
    """``"module.name"`` of every global in the checkpoint beyond torch's weights_only allowlist.

    Sorted; what ``torch.serialization.get_unsafe_globals_in_checkpoint`` returns (globals
    registered with ``add_safe_globals`` excluded), found without running anything, for
    legacy files too. These are what ``pyckpt.load`` refuses by default and keeps as
    :class:`pyckpt.Opaque` records with ``unknown_globals="opaque"``.
    """
    with index_checkpoint(f, current_backend(), policy=_inspection_policy()) as index:
        return sorted(index.unknown_globals)


def _inspection_policy() -> GlobalsPolicy:
    return policy_for(UNKNOWN_OPAQUE, list_blocked=True)


def _describe(index: Any, rows: int | None, backend_name: str) -> dict[str, Any]:
    records = list(iter_records(index.root))
    tensors = [(path, record) for path, record in records if type(record) is TensorRecord]
    dtypes: dict[str, dict[str, int]] = {}
    table = []
    for path, tensor in tensors:  # one pass, each fact computed once: 50,000 rows, maybe
        name, nbytes = tensor.dtype.name, tensor.nbytes
        entry = dtypes.get(name)
        if entry is None:
            entry = dtypes[name] = {"tensors": 0, "bytes": 0}
        entry["tensors"] += 1
        entry["bytes"] += nbytes
        table.append({"key": path, "dtype": name, "shape": list(tensor.size), "bytes": nbytes,
                      "storage": tensor.storage.key})
    storages = index.storages.values()
    shown = table if rows is None else table[:rows]
    root_is_state_dict = is_state_dict(index.root)  # a scan of every entry: done once
    return {
        "schema": SCHEMA_VERSION,
        "path": index.display,
        "backend": backend_name,
        "format": index.format,
        "top_folder": index.top_folder,
        "byteorder": index.byteorder,
        "file_bytes": index.file_bytes,
        "files": [part.display for part in getattr(index, "parts", [])],
        "tensors": len(tensors),
        "storages": len(index.storages),
        "storage_bytes": sum(s.nbytes for s in storages),
        "tensor_bytes": sum(row["bytes"] for row in table),
        "compressed_storages": sum(1 for s in storages if s.method != METHOD_STORED),
        "unaligned_storages": sum(1 for s in storages if s.method == METHOD_STORED and not index.can_view(s)),
        "metadata": index.metadata,
        "dtypes": dict(sorted(dtypes.items(), key=lambda item: -item[1]["bytes"])),
        "state_dicts": _state_dicts(index.root, root_is_state_dict),
        "unknown_globals": _unknown_globals(index, records),
        "entries": [] if root_is_state_dict else _entries(index.root),
        "table": shown,
        "table_omitted": len(table) - len(shown),
    }


def _unknown_globals(index: Any, records: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Each global beyond the allowlist, whether loading refuses it always, and where it sits."""
    where: dict[str, list[str]] = {}
    for path, record in records:
        if isinstance(record, Opaque) and record.qualified_name in index.unknown_globals:
            places = where.setdefault(record.qualified_name, [])
            if len(places) < MAX_PLACES:
                places.append(path)
    return [
        {
            "name": name,
            "blocked": name.split(".", 1)[0] in BLOCKED_MODULES,
            "where": where.get(name, []),
        }
        for name in sorted(index.unknown_globals)
    ]


def _holds_state_dict(value: Any) -> bool:
    return is_state_dict(value) or is_pickled_module(value)


def _state_dicts(root: Any, root_is_state_dict: bool) -> list[dict[str, Any]]:
    found = []
    candidates = [("", root)] if root_is_state_dict or is_pickled_module(root) else []
    if isinstance(root, dict) and not candidates:
        candidates = [(str(k), v) for k, v in root.items() if _holds_state_dict(v)]
    for where, holder in candidates:
        module_class = holder.qualified_name if isinstance(holder, Opaque) else None
        mapping = module_state_dict(holder, detach_record) if module_class else holder
        prefixes: Counter[str] = Counter()
        inner_markers = [f"{inner}." for inner in INNER_WRAPPERS]
        stripped = {key: strip_auto(key) for key in mapping}  # once per key: 50,000 of them, maybe
        for key, new in stripped.items():
            if new == key:
                continue
            for prefix in LEADING_WRAPPERS:
                if key.startswith(prefix):
                    prefixes[prefix] += 1
            for marker in inner_markers:
                if marker in key:
                    prefixes[marker] += 1
        renamed = [(k, new) for k, new in stripped.items() if new != k]
        targets = Counter(stripped.values())
        found.append(
            {
                "entry": where,
                "module_class": module_class,
                "keys": len(mapping),
                "wrapper_prefixes": dict(prefixes),
                "auto_strip": {
                    "renamed": len(renamed),
                    "examples": [list(pair) for pair in renamed[:5]],
                    "collisions": sorted(k for k, n in targets.items() if n > 1),
                },
            }
        )
    return found


def _entries(root: Any) -> list[dict[str, Any]]:
    """Top-level entries that are not state dicts (epoch, optimizer, hyperparameters...) of a
    root that is not a state dict itself."""
    if not isinstance(root, dict):
        return []
    out = []
    for key, value in root.items():
        if _holds_state_dict(value):
            continue
        item: dict[str, Any] = {"key": key if isinstance(key, str) else repr(key), "type": describe_value(value)}
        if type(value) in (int, float, bool, str) or value is None or isinstance(value, Opaque):
            text = repr(value)
            item["value"] = text if len(text) <= 80 else text[:77] + "..."
        out.append(item)
    return out
