"""Init rules (``PATTERN=FN(arg=value)``) and TOML rule files: parse and validate.

Functions are found by introspecting ``torch.nn.init`` (every public ``name_`` function),
so the list follows the installed torch rather than a hand-kept table.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paramctl.errors import OperationError, SourceError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["CAST_DTYPES", "CONVERT_KINDS", "InitRule", "Rename", "Step", "apply_renames",
           "init_functions", "load_rules_file", "parse_cast", "parse_init_rule", "parse_rename",
           "parse_steps", "run_init"]

_RULE = re.compile(r"^(?P<pattern>.+)=\s*(?P<fn>[A-Za-z_]\w*)\s*(?:\((?P<args>.*)\))?\s*$",
                   re.DOTALL)
_HIDDEN_PARAMS = {"tensor", "generator"}
_HALF = {"float16", "bfloat16"}


def init_functions() -> dict[str, Callable[..., Any]]:
    """``{"normal": torch.nn.init.normal_, ...}`` for every public in-place init function."""
    import inspect

    import torch.nn.init as tinit

    out: dict[str, Callable[..., Any]] = {}
    for name in dir(tinit):
        if name.startswith("_") or not name.endswith("_"):
            continue
        fn = getattr(tinit, name)
        if inspect.isfunction(fn):
            out[name[:-1]] = fn
    return out


@dataclass(frozen=True)
class InitRule:
    """One ``PATTERN=FN(...)`` rule, validated against the function's signature."""

    text: str
    pattern: str
    fn: str
    kwargs: tuple[tuple[str, Any], ...]

    @property
    def call(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.fn}({inner})"

    def seed_for(self, seed: int, name: str) -> int:
        """A 63-bit seed that depends on ``(seed, name, function and arguments)`` only."""
        import hashlib

        digest = hashlib.sha256(f"{seed}\0{name}\0{self.call}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _literal(node: Any) -> Any:
    import ast

    if isinstance(node, ast.Name):  # bare words: nonlinearity=relu, mode=fan_out
        return node.id
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise UsageError(f"argument value {ast.unparse(node)!r} is not a Python literal") from None


def _signature_params(fn: Callable[..., Any]) -> list[str]:
    import inspect

    return [p for p in inspect.signature(fn).parameters if p not in _HIDDEN_PARAMS]


def parse_init_rule(text: str) -> InitRule:
    """Parse ``'head.*.weight=normal(std=0.02)'``; errors list the valid choices.

    >>> parse_init_rule("*.bias=zeros").call
    'zeros()'
    """
    import ast
    import inspect

    match = _RULE.match(text.strip())
    if match is None:
        raise UsageError(f"bad init rule {text!r}: expected PATTERN=FN or PATTERN=FN(arg=value), "
                         "e.g. '*.bias=zeros' or 'head.*=normal(std=0.02)'")
    pattern, fn_name, raw_args = match["pattern"].strip(), match["fn"], match["args"]
    functions = init_functions()
    if fn_name.endswith("_") and fn_name[:-1] in functions:
        fn_name = fn_name[:-1]
    if fn_name not in functions:
        raise UsageError(f"unknown init function {fn_name!r} in {text!r}; valid: "
                         f"{', '.join(sorted(functions))}")
    fn = functions[fn_name]
    names = _signature_params(fn)
    kwargs: dict[str, Any] = {}
    if raw_args and raw_args.strip():
        try:
            call = ast.parse(f"f({raw_args})", mode="eval").body
        except SyntaxError:
            raise UsageError(f"bad arguments in {text!r}: expected arg=value, ...") from None
        if not isinstance(call, ast.Call):
            raise UsageError(f"bad arguments in {text!r}")
        if len(call.args) > len(names):
            raise UsageError(f"{fn_name}() takes at most {len(names)} arguments: "
                             f"{', '.join(names) or 'none'}")
        for pname, node in zip(names, call.args, strict=False):
            kwargs[pname] = _literal(node)
        for kw in call.keywords:
            if kw.arg is None or kw.arg not in names:
                raise UsageError(f"{fn_name}() has no argument {kw.arg!r}; valid: "
                                 f"{', '.join(names) or 'none'}")
            if kw.arg in kwargs:
                raise UsageError(f"{fn_name}() got {kw.arg!r} twice in {text!r}")
            kwargs[kw.arg] = _literal(kw.value)
    sig = inspect.signature(fn)
    required = [p for p, v in sig.parameters.items() if p not in _HIDDEN_PARAMS
                and v.default is inspect.Parameter.empty and p not in kwargs]
    if required:
        raise UsageError(f"{fn_name}() needs {', '.join(required)}, e.g. "
                         f"'{pattern}={fn_name}({required[0]}=...)'")
    rule = InitRule(text, pattern, fn_name, tuple(kwargs.items()))
    _check_values(rule)
    return rule


_SHAPE_WORDS = re.compile(r"dimension|fan|divisib|groups|shape|size|square|2-D|2D", re.I)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _probe(shape: tuple[int, ...], shrink: bool) -> torch.Tensor:
    """A real CPU tensor standing in for ``shape`` when checking a rule.

    Real rather than ``meta``: running init functions on meta tensors pulls in
    torch.distributed and sympy (over a second of imports). With ``shrink``, large shapes
    are reduced but keep their number of dims (which decides whether xavier, eye, dirac...
    apply at all).
    """
    import torch

    if shrink and math.prod(shape) > 1 << 16:
        shape = tuple(min(d, 16) for d in shape)
    return torch.empty(shape)


def _try(rule: InitRule, tensor: torch.Tensor) -> None:
    """Run ``rule`` on a scratch tensor without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        _call(rule, tensor)


def _check_values(rule: InitRule) -> None:
    """Reject a value that fails whatever the shape (``nonlinearity=foo``, ``std=-1``).

    Shape-dependent failures (``dirac(groups=3)`` on 8 channels) are left for the
    per-parameter check, which sees the real shapes.
    """
    first: Exception | None = None
    for shape in ((8, 8), (8, 8, 3), (8, 8, 3, 3), (8,)):
        try:
            _try(rule, _probe(shape, shrink=False))
            return
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
            first = first or exc
    if first is not None and not _SHAPE_WORDS.search(str(first)):
        raise UsageError(f"init rule {rule.text!r}: {_first_line(first)}")


def _call(rule: InitRule, tensor: torch.Tensor) -> None:
    fn = init_functions()[rule.fn]
    fn(tensor, **dict(rule.kwargs))


def check_applies(rule: InitRule, name: str, shape: tuple[int, ...], dtype: str,
                  float_dtypes: frozenset[str]) -> None:
    """Raise :class:`OperationError` if ``rule`` cannot initialise this tensor."""
    if dtype not in float_dtypes:
        raise OperationError(f"cannot initialise {name} ({dtype}): init applies to "
                             "floating-point tensors only; exclude it from the pattern")
    try:
        _try(rule, _probe(shape, shrink=True))
    except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
        try:
            import torch

            # The shrunk probe can fail where the real shape works (dirac groups):
            # confirm on a meta tensor of the real shape before refusing.
            _try(rule, torch.empty(shape, device="meta"))
            return
        except (ValueError, TypeError, AssertionError, RuntimeError, NotImplementedError):
            pass
        shape_text = "x".join(map(str, shape)) or "scalar"
        raise OperationError(f"cannot initialise {name} ({shape_text}) with {rule.call}: "
                             f"{_first_line(exc)}") from None


def run_init(rule: InitRule, name: str, tensor: torch.Tensor, seed: int | None) -> None:
    """Initialise ``tensor`` in place; half types are computed in float32 and rounded."""
    import torch

    from paramctl.tensors import dtype_name

    # Half types are computed in float32 and rounded; a strided view (a transposed tensor
    # in a .pt) is computed contiguously, so values never depend on memory layout.
    if dtype_name(tensor.dtype) in _HALF or tensor.element_size() == 1:
        work = _float32_scratch(tuple(tensor.shape))
    elif not tensor.is_contiguous():
        work = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    else:
        work = tensor
    derived = rule.seed_for(seed, name) if seed is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            if derived is None:
                import os

                torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            else:
                torch.manual_seed(derived)
            with torch.no_grad():
                _call(rule, work)
    except (ValueError, TypeError, RuntimeError, AssertionError, NotImplementedError) as exc:
        raise OperationError(f"cannot initialise {name} with {rule.call}: "
                             f"{_first_line(exc)}") from None
    if work is not tensor:
        with torch.no_grad():
            tensor.copy_(work)


# float32 scratch for inits of half types, kept between the tensors of a rewrite (a fresh
# one costs a page fault per 4 KiB: 22,000 for one 7B MLP matrix), per thread, up to 256 MiB.
_SCRATCH = threading.local()
_SCRATCH_MAX = 256 << 20


def _float32_scratch(shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    numel = math.prod(shape)
    if numel * 4 > _SCRATCH_MAX:
        return torch.empty(shape, dtype=torch.float32)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel].view(shape)


# -- rule files --------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One ordered step: ``kind`` is freeze, unfreeze, init, or one of convert's keep,
    drop, rename (``renames``) and cast (``dtype``, limited by ``patterns`` and
    ``excludes``)."""

    kind: str
    patterns: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    exact: tuple[str, ...] = ()
    rules: tuple[InitRule, ...] = field(default=())
    where: str = ""  # "rules.toml: rule 2" for a step from a rules file; prefixes its errors
    renames: tuple[Rename, ...] = ()
    dtype: str | None = None


_STEP_KEYS = ("freeze", "unfreeze", "init", "keep", "drop", "rename", "cast")
CONVERT_KINDS = frozenset({"keep", "drop", "rename", "cast"})


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{where}: '{key}' must be a string or a non-empty list of strings")


def parse_steps(doc: Mapping[str, Any], origin: str = "rules") -> tuple[list[Step], int | None]:
    """Validate a parsed rules document; returns the steps and an optional ``seed``."""
    unknown = set(doc) - {"rule", "seed"}
    if unknown:
        raise UsageError(f"{origin}: unknown top-level key {sorted(unknown)[0]!r} "
                         "(expected [[rule]] tables and an optional seed)")
    seed = doc.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise UsageError(f"{origin}: seed must be an integer")
    rules = doc.get("rule")
    if not isinstance(rules, list) or not rules:
        raise UsageError(f"{origin}: no [[rule]] tables found")
    steps: list[Step] = []
    for i, entry in enumerate(rules, start=1):
        where = f"{origin}: rule {i}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: must be a table")
        kinds = [k for k in _STEP_KEYS if k in entry]
        extra = set(entry) - {*_STEP_KEYS, "exclude", "only"}
        if extra:
            raise UsageError(f"{where}: unknown key {sorted(extra)[0]!r} (expected one of "
                             f"{', '.join(_STEP_KEYS)}, and optionally exclude)")
        if len(kinds) != 1:
            raise UsageError(f"{where}: needs exactly one of {', '.join(_STEP_KEYS)}")
        kind = kinds[0]
        if "only" in entry and kind != "cast":
            raise UsageError(f"{where}: 'only' applies to cast")
        excludes = _strings(entry["exclude"], where, "exclude") if "exclude" in entry else ()
        if kind == "cast":
            value = entry["cast"]
            if not isinstance(value, str):
                raise UsageError(f"{where}: 'cast' must be a dtype name such as \"bfloat16\"")
            try:
                dtype = parse_cast(value)
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
            only = _strings(entry["only"], where, "only") if "only" in entry else ()
            steps.append(Step(kind, patterns=only, excludes=excludes, where=where, dtype=dtype))
            continue
        values = _strings(entry[kind], where, kind)
        if kind == "init":
            try:
                parsed = tuple(parse_init_rule(v) for v in values)
            except UsageError as exc:
                raise UsageError(f"{where} (init): {exc}") from None
            steps.append(Step(kind, excludes=excludes, rules=parsed, where=where))
        elif kind == "rename":
            if excludes:
                raise UsageError(f"{where}: 'exclude' does not apply to rename")
            try:
                renames = tuple(parse_rename(v) for v in values)
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
            steps.append(Step(kind, where=where, renames=renames))
        else:
            if excludes and kind in ("keep", "drop"):
                raise UsageError(f"{where}: 'exclude' does not apply to {kind}; use '!PATTERN'")
            steps.append(Step(kind, patterns=values, excludes=excludes, where=where))
    return steps, seed


