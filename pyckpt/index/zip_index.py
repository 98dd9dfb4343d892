"""The pure-Python zip central-directory reader (the fallback backend's index).

It trusts nothing: every offset and size is checked against the file, zip64 fields are
taken from the zip64 records, names are checked for path tricks, and records may neither
overlap each other nor the central directory. ``csrc/index/zip_index.cpp`` is its native
twin and produces the same entries and the same error messages.
"""

from __future__ import annotations

import struct

from ..errors import CheckpointError
from .records import METHOD_DEFLATE, METHOD_STORED, ZipEntry
from .source import Source

EOCD_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
CENTRAL_SIGNATURE = b"PK\x01\x02"
LOCAL_SIGNATURE = b"PK\x03\x04"

EOCD_SIZE = 22
ZIP64_LOCATOR_SIZE = 20
ZIP64_EOCD_SIZE = 56
CENTRAL_SIZE = 46
LOCAL_SIZE = 30
MAX_COMMENT = 0xFFFF
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF

_eocd = struct.Struct("<4sHHHHIIH")
_locator = struct.Struct("<4sIQI")
_zip64_eocd = struct.Struct("<4sQHHIIQQQQ")
_central = struct.Struct("<4sHHHHHHIIIHHHHHII")
_local = struct.Struct("<4sHHHHHIIIHH")


def read_zip_entries(source: Source) -> list[ZipEntry]:
    """All entries of the archive, in central-directory order, with data offsets resolved."""
    size = source.size
    if size < EOCD_SIZE:
        raise CheckpointError(f"not a zip archive: {size} bytes is too short for an end record")
    # Archives without a comment (every torch writer) end with the end record; only
    # otherwise search the tail, which may overlap the last record's data.
    tail_start = size - EOCD_SIZE
    tail = source.read(tail_start, EOCD_SIZE)
    eocd_at = _find_eocd(tail)
    if eocd_at < 0:
        tail_length = min(size, EOCD_SIZE + MAX_COMMENT)
        tail_start = size - tail_length
        tail = source.read(tail_start, tail_length)
        eocd_at = _find_eocd(tail)
    if eocd_at < 0:
        raise CheckpointError("not a zip archive: no end-of-central-directory record")
    eocd_offset = tail_start + eocd_at
    _, disk, cd_disk, entries_on_disk, entries, cd_size, cd_offset, _ = _eocd.unpack_from(tail, eocd_at)
    cd_limit = eocd_offset

    has_locator = eocd_offset >= ZIP64_LOCATOR_SIZE and (
        source.read(eocd_offset - ZIP64_LOCATOR_SIZE, 4) == ZIP64_LOCATOR_SIGNATURE
    )
    if has_locator:
        locator_offset = eocd_offset - ZIP64_LOCATOR_SIZE
        _, _, zip64_offset, _ = _locator.unpack(source.read(locator_offset, ZIP64_LOCATOR_SIZE))
        if zip64_offset + ZIP64_EOCD_SIZE > locator_offset:
            raise CheckpointError(
                f"zip64 end record offset {zip64_offset} points past its locator at {locator_offset}"
            )
        record = source.read(zip64_offset, ZIP64_EOCD_SIZE)
        (signature, _, _, _, disk, cd_disk, entries_on_disk, entries, cd_size, cd_offset) = (
            _zip64_eocd.unpack(record)
        )
        if signature != ZIP64_EOCD_SIGNATURE:
            raise CheckpointError(f"no zip64 end record at offset {zip64_offset}")
        cd_limit = zip64_offset
    elif U32_MAX in (cd_size, cd_offset) or U16_MAX in (entries, entries_on_disk):
        raise CheckpointError("end record uses zip64 markers but there is no zip64 end record")

    if disk != 0 or cd_disk != 0 or entries_on_disk != entries:
        raise CheckpointError("multi-disk zip archives are not supported")
    if cd_offset > cd_limit or cd_size > cd_limit - cd_offset:
        raise CheckpointError(
            f"central directory (offset {cd_offset}, {cd_size} bytes) runs past its end record "
            f"at offset {cd_limit}"
        )
    if entries > cd_size // CENTRAL_SIZE:
        raise CheckpointError(
            f"central directory declares {entries} entries but its {cd_size} bytes hold fewer"
        )
    directory = source.read(cd_offset, cd_size)
    result = []
    seen: set[str] = set()
    pos = 0
    for _ in range(entries):
        entry, pos = _parse_central(directory, pos, source, cd_offset)
        if entry.name in seen:
            raise CheckpointError(f"record '{entry.name}' appears twice in the central directory")
        seen.add(entry.name)
        result.append(entry)
    _check_no_overlap(result)
    return result


