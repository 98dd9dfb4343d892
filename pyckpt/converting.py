"""``pyckpt.convert``: rename a checkpoint's keys into a new file, streaming, atomically.

Only ``data.pkl`` is rewritten for ``pt`` output; storage bytes pass through untouched
(``copy_file_range`` where the kernel can), so memory stays flat whatever the size and the
speed is that of copying the file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from ._backend import current_backend
from ._collector import without_collector
from .convert_common import (
    FORMAT_DCP,
    FORMAT_PT,
    FORMAT_SAFETENSORS,
    ByteProgress,
    ConvertReport,
    check_all_views,
    kept_metadata,
    output_format,
    storage_bytes,
)
from .casting import cast_tree
from .convert_directories import convert_directory_to_file, convert_to_dcp, convert_to_shards
from .errors import CheckpointError
from .float_cast import cast_target
from .index import index_opened
from .index.policy import UNKNOWN_OPAQUE, policy_for
from .index.dcp_format import is_dcp_directory
from .index.sharded import ShardedCheckpoint, checkpoint_files
from .index.source import FileSource, Source, open_source
from .index.zip_format import zip_entries_of
from .plan import check_view
from .rename import AUTO, RenameReport, RenameRules, locate_state_dict, make_key_map, rename_state_dict, rename_tree
from .sinks.atomic import AtomicFile
from .sinks.pt_writer import span_destination, write_pt, write_pt_around_span
from .sinks.safetensors_writer import write_safetensors
from .sinks.sharded_writer import parse_size
from .sinks.storage_span import SpanCopy, StorageSpan, find_storage_span

__all__ = ["FORMAT_DCP", "FORMAT_PT", "FORMAT_SAFETENSORS", "ConvertReport", "convert", "output_format"]


@without_collector
def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    strip_prefix: str | None = AUTO,
    rename: RenameRules | None = None,
    format: str | None = None,
    key: str | None = None,
    overwrite: bool = False,
    drop_extra: bool = False,
    extract_state_dict: bool = False,
    progress: Callable[[int, int], None] | None = None,
    max_shard_size: int | str | None = None,
    dtype: Any = None,
) -> ConvertReport:
    """Write ``src`` to ``dst`` with renamed keys; nothing stands at ``dst`` unless it succeeds.

    Args:
        strip_prefix: ``"auto"`` (default), None, or a prefix; as in ``pyckpt.load``.
        rename: ``(regex, replacement)`` pairs applied after ``strip_prefix``.
        format: ``"pt"`` or ``"safetensors"``; default from ``dst``'s extension (else pt).
        key: the entry holding the state dict or pickled module, for ``extract_state_dict``
            and safetensors (found automatically otherwise).
        overwrite: replace an existing ``dst`` (``--force``).
        drop_extra: for safetensors, drop top-level entries that cannot be metadata instead
            of refusing.
        extract_state_dict: write only the model's state dict (found as ``load_state_dict``
            finds it, also inside a pickled module); implied by safetensors output.
        progress: called as ``progress(bytes_done, bytes_total)``; from a background thread
            while the storages of a torch-written file are copied.
        max_shard_size: write ``dst`` as a Hugging Face sharded checkpoint directory with
            shards of at most this size (bytes, or ``"5GB"``, ``"500MB"``, ``"2GiB"``);
            safetensors shards unless ``format="pt"``. Implies ``extract_state_dict``.

    The source is read in opaque mode: objects of classes beyond torch's allowlist are
    written back to pt output exactly as they were read (same global, arguments and state),
    never imported or run.
    """
    started = time.perf_counter()
    source, destination = os.fspath(src), os.fspath(dst)
    sharded_limit = None if max_shard_size is None else parse_size(max_shard_size)
    chosen = output_format(destination, format, sharded=sharded_limit is not None)
    target = None if dtype is None else cast_target(dtype)
    if sharded_limit is not None and chosen == FORMAT_DCP:
        raise ValueError("--max-shard-size writes Hugging Face shards (pt or safetensors), not DCP")
    if not overwrite and os.path.lexists(destination):
        raise FileExistsError(17, "File exists (use --force to replace it)", destination)
    backend = current_backend()
    key_map = make_key_map(strip_prefix, rename)
    report = RenameReport()
    if sharded_limit is not None:
        return convert_to_shards(
            source, destination, chosen, sharded_limit, backend, key_map, report, started,
            key=key, overwrite=overwrite, drop_extra=drop_extra, progress=progress, target=target,
        )
    if chosen == FORMAT_DCP:
        return convert_to_dcp(
            source, destination, backend, key_map, report, started,
            key=key, overwrite=overwrite, extract_state_dict=extract_state_dict, progress=progress, target=target,
        )
    files = checkpoint_files(source)
    if is_dcp_directory(source) or isinstance(files, ShardedCheckpoint):  # several files, one index
        return convert_directory_to_file(
            source, destination, chosen, backend, key_map, report, started, overwrite=overwrite,
            drop_extra=drop_extra, progress=progress, target=target,
        )
    if files is not None:  # a model directory holding one file
        source = files
    advance = ByteProgress(0, progress)  # its total is known once the source is indexed

    with AtomicFile(destination, overwrite=overwrite) as output, ExitStack() as cleanup:
        opened = open_source(source)
        cleanup.callback(opened.close)
        whole_tree = chosen == FORMAT_PT and not extract_state_dict
        copying: SpanCopy | None = None
        span = _storage_span(opened, backend) if whole_tree and target is None else None
        if span is not None:
            # Started before indexing, so the copy overlaps the pickle's reading and rewriting.
            copying = cleanup.enter_context(
                SpanCopy(span, opened.fd, output.fd, span_destination(span), backend, advance)  # type: ignore[attr-defined]
            )
        # Not entered into ``cleanup``: closing the index closes the source, which the copy
        # thread reads until it is joined (``opened.close`` runs after that).
        index = index_opened(opened, backend, policy=policy_for(UNKNOWN_OPAQUE))
        try:
            if whole_tree:
                metadata, dropped = kept_metadata(index, chosen, index.root, None, drop_extra)
                root = rename_tree(index.root, key_map, report)
                tensors = _check_index_views(index, root)
                payload: Any = cast_tree(root, target)
            else:
                found_under, original = locate_state_dict(index.root, key)
                metadata, dropped = kept_metadata(index, chosen, index.root, found_under, drop_extra)
                state_dict = original if key_map is None else rename_state_dict(original, key_map, report)
                tensors = check_all_views(state_dict) if chosen == FORMAT_PT else len(state_dict)
                payload = cast_tree(state_dict, target)
            advance.total = storage_bytes(index, target)
            written = None if copying is None else write_pt_around_span(index, payload, output.fd, copying)
            if written is None:
                if copying is not None:  # the pickle names its storages otherwise: start over
                    copying.wait()
                    os.ftruncate(output.fd, 0)
                    advance.done = 0
                if chosen == FORMAT_PT:
                    written = write_pt(index, payload, output.fd, destination, backend, advance)
                else:
                    written = write_safetensors(index, payload, metadata, output.fd, backend, advance)
        except CheckpointError as exc:
            raise exc.located(path=index.display)
    return ConvertReport(
        source=source,
        destination=destination,
        format=chosen,
        tensors=tensors,
        storages=written.storages,
        tensor_bytes=written.tensors_bytes,
        file_bytes=written.file_bytes,
        renamed_keys=report.renamed,
        seconds=time.perf_counter() - started,
        examples=report.examples,
        dropped=dropped,
    )


def _check_index_views(index: Any, root: Any) -> int:
    """Every view the native converter did not check already; the tensors the pickle made.

    Without walking the tree (a checkpoint of 50,000 tensors would pay for it): the root is
    walked only to name the key of a view that does not fit.
    """
    try:
        for record in index.unchecked_views:
            check_view(record, "")
    except CheckpointError:
        check_all_views(root)
        raise
    return len(index.tensor_records)


def _storage_span(source: Source, backend: Any) -> StorageSpan | None:
    """The storage span of a torch zip file, read from its directory before anything else."""
    if not isinstance(source, FileSource) or source.read(0, min(source.size, 4)) != b"PK\x03\x04":
        return None
    try:
        return find_storage_span(zip_entries_of(source, backend))
    except CheckpointError as exc:
        raise exc.located(path=source.display)
