"""The hostile and damaged checkpoint corpus, built from scratch (nothing is checked in).

Every case is a whole file (bytes) that ``pyckpt.load`` must refuse with a
``pyckpt.CheckpointError`` whose message holds the case's ``expect`` fragments. Groups:

- ``code``: pickles that run code under plain pickle / ``torch.load(weights_only=False)``
  (``os.system``, ``posix.system``, ``builtins.exec``/``eval``/``getattr``/``__import__``,
  ``subprocess.Popen``/``check_output``, ``importlib.import_module``), reached through
  GLOBAL, STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX, BUILD, INST and OBJ, at protocol 2 and
  protocols 4/5, inside a torch zip file, a legacy file and a TorchScript archive. Each one
  tries to create its own sentinel file ``<sentinel_dir>/<case name>``; ``live`` cases are
  proven to do so under ``torch.load(weights_only=False)`` by the tests.
- ``damaged``: empty, random, Git LFS pointer, tar, truncations at many offsets (inside the
  central directory, records, data.pkl; zip and legacy), cut-out ranges, end records that
  point past the end of the file, overlapping and duplicate records, names with ``..``.
- ``lying``: storages larger than their record, views past their storage, shapes and
  strides whose products overflow int64, negative sizes, missing ``data/<key>`` records,
  storage keys with path components.
- ``resource``: DEFLATE bombs whose declared sizes lie, 100k-deep lists / dicts / tuples,
  unknown opcodes, missing STOP, memo indexes never stored, huge string lengths,
  ``bytearray(10**12)``, ``_codecs.encode`` with codecs other than latin-1.

Pickles are written by hand (bytes); zip files are written with torch's own writer
(``torch._C.PyTorchFileWriter``) when the case is "a real file with a hostile data.pkl",
and with Python's ``zipfile`` or patched bytes (offsets and CRCs fixed up) when the zip
structure itself is the attack.

``build_cases(sentinel_dir)`` returns every case; ``small_cases()`` the ones under 64 KiB
(fuzzer seeds); ``write_corpus(directory, sentinel_dir)`` writes them as files.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import random
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

DEFAULT_SENTINEL_DIR = os.path.join(tempfile.gettempdir(), "pyckpt-attack-sentinels")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 12345\n"
)

# What the messages say (the Python reader's wording; the native one matches it).
REFUSED_GLOBAL = "refused global"
NOT_ALLOWLISTED = "it is not on torch's weights_only allowlist"
ALWAYS_BLOCKED = "is always blocked"
REFUSED_OPCODE = "refused opcode"
NO_EOCD = "no end-of-central-directory record"
TRUNCATED_PICKLE = "pickle is truncated"
PAST_END = "passes the end of the file"
NESTS = "nests"


@dataclass
class Case:
    """One hostile file and what pyckpt must say about it."""

    name: str
    data: bytes
    expect: tuple[str, ...]  # every fragment must appear in the message, on both backends
    group: str  # code, damaged, lying, resource
    error: str = "CheckpointError"  # the class (or a subclass of it) that must be raised
    live: bool = False  # plain pickle / torch.load(weights_only=False) runs the payload
    slow: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"


# =========================================================================================
# Pickle writing by hand
# =========================================================================================


def pint(n: int) -> bytes:
    """An int in the smallest protocol-2 opcode that holds it (LONG1 for big or negative)."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    length = (n.bit_length() + 8) // 8
    return b"\x8a" + bytes([length]) + n.to_bytes(length, "little", signed=True)


