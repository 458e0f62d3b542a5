"""A restricted pickle machine for torch checkpoints that never imports or runs anything.

It walks the opcode stream with :func:`pickletools.genops` and builds plain Python values
(dicts, lists, tuples, numbers, strings) plus :class:`TensorRef` records for tensors. Only
the handful of globals a tensor checkpoint needs are understood; anything else (a user
class, ``os.system``, ``builtins.eval``) raises :class:`UnsafeFileError` naming it. Because
nothing is imported, the allowlist is the whole attack surface.

It also records where each tensor is defined in the byte stream, so a writer can rewrite
the pickle by splicing a few opcodes and leave every other byte as it was.
"""

from __future__ import annotations

import io
import math
import pickletools
import reprlib
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from paramctl.errors import CorruptFileError, UnsafeFileError

__all__ = [
    "STORAGE_DTYPES",
    "Global",
    "ParsedPickle",
    "StorageRef",
    "TensorRef",
    "parse_pickle",
]

# torch.<Name>Storage -> dtype name (torch/storage.py _dtype_to_storage_type_map).
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

# dtypes that torch pickles as `torch.<name>` globals (arguments of _rebuild_tensor_v3).
_DTYPE_GLOBALS = frozenset(
    {
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
        "complex128", "complex64", "complex32", "int64", "int32", "int16", "int8",
        "uint64", "uint32", "uint16", "uint8", "bool", "bits8", "bits16", "bits1x8",
        "bits2x4", "bits4x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
        "double", "float", "half", "long", "int", "short", "cfloat", "cdouble",
    }
)
_DTYPE_ALIASES = {
    "double": "float64", "float": "float32", "half": "float16", "long": "int64",
    "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128",
}

_LATIN1 = ("latin1", "latin-1", "iso-8859-1")
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_REBUILD_TENSOR_V3 = ("torch._utils", "_rebuild_tensor_v3")
_REBUILD_PARAM = ("torch._utils", "_rebuild_parameter")
_REBUILD_PARAM_STATE = ("torch._utils", "_rebuild_parameter_with_state")
_CALLABLE_GLOBALS = {
    _REBUILD_TENSOR,
    _REBUILD_TENSOR_V3,
    _REBUILD_PARAM,
    _REBUILD_PARAM_STATE,
    ("collections", "OrderedDict"),
    ("collections", "Counter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "bytearray"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("_codecs", "encode"),
}

Span = tuple[int, int]

# torch sizes, strides and offsets are int64.
_INT64_MAX = (1 << 63) - 1
# Keys are hashed recursively (CPython does not guard tuple hashing against deep nesting,
# and does not cache it), so tuples and frozensets are bounded in depth, and the elements
# hashed or copied in total are bounded by the pickle's size plus this allowance.
_MAX_NESTING = 100
_WORK_ALLOWANCE = 1 << 20
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any) -> str:
    """A bounded, one-line repr of a value taken from an untrusted pickle."""
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # e.g. an int too long to print
        return f"<{type(value).__name__}>"


@dataclass(frozen=True)
class Global:
    """A global named by the pickle; never resolved to a real object."""

    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class StorageRef:
    """A persistent storage reference: the zip record ``data/<key>``."""

    key: str
    dtype: str
    location: str
    numel: int  # elements of ``dtype`` (bytes for an untyped storage)
    untyped: bool = False


