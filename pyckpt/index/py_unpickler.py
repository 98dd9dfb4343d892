"""The pure-Python restricted unpickler (the fallback backend's VM).

It accepts exactly the opcodes of torch's weights-only unpickler (protocol 2 plus
EMPTY_SET) and hands every call, build and persistent id to the shared
:class:`~pyckpt.index.interpret.Interpreter`. It never imports or calls anything named by
the file. ``csrc/index/pickle_vm.cpp`` is the native twin; keep them in step.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from typing import Any

from ..errors import CheckpointError, TruncatedCheckpointError, UnsafeCheckpointError
from .interpret import REFUSED_BUILD, Interpreter


_unpack_i32 = struct.Struct("<i").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from
_unpack_u16 = struct.Struct("<H").unpack_from
_unpack_f64 = struct.Struct(">d").unpack_from


TRUNCATED = "pickle is truncated (no STOP before the end of the data)"


def unpickle(data: bytes | memoryview, interpreter: Interpreter, *, start: int = 0) -> tuple[Any, int]:
    """Run the restricted VM over ``data[start:]``; returns the object and the offset after STOP."""
    data = bytes(data) if not isinstance(data, bytes) else data
    try:
        return _run(data, interpreter, start)
    except CheckpointError as exc:
        raise exc
    except (IndexError, struct.error):
        raise TruncatedCheckpointError(TRUNCATED) from None
    except RecursionError:
        raise CheckpointError("pickle nests too deeply") from None


def _run(data: bytes, interp: Interpreter, pos: int) -> tuple[Any, int]:
    end = len(data)
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    marks: list[int] = []

    def fail(message: str, at: int) -> CheckpointError:
        return CheckpointError(f"bad pickle at offset {at}: {message}")

    def pop(at: int) -> Any:
        if not stack or (marks and len(stack) <= marks[-1]):
            raise fail("stack underflow", at)
        return stack.pop()

    def top(at: int) -> Any:
        if not stack or (marks and len(stack) <= marks[-1]):
            raise fail("stack underflow", at)
        return stack[-1]

    def pop_mark(at: int) -> list[Any]:
        if not marks:
            raise fail("no MARK on the stack", at)
        base = marks.pop()
        items = stack[base:]
        del stack[base:]
        return items

    def take(n: int, at: int) -> bytes:
        nonlocal pos
        if n > end - pos:
            raise TruncatedCheckpointError(TRUNCATED)
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    def read_line(at: int) -> str:
        nonlocal pos
        newline = data.find(b"\n", pos, min(end, pos + 1024))
        if newline < 0:
            raise fail("GLOBAL name is not terminated within 1024 bytes", at)
        raw = data[pos:newline]
        pos = newline + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise fail("GLOBAL name is not UTF-8", at) from None

    def callable_name(func: Any, at: int, op: str) -> str:
        name = interp.global_name(func)
        if name is None:
            raise UnsafeCheckpointError(f"refused {op} at offset {at}: the callable is not an allowlisted global")
        return name

    while True:
        if pos >= end:
            raise TruncatedCheckpointError(TRUNCATED)
        at = pos
        op = data[pos]
        pos += 1
        if op == 0x71:  # BINPUT
            memo[take(1, at)[0]] = top(at)
        elif op == 0x68:  # BINGET
            index = take(1, at)[0]
            if index not in memo:
                raise fail(f"memo index {index} was never stored", at)
            stack.append(memo[index])
        elif op == 0x58:  # BINUNICODE
            (n,) = _unpack_u32(take(4, at))
            try:
                stack.append(take(n, at).decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                raise fail("string is not valid UTF-8", at) from None
        elif op == 0x4B:  # BININT1
            stack.append(take(1, at)[0])
        elif op == 0x28:  # MARK
            marks.append(len(stack))
        elif op == 0x74:  # TUPLE
            stack.append(tuple(pop_mark(at)))
        elif op == 0x85:  # TUPLE1
            stack.append((pop(at),))
        elif op == 0x86:  # TUPLE2
            b = pop(at)
            stack.append((pop(at), b))
        elif op == 0x87:  # TUPLE3
            c = pop(at)
            b = pop(at)
            stack.append((pop(at), b, c))
        elif op == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif op == 0x63:  # GLOBAL
            module = read_line(at)
            name = read_line(at)
            stack.append(interp.resolve_global(interp.check_global(module, name)))
        elif op == 0x52:  # REDUCE
            args = pop(at)
            func = pop(at)
            stack.append(interp.call_at(callable_name(func, at, "REDUCE"), args, False, at))
        elif op == 0x81:  # NEWOBJ
            args = pop(at)
            cls = pop(at)
            stack.append(interp.call_at(callable_name(cls, at, "NEWOBJ"), args, True, at))
        elif op == 0x51:  # BINPERSID
            pid = pop(at)
            stack.append(interp.persistent_at(pid, at))
        elif op == 0x62:  # BUILD
            state = pop(at)
            target = top(at)
            if not _buildable(target):
                raise UnsafeCheckpointError(f"{REFUSED_BUILD} (pickle offset {at})")
            interp.build_at(target, state, at)
        elif op == 0x4E:  # NONE
            stack.append(None)
        elif op == 0x88:  # NEWTRUE
            stack.append(True)
        elif op == 0x89:  # NEWFALSE
            stack.append(False)
        elif op == 0x4A:  # BININT
            stack.append(_unpack_i32(take(4, at))[0])
        elif op == 0x4D:  # BININT2
            stack.append(_unpack_u16(take(2, at))[0])
        elif op == 0x8A:  # LONG1
            n = take(1, at)[0]
            stack.append(int.from_bytes(take(n, at), "little", signed=True))
        elif op == 0x47:  # BINFLOAT
            stack.append(_unpack_f64(take(8, at))[0])
        elif op == 0x55:  # SHORT_BINSTRING
            n = take(1, at)[0]
            try:
                stack.append(take(n, at).decode("utf-8"))
            except UnicodeDecodeError:
                raise fail("string is not valid UTF-8", at) from None
        elif op == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif op == 0x61:  # APPEND
            item = pop(at)
            target = top(at)
            if type(target) is not list:
                raise fail("APPEND to something that is not a list", at)
            target.append(item)
        elif op == 0x65:  # APPENDS
            items = pop_mark(at)
            target = top(at)
            if type(target) is not list:
                raise fail("APPENDS to something that is not a list", at)
            target.extend(items)
        elif op == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif op == 0x73:  # SETITEM
            value = pop(at)
            key = pop(at)
            _set_items(top(at), [key, value], at, fail)
        elif op == 0x75:  # SETITEMS
            items = pop_mark(at)
            _set_items(top(at), items, at, fail)
        elif op == 0x8F:  # EMPTY_SET
            stack.append(set())
        elif op == 0x6A:  # LONG_BINGET
            (index,) = _unpack_u32(take(4, at))
            if index not in memo:
                raise fail(f"memo index {index} was never stored", at)
            stack.append(memo[index])
        elif op == 0x72:  # LONG_BINPUT
            (index,) = _unpack_u32(take(4, at))
            memo[index] = top(at)
        elif op == 0x80:  # PROTO
            take(1, at)
        elif op == 0x2E:  # STOP
            result = pop(at)
            return result, pos
        else:
            raise UnsafeCheckpointError(
                f"refused opcode 0x{op:02x} at offset {at}: not one of the protocol-2 opcodes "
                "that torch's weights_only unpickler accepts"
            )


def _buildable(target: Any) -> bool:
    """What may receive BUILD at all; the interpreter decides the rest (as the native VM)."""
    return type(target) in (OrderedDict, Counter) or not isinstance(target, _PLAIN_VALUES)


_PLAIN_VALUES = (type(None), bool, int, float, str, bytes, bytearray, complex, list, tuple, dict, set)


def _set_items(target: Any, items: list[Any], at: int, fail: Any) -> None:
    if not isinstance(target, dict):
        raise fail("SETITEM on something that is not a dict", at)
    if len(items) % 2:
        raise fail("SETITEMS with an odd number of items", at)
    for i in range(0, len(items), 2):
        try:
            target[items[i]] = items[i + 1]
        except TypeError:
            raise CheckpointError(
                f"bad pickle: dict key of type {type(items[i]).__name__} is not hashable"
            ) from None