def pstr(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def pstr4(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode("utf-8")
    return b"\x8c" + bytes([len(raw)]) + raw


def glob2(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def glob4(module: str, name: str) -> bytes:
    """STACK_GLOBAL with its two strings (BINUNICODE, so the first protocol-4 opcode is 0x93)."""
    return pstr(module) + pstr(name) + b"\x93"


def ptuple(*items: bytes) -> bytes:
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + bytes([0x84 + len(items)])
    return b"(" + b"".join(items) + b"t"


def plist(*items: bytes) -> bytes:
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def proto4_framed(body: bytes, protocol: int = 4) -> bytes:
    """Protocol 4/5 as pickle writes it: PROTO, then FRAME around the rest."""
    inner = body + b"."
    return b"\x80" + bytes([protocol]) + b"\x95" + struct.pack("<Q", len(inner)) + inner


def proto_unframed(body: bytes, protocol: int) -> bytes:
    return b"\x80" + bytes([protocol]) + body + b"."


# =========================================================================================
# Files with a given data.pkl: torch's zip writer, the legacy layout, TorchScript
# =========================================================================================


def torch_zip(pickle_bytes: bytes, records: dict[str, bytes] | None = None, *, stem: str = "archive") -> bytes:
    """A torch zip file written by torch's own writer around a given data.pkl."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{stem}.pt")
        writer = torch._C.PyTorchFileWriter(path)
        writer.write_record("data.pkl", pickle_bytes, len(pickle_bytes))
        writer.write_record("byteorder", b"little", 6)
        for name, data in (records or {}).items():
            writer.write_record(name, data, len(data))
        writer.write_end_of_file()
        del writer
        with open(path, "rb") as f:
            return f.read()


def legacy_file(
    object_pickle: bytes,
    storages: list[tuple[str, int, bytes]] | None = None,
    *,
    sys_info: bytes | None = None,
    keys: list[str] | None = None,
) -> bytes:
    """The pre-1.6 layout: magic, protocol, sys_info, object, keys, then (count, bytes) each."""
    storages = storages or []
    out = bytearray()
    out += proto2(pint(LEGACY_MAGIC))
    out += proto2(pint(1001))
    out += sys_info if sys_info is not None else proto2(
        b"}(" + pstr("protocol_version") + pint(1001) + pstr("little_endian") + b"\x88"
        + pstr("type_sizes") + b"}(" + pstr("short") + pint(2) + pstr("int") + pint(4) + pstr("long") + pint(4)
        + b"uu"
    )
    out += object_pickle
    key_list = keys if keys is not None else [key for key, _, _ in storages]
    out += proto2(plist(*[pstr(k) for k in key_list]))
    for _key, count, data in storages:
        out += struct.pack("<q", count) + data
    return bytes(out)


@functools.lru_cache(maxsize=1)
def _torchscript_template() -> bytes:
    module = torch.nn.Linear(2, 2)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def torchscript_with(pickle_bytes: bytes) -> bytes:
    """A real TorchScript archive whose data.pkl is replaced (constants.pkl and code/ kept)."""
    return rezip(_torchscript_template(), lambda name, data: pickle_bytes if name.endswith("/data.pkl") else data)


def rezip(
    data: bytes,
    transform: Callable[[str, bytes], bytes | None] = lambda name, data: data,
    *,
    compression: int = zipfile.ZIP_STORED,
    rename: Callable[[str], str] = lambda name: name,
    extra: list[tuple[str, bytes]] | None = None,
) -> bytes:
    """Copy a zip record by record with Python's zipfile (CRCs and offsets recomputed)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", compression=compression) as target:
        for info in source.infolist():
            content = transform(info.filename, source.read(info.filename))
            if content is not None:
                target.writestr(zipfile.ZipInfo(rename(info.filename)), content, compress_type=compression)
        for name, content in extra or []:
            with _quiet():
                target.writestr(zipfile.ZipInfo(name), content, compress_type=compression)
    return out.getvalue()


class _quiet:
    def __enter__(self) -> None:
        import warnings

        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self.catcher.__exit__(*exc)


# =========================================================================================
# A valid state-dict pickle, written by hand so every field can lie
# =========================================================================================


@dataclass
class T:
    """One tensor entry: key -> _rebuild_tensor_v2(storage(...), offset, size, stride)."""

    key: str
    storage_key: object = "0"
    numel: object = 16
    offset: object = 0
    size: tuple = (4, 4)
    stride: tuple = (4, 1)
    storage_type: tuple[str, str] = ("torch", "FloatStorage")
    location: object = "cpu"


def _value(v: object) -> bytes:
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if isinstance(v, int):
        return pint(v)
    if isinstance(v, str):
        return pstr(v)
    if v is None:
        return b"N"
    raise TypeError(v)


def state_dict_pickle(tensors: list[T]) -> bytes:
    """What torch.save writes for an OrderedDict of tensors (memo-free, protocol 2)."""
    body = bytearray(glob2("collections", "OrderedDict") + b")R(")
    for t in tensors:
        pid = ptuple(pstr("storage"), glob2(*t.storage_type), _value(t.storage_key), _value(t.location), _value(t.numel))
        size = b"(" + b"".join(pint(s) for s in t.size) + b"t"
        stride = b"(" + b"".join(pint(s) for s in t.stride) + b"t"
        args = b"(" + pid + b"Q" + pint(t.offset) + size + stride + b"\x89" + glob2("collections", "OrderedDict") + b")R" + b"t"
        body += pstr(t.key) + glob2("torch._utils", "_rebuild_tensor_v2") + args + b"R"
    body += b"u"
    return proto2(bytes(body))


def state_dict_zip(tensors: list[T], records: dict[str, bytes] | None = None) -> bytes:
    if records is None:
        records = {f"data/{t.storage_key}": bytes(64) for t in tensors if isinstance(t.storage_key, str)}
    return torch_zip(state_dict_pickle(tensors), records)


@functools.lru_cache(maxsize=1)
def real_checkpoint() -> bytes:
    """A small real training checkpoint saved by torch.save (zip format)."""
    torch.manual_seed(0)
    obj = {
        "state_dict": collections.OrderedDict(
            [("module.w", torch.randn(8, 8)), ("module.b", torch.arange(8.0)), ("module.n", torch.tensor(3))]
        ),
        "epoch": 7,
    }
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def real_legacy_checkpoint() -> bytes:
    torch.manual_seed(0)
    obj = collections.OrderedDict([("w", torch.randn(8, 8)), ("b", torch.arange(8.0))])
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


# =========================================================================================
# Zip structure helpers
# =========================================================================================


@dataclass
class ZipLayout:
    eocd: int
    cd_offset: int
    cd_size: int
    zip64_eocd: int | None
    zip64_locator: int | None
    entries: list[dict]  # name, central (offset of its CD entry), header, data, size


def layout(data: bytes) -> ZipLayout:
    eocd = data.rindex(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
    zip64_eocd = zip64_locator = None
    if data[eocd - 20 : eocd - 16] == b"PK\x06\x07":
        zip64_locator = eocd - 20
        (zip64_eocd,) = struct.unpack_from("<Q", data, zip64_locator + 8)
        cd_size, cd_offset = struct.unpack_from("<QQ", data, zip64_eocd + 40)
    entries = []
    pos = cd_offset
    while pos < cd_offset + cd_size:
        (compressed, size, name_len, extra_len, comment_len) = struct.unpack_from("<IIHHH", data, pos + 20)
        (header,) = struct.unpack_from("<I", data, pos + 42)
        name = data[pos + 46 : pos + 46 + name_len].decode()
        local_name, local_extra = struct.unpack_from("<HH", data, header + 26)
        entries.append(
            {"name": name, "central": pos, "header": header, "data": header + 30 + local_name + local_extra,
             "size": size, "compressed": compressed}
        )
        pos += 46 + name_len + extra_len + comment_len
    return ZipLayout(eocd, cd_offset, cd_size, zip64_eocd, zip64_locator, entries)


def entry(lay: ZipLayout, suffix: str) -> dict:
    return next(e for e in lay.entries if e["name"].endswith(suffix))


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def fix_crc(data: bytes, name_suffix: str) -> bytes:
    """Recompute one record's CRC in the central directory (as an attacker would)."""
    lay = layout(data)
    e = entry(lay, name_suffix)
    crc = zlib.crc32(data[e["data"] : e["data"] + e["compressed"]])
    return patch(data, e["central"] + 16, "<I", crc)


# =========================================================================================
# The cases
# =========================================================================================


def _cmd(sentinel: str) -> str:
    return f"touch '{sentinel}'"


def _pycode(sentinel: str) -> str:
    return f"open({sentinel!r}, 'w').close()"


def _code_payloads(sentinel: str) -> list[tuple[str, bytes, tuple[str, ...], bool]]:
    """(name, protocol-2 opcode body without PROTO/STOP, expected fragments, live)."""
    cmd, code = _cmd(sentinel), _pycode(sentinel)
    argv = plist(pstr("touch"), pstr(sentinel))
    getattr_os_system = (
        # builtins.getattr(builtins.__import__('os'), 'system')(cmd)
        glob2("builtins", "getattr") + glob2("builtins", "__import__") + pstr("os") + b"\x85R" + pstr("system") + b"\x86R"
        + pstr(cmd) + b"\x85R"
    )
    import_first = (
        # __import__('os') stored in the memo, then getattr(memo, 'system')(cmd)
        glob2("builtins", "__import__") + pstr("os") + b"\x85R" + b"q\x000"
        + glob2("builtins", "getattr") + b"h\x00" + pstr("system") + b"\x86R" + pstr(cmd) + b"\x85R"
    )
    importlib_first = (
        glob2("importlib", "import_module") + pstr("os") + b"\x85R" + b"q\x000"
        + glob2("builtins", "getattr") + b"h\x00" + pstr("system") + b"\x86R" + pstr(cmd) + b"\x85R"
    )
    # BUILD gadget: OrderedDict() gets __setstate__ = os.system through slot state; the
    # second BUILD then calls os.system(cmd).
    build_gadget = (
        glob2("collections", "OrderedDict") + b")\x81" + b"N}" + pstr("__setstate__") + glob2("os", "system") + b"s\x86b"
        + pstr(cmd) + b"b"
    )
    blocked = lambda module, name: (REFUSED_GLOBAL, f"{module}.{name}", ALWAYS_BLOCKED)  # noqa: E731
    refused = lambda module, name: (REFUSED_GLOBAL, f"{module}.{name}", NOT_ALLOWLISTED)  # noqa: E731
    return [
        ("os_system_reduce", glob2("os", "system") + pstr(cmd) + b"\x85R", blocked("os", "system"), True),
        ("posix_system_reduce", glob2("posix", "system") + pstr(cmd) + b"\x85R", blocked("posix", "system"), True),
        ("nt_system_reduce", glob2("nt", "system") + pstr(cmd) + b"\x85R", blocked("nt", "system"), False),
        ("os_path_submodule", glob2("os.path", "exists") + pstr(sentinel) + b"\x85R", blocked("os.path", "exists"), False),
        ("builtins_exec", glob2("builtins", "exec") + pstr(code) + b"\x85R", refused("builtins", "exec"), True),
        ("py2_builtin_eval", glob2("__builtin__", "eval") + pstr(f"__import__('os').system({cmd!r})") + b"\x85R",
         refused("builtins", "eval"), True),
        ("subprocess_popen", glob2("subprocess", "Popen") + argv + b"\x85R", refused("subprocess", "Popen"), True),
        ("subprocess_check_output", glob2("subprocess", "check_output") + argv + b"\x85R",
         refused("subprocess", "check_output"), True),
        ("importlib_import_module", importlib_first, refused("importlib", "import_module"), True),
        ("builtins_getattr", getattr_os_system, refused("builtins", "getattr"), True),
        ("builtins_import", import_first, refused("builtins", "__import__"), True),
        ("newobj_popen", glob2("subprocess", "Popen") + argv + b"\x85\x81", refused("subprocess", "Popen"), False),
        # OrderedDict.__new__(OrderedDict, os.system): an allowlisted class, a blocked argument
        ("newobj_allowlisted_with_os_arg", glob2("collections", "OrderedDict") + glob2("os", "system") + b"\x85\x81",
         blocked("os", "system"), False),
        ("build_setstate_gadget", build_gadget, blocked("os", "system"), True),
        ("inst_os_system", b"(" + pstr(cmd) + b"ios\nsystem\n", (REFUSED_OPCODE, "0x69"), True),
        ("obj_os_system", b"(" + glob2("os", "system") + pstr(cmd) + b"o", blocked("os", "system"), True),
        ("obj_allowlisted_class", b"(" + glob2("collections", "OrderedDict") + b"o", (REFUSED_OPCODE, "0x6f"), False),
        ("stack_global_os_system", glob4("os", "system") + pstr(cmd) + b"\x85R", (REFUSED_OPCODE, "0x93"), True),
        ("stack_global_exec", glob4("builtins", "exec") + pstr(code) + b"\x85R", (REFUSED_OPCODE, "0x93"), True),
        ("reduce_non_global_callable", b"}" + b")R", ("refused REDUCE", "not an allowlisted global"), False),
        ("build_on_plain_dict", b"}" + b"}" + pstr("__setstate__") + pint(1) + b"sb", ("refused BUILD",), False),
        ("build_on_list", b"]" + b"}b", ("refused BUILD",), False),
    ]


def _payload(name: str, sentinel: str) -> tuple[bytes, tuple[str, ...], bool]:
    for payload_name, body, expect, live in _code_payloads(sentinel):
        if payload_name == name:
            return body, expect, live
    raise KeyError(name)


PROTOCOL_VARIANTS: dict[str, tuple[Callable[[bytes], bytes], tuple[str, ...] | None]] = {
    # protocol 2, as torch writes it
    "p2": (proto2, None),
    # protocol 4 as pickle writes it: the FRAME opcode (0x95) right after PROTO is refused
    "p4": (lambda body: proto4_framed(body, 4), (REFUSED_OPCODE, "0x95")),
    # protocol 5 without frames: the payload's own opcodes decide
    "p5": (lambda body: proto_unframed(body, 5), None),
}


def code_cases(sentinel_dir: str) -> list[Case]:
    """Every payload at every protocol variant, in a torch zip file and in a legacy file."""
    cases = []
    payload_names = [name for name, _, _, _ in _code_payloads("x")]
    for variant, (wrap, variant_expect) in PROTOCOL_VARIANTS.items():
        for name in payload_names:
            for container in ("zip", "legacy"):
                case_name = f"code_{name}_{variant}_{container}"
                body, expect, live = _payload(name, os.path.join(sentinel_dir, case_name))
                # pickle maps Python 2 module names (__builtin__) only below protocol 3.
                live = live and not (name.startswith("py2_") and variant != "p2")
                pickle_bytes = wrap(body)
                data = torch_zip(pickle_bytes) if container == "zip" else legacy_file(pickle_bytes)
                cases.append(Case(case_name, data, variant_expect or expect, "code", error="UnsafeCheckpointError",
                                  live=live, tags=(container, variant)))
    # A few payloads in other places: the legacy sys_info pickle, a TorchScript archive
    # (whose rules also accept __torch__ classes), and GLOBAL under a protocol-4 header.
    for name in ("os_system_reduce", "builtins_exec", "subprocess_popen", "inst_os_system", "build_setstate_gadget"):
        case_name = f"code_{name}_sysinfo"
        body, expect, live = _payload(name, os.path.join(sentinel_dir, case_name))
        cases.append(Case(case_name, legacy_file(proto2(pint(1)), sys_info=proto2(body)), expect, "code",
                          error="UnsafeCheckpointError", live=live, tags=("legacy",)))
        case_name = f"code_{name}_torchscript"
        body, expect, _ = _payload(name, os.path.join(sentinel_dir, case_name))
        cases.append(Case(case_name, torchscript_with(proto2(body)), expect, "code",
                          error="UnsafeCheckpointError", tags=("torchscript",)))
        case_name = f"code_{name}_p4global_zip"
        body, expect, live = _payload(name, os.path.join(sentinel_dir, case_name))
        cases.append(Case(case_name, torch_zip(proto_unframed(body, 4)), expect, "code",
                          error="UnsafeCheckpointError", live=live, tags=("zip", "p4")))
    sentinel = os.path.join(sentinel_dir, "code_newobj_ex_p4_zip")
    argv = plist(pstr("touch"), pstr(sentinel))
    cases += [
        Case("code_newobj_ex_p4_zip", torch_zip(proto_unframed(glob4("subprocess", "Popen") + argv + b"\x85}\x92", 4)),
             (REFUSED_OPCODE, "0x93"), "code", error="UnsafeCheckpointError", tags=("zip", "p4")),
        Case("code_newobj_ex_global_p4_zip", torch_zip(proto_unframed(glob2("collections", "OrderedDict") + b")}\x92", 4)),
             (REFUSED_OPCODE, "0x92"), "code", error="UnsafeCheckpointError", tags=("zip", "p4")),
        Case("code_torchscript_class_with_args",
             torchscript_with(proto2(glob2("__torch__.evil", "M") + pstr("x") + b"\x85\x81")),
             ("TorchScript classes are only created empty with NEWOBJ",), "code", tags=("torchscript",)),
        Case("code_torchscript_names_outside_torchscript",
             torch_zip(proto2(glob2("__torch__.evil", "M") + b")\x81")),
             (REFUSED_GLOBAL, "__torch__.evil.M"), "code", error="UnsafeCheckpointError", tags=("zip",)),
        Case("code_persistent_id_not_storage",
             torch_zip(proto2(ptuple(pstr("module"), glob2("collections", "OrderedDict")) + b"Q")),
             ("refused persistent id of type 'module'",), "code", error="UnsafeCheckpointError", tags=("zip",)),
        Case("code_persid_text_opcode", torch_zip(proto2(b"Pos.system\n")), (REFUSED_OPCODE, "0x50"), "code",
             error="UnsafeCheckpointError", tags=("zip",)),
    ]
    return cases


# -- damaged files ---------------------------------------------------------------------------


def damaged_cases() -> list[Case]:
    base = real_checkpoint()
    lay = layout(base)
    pkl = entry(lay, "/data.pkl")
    data0 = entry(lay, "/data/0")
    cases = [
        Case("empty", b"", ("file is empty",), "damaged"),
        Case("random_bytes", _random(4096, 1, avoid=(b"PK", b"\x80\x02\x8a")), ("not a PyTorch checkpoint", "unknown format"),
             "damaged"),
        Case("random_after_zip_magic", b"PK\x03\x04" + _random(4096, 2), (NO_EOCD,), "damaged"),
        Case("random_after_legacy_magic", b"\x80\x02\x8a" + _random(4096, 3), (), "damaged"),
        Case("lfs_pointer", LFS_POINTER, ("Git LFS pointer", "git lfs pull"), "damaged"),
        Case("tar_format", bytes(257) + b"ustar\x0000" + bytes(250), ("tar checkpoint format",), "damaged"),
        Case("zip_magic_only", b"PK\x03\x04", ("4 bytes is too short for an end record",), "damaged"),
        Case("eocd_only", b"PK\x05\x06" + bytes(18), ("zip archive has no records",), "damaged"),
    ]
    # Truncations of the zip (the end record goes with the tail).
    offsets = {
        "in_data_pkl": pkl["data"] + pkl["compressed"] // 2,
        "in_data_record": data0["data"] + 7,
        "in_local_header": data0["header"] + 10,
        "in_central_directory": lay.cd_offset + 30,
        "at_central_directory": lay.cd_offset,
        "in_zip64_end_record": lay.zip64_eocd + 20,
        "in_zip64_locator": lay.zip64_locator + 5,
        "in_end_record": lay.eocd + 10,
        "one_byte_short": len(base) - 1,
        "first_30_bytes": 30,
    }
    cases.append(Case("zip_truncated_first_byte_only", base[:1], ("not a PyTorch checkpoint",), "damaged"))
    for where, cut in offsets.items():
        cases.append(Case(f"zip_truncated_{where}", base[:cut], (NO_EOCD,), "damaged", tags=("truncation",)))
    # Cut-outs: a range removed from the middle, the tail (and its end records) kept.
    cases += [
        Case("zip_cut_in_data_pkl", _cut(base, pkl["data"] + 8, 16), ("zip64 end record offset", "points past its locator"),
             "damaged"),
        Case("zip_cut_in_central_directory", _cut(base, lay.cd_offset + 50, 10),
             ("zip64 end record offset", "points past its locator"), "damaged"),
    ]
    # End records pointing past the end of the file.
    cases += [
        Case("zip64_central_directory_past_eof", patch(base, lay.zip64_eocd + 48, "<Q", 1 << 40),
             ("central directory (offset 1099511627776", "runs past its end record"), "damaged"),
        Case("zip64_central_directory_size_past_eof", patch(base, lay.zip64_eocd + 40, "<Q", (1 << 63) - 1),
             ("runs past its end record",), "damaged"),
        Case("zip64_locator_past_eof", patch(base, lay.zip64_locator + 8, "<Q", 1 << 62),
             ("zip64 end record offset 4611686018427387904 points past its locator",), "damaged"),
        Case("zip64_locator_to_garbage", patch(base, lay.zip64_locator + 8, "<Q", 0),
             ("no zip64 end record at offset 0",), "damaged"),
        Case("zip64_entry_count_huge", patch(patch(base, lay.zip64_eocd + 24, "<Q", 1 << 60), lay.zip64_eocd + 32, "<Q", 1 << 60),
             ("central directory declares 1152921504606846976 entries",), "damaged"),
        Case("zip64_multi_disk", patch(base, lay.zip64_eocd + 16, "<I", 3), ("multi-disk",), "damaged"),
        Case("local_header_offset_past_central_directory", patch(base, data0["central"] + 42, "<I", lay.cd_offset + 100),
             ("local header offset", "is not before the central directory"), "damaged"),
        Case("local_header_signature_wrong", patch(base, data0["header"], "<I", 0x04034B51),
             ("no local header at offset",), "damaged"),
        Case("record_size_into_central_directory",
             patch(patch(base, data0["central"] + 20, "<I", 0x7FFFFFF0), data0["central"] + 24, "<I", 0x7FFFFFF0),
             ("runs into the central directory",), "damaged"),
        Case("record_overlaps_next",
             patch(patch(base, pkl["central"] + 20, "<I", pkl["compressed"] + 200), pkl["central"] + 24, "<I", pkl["compressed"] + 200),
             ("record overlaps record",), "damaged"),
        Case("stored_sizes_disagree", patch(base, data0["central"] + 24, "<I", data0["size"] + 4),
             ("stored record declares",), "damaged"),
        Case("unknown_compression_method", patch(base, data0["central"] + 10, "<H", 12),
             ("compression method 12",), "damaged"),
        Case("encrypted_record", patch(base, data0["central"] + 8, "<H", 0x0009), ("record is encrypted",), "damaged"),
        Case("data_pkl_crc_mismatch", patch(base, pkl["central"] + 16, "<I", 0xDEADBEEF), ("CRC32 mismatch",), "damaged"),
        Case("zip64_marker_without_extra", patch(base, pkl["central"] + 24, "<I", 0xFFFFFFFF),
             ("zip64 sizes are missing",), "damaged"),
    ]
    # zipfile-built archives: duplicates, path tricks, no zip64 end records.
    plain = rezip(base)
    plain_lay = layout(plain)
    cases += [
        Case("eocd_zip64_markers_without_zip64", patch(plain, plain_lay.eocd + 16, "<I", 0xFFFFFFFF),
             ("zip64 markers but there is no zip64 end record",), "damaged"),
        Case("duplicate_data_pkl", rezip(base, extra=[("archive/data.pkl", proto2(pint(1)))]),
             ("appears twice in the central directory",), "damaged"),
        Case("duplicate_data_record", rezip(base, extra=[("archive/data/0", bytes(256))]),
             ("appears twice",), "damaged"),
        Case("name_dotdot", rezip(base, extra=[("archive/../../etc/passwd", b"x")]),
             ("climbs out of the archive", "archive/../../etc/passwd"), "damaged"),
        Case("name_dotdot_top", rezip(base, rename=lambda n: n.replace("archive/", "../", 1)),
             ("climbs out of the archive",), "damaged"),
        Case("name_absolute", rezip(base, extra=[("/etc/passwd", b"x")]), ("climbs out of the archive",), "damaged"),
        Case("name_backslash", rezip(base, extra=[("archive\\..\\evil", b"x")]), ("climbs out of the archive",), "damaged"),
        Case("name_dot_part", rezip(base, rename=lambda n: n.replace("archive/data/", "archive/./data/")),
             ("climbs out of the archive",), "damaged"),
        Case("no_data_pkl", rezip(base, lambda n, d: None if n.endswith("data.pkl") else d),
             ("no 'archive/data.pkl' record",), "damaged"),
        Case("no_top_folder", rezip(base, rename=lambda n: n.split("/", 1)[1]), ("not under a top folder",), "damaged"),
        Case("unknown_byteorder", rezip(base, lambda n, d: b"middle" if n.endswith("/byteorder") else d),
             ("unknown byte order",), "damaged"),
        Case("bzip2_records", rezip(base, compression=zipfile.ZIP_BZIP2), ("compression method 12",), "damaged"),
        Case("data_pkl_not_a_pickle", rezip(base, lambda n, d: b"hello" if n.endswith("data.pkl") else d),
             ("memo index 101 was never stored",), "damaged"),
        Case("data_pkl_empty", rezip(base, lambda n, d: b"" if n.endswith("data.pkl") else d), (TRUNCATED_PICKLE,), "damaged"),
    ]
    # Found by the fuzzers: names that are not plain text must come out the same on both backends.
    cases += [
        Case("name_empty", rezip(base, extra=[("", b"x")]), ("record name is empty",), "damaged"),
        Case("name_not_utf8_duplicate",
             rezip(base, extra=[("archive/dupX", b"1"), ("archive/dupX", b"2")]).replace(b"archive/dupX", b"archive/dup\xff"),
             ("appears twice in the central directory",), "damaged"),
    ]
    # Truncations of a legacy file: in each pickle, and in the storage data.
    legacy = real_legacy_checkpoint()
    for cut in (3, 12, 40, 120, 300, len(legacy) - 300, len(legacy) - 1):
        cases.append(Case(f"legacy_truncated_at_{cut}", legacy[:cut], (), "damaged", tags=("truncation", "legacy")))
    return cases


def _random(n: int, seed: int, avoid: tuple[bytes, ...] = ()) -> bytes:
    rng = random.Random(seed)
    while True:
        data = bytes(rng.randrange(256) for _ in range(n))
        if not any(data.startswith(prefix) for prefix in avoid) and b"PK\x05\x06" not in data:
            return data


def _cut(data: bytes, at: int, length: int) -> bytes:
    return data[:at] + data[at + length :]


def truncation_sweep(step: int = 1) -> list[Case]:
    """Every prefix (every ``step`` bytes) of a real zip and a real legacy file (slow)."""
    cases = []
    base = real_checkpoint()
    for cut in range(0, len(base), step):
        cases.append(Case(f"sweep_zip_{cut}", base[:cut], (), "damaged", slow=True, tags=("truncation",)))
    legacy = real_legacy_checkpoint()
    for cut in range(0, len(legacy), step):
        cases.append(Case(f"sweep_legacy_{cut}", legacy[:cut], (), "damaged", slow=True, tags=("truncation", "legacy")))
    return cases


# -- lying sizes ---------------------------------------------------------------------------


def lying_cases() -> list[Case]:
    big = 1 << 40
    cases = [
        Case("numel_larger_than_record", state_dict_zip([T("w", numel=1000)]),
             ("storage declares 1000 x 4-byte elements (4000 bytes) but the record holds 64",), "lying"),
        Case("numel_int64_max", state_dict_zip([T("w", numel=(1 << 63) - 1)]), ("but the record holds 64",), "lying"),
        Case("view_past_storage", state_dict_zip([T("w", size=(5, 5), stride=(5, 1))]),
             ("needs 100 bytes but storage '0' has 64", "key 'w'"), "lying"),
        Case("view_offset_past_storage", state_dict_zip([T("w", offset=15, size=(2,), stride=(1,))]),
             ("needs 68 bytes but storage '0' has 64",), "lying"),
        Case("view_stride_past_storage", state_dict_zip([T("w", size=(2, 2), stride=(100, 1))]),
             ("needs 408 bytes",), "lying"),
        Case("shape_product_overflows", state_dict_zip([T("w", size=(big, big, big), stride=(1, 1, 1))]),
             ("overflows int64",), "lying"),
        Case("stride_extent_overflows", state_dict_zip([T("w", size=(4, 4), stride=(1 << 62, 1 << 62))]),
             ("overflows int64",), "lying"),
        Case("offset_plus_extent_overflows", state_dict_zip([T("w", offset=(1 << 63) - 2, size=(4,), stride=(1,))]),
             ("overflows int64",), "lying"),
        Case("size_beyond_int64", state_dict_zip([T("w", size=(1 << 64,), stride=(1,))]),
             ("is not a non-negative 64-bit integer",), "lying"),
        Case("negative_numel", state_dict_zip([T("w", numel=-1)]), ("element count -1 is not a non-negative",), "lying"),
        Case("negative_size", state_dict_zip([T("w", size=(-4, 4))]), ("size -4 is not a non-negative",), "lying"),
        Case("negative_stride", state_dict_zip([T("w", stride=(-4, 1))]), ("stride -4 is not a non-negative",), "lying"),
        Case("negative_offset", state_dict_zip([T("w", offset=-8)]), ("storage offset -8 is not a non-negative",), "lying"),
        Case("size_stride_lengths_differ", state_dict_zip([T("w", size=(4, 4), stride=(1,))]), ("differ in length",), "lying"),
        Case("missing_data_record", state_dict_zip([T("w", storage_key="7")], records={"data/0": bytes(64)}),
             ("storage '7' has no record",), "lying"),
        Case("storage_key_dotdot", state_dict_zip([T("w", storage_key="../x")], records={"data/0": bytes(64)}),
             ("storage key '../x' is not a plain record name",), "lying"),
        Case("storage_key_subdir", state_dict_zip([T("w", storage_key="a/b")], records={"data/a/b": bytes(64)}),
             ("storage key 'a/b' is not a plain record name",), "lying"),
        Case("storage_key_empty", state_dict_zip([T("w", storage_key="")], records={"data/0": bytes(64)}),
             ("storage key '' is not a plain record name",), "lying"),
        Case("storage_key_dot", state_dict_zip([T("w", storage_key=".")], records={"data/0": bytes(64)}),
             ("storage key '.' is not a plain record name",), "lying"),
        Case("storage_key_absolute", state_dict_zip([T("w", storage_key="/etc/passwd")], records={"data/0": bytes(64)}),
             ("is not a plain record name",), "lying"),
        Case("storage_key_not_a_string", state_dict_zip([T("w", storage_key=None)], records={"data/0": bytes(64)}),
             ("storage key and location must be strings",), "lying"),
        Case("storage_type_not_a_storage", state_dict_zip([T("w", storage_type=("collections", "OrderedDict"))]),
             ("names no storage type",), "lying"),
        Case("storage_location_unknown", state_dict_zip([T("w", location="nowhere:0")]),
             ("cannot be restored to location 'nowhere:0'",), "lying"),
        Case("storage_location_not_a_string", state_dict_zip([T("w", location=7)]),
             ("storage key and location must be strings",), "lying"),
        Case("storage_numel_none", state_dict_zip([T("w", numel=None)]),
             ("element count None is not a non-negative 64-bit integer",), "lying"),
        Case("global_name_with_nul", torch_zip(proto2(glob2("torch._utils", "_rebuild\x00tensor_v2"))),
             ("refused global torch._utils._rebuild\x00tensor_v2", NOT_ALLOWLISTED), "lying", error="UnsafeCheckpointError"),
        Case("two_tensors_one_lies", state_dict_zip([T("ok"), T("bad", storage_key="1", numel=17)],
                                                    records={"data/0": bytes(64), "data/1": bytes(64)}),
             ("storage declares 17 x 4-byte elements",), "lying"),
    ]
    # The legacy format's own sizes.
    legacy_pickle = proto2(
        glob2("collections", "OrderedDict") + b")R(" + pstr("w") + glob2("torch._utils", "_rebuild_tensor_v2")
        + b"(" + ptuple(pstr("storage"), glob2("torch", "FloatStorage"), pstr("0"), pstr("cpu"), pint(16)) + b"Q"
        + pint(0) + b"(" + pint(16) + b"t(" + pint(1) + b"t\x89" + glob2("collections", "OrderedDict") + b")Rt" + b"Ru"
    )
    cases += [
        Case("legacy_count_disagrees", legacy_file(legacy_pickle, [("0", 17, bytes(64))]),
             ("storage '0' has 17 elements in the file but the pickle declares 16",), "lying", tags=("legacy",)),
        Case("legacy_negative_count", legacy_file(legacy_pickle, [("0", -1, bytes(64))]),
             ("has -1 elements in the file",), "lying", tags=("legacy",)),
        Case("legacy_data_past_eof", legacy_file(legacy_pickle, [("0", 16, bytes(10))]), (PAST_END,), "lying",
             tags=("legacy",)),
        Case("legacy_unused_storage_key", legacy_file(legacy_pickle, [("0", 16, bytes(64)), ("9", 1, bytes(4))]),
             ("stores data for storage '9' that nothing uses",), "lying", tags=("legacy",)),
        Case("legacy_missing_storage", legacy_file(legacy_pickle, [], keys=[]), ("has no data for storage '0'",), "lying",
             tags=("legacy",)),
        Case("legacy_key_list_not_strings", _legacy_with_raw_keys(legacy_pickle, proto2(plist(pint(0)))),
             ("legacy storage key list is not a list of strings",), "lying", tags=("legacy",)),
        Case("legacy_wrong_magic", proto2(pint(LEGACY_MAGIC + 1)) + proto2(pint(1001)), ("wrong magic number",), "lying",
             tags=("legacy",)),
        Case("legacy_wrong_protocol", proto2(pint(LEGACY_MAGIC)) + proto2(pint(1000)), ("unsupported legacy protocol",),
             "lying", tags=("legacy",)),
        Case("legacy_persistent_id_in_header", proto2(pint(LEGACY_MAGIC)) + proto2(pint(1001))
             + proto2(ptuple(pstr("storage"), glob2("torch", "FloatStorage"), pstr("0"), pstr("cpu"), pint(1)) + b"Q"),
             ("persistent id in a legacy header pickle",), "lying", error="UnsafeCheckpointError", tags=("legacy",)),
    ]
    return cases


def _storage_pid(key: str, numel: int, storage_type: tuple[str, str] = ("torch", "FloatStorage")) -> bytes:
    return ptuple(pstr("storage"), glob2(*storage_type), pstr(key), pstr("cpu"), pint(numel)) + b"Q"


def _ints(*values: int) -> bytes:
    return b"(" + b"".join(pint(v) for v in values) + b"t"


def _tensor_v2(key: str, numel: int, size: tuple, stride: tuple, storage_type=("torch", "FloatStorage")) -> bytes:
    return (glob2("torch._utils", "_rebuild_tensor_v2") + b"(" + _storage_pid(key, numel, storage_type) + pint(0)
            + _ints(*size) + _ints(*stride) + b"\x89" + glob2("collections", "OrderedDict") + b")RtR")


def allowlisted_rebuild_cases() -> list[Case]:
    """torch's other allowlisted rebuild functions, called with arguments that lie.

    pyckpt hands these to torch's own functions (as torch.load does); torch must refuse the
    lie, and pyckpt must report that as a CheckpointError naming the function.
    """
    long_type = ("torch", "LongStorage")
    qtensor = (
        glob2("torch._utils", "_rebuild_qtensor") + b"(" + _storage_pid("0", 4, ("torch", "QUInt8Storage")) + pint(0)
        + _ints(1 << 31) + _ints(1) + b"(" + glob2("torch", "per_tensor_affine") + b"G?\xb9\x99\x99\x99\x99\x99\x9a"
        + pint(0) + b"t\x89" + glob2("collections", "OrderedDict") + b")RtR"
    )
    meta = glob2("torch._utils", "_rebuild_meta_tensor_no_storage") + b"(" + glob2("torch", "float32") + _ints(1 << 62, 1 << 62) + _ints(1, 1) + b"\x89tR"
    nested = (
        glob2("torch._utils", "_rebuild_nested_tensor") + b"(" + _tensor_v2("0", 4, (4,), (1,))
        + _tensor_v2("1", 2, (1, 2), (2, 1), long_type) + _tensor_v2("2", 2, (1, 2), (2, 1), long_type)
        + _tensor_v2("3", 1, (1,), (1,), long_type) + b"tR"
    )
    records = {"data/0": bytes(16), "data/1": (1000).to_bytes(8, "little") * 2, "data/2": (1).to_bytes(8, "little") * 2,
               "data/3": bytes(8)}
    return [
        Case("qtensor_size_lies", torch_zip(proto2(qtensor), records), ("_rebuild_qtensor failed", "out of bounds for storage"), "lying"),
        Case("meta_tensor_numel_overflows", torch_zip(proto2(meta), records),
             ("_rebuild_meta_tensor_no_storage failed", "overflow"), "lying"),
        Case("nested_tensor_sizes_lie", torch_zip(proto2(nested), records),
             ("_rebuild_nested_tensor failed", "out of bounds for storage"), "lying"),
    ]


def _legacy_with_raw_keys(object_pickle: bytes, keys_pickle: bytes) -> bytes:
    head = legacy_file(object_pickle, [], keys=[])
    empty_keys = proto2(plist())
    assert head.endswith(empty_keys)
    return head[: -len(empty_keys)] + keys_pickle


# -- resource attacks ---------------------------------------------------------------------------


def deflate_bomb(total: int, *, chunk: int = 64 << 20) -> bytes:
    """A raw DEFLATE stream of ``total`` zero bytes (~1000:1), built without inflating it.

    A block compressed with a full flush is independent of what precedes it, so one
    compressed chunk repeated is a valid stream; an empty final block ends it.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(total, chunk)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    ending = tail.compress(bytes(rest)) + tail.flush()
    return piece * count + ending


def deflated_zip(records: dict[str, bytes], *, raw_streams: dict[str, tuple[bytes, int, int]] | None = None) -> bytes:
    """A zip whose ``raw_streams`` records are given as (deflate stream, declared size, crc).

    The other records are written normally (stored). The declared sizes are written as given:
    this is how a bomb lies about what it inflates to.
    """
    out = io.BytesIO()
    central = []
    for name, data in records.items():
        stream = raw_streams.get(name) if raw_streams else None
        if stream is None:
            method, payload, size, crc = 0, data, len(data), zlib.crc32(data)
        else:
            method, (payload, size, crc) = 8, stream
        raw_name = name.encode()
        header_offset = out.tell()
        zip64 = size >= 0xFFFFFFFF or len(payload) >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, len(payload)) if zip64 else b""
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, method, 0, 0, crc,
                              0xFFFFFFFF if zip64 else len(payload), 0xFFFFFFFF if zip64 else size, len(raw_name), len(extra)))
        out.write(raw_name + extra + payload)
        central.append((raw_name, method, crc, len(payload), size, header_offset, zip64))
    cd_offset = out.tell()
    for raw_name, method, crc, compressed, size, header_offset, zip64 in central:
        extra = struct.pack("<HHQQ", 1, 16, size, compressed) if zip64 else b""
        out.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, method, 0, 0, crc,
                              0xFFFFFFFF if zip64 else compressed, 0xFFFFFFFF if zip64 else size,
                              len(raw_name), len(extra), 0, 0, 0, 0, header_offset))
        out.write(raw_name + extra)
    cd_size = out.tell() - cd_offset
    zip64_offset = out.tell()
    out.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, len(central), len(central), cd_size, cd_offset))
    out.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_offset, 1))
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    return out.getvalue()


@functools.lru_cache(maxsize=4)
def _bomb(total: int) -> bytes:
    return deflate_bomb(total)


def bomb_cases() -> list[Case]:
    gib = 1 << 30
    bomb = _bomb(5 * gib)  # ~5 MB of DEFLATE that inflates to 5 GiB of zeros
    small_pickle = state_dict_pickle([T("w", numel=1024, size=(1024,), stride=(1,))])
    cases = [
        # The storage record claims 4 KiB but its stream inflates to 5 GiB.
        Case("deflate_bomb_storage_declares_4k",
             deflated_zip({"archive/data.pkl": small_pickle, "archive/byteorder": b"little", "archive/data/0": b""},
                          raw_streams={"archive/data/0": (bomb, 4096, 0)}),
             ("inflates past the 4096 bytes it declares",), "resource", tags=("bomb",)),
        # data.pkl is the bomb and claims to be small.
        Case("deflate_bomb_data_pkl_declares_small",
             deflated_zip({"archive/data.pkl": b"", "archive/byteorder": b"little"},
                          raw_streams={"archive/data.pkl": (bomb, 100, 0)}),
             ("inflates past the 100 bytes it declares",), "resource", tags=("bomb",)),
        # data.pkl claims 5 GiB: refused before inflating anything.
        Case("deflate_bomb_data_pkl_declares_5g",
             deflated_zip({"archive/data.pkl": b"", "archive/byteorder": b"little"},
                          raw_streams={"archive/data.pkl": (bomb, 5 * gib, 0)}),
             ("record declares 5368709120 bytes, more than the 2147483648 allowed",), "resource", tags=("bomb",)),
        # A declared size beyond what DEFLATE can reach from the stored bytes.
        Case("deflate_ratio_impossible",
             deflated_zip({"archive/data.pkl": b"", "archive/byteorder": b"little"},
                          raw_streams={"archive/data.pkl": (zlib.compress(proto2(pint(1)))[2:-4], 1 << 40, 0)}),
             ("beyond deflate's limit",), "resource", tags=("bomb",)),
        # The storage honestly declares 5 GiB: more than the memory limit the tests run under.
        Case("deflate_bomb_storage_declares_5g",
             deflated_zip({"archive/data.pkl": state_dict_pickle([T("w", numel=5 * gib // 4, size=(4,), stride=(1,))]),
                           "archive/byteorder": b"little", "archive/data/0": b""},
                          raw_streams={"archive/data/0": (bomb, 5 * gib, 0)}),
             ("cannot allocate 5368709120 bytes",), "resource", tags=("bomb", "needs_rlimit")),
    ]
    return cases


DEEP = 100_000


def _deep_pickles() -> dict[str, bytes]:
    n = DEEP
    lists = b"]" * n + pint(1) + b"a" * n
    tuples = b")" + b"\x85" * n
    dicts = (b"}" + pint(0)) * n + b"}" + b"s" * n
    # Built inner-first through the memo: every container is already complete when the
    # next one takes it, so no stack of pending containers gives the depth away.
    inner_first = bytearray(b"}q\x00")
    for i in range(1, 2000):
        inner_first += b"}" + pint(0) + b"h" + bytes([(i - 1) % 256]) + b"s" + b"q" + bytes([i % 256])
    mixed = (b"]" + b"}" + pint(0)) * (n // 2) + pint(1) + (b"\x85" + b"s" + b"a") * (n // 2)
    return {
        "lists": proto2(lists),
        "tuples": proto2(tuples),
        "dicts": proto2(dicts),
        "dicts_inner_first": proto2(bytes(inner_first)),
        "mixed": proto2(mixed),
    }


def deflate_repeated(head: bytes, unit: bytes, count: int, tail: bytes) -> tuple[bytes, int, int]:
    """A raw DEFLATE stream of ``head + unit * count + tail`` built without holding it.

    Returns (stream, size, crc). Like :func:`deflate_bomb`, a chunk compressed with a full
    flush is repeated; its CRC is combined arithmetic-free by running zlib.crc32 over the
    chunk as many times (fast: the chunk is a few MiB).
    """
    per_chunk = max(1, (4 << 20) // len(unit))
    chunk = unit * per_chunk
    full, rest = divmod(count, per_chunk)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)]
    repeated = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = repeated.compress(chunk) + repeated.flush(zlib.Z_FULL_FLUSH)
    parts.append(piece * full)
    ending = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts.append(ending.compress(unit * rest + tail) + ending.flush())
    crc = zlib.crc32(head)
    for _ in range(full):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(unit * rest + tail, crc)
    return b"".join(parts), len(head) + len(unit) * count + len(tail), crc


@functools.lru_cache(maxsize=1)
def huge_list_pickle_zip() -> bytes:
    """A 300 KB file whose data.pkl (300 MB inflated) builds one list of 10**8 elements."""
    stream = deflate_repeated(b"\x80\x02]", b"K\x01a", 10**8, b".")
    return deflated_zip({"archive/data.pkl": b"", "archive/byteorder": b"little"},
                        raw_streams={"archive/data.pkl": stream})


def resource_cases() -> list[Case]:
    cases = [
        # Every value pushed counts against a limit, for a compressed pickle 16 per byte it
        # occupies in the file: refused after ~5 million values, not after exhausting memory.
        Case("huge_list_deflated", huge_list_pickle_zip(), ("pickle pushes more than", "values"), "resource",
             tags=("bomb",)),
    ]
    for name, pickle_bytes in _deep_pickles().items():
        cases.append(Case(f"deep_{name}_zip", torch_zip(pickle_bytes), (NESTS,), "resource", tags=("deep",)))
        cases.append(Case(f"deep_{name}_legacy", legacy_file(pickle_bytes), (NESTS,), "resource", tags=("deep", "legacy")))
    opcode = lambda body: torch_zip(body)  # noqa: E731
    cases += [
        Case("unknown_opcode_ff", opcode(proto2(b"\xff")), (REFUSED_OPCODE, "0xff"), "resource", error="UnsafeCheckpointError"),
        Case("unknown_opcode_nul", opcode(proto2(b"\x00")), (REFUSED_OPCODE, "0x00"), "resource", error="UnsafeCheckpointError"),
        Case("pop_opcode", opcode(proto2(pint(1) + pint(2) + b"0")), (REFUSED_OPCODE, "0x30"), "resource",
             error="UnsafeCheckpointError"),
        Case("dup_opcode", opcode(proto2(b"]2")), (REFUSED_OPCODE, "0x32"), "resource", error="UnsafeCheckpointError"),
        Case("text_int_opcode", opcode(proto2(b"I1\n")), (REFUSED_OPCODE, "0x49"), "resource", error="UnsafeCheckpointError"),
        Case("missing_stop", opcode(b"\x80\x02" + pint(1)), (TRUNCATED_PICKLE,), "resource", error="TruncatedCheckpointError"),
        Case("missing_stop_in_container", opcode(b"\x80\x02}(" + pstr("a") + pint(1)), (TRUNCATED_PICKLE,), "resource",
             error="TruncatedCheckpointError"),
        Case("stop_on_empty_stack", opcode(b"\x80\x02."), ("stack underflow",), "resource"),
        Case("memo_index_never_stored", opcode(proto2(b"h\x05")), ("memo index 5 was never stored",), "resource"),
        Case("long_memo_index_never_stored", opcode(proto2(b"j\xff\xff\xff\xff")), ("memo index 4294967295 was never stored",),
             "resource"),
        Case("memo_put_on_empty_stack", opcode(proto2(b"q\x00" + pint(1))), ("stack underflow",), "resource"),
        Case("huge_binunicode_length", opcode(b"\x80\x02X\xf0\xff\xff\xff" + b"abc."), (TRUNCATED_PICKLE,), "resource",
             error="TruncatedCheckpointError"),
        Case("huge_binunicode8_length", opcode(b"\x80\x02\x8d" + struct.pack("<Q", 1 << 62) + b"abc."), (REFUSED_OPCODE, "0x8d"),
             "resource", error="UnsafeCheckpointError"),
        Case("huge_binbytes_length", opcode(b"\x80\x03B\xf0\xff\xff\xff" + b"abc."), (REFUSED_OPCODE, "0x42"), "resource",
             error="UnsafeCheckpointError"),
        Case("huge_long4", opcode(b"\x80\x02\x8b\xff\xff\xff\x7f" + b"."), (REFUSED_OPCODE, "0x8b"), "resource",
             error="UnsafeCheckpointError"),
        Case("global_name_unterminated", opcode(b"\x80\x02ctorch._utils" + b"x" * 5000), ("not terminated within 1024 bytes",),
             "resource"),
        Case("bytearray_10e12", opcode(proto2(glob2("builtins", "bytearray") + pint(10**12) + b"\x85R")),
             ("bytearray is only accepted over bytes or a latin1 string",), "resource"),
        Case("bytearray_py2_name", opcode(proto2(glob2("__builtin__", "bytearray") + pint(1 << 40) + b"\x85R")),
             ("bytearray is only accepted",), "resource"),
        Case("many_marks", opcode(b"\x80\x02" + b"(" * 1_000_000), (TRUNCATED_PICKLE,), "resource",
             error="TruncatedCheckpointError"),
        Case("many_memo_entries", opcode(b"\x80\x02" + pint(1) + b"".join(b"r" + struct.pack("<I", i) for i in range(0, 1 << 32, 1 << 14))),
             (TRUNCATED_PICKLE,), "resource", error="TruncatedCheckpointError"),
        Case("set_from_huge_list", opcode(proto2(glob2("builtins", "set") + b"]" + b"(" + pint(1) * 200_000 + b"e\x85R"
                                                 + b"q\x00" + b"h\x00" * 10 + b"t")),
             (), "resource"),
    ]
    for codec in ("zlib", "zlib_codec", "bz2", "base64", "hex", "rot13", "utf-16", "uu", "punycode"):
        cases.append(Case(f"codecs_encode_{codec}",
                          opcode(proto2(glob2("_codecs", "encode") + pstr("x" * 64) + pstr(codec) + b"\x86R")),
                          ("_codecs.encode is only accepted as encode(str, 'latin1')",), "resource"))
    return cases


# =========================================================================================
# The corpus
# =========================================================================================


def safetensors_file(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file: the header (JSON of a dict, or raw bytes) and the data, as written."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _f32(offsets: list[int], shape: list[int] | None = None, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [(offsets[1] - offsets[0]) // 4],
            "data_offsets": offsets}


def safetensors_cases() -> list[Case]:
    """safetensors headers that lie; each is refused before a tensor byte is read."""
    data = bytes(range(64))
    return [
        Case("st_offsets_overlap", safetensors_file({"a": _f32([0, 16]), "b": _f32([8, 24])}, data[:24]),
             ("'b'", "overlaps the tensor before it"), "lying"),
        Case("st_offsets_gap", safetensors_file({"a": _f32([0, 16]), "b": _f32([20, 36])}, data[:36]),
             ("'b'", "leaves 4 bytes unused before it"), "lying"),
        Case("st_offsets_past_end", safetensors_file({"a": _f32([0, 16]), "b": _f32([16, 64])}, data[:24]),
             ("'b'", "run past the end of the data (24 bytes)"), "lying"),
        Case("st_data_after_last_tensor", safetensors_file({"a": _f32([0, 16])}, data[:24]),
             ("the tensors' data ends at 16 but the file holds 24 bytes of data",), "lying"),
        Case("st_unknown_dtype", safetensors_file({"a": _f32([0, 16], dtype="F33")}, data[:16]),
             ("'a'", "unknown safetensors dtype 'F33'"), "lying"),
        Case("st_shape_mismatch", safetensors_file({"a": _f32([0, 16], shape=[5])}, data[:16]),
             ("'a'", "shape [5] of F32 needs 20 bytes but data_offsets [0, 16] give 16"), "lying"),
        Case("st_shape_huge", safetensors_file({"a": _f32([0, 16], shape=[1 << 40, 1 << 40])}, data[:16]),
             ("'a'", "needs 4835703278458516698824704 bytes"), "lying"),
        Case("st_shape_negative", safetensors_file({"a": _f32([0, 16], shape=[-4])}, data[:16]),
             ("'a'", "is not a list of non-negative integers"), "lying"),
        Case("st_offsets_reversed", safetensors_file({"a": _f32([16, 0], shape=[0])}, data[:16]),
             ("'a'", "are not [begin, end] with 0 <= begin <= end"), "lying"),
        Case("st_header_over_limit", struct.pack("<Q", 100_000_001) + b"{" + bytes(64),
             ("safetensors header declares 100000001 bytes, over the 100000000 byte limit",), "resource"),
        Case("st_header_past_eof", struct.pack("<Q", 4096) + b'{"a": 1}',
             ("safetensors header declares 4096 bytes but the file holds 8",), "damaged"),
        Case("st_header_not_json", safetensors_file(b'{"a": {"dtype": "F32", '), ("safetensors header is not valid JSON",),
             "damaged"),
        Case("st_header_not_utf8", safetensors_file(b'{"\xff": 1}'), ("safetensors header is not valid JSON",), "damaged"),
        Case("st_header_deep", safetensors_file(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
             ("safetensors header nests too deeply",), "resource"),
        Case("st_duplicate_keys",
             safetensors_file(b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                              b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}', data[:32]),
             ("safetensors header names 'a' twice",), "lying"),
        Case("st_metadata_not_strings", safetensors_file({"__metadata__": {"epoch": 3}, "a": _f32([0, 16])}, data[:16]),
             ("safetensors __metadata__ must map names to strings",), "lying"),
        Case("st_entry_extra_field", safetensors_file({"a": {**_f32([0, 16]), "offset": 0}}, data[:16]),
             ("'a'", "header entry must hold exactly dtype, shape and data_offsets"), "lying"),
    ]


def build_cases(sentinel_dir: str = DEFAULT_SENTINEL_DIR, *, include_bombs: bool = True) -> list[Case]:
    cases = code_cases(sentinel_dir) + damaged_cases() + lying_cases() + allowlisted_rebuild_cases() + resource_cases()
    cases += safetensors_cases()
    if include_bombs:
        cases += bomb_cases()
    names = [case.name for case in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"duplicate case names: {sorted(duplicates)}"
    return cases


def small_cases(limit: int = 64 << 10) -> list[Case]:
    """The cases small enough to seed a fuzzer (default sentinel directory)."""
    return [case for case in build_cases(include_bombs=False) if len(case.data) <= limit]


def write_corpus(directory: str, sentinel_dir: str = DEFAULT_SENTINEL_DIR, cases: list[Case] | None = None) -> list[tuple[Case, str]]:
    os.makedirs(directory, exist_ok=True)
    written = []
    for case in cases if cases is not None else build_cases(sentinel_dir):
        path = os.path.join(directory, case.filename)
        with open(path, "wb") as f:
            f.write(case.data)
        written.append((case, path))
    return written


# =========================================================================================
# Running hostile loads in a contained process
# =========================================================================================

RUNNER = r"""
import json, os, resource, signal, sys, traceback
job = json.load(open(sys.argv[1]))
limit = job["address_space"]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import io, warnings
warnings.simplefilter("ignore")
import torch
import pyckpt
from pyckpt._backend import use_backend

class Hang(Exception):
    pass

def alarm(signum, frame):
    raise Hang()

signal.signal(signal.SIGALRM, alarm)
out = open(job["out"], "a", buffering=1)
with use_backend(job["backend"]):
    for item in job["items"]:
        out.write(json.dumps({"start": item["id"]}) + "\n")
        result = {"id": item["id"]}
        signal.alarm(job["case_timeout"])
        try:
            if item["mode"] == "path":
                value = pyckpt.load(item["path"])
            elif item["mode"] == "opaque":
                value = pyckpt.load(item["path"], unknown_globals="opaque")
            elif item["mode"] == "abort":  # self-test of the containment
                os.abort()
            elif item["mode"] == "sleep":
                import time
                time.sleep(10**6)
            elif item["mode"] == "allocate":
                value = bytearray(item["size"])
            elif item["mode"] == "buffer":
                with open(item["path"], "rb") as f:
                    value = pyckpt.load(io.BytesIO(f.read()))
            else:
                model = torch.nn.Linear(4, 4)
                value = pyckpt.load_state_dict(model, item["path"])
            result.update(kind="ok", value=repr(value)[:200])
        except pyckpt.CheckpointError as exc:
            result.update(kind="error", classes=[c.__name__ for c in type(exc).__mro__], message=str(exc))
        except Hang:
            result.update(kind="hang")
        except BaseException as exc:
            result.update(kind="other", classes=[c.__name__ for c in type(exc).__mro__], message=str(exc)[:2000],
                          traceback=traceback.format_exc()[-4000:])
        finally:
            signal.alarm(0)
        out.write(json.dumps(result) + "\n")
    out.write(json.dumps({"done": True, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}) + "\n")
"""


def run_contained(
    backend: str,
    items: list[dict],
    workdir: str,
    *,
    address_space: int = 3 << 30,
    case_timeout: int = 60,
    batch_timeout: int = 900,
) -> tuple[dict[str, dict], int]:
    """Load each item (``id``, ``path``, ``mode`` = path | buffer | opaque | state_dict) in a child
    process under ``RLIMIT_AS``; a child that dies (signal, abort) or hangs is blamed on the
    item it was loading and the rest run in a fresh child. Returns (results by id, peak RSS KiB).
    """
    import json
    import subprocess
    import sys

    os.makedirs(workdir, exist_ok=True)
    runner = os.path.join(workdir, "runner.py")
    with open(runner, "w") as f:
        f.write(RUNNER)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), tests_dir, os.environ.get("PYTHONPATH", "")]))
    results: dict[str, dict] = {}
    pending = list(items)
    peak = 0
    round_number = 0
    while pending:
        round_number += 1
        out = os.path.join(workdir, f"{backend}-{round_number}.jsonl")
        job = os.path.join(workdir, f"{backend}-{round_number}.json")
        with open(job, "w") as f:
            json.dump({"backend": backend, "items": pending, "out": out, "address_space": address_space,
                       "case_timeout": case_timeout}, f)
        try:
            proc = subprocess.run([sys.executable, runner, job], env=env, capture_output=True, text=True,
                                  timeout=batch_timeout)
            returncode, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            returncode, stderr = None, (exc.stderr or b"").decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        started = None
        done = False
        if os.path.exists(out):
            with open(out) as f:
                for line in f:
                    record = json.loads(line)
                    if "start" in record:
                        started = record["start"]
                    elif "done" in record:
                        done = True
                        peak = max(peak, record["maxrss_kb"])
                    else:
                        results[record["id"]] = record
                        started = None
        if done:
            break
        if started is None:
            # The child died before it started any item: nothing to blame, report it on all.
            for item in pending:
                results[item["id"]] = {"id": item["id"], "kind": "crash", "returncode": returncode, "stderr": stderr[-4000:]}
            break
        kind = "hang" if returncode is None else "crash"
        results[started] = {"id": started, "kind": kind, "returncode": returncode, "stderr": stderr[-4000:]}
        pending = [item for item in pending if item["id"] not in results]
    return results, peak


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "attack-corpus"
    written = write_corpus(target)
    print(f"wrote {len(written)} cases to {target}")
