"""A restricted pickle machine for torch checkpoints that never imports or runs anything.

It decodes the opcode stream itself (pickletools' tables and argument readers, the common
opcodes inline) and builds plain Python values (dicts, lists, tuples, numbers, strings)
plus :class:`TensorRef` records for tensors. A
handful of globals are *interpreted* by this module's own code (torch's tensor and
Parameter rebuild functions, ``OrderedDict``, ``set``, ``torch.Size``...). Every other
global (a user's config class, ``argparse.Namespace``, a numpy scalar, ``os.system``) is a
:class:`Global` name that is never resolved, and what the pickle would build from it
(REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, then BUILD, SETITEM(S), APPEND(S)) is an inert
:class:`Placeholder` record: its arguments and state are kept as parsed values, so tensors
inside it are still seen, but nothing is imported, looked up or called. No code path in
this module, or in its callers, turns a :class:`Global` into a Python object.

What is still refused: opcodes torch never writes that need a registry or an import to
mean anything (EXT1/2/4; UnsafeFileError), malformed streams (CorruptFileError), and calls
to the interpreted globals with arguments they do not take (``bytearray(2**30)``, a
``_rebuild_tensor_v2`` whose shape is not a tuple of ints): those would be wrong to guess.
A torch rebuild function this module does not interpret (``_rebuild_qtensor``...) gives a
placeholder like any other; :func:`opaque_tensor` lets a caller refuse one where a tensor
is expected instead of skipping it. Every bound (nesting depth, work budget, sizes, memo)
applies to placeholders as well.

It also records where each tensor is defined in the byte stream, so a writer can rewrite
the pickle by splicing a few opcodes and leave every other byte as it was.
"""

from __future__ import annotations

import io
import math
import mmap
import pickletools
import reprlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paramctl.errors import CorruptFileError, UnsafeFileError
from paramctl.formats import STORAGE_DTYPES

__all__ = [
    "STORAGE_DTYPES",
    "Global",
    "ParsedPickle",
    "Placeholder",
    "StorageRef",
    "TensorRef",
    "opaque_tensor",
    "parse_pickle",
]


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
_MAX_WORK_BYTES = 1 << 30
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

    @property
    def shown(self) -> str:
        """``dotted``, bounded and on one line, for messages."""
        dotted = self.dotted
        if not dotted.isprintable() or len(dotted) > 200:
            dotted = _short(dotted)[1:-1]
        return dotted

    @property
    def description(self) -> str:
        return f"pickled reference to {self.shown}"


@dataclass(eq=False, repr=False)
class Placeholder:
    """What the pickle would build by calling ``factory`` (a class or function it names),
    recorded inert: nothing is imported, looked up or called.

    ``args`` (and ``kwargs`` for NEWOBJ_EX) are what the call would get, ``state`` what
    BUILD would set (the object's ``__dict__`` for a plain class, a ``(dict, slots)`` pair,
    or any value a ``__setstate__`` would take), ``items`` and ``elements`` what SETITEM(S)
    and APPEND(S) would add to a dict or list subclass. Hashing is by identity, like the
    objects it stands for, so a placeholder can be a dictionary key at no cost.
    """

    factory: Global | Placeholder
    args: tuple[Any, ...] = ()
    kwargs: dict[Any, Any] | None = None
    state: Any = None
    items: dict[Any, Any] | None = None
    elements: list[Any] | None = None

    @property
    def type_name(self) -> str:
        """The dotted name of what would be called, e.g. ``argparse.Namespace``."""
        node: Global | Placeholder = self.factory
        calls = 0
        while isinstance(node, Placeholder) and calls < 3:
            node, calls = node.factory, calls + 1
        if isinstance(node, Placeholder):
            return "(a call result)" + "()" * calls
        return node.shown + "()" * calls

    @property
    def description(self) -> str:
        return f"pickled {self.type_name} object"

    def attributes(self) -> dict[Any, Any]:
        """The attributes BUILD would set (``__dict__`` and slots); empty if none."""
        state = self.state
        if isinstance(state, dict):
            return state
        if isinstance(state, tuple) and len(state) == 2 and all(
                isinstance(s, dict | type(None)) for s in state):
            return {**(state[0] or {}), **(state[1] or {})}
        return {}

    def fields(self) -> dict[Any, Any]:
        """Everything reachable by name: dict items (a dict subclass), then attributes."""
        attributes = self.attributes()
        return {**self.items, **attributes} if self.items else attributes

    def __repr__(self) -> str:
        return f"<inert {self.type_name} object>"


