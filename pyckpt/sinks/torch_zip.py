"""Lay out and write the torch zip format: stored records, each record's data 64-byte
aligned (through the 'FB' padding field torch's writer uses), zip64 records where sizes or
offsets need them, and the zip64 end record and locator always (as torch writes them).

The whole layout is computed before anything is written, so the data of every record can be
written at its final offset in any order and by any number of threads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ALIGNMENT = 64
U32_MAX = 0xFFFFFFFF
U16_MAX = 0xFFFF
LOCAL_SIZE = 30
PADDING_ID = 0x4246  # b"FB", the id torch's writer gives its padding field
ZIP64_ID = 0x0001
VERSION_ZIP64 = 45
DOS_DATE = 0x21  # 1980-01-01: fixed, so equal inputs give equal files
DOS_TIME = 0


@dataclass
class ZipRecord:
    name: str
    size: int
    header_offset: int = 0
    data_offset: int = 0
    local_extra: bytes = b""
    crc32: int = 0
    # Flags a record copied whole from another archive keeps: bit 3 says a data descriptor
    # follows its data there.
    kept_flags: int = 0

    @property
    def encoded_name(self) -> bytes:
        return self.name.encode("utf-8")

    @property
    def flags(self) -> int:
        return self.kept_flags | (0x0800 if not self.name.isascii() else 0)  # bit 11: the name is UTF-8


def lay_out(names_and_sizes: list[tuple[str, int]], start: int = 0) -> tuple[list[ZipRecord], int]:
    """Records with offsets from ``start``; returns them and the offset just past the last."""
    records = []
    offset = start
    for name, size in names_and_sizes:
        record = ZipRecord(name, size, header_offset=offset)
        unpadded = _unpadded_data_offset(record)
        _pad(record, (-unpadded) % ALIGNMENT)
        records.append(record)
        offset = record.data_offset + size
    return records, offset


def end_data_at(record: ZipRecord, end: int) -> None:
    """Pad ``record``'s local header so that its data ends exactly at ``end``."""
    padding = end - record.size - _unpadded_data_offset(record)
    if not 0 <= padding <= U16_MAX - 4:
        raise ValueError(f"record '{record.name}' cannot end at offset {end}")
    _pad(record, padding)


def _unpadded_data_offset(record: ZipRecord) -> int:
    return record.header_offset + LOCAL_SIZE + len(record.encoded_name) + len(_local_zip64(record.size)) + 4


def _pad(record: ZipRecord, padding: int) -> None:
    record.local_extra = _local_zip64(record.size) + struct.pack("<HH", PADDING_ID, padding) + b"Z" * padding
    record.data_offset = _unpadded_data_offset(record) + padding


def _local_zip64(size: int) -> bytes:
    return struct.pack("<HHQQ", ZIP64_ID, 16, size, size) if size >= U32_MAX else b""


def local_header(record: ZipRecord) -> bytes:
    big = record.size >= U32_MAX
    size = U32_MAX if big else record.size
    name = record.encoded_name
    return (
        struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            VERSION_ZIP64,
            record.flags,
            0,
            DOS_TIME,
            DOS_DATE,
            record.crc32,
            size,
            size,
            len(name),
            len(record.local_extra),
        )
        + name
        + record.local_extra
    )


def local_crc_offset(record: ZipRecord) -> int:
    """Where the CRC field of the record's local header sits (patched after the data)."""
    return record.header_offset + 14


def central_directory(records: list[ZipRecord], cd_offset: int) -> bytes:
    """Central directory, zip64 end record, its locator and the end record."""
    parts = []
    for record in records:
        values = []
        size = record.size
        header_offset = record.header_offset
        if size >= U32_MAX:
            values += [size, size]
            size = U32_MAX
        if header_offset >= U32_MAX:
            values.append(header_offset)
            header_offset = U32_MAX
        extra = struct.pack(f"<HH{len(values)}Q", ZIP64_ID, 8 * len(values), *values) if values else b""
        name = record.encoded_name
        parts.append(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                VERSION_ZIP64 | 0x0300,  # made by Unix
                VERSION_ZIP64,
                record.flags,
                0,
                DOS_TIME,
                DOS_DATE,
                record.crc32,
                size,
                size,
                len(name),
                len(extra),
                0,
                0,
                0,
                0o100644 << 16,
                header_offset,
            )
            + name
            + extra
        )
    directory = b"".join(parts)
    zip64_end_offset = cd_offset + len(directory)
    count = len(records)
    zip64_end = struct.pack(
        "<4sQHHIIQQQQ",
        b"PK\x06\x06",
        44,
        VERSION_ZIP64 | 0x0300,
        VERSION_ZIP64,
        0,
        0,
        count,
        count,
        len(directory),
        cd_offset,
    )
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_end_offset, 1)
    end = struct.pack(
        "<4sHHHHIIH",
        b"PK\x05\x06",
        0,
        0,
        min(count, U16_MAX),
        min(count, U16_MAX),
        min(len(directory), U32_MAX),
        min(cd_offset, U32_MAX),
        0,
    )
    return directory + zip64_end + locator + end
