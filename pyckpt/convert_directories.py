"""Conversions whose input or output is a directory: Hugging Face shards and
``torch.distributed.checkpoint`` directories, in and out (any input is opened with
:func:`pyckpt.index.index_any`). The single-file path, with its storage span copied
whole, is :mod:`pyckpt.converting`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .convert_common import (
    FORMAT_DCP,
    FORMAT_PT,
    FORMAT_SAFETENSORS,
    ByteProgress,
    ConvertReport,
    check_all_views,
    kept_metadata,
)
from .casting import cast_tree
from .errors import CheckpointError
from .index import index_any
from .index.policy import UNKNOWN_OPAQUE, policy_for
from .index.symbols import DType
from .rename import RenameReport, locate_state_dict, rename_state_dict, rename_tree
from .sinks.atomic import AtomicFile
from .sinks.dcp_writer import write_dcp
from .sinks.pt_writer import write_pt
from .sinks.safetensors_writer import write_safetensors
from .sinks.sharded_writer import write_sharded

def convert_to_shards(
    source: str,
    destination: str,
    chosen: str,
    limit: int,
    backend: Any,
    key_map: Any,
    report: RenameReport,
    started: float,
    *,
    key: str | None,
    overwrite: bool,
    drop_extra: bool,
    progress: Callable[[int, int], None] | None,
    target: DType | None,
) -> ConvertReport:
    """``convert`` into a sharded checkpoint directory (the state dict only, as always for
    Hugging Face shards)."""
    with index_any(source, backend, policy=policy_for(UNKNOWN_OPAQUE)) as index:
        try:
            found_under, original = locate_state_dict(index.root, key)
            metadata, dropped = kept_metadata(index, chosen, index.root, found_under, drop_extra)
            state_dict = original if key_map is None else rename_state_dict(original, key_map, report)
            if chosen == FORMAT_PT:
                check_all_views(state_dict)
            state_dict = cast_tree(state_dict, target)
            advance = ByteProgress.of_index(index, progress, target)

            written = write_sharded(
                index, state_dict, metadata, destination, safetensors=chosen == FORMAT_SAFETENSORS, limit=limit,
                overwrite=overwrite, backend=backend, progress=advance,
            )
        except CheckpointError as exc:
            raise exc.located(path=index.display)
    return ConvertReport(
        source=source,
        destination=destination,
        format=f"{chosen}, sharded",
        tensors=len(state_dict),
        storages=written.storages,
        tensor_bytes=written.tensors_bytes,
        file_bytes=written.file_bytes,
        renamed_keys=report.renamed,
        seconds=time.perf_counter() - started,
        examples=report.examples,
        dropped=dropped,
    )


def convert_to_dcp(
    source: str,
    destination: str,
    backend: Any,
    key_map: Any,
    report: RenameReport,
    started: float,
    *,
    key: str | None,
    overwrite: bool,
    extract_state_dict: bool,
    progress: Callable[[int, int], None] | None,
    target: DType | None,
) -> ConvertReport:
    """``convert`` into a ``torch.distributed.checkpoint`` directory."""
    with index_any(source, backend, policy=policy_for(UNKNOWN_OPAQUE)) as index:
        try:
            if extract_state_dict:
                _, original = locate_state_dict(index.root, key)
                root: Any = original if key_map is None else rename_state_dict(original, key_map, report)
            else:
                root = rename_tree(index.root, key_map, report)
            tensors = check_all_views(root)
            root = cast_tree(root, target)
            advance = ByteProgress.of_index(index, progress, target)

            written = write_dcp(index, root, destination, overwrite=overwrite, backend=backend, progress=advance)
        except CheckpointError as exc:
            raise exc.located(path=index.display)
    _, dropped = kept_metadata(index, FORMAT_DCP, index.root, None, drop_extra=False)
    return ConvertReport(
        source=source, destination=destination, format=FORMAT_DCP, tensors=tensors, storages=written.storages,
        tensor_bytes=written.tensors_bytes, file_bytes=written.file_bytes, renamed_keys=report.renamed,
        seconds=time.perf_counter() - started, examples=report.examples, dropped=dropped,
    )


def convert_directory_to_file(
    source: str,
    destination: str,
    chosen: str,
    backend: Any,
    key_map: Any,
    report: RenameReport,
    started: float,
    *,
    overwrite: bool,
    drop_extra: bool,
    progress: Callable[[int, int], None] | None,
    target: DType | None,
) -> ConvertReport:
    """A sharded or DCP checkpoint into one pt or safetensors file, each tensor copied from its file."""
    with index_any(source, backend, policy=policy_for(UNKNOWN_OPAQUE)) as index, AtomicFile(
        destination, overwrite=overwrite
    ) as output:
        try:
            if chosen == FORMAT_PT:  # the whole tree (a DCP save may hold a training state)
                state_dict = rename_tree(index.root, key_map, report)
                metadata, dropped = kept_metadata(index, chosen, index.root, None, drop_extra)
            else:
                found_under, found = locate_state_dict(index.root, None)
                metadata, dropped = kept_metadata(index, chosen, index.root, found_under, drop_extra)
                state_dict = found if key_map is None else rename_state_dict(found, key_map, report)
            tensors = check_all_views(state_dict)
            state_dict = cast_tree(state_dict, target)
            advance = ByteProgress.of_index(index, progress, target)

            if chosen == FORMAT_PT:
                written = write_pt(index, state_dict, output.fd, destination, backend, advance)
            else:
                written = write_safetensors(index, state_dict, metadata, output.fd, backend, advance)
        except CheckpointError as exc:
            raise exc.located(path=index.display)
    return ConvertReport(
        source=source, destination=destination, format=chosen, tensors=tensors, storages=written.storages,
        tensor_bytes=written.tensors_bytes, file_bytes=written.file_bytes, renamed_keys=report.renamed,
        seconds=time.perf_counter() - started, examples=report.examples, dropped=dropped,
    )