def opaque_tensor(value: Any) -> str | None:
    """The name of the torch function or class behind ``value`` when it is a tensor this
    reader cannot describe (quantized, sparse, nested, a subclass, an uninitialised
    Parameter...); ``None`` for anything else."""
    if not isinstance(value, Placeholder):
        return None
    factory = value.factory
    if isinstance(factory, Placeholder):
        return None
    if factory.module.split(".")[0] == "torch" and (
            factory.name.startswith("_rebuild") or factory.name.startswith("Uninitialized")):
        return factory.shown
    return None


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
    end: int = 0  # offset just past STOP
    storages: dict[str, StorageRef] = field(default_factory=dict)  # every persistent id


class _Mark:
    __slots__ = ()


_MARK = _Mark()


# The encodings of a bool argument (protocol 2+ and 0/1): a requires_grad flag a writer may
# flip in place. Anything longer (a memo PUT after it...) is not spliced.
_BOOL_OPCODES = frozenset({b"\x88", b"\x89", b"I01\n", b"I00\n"})
# copyreg helpers that protocols 0 and 1 wrap a class in: report the class itself.
_RECONSTRUCTORS = frozenset({("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"),
                             ("copyreg", "__newobj__"), ("copy_reg", "__newobj__")})


# The opcode table, by byte, and the argument layouts decoded without pickletools.
_OPCODES = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
_NO_ARGUMENT = frozenset(code for code, op in _OPCODES.items() if op.arg is None)
_ONE_BYTE_ARGUMENT = frozenset(b"qhK")  # BINPUT, BINGET, BININT1
_UINT4 = struct.Struct("<I").unpack_from  # struct.error when cut short
_FIXED_INT_ARGUMENT = {ord("M"): (struct.Struct("<H").unpack_from, 2),  # BININT2
                       ord("J"): (struct.Struct("<i").unpack_from, 4),  # BININT
                       ord("r"): (_UINT4, 4), ord("j"): (_UINT4, 4)}  # LONG_BINPUT/GET
_SHORT_BINUNICODE, _BINUNICODE, _BINFLOAT, _STOP = 0x8C, ord("X"), ord("G"), ord(".")


def _utf8(raw: bytes, length: int) -> str:
    if len(raw) != length:
        raise ValueError("pickle exhausted in the middle of a string")
    return str(raw, "utf-8", "surrogatepass")  # as pickletools and pickle decode it


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _INT64_MAX for v in value
    ):
        raise CorruptFileError(f"tensor {what} is not a tuple of int64: {_short(value)}")
    return value


