"""The pure-Python restricted unpickler (the fallback backend's VM).

By default it accepts exactly the opcodes of torch's weights-only unpickler (protocol 2
plus EMPTY_SET); in opaque mode also those of protocols 3 to 5. It hands every call, build
and persistent id to the shared :class:`~pyckpt.index.interpret.Interpreter`, never imports
or calls anything named by the file, and stops a pickle that pushes more values than the
policy allows (which bounds the stack, the memo and every container). ``csrc/index/pickle_vm.cpp`` is the native twin; keep them in step.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from typing import Any

from ..errors import CheckpointError, TruncatedCheckpointError, UnsafeCheckpointError
from .interpret import REFUSED_BUILD, Interpreter
from .opaque import Opaque


_unpack_i32 = struct.Struct("<i").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from
_unpack_u16 = struct.Struct("<H").unpack_from
_unpack_u64 = struct.Struct("<Q").unpack_from
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


# Opcodes every pickle created by Python 3's pickler may hold beyond torch's protocol-2 set
# (protocols 3 to 5, and the stack opcodes of protocol 1). Only opaque mode accepts them:
# the default mode refuses whatever torch's weights_only unpickler refuses.
OPAQUE_ONLY_OPCODES = frozenset(
    {0x8C, 0x8D, 0x42, 0x43, 0x8E, 0x96, 0x93, 0x94, 0x95, 0x92, 0x90, 0x91, 0x8B, 0x30, 0x31, 0x32, 0x54}
)
MAX_LONG_BYTES = 1 << 20  # a LONG4 integer of more than 8 million bits is refused


def _run(data: bytes, interp: Interpreter, pos: int) -> tuple[Any, int]:
    end = len(data)
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    marks: list[int] = []
    policy = interp.policy
    opaque_mode = policy.opaque
    max_values = policy.max_objects
    values_pushed = 0  # onto the stack or into the memo: every container item was pushed once

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
        popped = stack[base:]
        del stack[base:]
        return popped

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

    def text(n: int, at: int, errors: str = "surrogatepass") -> str:
        try:
            return take(n, at).decode("utf-8", errors)
        except UnicodeDecodeError:
            raise fail("string is not valid UTF-8", at) from None

    def callable_value(func: Any, at: int, op: str) -> Any:
        if interp.global_name(func) is None and not (opaque_mode and isinstance(func, Opaque)):
            raise UnsafeCheckpointError(f"refused {op} at offset {at}: the callable is not an allowlisted global")
        return func

    def append_to(target: Any, values: list[Any], at: int, op: str) -> None:
        if type(target) is list:
            target.extend(values)
        elif isinstance(target, Opaque):
            interp.extend_at(target, values, at)
        else:
            raise fail(f"{op} to something that is not a list", at)

    while True:
        if pos >= end:
            raise TruncatedCheckpointError(TRUNCATED)
        at = pos
        op = data[pos]
        pos += 1
        if op in _PUSHES:
            values_pushed += 1
            if values_pushed > max_values:
                raise too_many_values(max_values, at)
        if op == 0x71:  # BINPUT
            memo[take(1, at)[0]] = top(at)
        elif op == 0x68:  # BINGET
            index = take(1, at)[0]
            if index not in memo:
                raise fail(f"memo index {index} was never stored", at)
            stack.append(memo[index])
        elif op == 0x58:  # BINUNICODE
            (n,) = _unpack_u32(take(4, at))
            stack.append(text(n, at))
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
            stack.append(interp.resolve_global(*interp.check_global(module, name)))
        elif op == 0x52:  # REDUCE
            args = pop(at)
            func = callable_value(pop(at), at, "REDUCE")
            stack.append(interp.call_at(func, args, False, at))
        elif op == 0x81:  # NEWOBJ
            args = pop(at)
            cls = callable_value(pop(at), at, "NEWOBJ")
            stack.append(interp.call_at(cls, args, True, at))
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
            stack.append(text(take(1, at)[0], at, "strict"))
        elif op == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif op == 0x61:  # APPEND
            item = pop(at)
            append_to(top(at), [item], at, "APPEND")
        elif op == 0x65:  # APPENDS
            values = pop_mark(at)
            append_to(top(at), values, at, "APPENDS")
        elif op == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif op == 0x73:  # SETITEM
            value = pop(at)
            key = pop(at)
            _set_items(top(at), [key, value], at, fail, interp)
        elif op == 0x75:  # SETITEMS
            values = pop_mark(at)
            _set_items(top(at), values, at, fail, interp)
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
        elif op in OPAQUE_ONLY_OPCODES and opaque_mode:
            if op == 0x8C:  # SHORT_BINUNICODE
                stack.append(text(take(1, at)[0], at))
            elif op == 0x8D:  # BINUNICODE8
                stack.append(text(_unpack_u64(take(8, at))[0], at))
            elif op == 0x54:  # BINSTRING (a Python 2 str), decoded as torch decodes SHORT_BINSTRING
                (n,) = _unpack_i32(take(4, at))
                if n < 0:
                    raise fail("negative string length", at)
                stack.append(text(n, at, "strict"))
            elif op == 0x43:  # SHORT_BINBYTES
                stack.append(take(take(1, at)[0], at))
            elif op == 0x42:  # BINBYTES
                stack.append(take(_unpack_u32(take(4, at))[0], at))
            elif op == 0x8E:  # BINBYTES8
                stack.append(take(_unpack_u64(take(8, at))[0], at))
            elif op == 0x96:  # BYTEARRAY8
                stack.append(bytearray(take(_unpack_u64(take(8, at))[0], at)))
            elif op == 0x8B:  # LONG4
                (n,) = _unpack_i32(take(4, at))
                if n < 0 or n > MAX_LONG_BYTES:
                    raise fail(f"LONG4 of {n} bytes", at)
                stack.append(int.from_bytes(take(n, at), "little", signed=True))
            elif op == 0x93:  # STACK_GLOBAL
                name = pop(at)
                module = pop(at)
                if type(module) is not str or type(name) is not str:
                    raise fail("STACK_GLOBAL needs two strings", at)
                if "\n" in module or "\n" in name:
                    raise fail("STACK_GLOBAL name holds a line break", at)
                stack.append(interp.resolve_global(*interp.check_global(module, name)))
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = top(at)
            elif op == 0x95:  # FRAME: only a length hint
                take(8, at)
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = pop(at)
                args = pop(at)
                cls = callable_value(pop(at), at, "NEWOBJ_EX")
                stack.append(interp.call_at(cls, args, True, at, kwargs))
            elif op == 0x90:  # ADDITEMS
                values = pop_mark(at)
                target = top(at)
                if type(target) is not set:
                    raise fail("ADDITEMS to something that is not a set", at)
                _add_hashable(target, values)
            elif op == 0x91:  # FROZENSET
                collected: set[Any] = set()
                _add_hashable(collected, pop_mark(at))
                stack.append(frozenset(collected))
            elif op == 0x30:  # POP: the top item, or the mark when nothing stands above it
                if stack and not (marks and len(stack) <= marks[-1]):
                    stack.pop()
                elif marks:
                    marks.pop()
                else:
                    raise fail("stack underflow", at)
            elif op == 0x31:  # POP_MARK
                pop_mark(at)
            else:  # 0x32 DUP
                stack.append(top(at))
        elif op in OPAQUE_ONLY_OPCODES:
            raise UnsafeCheckpointError(
                f"refused opcode 0x{op:02x} at offset {at}: not one of the protocol-2 opcodes that "
                "torch's weights_only unpickler accepts (unknown_globals='opaque' reads protocols 2 to 5)"
            )
        elif opaque_mode:
            raise UnsafeCheckpointError(
                f"refused opcode 0x{op:02x} at offset {at}: not one of the opcodes of pickle protocols "
                "2 to 5 that opaque mode reads (text opcodes of protocols 0 and 1, out-of-band buffers)"
            )
        else:
            raise UnsafeCheckpointError(
                f"refused opcode 0x{op:02x} at offset {at}: not one of the protocol-2 opcodes "
                "that torch's weights_only unpickler accepts"
            )


# Opcodes that push a value or store one in the memo (the native VM counts the same ones).
_PUSHES = frozenset(
    {0x58, 0x4B, 0x74, 0x85, 0x86, 0x87, 0x29, 0x63, 0x52, 0x81, 0x51, 0x4A, 0x4D, 0x8A, 0x47, 0x55, 0x5D, 0x7D,
     0x8F, 0x4E, 0x88, 0x89, 0x68, 0x6A, 0x71, 0x72,
     0x8C, 0x8D, 0x42, 0x43, 0x8E, 0x96, 0x93, 0x92, 0x91, 0x8B, 0x54, 0x94, 0x32}
)


def too_many_values(limit: int, at: int) -> CheckpointError:
    return CheckpointError(
        f"pickle pushes more than {limit} values (at offset {at}): far more than real checkpoints "
        "of its size need, so it is refused before it exhausts memory (PYCKPT_MAX_OBJECTS sets the limit)"
    )


def _buildable(target: Any) -> bool:
    """What may receive BUILD at all; the interpreter decides the rest (as the native VM)."""
    return type(target) in (OrderedDict, Counter) or not isinstance(target, _PLAIN_VALUES)


_PLAIN_VALUES = (type(None), bool, int, float, str, bytes, bytearray, complex, list, tuple, dict, set)


def _add_hashable(target: set[Any], values: list[Any]) -> None:
    try:
        target.update(values)
    except TypeError as exc:
        raise CheckpointError(f"bad pickle: set item is not hashable ({exc})") from None


def _set_items(target: Any, items: list[Any], at: int, fail: Any, interp: Interpreter) -> None:
    if isinstance(target, Opaque):
        interp.set_items_at(target, items, at)
        return
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