@dataclass(eq=False)
class TensorRef:
    """A tensor as the pickle describes it; ``span`` is its defining expression."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool
    is_parameter: bool
    span: Span
    # For a Parameter: the span of its requires_grad argument.
    grad_span: Span | None = None
    # For a Parameter: the tensor it wraps.
    data: TensorRef | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ParsedPickle:
    root: Any
    tensors: list[TensorRef]
    frames: list[Span]  # FRAME opcodes, which a splice must drop (they carry lengths)
    protocol: int
    # id(dict) -> {key: (span of the key's expression, span of the value's)}, for dicts
    # filled by SETITEM(S): what a writer splices to rename or drop an entry.
    entries: dict[int, dict[Any, tuple[Span, Span]]] = field(default_factory=dict)
    _keep: list[Any] = field(default_factory=list, repr=False)


class _Mark:
    __slots__ = ()


_MARK = _Mark()


def _module_refusal(g: Global) -> UnsafeFileError:
    dotted = g.dotted
    if not dotted.isprintable() or len(dotted) > 200:
        dotted = _short(dotted)[1:-1]
    return UnsafeFileError(
        f"refusing to load global '{dotted}': the pickle would import or run code "
        "(not a plain tensor checkpoint). If you trust this file, pass --unsafe-load"
    )


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _INT64_MAX for v in value
    ):
        raise CorruptFileError(f"tensor {what} is not a tuple of int64: {_short(value)}")
    return value


class _Machine:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.stack: list[Any] = []
        self.starts: list[int] = []
        self.marks: list[tuple[int, int]] = []  # (stack length, position)
        self.memo: dict[int, Any] = {}
        self.tensors: list[TensorRef] = []
        self.frames: list[Span] = []
        self.tuple_spans: dict[int, list[Span]] = {}
        self.nesting: dict[int, tuple[int, int]] = {}  # id -> (depth, elements in all)
        self.work = len(data) + _WORK_ALLOWANCE
        self.keep: list[Any] = []
        self.protocol = 0
        self.entries: dict[int, dict[Any, tuple[Span, Span]]] = {}

    # -- stack helpers -------------------------------------------------------------
    def push(self, value: Any, start: int) -> None:
        self.stack.append(value)
        self.starts.append(start)

    def pop(self) -> tuple[Any, int]:
        if not self.stack or self.stack[-1] is _MARK:
            raise CorruptFileError("pickle stack underflow")
        return self.stack.pop(), self.starts.pop()

    def pop_mark(self) -> tuple[list[Any], list[int], int]:
        if not self.marks:
            raise CorruptFileError("pickle has no MARK where one is needed")
        depth, pos = self.marks.pop()
        if depth > len(self.stack):
            raise CorruptFileError("pickle MARK is out of order")
        items, starts = self.stack[depth:], self.starts[depth:]
        del self.stack[depth:], self.starts[depth:]
        if any(i is _MARK for i in items):
            raise CorruptFileError("pickle has a stray MARK")
        return items, starts, pos

    def top(self) -> Any:
        if not self.stack:
            raise CorruptFileError("pickle stack underflow")
        return self.stack[-1]

    # -- main loop -------------------------------------------------------------------
    def run(self) -> Any:
        ops: Iterator[tuple[Any, Any, int | None]] = pickletools.genops(io.BytesIO(self.data))
        for op, arg, pos_or_none in ops:
            pos = pos_or_none or 0
            # Only REDUCE/NEWOBJ/STOP (no argument) and FRAME (8 bytes) use ``end``.
            name = op.name
            end = pos + 9 if name == "FRAME" else pos + 1
            if name == "STOP":
                if len(self.stack) != 1:
                    raise CorruptFileError("pickle ends with a malformed stack")
                if end != len(self.data):
                    raise CorruptFileError("data after the end of the pickle")
                return self.stack[0]
            handler = getattr(self, "op_" + name, None)
            if handler is None:
                raise UnsafeFileError(
                    f"unsupported pickle opcode {name} (not used by torch checkpoints); "
                    "if you trust this file, pass --unsafe-load"
                )
            handler(arg, pos, end)
        raise CorruptFileError("pickle has no STOP opcode (truncated?)")

    # -- simple values -----------------------------------------------------------------
    def _value(self, arg: Any, pos: int, end: int) -> None:
        self.push(arg, pos)

    op_INT = op_BININT = op_BININT1 = op_BININT2 = op_LONG = op_LONG1 = op_LONG4 = _value
    op_FLOAT = op_BINFLOAT = op_STRING = op_BINSTRING = op_SHORT_BINSTRING = _value
    op_UNICODE = op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = _value
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = _value

    def op_BYTEARRAY8(self, arg: Any, pos: int, end: int) -> None:
        self.push(bytearray(arg), pos)

    def op_NONE(self, arg: Any, pos: int, end: int) -> None:
        self.push(None, pos)

    def op_NEWTRUE(self, arg: Any, pos: int, end: int) -> None:
        self.push(True, pos)

    def op_NEWFALSE(self, arg: Any, pos: int, end: int) -> None:
        self.push(False, pos)

    def op_PROTO(self, arg: Any, pos: int, end: int) -> None:
        self.protocol = int(arg)

    def op_FRAME(self, arg: Any, pos: int, end: int) -> None:
        self.frames.append((pos, end))

    def op_MARK(self, arg: Any, pos: int, end: int) -> None:
        self.marks.append((len(self.stack), pos))

    def op_POP(self, arg: Any, pos: int, end: int) -> None:
        if self.stack and self.stack[-1] is _MARK:
            raise CorruptFileError("pickle pops a MARK")
        # POP with an open mark and nothing pushed drops the mark (pickle.py semantics).
        if not self.stack and self.marks and self.marks[-1][0] == 0:
            self.marks.pop()
            return
        self.pop()

    def op_POP_MARK(self, arg: Any, pos: int, end: int) -> None:
        self.pop_mark()

    def op_DUP(self, arg: Any, pos: int, end: int) -> None:
        self.push(self.top(), pos)

    # -- containers ------------------------------------------------------------------
    def op_EMPTY_DICT(self, arg: Any, pos: int, end: int) -> None:
        self.push({}, pos)

    def op_EMPTY_LIST(self, arg: Any, pos: int, end: int) -> None:
        self.push([], pos)

    def op_EMPTY_SET(self, arg: Any, pos: int, end: int) -> None:
        self.push(set(), pos)

    def op_EMPTY_TUPLE(self, arg: Any, pos: int, end: int) -> None:
        self.push((), pos)

    def _charge(self, n: int) -> None:
        self.work -= n
        if self.work < 0:
            raise CorruptFileError("pickle expands to far more data than it holds "
                                   "(a pickle bomb?)")

    def _nested(self, value: Any) -> Any:
        """Record the depth and total size of a new tuple or frozenset; keep it alive."""
        depth, size = 1, len(value)
        for item in value:
            if isinstance(item, tuple | frozenset):
                d, n = self.nesting.get(id(item), (1, len(item)))
                depth, size = max(depth, d + 1), size + n
        if depth > _MAX_NESTING:
            raise CorruptFileError(f"pickle nests tuples over {_MAX_NESTING} deep")
        self.nesting[id(value)] = (depth, size)
        self.keep.append(value)
        return value

    def _tuple(self, items: list[Any], spans: list[Span], start: int) -> None:
        t = self._nested(tuple(items))
        self.tuple_spans[id(t)] = spans
        self.push(t, start)

    def _spans(self, starts: list[int], end: int) -> list[Span]:
        ends = [*starts[1:], end]
        return list(zip(starts, ends, strict=True))

    def op_TUPLE(self, arg: Any, pos: int, end: int) -> None:
        items, starts, mark_pos = self.pop_mark()
        self._tuple(items, self._spans(starts, pos), mark_pos)

    def _tuple_n(self, n: int, pos: int) -> None:
        if len(self.stack) < n or any(v is _MARK for v in self.stack[-n:]):
            raise CorruptFileError("pickle stack underflow")
        items, starts = self.stack[-n:], self.starts[-n:]
        del self.stack[-n:], self.starts[-n:]
        self._tuple(items, self._spans(starts, pos), starts[0] if starts else pos)

    def op_TUPLE1(self, arg: Any, pos: int, end: int) -> None:
        self._tuple_n(1, pos)

    def op_TUPLE2(self, arg: Any, pos: int, end: int) -> None:
        self._tuple_n(2, pos)

    def op_TUPLE3(self, arg: Any, pos: int, end: int) -> None:
        self._tuple_n(3, pos)

    def op_LIST(self, arg: Any, pos: int, end: int) -> None:
        items, _, mark_pos = self.pop_mark()
        self.push(list(items), mark_pos)

    def op_DICT(self, arg: Any, pos: int, end: int) -> None:
        items, _, mark_pos = self.pop_mark()
        if len(items) % 2:
            raise CorruptFileError("pickle DICT has an odd number of items")
        d: dict[Any, Any] = {}
        for k, v in zip(items[::2], items[1::2], strict=True):
            d[self._key(k)] = v
        self.push(d, mark_pos)

    def op_FROZENSET(self, arg: Any, pos: int, end: int) -> None:
        items, _, mark_pos = self.pop_mark()
        self.push(self._nested(frozenset(self._key(i) for i in items)), mark_pos)

    def _key(self, k: Any) -> Any:
        if isinstance(k, tuple | frozenset):
            self._charge(self.nesting.get(id(k), (1, len(k)))[1])
        try:
            hash(k)
        except TypeError:
            raise CorruptFileError(
                f"unhashable dictionary key in pickle: {type(k).__name__}") from None
        return k

    def op_APPEND(self, arg: Any, pos: int, end: int) -> None:
        value, _ = self.pop()
        target = self.top()
        if not isinstance(target, list):
            raise CorruptFileError(f"pickle APPEND to a {type(target).__name__}")
        target.append(value)

    def op_APPENDS(self, arg: Any, pos: int, end: int) -> None:
        items, _, _ = self.pop_mark()
        target = self.top()
        if not isinstance(target, list):
            raise CorruptFileError(f"pickle APPENDS to a {type(target).__name__}")
        target.extend(items)

    def op_SETITEM(self, arg: Any, pos: int, end: int) -> None:
        value, value_start = self.pop()
        key, key_start = self.pop()
        target = self.top()
        if not isinstance(target, dict):
            raise CorruptFileError(f"pickle SETITEM on a {type(target).__name__}")
        target[self._key(key)] = value
        self._entry(target, key, (key_start, value_start), (value_start, pos))

    def op_SETITEMS(self, arg: Any, pos: int, end: int) -> None:
        items, starts, _ = self.pop_mark()
        target = self.top()
        if not isinstance(target, dict) or len(items) % 2:
            raise CorruptFileError("pickle SETITEMS is malformed")
        spans = self._spans(starts, pos)
        for i, (k, v) in enumerate(zip(items[::2], items[1::2], strict=True)):
            target[self._key(k)] = v
            self._entry(target, k, spans[2 * i], spans[2 * i + 1])

    def _entry(self, target: dict[Any, Any], key: Any, key_span: Span, value_span: Span
               ) -> None:
        if isinstance(key, str):
            self.entries.setdefault(id(target), {})[key] = (key_span, value_span)

    def op_ADDITEMS(self, arg: Any, pos: int, end: int) -> None:
        items, _, _ = self.pop_mark()
        target = self.top()
        if not isinstance(target, set):
            raise CorruptFileError("pickle ADDITEMS on a non-set")
        target.update(self._key(i) for i in items)

    # -- memo ------------------------------------------------------------------------
    def _put(self, index: int) -> None:
        if index < 0:
            raise CorruptFileError("negative memo index in pickle")
        self.memo[index] = self.top()

    def op_PUT(self, arg: Any, pos: int, end: int) -> None:
        self._put(int(arg))

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, arg: Any, pos: int, end: int) -> None:
        self._put(len(self.memo))

    def op_GET(self, arg: Any, pos: int, end: int) -> None:
        try:
            self.push(self.memo[int(arg)], pos)
        except KeyError:
            raise CorruptFileError(f"pickle refers to unknown memo entry {arg}") from None

    op_BINGET = op_LONG_BINGET = op_GET

    # -- globals and calls -------------------------------------------------------------
    def _global(self, module: str, name: str, pos: int) -> None:
        g = Global(module, name)
        if (module, name) in _CALLABLE_GLOBALS:
            self.push(g, pos)
            return
        if module == "torch" and (name in STORAGE_DTYPES or name in _DTYPE_GLOBALS):
            self.push(g, pos)
            return
        if (module, name) in {("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")}:
            self.push(g, pos)
            return
        raise _module_refusal(g)

    def op_GLOBAL(self, arg: Any, pos: int, end: int) -> None:
        module, _, name = str(arg).partition(" ")
        self._global(module, name, pos)

    def op_STACK_GLOBAL(self, arg: Any, pos: int, end: int) -> None:
        name, _ = self.pop()
        module, start = self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise CorruptFileError("pickle STACK_GLOBAL needs two strings")
        self._global(module, name, start)

    def op_REDUCE(self, arg: Any, pos: int, end: int) -> None:
        args, _ = self.pop()
        func, start = self.pop()
        if not isinstance(func, Global):
            raise CorruptFileError(f"pickle calls a non-callable {type(func).__name__}")
        if not isinstance(args, tuple):
            raise CorruptFileError("pickle REDUCE arguments are not a tuple")
        spans = self.tuple_spans.get(id(args))
        self.push(self._call(func, args, spans, (start, end)), start)

    def op_NEWOBJ(self, arg: Any, pos: int, end: int) -> None:
        args, _ = self.pop()
        cls, start = self.pop()
        if not isinstance(cls, Global) or not isinstance(args, tuple):
            raise CorruptFileError("pickle NEWOBJ is malformed")
        if (cls.module, cls.name) not in {("collections", "OrderedDict"), ("builtins", "set")}:
            raise _module_refusal(cls)
        self.push(self._call(cls, args, None, (start, end)), start)

    # Opcodes torch never writes that create objects: refuse them naming the class.
    def op_NEWOBJ_EX(self, arg: Any, pos: int, end: int) -> None:
        self.pop()
        self.pop()
        cls, _ = self.pop()
        if isinstance(cls, Global):
            raise _module_refusal(cls)
        raise CorruptFileError("pickle NEWOBJ_EX is malformed")

    def op_INST(self, arg: Any, pos: int, end: int) -> None:
        module, _, name = str(arg).partition(" ")
        raise _module_refusal(Global(module, name))

    def op_OBJ(self, arg: Any, pos: int, end: int) -> None:
        items, _, _ = self.pop_mark()
        if items and isinstance(items[0], Global):
            raise _module_refusal(items[0])
        raise CorruptFileError("pickle OBJ is malformed")

    def op_BUILD(self, arg: Any, pos: int, end: int) -> None:
        state, _ = self.pop()
        target = self.top()
        # torch pickles an OrderedDict state dict with its `_metadata` attribute as
        # BUILD state; record nothing, change nothing.
        if isinstance(target, dict) and isinstance(state, dict | tuple | type(None)):
            return
        raise CorruptFileError(f"pickle BUILD on a {type(target).__name__}")

    def op_PERSID(self, arg: Any, pos: int, end: int) -> None:
        raise CorruptFileError("text persistent ids are not used by torch checkpoints")

    def op_BINPERSID(self, arg: Any, pos: int, end: int) -> None:
        pid, start = self.pop()
        self.push(self._storage(pid), start)

    def _storage(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptFileError(f"unknown persistent id in pickle: {_short(pid)}")
        _, kind, key, location, numel = pid
        if not isinstance(kind, Global) or not isinstance(key, str):
            raise CorruptFileError("malformed storage reference in pickle")
        if not isinstance(location, str):
            raise CorruptFileError("malformed storage location in pickle")
        if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel <= _INT64_MAX:
            raise CorruptFileError("malformed storage size in pickle")
        if kind.name in STORAGE_DTYPES:
            return StorageRef(key, STORAGE_DTYPES[kind.name], location, numel)
        if kind.name == "UntypedStorage":
            return StorageRef(key, "uint8", location, numel, untyped=True)
        raise CorruptFileError(f"unknown storage type {_short(kind.dotted)}")

    def _call(self, func: Global, args: tuple[Any, ...], spans: list[Span] | None,
              span: Span) -> Any:
        key = (func.module, func.name)
        if key in (_REBUILD_TENSOR, _REBUILD_TENSOR_V3):
            return self._tensor(key == _REBUILD_TENSOR_V3, args, span)
        if key in (_REBUILD_PARAM, _REBUILD_PARAM_STATE):
            if len(args) < 3 or not isinstance(args[0], TensorRef):
                raise CorruptFileError("malformed torch.nn.Parameter in pickle")
            data, grad = args[0], args[1]
            if not isinstance(grad, bool):
                raise CorruptFileError("malformed Parameter.requires_grad in pickle")
            ref = TensorRef(
                data.storage, data.offset, data.shape, data.stride, data.dtype, grad, True,
                span, grad_span=spans[1] if spans else None, data=data,
            )
            if self.tensors and self.tensors[-1] is data:
                self.tensors[-1] = ref
            else:
                self.tensors.append(ref)
            return ref
        # Every call below copies at most its argument: charge that against the budget,
        # and hash keys and set members through _key.
        source = args[0] if args else ()
        if func.name != "complex" and hasattr(source, "__len__"):
            self._charge(len(source))
        if key in {("collections", "OrderedDict"), ("collections", "Counter")}:
            if not isinstance(source, dict | list | tuple):
                raise CorruptFileError("malformed OrderedDict in pickle")
            out: OrderedDict[Any, Any] = OrderedDict()
            for pair in source.items() if isinstance(source, dict) else source:
                if not isinstance(pair, tuple | list) or len(pair) != 2:
                    raise CorruptFileError("malformed OrderedDict in pickle")
                out[self._key(pair[0])] = pair[1]
            return out
        if key == ("_codecs", "encode"):
            if len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1":
                return args[0].encode("latin1")
            raise CorruptFileError("unsupported _codecs.encode call in pickle")
        if key == ("torch", "Size"):
            dims = tuple(source) if isinstance(source, tuple | list) else ()
            return self._nested(_as_int_tuple(dims, "size"))
        if key == ("torch", "device"):
            if not all(isinstance(a, str | int) for a in args):
                raise CorruptFileError("malformed torch.device in pickle")
            return ":".join(str(a) for a in args)
        if func.name in ("set", "frozenset"):
            if len(args) > 1 or not isinstance(source, list | tuple | set | frozenset):
                raise CorruptFileError(f"malformed {func.dotted} call in pickle")
            items = [self._key(i) for i in source]
            return set(items) if func.name == "set" else self._nested(frozenset(items))
        if func.name == "bytearray":
            # bytearray(n) would allocate n bytes: only the forms pickle itself writes.
            if args == () or (len(args) == 1 and isinstance(source, bytes)) or (
                    len(args) == 2 and isinstance(source, str) and args[1] in _LATIN1):
                return bytearray(*args)
            raise CorruptFileError("unsupported bytearray call in pickle")
        try:
            if func.name == "complex":
                return complex(*args)
            if func.name == "slice":
                return slice(*args)
        except (TypeError, ValueError) as exc:
            raise CorruptFileError(f"malformed {func.dotted} call in pickle: {exc}") from None
        raise _module_refusal(func)

    def _tensor(self, v3: bool, args: tuple[Any, ...], span: Span) -> TensorRef:
        if len(args) < (7 if v3 else 6) or not isinstance(args[0], StorageRef):
            raise CorruptFileError("malformed tensor in pickle")
        storage, offset = args[0], args[1]
        shape = _as_int_tuple(args[2], "shape")
        stride = _as_int_tuple(args[3], "stride")
        grad = args[4]
        if not isinstance(offset, int) or offset < 0 or not isinstance(grad, bool):
            raise CorruptFileError("malformed tensor in pickle")
        if len(shape) != len(stride) or any(d < 0 for d in shape) or any(s < 0 for s in stride):
            raise CorruptFileError(f"malformed tensor shape {_short(shape)} / stride "
                                   f"{_short(stride)}")
        if offset > _INT64_MAX or len(shape) > 1024 or _numel_over(shape, _INT64_MAX):
            raise CorruptFileError(f"tensor shape {_short(shape)} is too large")
        dtype = storage.dtype
        if v3:
            g = args[6]
            if not isinstance(g, Global) or g.module != "torch" or g.name not in _DTYPE_GLOBALS:
                raise CorruptFileError("malformed dtype in pickle")
            dtype = _DTYPE_ALIASES.get(g.name, g.name)
        ref = TensorRef(storage, offset, shape, stride, dtype, grad, False, span)
        self.tensors.append(ref)
        return ref


def _numel_over(shape: tuple[int, ...], limit: int) -> bool:
    """Whether the product of ``shape`` exceeds ``limit`` (without building a huge int)."""
    if 0 in shape:
        return False
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            return True
    return False


def parse_pickle(data: bytes, machine_class: type[_Machine] | None = None) -> ParsedPickle:
    """Run the restricted machine over ``data`` (a torch ``data.pkl``).

    ``machine_class`` extends the allowlist (DCP's metadata records). Raises
    :class:`UnsafeFileError` for any global outside the allowlist and
    :class:`CorruptFileError` for a malformed stream.
    """
    machine = (machine_class or _Machine)(data)
    try:
        root = machine.run()
    except (UnsafeFileError, CorruptFileError):
        raise
    except RecursionError:
        raise CorruptFileError("pickle is nested too deeply") from None
    except (ValueError, LookupError, TypeError, struct.error, UnicodeError,
            OverflowError, MemoryError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CorruptFileError(f"malformed pickle: {detail}") from None
    return ParsedPickle(root, machine.tensors, machine.frames, machine.protocol,
                        entries=machine.entries, _keep=machine.keep)