class _Machine:
    def __init__(self, data: bytes | mmap.mmap, start: int = 0, *,
                 trailing: bool = False) -> None:
        # ``data`` holds the pickle from ``start``; with ``trailing`` more may follow STOP
        # (a legacy torch file is a sequence of pickles, memory-mapped).
        self.data = data
        self.start = start
        self.trailing = trailing
        self.end = 0
        self.stack: list[Any] = []
        self.starts: list[int] = []
        self.marks: list[tuple[int, int]] = []  # (stack length, position)
        self.memo: dict[int, Any] = {}
        self.tensors: list[TensorRef] = []
        self.frames: list[Span] = []
        self.tuple_spans: dict[int, list[Span]] = {}
        self.nesting: dict[int, tuple[int, int]] = {}  # id -> (depth, elements in all)
        self.work = min(len(data) - start, _MAX_WORK_BYTES) + _WORK_ALLOWANCE
        self.keep: list[Any] = []
        self.protocol = 0
        self.entries: dict[int, dict[Any, tuple[Span, Span]]] = {}
        self.storages: dict[str, StorageRef] = {}

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
        # The opcode stream is decoded here rather than by pickletools.genops (a generator
        # re-reading through a file object), which was most of the time on a pickle holding
        # many small objects: the opcodes torch's pickler writes most are decoded inline,
        # every other one through pickletools' own argument reader.
        data, size, pos = self.data, len(self.data), self.start
        arg: Any
        handlers = self.handlers()
        stream: Any = None
        while pos < size:
            code = data[pos]
            p = pos + 1
            if code in _NO_ARGUMENT:
                arg, end = None, p
            elif code in _ONE_BYTE_ARGUMENT:
                arg, end = data[p], p + 1
            elif code == _SHORT_BINUNICODE:
                end = p + 1 + data[p]
                arg = _utf8(data[p + 1:end], end - p - 1)
            elif code == _BINUNICODE:
                end = p + 4 + _UINT4(data, p)[0]
                arg = _utf8(data[p + 4:end], end - p - 4)
            elif code in _FIXED_INT_ARGUMENT:
                unpack, width = _FIXED_INT_ARGUMENT[code]
                arg, end = unpack(data, p)[0], p + width
            elif code == _BINFLOAT:
                arg, end = struct.unpack_from(">d", data, p)[0], p + 8
            else:
                op = _OPCODES.get(code)
                if op is None:
                    raise ValueError(f"at position {pos}, opcode {bytes([code])!r} unknown")
                if stream is None:
                    stream = io.BytesIO(data) if isinstance(data, bytes) else data
                stream.seek(p)
                arg = op.arg.reader(stream) if op.arg is not None else None
                end = stream.tell()
            if code == _STOP:
                if len(self.stack) != 1:
                    raise CorruptFileError("pickle ends with a malformed stack")
                if end != size and not self.trailing:
                    raise CorruptFileError("data after the end of the pickle")
                self.end = end
                return self.stack[0]
            handler = handlers.get(code)
            if handler is None:
                raise UnsafeFileError(
                    f"unsupported pickle opcode {_OPCODES[code].name} (not used by torch "
                    "checkpoints); if you trust this file, pass --unsafe-load"
                )
            handler(arg, pos, end)
            pos = end
        raise CorruptFileError("pickle has no STOP opcode (truncated?)")

    def handlers(self) -> dict[int, Callable[[Any, int, int], None]]:
        """Opcode byte -> bound handler, looked up once per run instead of per opcode."""
        return {code: getattr(self, "op_" + op.name) for code, op in _OPCODES.items()
                if hasattr(self, "op_" + op.name)}

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
        if not starts:  # "(t": protocol 0's empty tuple
            return []
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

    def _list_target(self, what: str) -> list[Any]:
        target = self.top()
        if isinstance(target, Placeholder):  # a list subclass: record what it would hold
            if target.elements is None:
                target.elements = []
            return target.elements
        if not isinstance(target, list):
            raise CorruptFileError(f"pickle {what} to a {_kind(target)}")
        return target

    def _dict_target(self, what: str) -> dict[Any, Any]:
        target = self.top()
        if isinstance(target, Placeholder):  # a dict subclass (defaultdict, AttributeDict)
            if target.items is None:
                target.items = {}
            return target.items
        if not isinstance(target, dict):
            raise CorruptFileError(f"pickle {what} on a {_kind(target)}")
        return target

    def op_APPEND(self, arg: Any, pos: int, end: int) -> None:
        value, _ = self.pop()
        self._list_target("APPEND").append(value)

    def op_APPENDS(self, arg: Any, pos: int, end: int) -> None:
        items, _, _ = self.pop_mark()
        self._list_target("APPENDS").extend(items)

    def op_SETITEM(self, arg: Any, pos: int, end: int) -> None:
        value, value_start = self.pop()
        key, key_start = self.pop()
        target = self._dict_target("SETITEM")
        target[self._key(key)] = value
        self._entry(target, key, (key_start, value_start), (value_start, pos))

    def op_SETITEMS(self, arg: Any, pos: int, end: int) -> None:
        items, starts, _ = self.pop_mark()
        target = self._dict_target("SETITEMS")
        if len(items) % 2:
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
        # Only a name: nothing is looked up. What a call to it builds is decided in _call.
        self.push(Global(module, name), pos)

    def op_GLOBAL(self, arg: Any, pos: int, end: int) -> None:
        module, _, name = str(arg).partition(" ")
        self._global(module, name, pos)

    def op_STACK_GLOBAL(self, arg: Any, pos: int, end: int) -> None:
        name, _ = self.pop()
        module, start = self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise CorruptFileError("pickle STACK_GLOBAL needs two strings")
        self._global(module, name, start)

    def _construct(self, func: Any, args: tuple[Any, ...], spans: list[Span] | None,
                   span: Span) -> Any:
        """``func(*args)`` as REDUCE, INST and OBJ mean it: interpreted or inert."""
        if isinstance(func, Placeholder):  # calling what a call returned: inert too
            return Placeholder(func, args)
        if not isinstance(func, Global):
            raise CorruptFileError(f"pickle calls a non-callable {_kind(func)}")
        return self._call(func, args, spans, span)

    def op_REDUCE(self, arg: Any, pos: int, end: int) -> None:
        args, _ = self.pop()
        func, start = self.pop()
        if not isinstance(func, Global | Placeholder):
            raise CorruptFileError(f"pickle calls a non-callable {_kind(func)}")
        if not isinstance(args, tuple):
            raise CorruptFileError("pickle REDUCE arguments are not a tuple")
        spans = self.tuple_spans.get(id(args))
        self.push(self._construct(func, args, spans, (start, end)), start)

    def op_NEWOBJ(self, arg: Any, pos: int, end: int) -> None:
        args, _ = self.pop()
        cls, start = self.pop()
        if not isinstance(cls, Global | Placeholder) or not isinstance(args, tuple):
            raise CorruptFileError("pickle NEWOBJ is malformed")
        if isinstance(cls, Global) and (cls.module, cls.name) in {
                ("collections", "OrderedDict"), ("builtins", "set")}:
            self.push(self._call(cls, args, None, (start, end)), start)
            return
        self.push(_placeholder(cls, args), start)

    def op_NEWOBJ_EX(self, arg: Any, pos: int, end: int) -> None:
        kwargs, _ = self.pop()
        args, _ = self.pop()
        cls, start = self.pop()
        if not isinstance(cls, Global | Placeholder) or not isinstance(args, tuple) \
                or not isinstance(kwargs, dict):
            raise CorruptFileError("pickle NEWOBJ_EX is malformed")
        self.push(Placeholder(cls, args, kwargs), start)

    def op_INST(self, arg: Any, pos: int, end: int) -> None:
        module, _, name = str(arg).partition(" ")
        items, _, mark_pos = self.pop_mark()
        self.push(self._construct(Global(module, name), tuple(items), None, (mark_pos, end)),
                  mark_pos)

    def op_OBJ(self, arg: Any, pos: int, end: int) -> None:
        items, _, mark_pos = self.pop_mark()
        if not items or not isinstance(items[0], Global | Placeholder):
            raise CorruptFileError("pickle OBJ is malformed")
        self.push(self._construct(items[0], tuple(items[1:]), None, (mark_pos, end)),
                  mark_pos)

    def op_BUILD(self, arg: Any, pos: int, end: int) -> None:
        state, _ = self.pop()
        target = self.top()
        if isinstance(target, Placeholder):
            self._set_state(target, state)
            return
        # torch pickles an OrderedDict state dict with its `_metadata` attribute as
        # BUILD state; record nothing, change nothing.
        if isinstance(target, dict) and isinstance(state, dict | tuple | type(None)):
            return
        raise CorruptFileError(f"pickle BUILD on a {_kind(target)}")

    def _set_state(self, target: Placeholder, state: Any) -> None:
        """BUILD again on the same object updates its ``__dict__`` (or replaces the state a
        ``__setstate__`` would get): keep what a reader of attributes would see."""
        old = target.state
        if isinstance(old, dict) and isinstance(state, dict) and old is not state:
            self._charge(len(old) + len(state))
            target.state = {**old, **state}
        else:
            target.state = state

    def op_PERSID(self, arg: Any, pos: int, end: int) -> None:
        raise CorruptFileError("text persistent ids are not used by torch checkpoints")

    def op_BINPERSID(self, arg: Any, pos: int, end: int) -> None:
        pid, start = self.pop()
        ref = self._storage(pid)
        self.storages.setdefault(ref.key, ref)
        self.push(ref, start)

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
            if len(args) >= 3 and opaque_tensor(args[0]):
                return Placeholder(func, args)  # a Parameter of a tensor kind not read here
            if len(args) < 3 or not isinstance(args[0], TensorRef):
                raise CorruptFileError("malformed torch.nn.Parameter in pickle")
            data, grad = args[0], args[1]
            if not isinstance(grad, bool):
                raise CorruptFileError("malformed Parameter.requires_grad in pickle")
            grad_span = spans[1] if spans else None
            if grad_span is not None and \
                    self.data[grad_span[0]:grad_span[1]] not in _BOOL_OPCODES:
                grad_span = None  # not one plain bool opcode: never spliced
            ref = TensorRef(
                data.storage, data.offset, data.shape, data.stride, data.dtype, grad, True,
                span, grad_span=grad_span, data=data,
            )
            if self.tensors and self.tensors[-1] is data:
                self.tensors[-1] = ref
            else:
                self.tensors.append(ref)
            return ref
        if key not in _CALLABLE_GLOBALS:
            return _placeholder(func, args)
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
        raise AssertionError(f"allowlisted global without an interpretation: {key}")

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