def load_rules_file(path: Path) -> tuple[list[Step], int | None]:
    """Read and validate a TOML rules file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"no such rules file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read rules file {path}: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from None
    return parse_steps(doc, str(path))


def steps_from_rules(rules: Sequence[InitRule]) -> list[Step]:
    return [Step("init", rules=(r,)) for r in rules]


# -- convert: renames and casts -------------------------------------------------------------
CAST_DTYPES = ("float32", "bfloat16", "float16")
_CAST_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "f16": "float16", "half": "float16"}


def parse_cast(text: str) -> str:
    """``bf16`` / ``bfloat16`` -> ``bfloat16``; anything else is a usage error."""
    dtype = _CAST_ALIASES.get(text.strip().lower(), text.strip().lower())
    if dtype not in CAST_DTYPES:
        raise UsageError(f"--cast {text!r}: unknown dtype; choose one of "
                         f"{', '.join(CAST_DTYPES)}")
    return dtype


@dataclass(frozen=True)
class Rename:
    """``FROM=TO``: a plain ``FROM`` replaces a leading prefix; ``re:REGEX=TO`` is re.sub."""

    text: str
    source: str
    target: str
    regex: re.Pattern[str] | None = None

    def __call__(self, name: str) -> str | None:
        """The new name, or None when this rename does not apply to ``name``."""
        if self.regex is not None:
            new, count = self.regex.subn(self.target, name)
            return new if count else None
        if name.startswith(self.source):
            return self.target + name[len(self.source):]
        return None


def parse_rename(text: str) -> Rename:
    """Parse ``FROM=TO`` (split at the last ``=``: names rarely hold one, regexes might)."""
    body = text[3:] if text.startswith("re:") else text
    if "=" not in body:
        raise UsageError(f"--rename {text!r}: expected FROM=TO, e.g. 'module.=' or "
                         "'encoder.=backbone.' or 're:^(.*)\\.gamma$=\\1.weight'")
    source, _, target = body.rpartition("=")
    if not source:
        raise UsageError(f"--rename {text!r}: FROM is empty")
    if text.startswith("re:"):
        try:
            regex = re.compile(source)
            regex.sub(target, "")  # checks the group references in TO
        except (re.error, IndexError) as exc:
            raise UsageError(f"--rename {text!r}: {exc}") from None
        return Rename(text, source, target, regex)
    return Rename(text, source, target)


def apply_renames(names: Sequence[str], renames: Sequence[Rename]) -> dict[str, str]:
    """``old -> new`` for every name, renames applied in order. A rename that applies to
    no name is a :class:`NoMatchError`; two names becoming one an :class:`OperationError`
    naming both."""
    from paramctl.errors import NoMatchError

    current = {n: n for n in names}
    for rename in renames:
        hits = 0
        for old, name in current.items():
            new = rename(name)
            if new is not None:
                hits += 1
                current[old] = new
        if not hits:
            raise NoMatchError(f"--rename {rename.text!r} matched no name (use --dry-run to "
                               "see the names, or `paramctl list SOURCE -f names`)")
    seen: dict[str, str] = {}
    for old, new in current.items():
        if not new:
            raise OperationError(f"--rename turns {old!r} into an empty name")
        if new in seen:
            raise OperationError(f"--rename maps both {seen[new]!r} and {old!r} to {new!r}")
        seen[new] = old
    return current