def _find_eocd(tail: bytes) -> int:
    at = tail.rfind(EOCD_SIGNATURE)
    while at >= 0:
        if at + EOCD_SIZE <= len(tail):
            (comment_length,) = struct.unpack_from("<H", tail, at + 20)
            if at + EOCD_SIZE + comment_length == len(tail):
                return at
        at = tail.rfind(EOCD_SIGNATURE, 0, at)
    return -1


def _parse_central(directory: bytes, pos: int, source: Source, cd_offset: int) -> tuple[ZipEntry, int]:
    if pos + CENTRAL_SIZE > len(directory):
        raise CheckpointError("central directory is truncated")
    (signature, _, _, flags, method, _, _, crc, compressed, size, name_length, extra_length,
     comment_length, disk_start, _, _, header_offset) = _central.unpack_from(directory, pos)
    if signature != CENTRAL_SIGNATURE:
        raise CheckpointError(f"bad central directory entry signature at offset {cd_offset + pos}")
    end = pos + CENTRAL_SIZE + name_length + extra_length + comment_length
    if end > len(directory):
        raise CheckpointError("central directory is truncated")
    raw_name = directory[pos + CENTRAL_SIZE : pos + CENTRAL_SIZE + name_length]
    name = decode_name(raw_name)
    extra = directory[pos + CENTRAL_SIZE + name_length : pos + CENTRAL_SIZE + name_length + extra_length]
    if U32_MAX in (size, compressed, header_offset) or disk_start == U16_MAX:
        size, compressed, header_offset = _zip64_extra(extra, name, size, compressed, header_offset, disk_start)

    _check_name(name)
    if flags & 0x1:
        raise CheckpointError("record is encrypted", record=name)
    if method not in (METHOD_STORED, METHOD_DEFLATE):
        raise CheckpointError(
            f"record uses compression method {method}; only stored (0) and deflate (8) are supported",
            record=name,
        )
    if method == METHOD_STORED and compressed != size:
        raise CheckpointError(
            f"stored record declares {size} bytes but occupies {compressed}", record=name
        )
    if method == METHOD_DEFLATE and size > compressed * 1032 + 1024:
        raise CheckpointError(
            f"deflate record claims to inflate {compressed} bytes to {size}, beyond deflate's limit",
            record=name,
        )
    if header_offset + LOCAL_SIZE > cd_offset:
        raise CheckpointError(
            f"local header offset {header_offset} is not before the central directory", record=name
        )
    (local_signature, _, _, _, _, _, _, _, _, local_name_length, local_extra_length) = _local.unpack(
        source.read(header_offset, LOCAL_SIZE)
    )
    if local_signature != LOCAL_SIGNATURE:
        raise CheckpointError(f"no local header at offset {header_offset}", record=name)
    data_offset = header_offset + LOCAL_SIZE + local_name_length + local_extra_length
    if data_offset > cd_offset or compressed > cd_offset - data_offset:
        raise CheckpointError(
            f"data ({compressed} bytes at offset {data_offset}) runs into the central directory "
            f"at offset {cd_offset}",
            record=name,
        )
    if source.read(header_offset + LOCAL_SIZE, local_name_length) != raw_name:
        raise CheckpointError("local header names a different record", record=name)
    entry = ZipEntry(name, method, flags, crc, compressed, size, header_offset, data_offset)
    return entry, end


def _zip64_extra(
    extra: bytes, name: str, size: int, compressed: int, header_offset: int, disk_start: int
) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        block_id, block_size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + block_size]
        if len(body) != block_size:
            break
        if block_id == 0x0001:
            needed = [size == U32_MAX, compressed == U32_MAX, header_offset == U32_MAX]
            if 8 * sum(needed) > block_size:
                break
            values = list(struct.unpack_from(f"<{sum(needed)}Q", body))
            if needed[0]:
                size = values.pop(0)
            if needed[1]:
                compressed = values.pop(0)
            if needed[2]:
                header_offset = values.pop(0)
            return size, compressed, header_offset
        pos += 4 + block_size
    raise CheckpointError("zip64 sizes are missing from the record's extra field", record=name)


def decode_name(raw: bytes) -> str:
    """Record names are UTF-8 in every torch writer; anything else is read as cp437."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp437")


def _check_name(name: str) -> None:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or any(part in ("..", ".") for part in parts)
    ):
        # record=None for an empty name, as the native reader (which has no "empty" record).
        raise CheckpointError("record name is empty, absolute or climbs out of the archive", record=name or None)


def _check_no_overlap(entries: list[ZipEntry]) -> None:
    ordered = sorted(entries, key=lambda e: e.header_offset)
    for current, following in zip(ordered, ordered[1:]):
        if current.data_offset + current.compressed_size > following.header_offset:
            raise CheckpointError(
                f"record overlaps record '{following.name}' (data ends at "
                f"{current.data_offset + current.compressed_size}, next header at {following.header_offset})",
                record=current.name,
            )