def _placeholder(factory: Global | Placeholder, args: tuple[Any, ...]) -> Placeholder:
    """An inert record of ``factory(*args)``; protocol 0/1's copyreg wrappers name the
    class they wrap."""
    if isinstance(factory, Global) and (factory.module, factory.name) in _RECONSTRUCTORS \
            and args and isinstance(args[0], Global | Placeholder):
        return Placeholder(args[0], args[1:])
    return Placeholder(factory, args)


def _kind(value: Any) -> str:
    """What a value is, for a message (an inert object is named by its class)."""
    if isinstance(value, Placeholder | Global):
        return value.description
    return type(value).__name__


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


def parse_pickle(data: bytes | mmap.mmap, machine_class: type[_Machine] | None = None, *,
                 start: int = 0, trailing: bool = False) -> ParsedPickle:
    """Run the restricted machine over ``data`` (a torch ``data.pkl``).

    ``machine_class`` extends what is interpreted (DCP's metadata records, legacy storage
    ids). ``start`` and ``trailing`` read one pickle of a sequence (``ParsedPickle.end``
    says where it stopped). Unknown globals become inert :class:`Placeholder` records;
    raises :class:`UnsafeFileError` for an opcode that needs imports to mean anything and
    :class:`CorruptFileError` for a malformed stream.
    """
    machine = (machine_class or _Machine)(data, start, trailing=trailing)
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
                        entries=machine.entries, _keep=machine.keep, end=machine.end,
                        storages=machine.storages)
