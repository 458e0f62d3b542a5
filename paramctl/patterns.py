"""The pattern language shared by every command: names in, names out.

* A glob (``encoder.*``, ``*.bias``, ``layers.[0-5].*``) is matched case-sensitively against
  the full dotted name; ``*`` crosses dots.
* A pattern also selects a module: it matches a name when it matches the name or any dotted
  prefix of it (``encoder`` and ``*.attn`` select everything under those modules).
* A bare word (no dot, no glob character, not ``re:``) also matches a whole name component
  at any depth, as PEFT's ``target_modules`` does: ``q_proj``, ``lora_A``, ``bias``.
* ``re:EXPR`` is a regular expression searched in the name (anchor with ``^``/``$``).
* ``!PATTERN`` (or an entry of ``excludes``) removes matches; excludes win over includes, and
  an exclude that matches nothing is not an error.
* An empty selection selects nothing: only the commands that look pass ``default_all=True``
  to read "no pattern" as "every name". Everything is spelled ``*``; only excludes
  (``'!head'`` alone) is a usage error there, since it would select nothing.

Selection is pure. Only when nothing matches does the error's hint look further: at the
names (closest names, modules, a difference of case) and at the current folder (a pattern
that is the name of a file there was probably an unquoted glob the shell expanded).

>>> select(["a.weight", "a.bias", "b.weight"], ["*.weight", "!b"])
['a.weight']
>>> select(["m.0.q_proj.weight", "m.0.k_proj.weight"], ["q_proj"])
['m.0.q_proj.weight']
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import filterfalse

from paramctl.errors import NoMatchError, UsageError

__all__ = [
    "Pattern",
    "is_bare_word",
    "parse_pattern",
    "select",
    "split_patterns",
    "swapped_arguments_hint",
]

_Matcher = Callable[[str], object]  # truthy when the name matches (a re.Match or None)
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern; ``text`` is what the user wrote (without ``!``).

    ``matches`` is a compiled regular expression's ``match`` or ``search``: a C function,
    so that selecting among 100,000 names costs one call per name and no Python loop.
    """

    text: str
    matches: _Matcher

    def __call__(self, name: str) -> bool:
        return self.matches(name) is not None


def _prefixes(name: str) -> Iterable[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    start = 0
    while True:
        dot = name.find(".", start)
        if dot < 0:
            yield name
            return
        yield name[:dot]
        start = dot + 1


def _is_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def is_bare_word(text: str) -> bool:
    """A pattern with no dot, no glob character and no ``re:``: it matches a component."""
    return bool(text) and not text.startswith("re:") and "." not in text and not _is_glob(text)


def _glob_body(text: str) -> str:
    """``fnmatch.translate(text)`` without its end anchor: ``(?s:...)``."""
    translated = fnmatch.translate(text)
    if not translated.endswith(r"\Z"):
        raise AssertionError(translated)
    return translated[:-2]


def parse_pattern(text: str) -> Pattern:
    """Compile one pattern; a malformed regular expression is a usage error."""
    if text.startswith("re:"):
        expr = text[3:]
        try:
            regex = re.compile(expr)
        except re.error as exc:
            raise UsageError(f"invalid regular expression {text!r}: {exc}") from None
        return Pattern(text, regex.search)
    if not text:
        raise UsageError("empty pattern; use '*' to select everything")
    if is_bare_word(text):
        # The whole name, a top-level module, or any component: all three are "a component".
        return Pattern(text, re.compile(rf"(?:\A|\.){re.escape(text)}(?:\.|\Z)").search)
    if not _is_glob(text):  # a module or a name: the name itself, or anything under it
        return Pattern(text, re.compile(rf"{re.escape(text)}(?:\.|\Z)").match)
    # The name, or one of its dotted prefixes, matches the glob: the glob matches up to the
    # end or up to a dot (the regex tries every split, as a loop over the prefixes would).
    return Pattern(text, re.compile(rf"(?s:{_glob_body(text)}(?:\..*)?)\Z").match)


def split_patterns(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``!PATTERN`` excludes from includes."""
    includes = [p for p in patterns if not p.startswith("!")]
    excludes = [p[1:] for p in patterns if p.startswith("!")]
    return includes, excludes


# -- hints when nothing matches ------------------------------------------------------------
def _modules(names: Sequence[str]) -> list[str]:
    """Every proper dotted prefix of every name (``a.b.c`` -> ``a``, ``a.b``)."""
    seen: dict[str, None] = {}
    for name in names:
        dot = name.find(".")
        while dot >= 0:
            seen[name[:dot]] = None
            dot = name.find(".", dot + 1)
    return list(seen)


def _components(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(part for name in names for part in name.split(".")))


def _closest(probe: str, candidates: Sequence[str]) -> tuple[list[str], float]:
    """Up to three close candidates and the similarity of the best (0 when none)."""
    import difflib  # only a failed match needs it

    close = difflib.get_close_matches(probe, candidates, n=3, cutoff=0.4)
    if not close:
        return [], 0.0
    return close, difflib.SequenceMatcher(None, probe, close[0]).ratio()


def _case_variants(pattern: str, names: Sequence[str], literal: bool) -> list[str]:
    """Real spellings that match ``pattern`` when case is ignored (at most three)."""
    folded = pattern.casefold()
    if literal or not (pattern.startswith("re:") or _is_glob(pattern)):
        pool = list(names) if literal else [*names, *_modules(names)]
        if not literal and is_bare_word(pattern):
            pool = _components(names)
        return sorted({c for c in pool if c.casefold() == folded})[:3]
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:], re.IGNORECASE)
        except re.error:
            return []
        return [n for n in names if regex.search(n)][:3]
    glob = re.compile(fnmatch.translate(pattern), re.IGNORECASE)
    return [n for n in names if any(glob.match(p) for p in _prefixes(n))][:3]


def _hint(pattern: str, names: Sequence[str], literal: bool) -> str:
    """The most specific reason we can see why ``pattern`` matched nothing ("" if none)."""
    if (not literal and not pattern.startswith("re:") and pattern not in (".", "..")
            and os.path.lexists(pattern)):
        kind = "folder" if os.path.isdir(pattern) else "file"
        return (f"; {pattern!r} is a {kind} in the current folder: the shell probably "
                "expanded an unquoted glob, so quote your patterns")
    if not literal and "[" in pattern and not pattern.startswith("re:"):
        known = set(names)
        if pattern in known or pattern in set(_modules(names)):
            escaped = pattern.replace("[", "[[]")
            regex = "re:^" + re.escape(pattern) + (r"$" if pattern in known else r"(\.|$)")
            return (f"; '[' is a glob character: write '{escaped}' or '{regex}' to match "
                    "it literally")
    variants = _case_variants(pattern, names, literal)
    if variants:
        return f"; names differ only in case: {', '.join(variants)}"
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    leaves, leaf_score = _closest(probe, names)
    parts = [f"closest names: {', '.join(leaves)}"] if leaves else []
    if not literal:
        # Module-like typos (`block` for `blocks`, `encoder.layer` for `encoder.layers`)
        # read better against module names, or name parts for a bare word.
        if is_bare_word(pattern):
            label, pool = "closest name parts", _components(names)
        else:
            label, pool = "closest modules", _modules(names)
            probe = probe.removesuffix(".*").removesuffix("*").rstrip(".") or probe
        modules, module_score = _closest(probe, pool)
        if modules and module_score >= leaf_score:
            parts.append(f"{label}: {', '.join(modules)}")
    return "".join(f"; {p}" for p in parts)


def _no_match(pattern: str, names: Sequence[str], *, literal: bool = False) -> NoMatchError:
    what = "name" if literal else "pattern"
    return NoMatchError(f"{what} {pattern!r} matched no parameter"
                        f"{_hint(pattern, names, literal)} (use --allow-empty to accept)")


def swapped_arguments_hint(source: str, others: Sequence[str], *,
                           command: str = "freeze") -> str | None:
    """A hint when SOURCE looks like a pattern and a later argument is an existing path.

    ``source`` looks like a pattern when it holds a glob character or starts with ``re:``
    and no such path exists; ``others`` are the arguments after it. Returns ``None`` when
    the arguments look right. Pure apart from checking which paths exist.

    >>> swapped_arguments_hint("*.bias", ["ckpt.pt"])  # doctest: +SKIP
    "arguments swapped? the checkpoint comes first: paramctl freeze ckpt.pt '*.bias'"
    """
    looks_like_pattern = source.startswith("re:") or _is_glob(source)
    if not looks_like_pattern or os.path.lexists(source):
        return None
    for other in others:
        if not other.startswith("-") and os.path.exists(other):
            return (f"arguments swapped? the checkpoint comes first: "
                    f"paramctl {command} {other} {source!r}")
    return None


# -- selection -----------------------------------------------------------------------------
def _only_excludes(excludes: Sequence[str]) -> UsageError:
    given = " ".join(repr("!" + e) for e in excludes)
    keep = " ".join(["'*'", *(repr("!" + e) for e in excludes)])
    return UsageError(f"only excludes given ({given}): that selects nothing; write {keep} "
                      f"to select everything but {', '.join(excludes)}")


def select(
    names: Sequence[str],
    patterns: Sequence[str],
    excludes: Sequence[str] = (),
    *,
    exact: Sequence[str] = (),
    allow_empty: bool = False,
    default_all: bool = False,
) -> list[str]:
    """Return the names selected by ``patterns`` and ``exact``, minus ``excludes``.

    Order follows ``names``. ``exact`` names (from ``--names-from``) match literally. With
    no include pattern and no exact name the selection is empty, unless ``default_all``
    (the commands that only look: no pattern shows everything); then excludes remove from
    every name. Without ``default_all``, excludes with nothing to remove them from are a
    :class:`UsageError` (write ``'*'`` first). An include pattern or exact name that
    matches nothing raises :class:`NoMatchError` unless ``allow_empty``; an exclude that
    matches nothing is fine.

    >>> select(["enc.0.w", "enc.1.w", "dec.w"], ["enc"], ["enc.1"])
    ['enc.0.w']
    >>> select(["enc.0.w", "dec.w"], [])
    []
    >>> select(["enc.0.w", "dec.w"], [], ["dec"], default_all=True)
    ['enc.0.w']
    """
    includes, bang = split_patterns(patterns)
    compiled = [parse_pattern(p) for p in includes]
    removed = [*bang, *excludes]
    dropped = [parse_pattern(p) for p in removed]
    if not compiled and not exact:
        if default_all:
            return _without(list(names), dropped)
        if dropped:
            raise _only_excludes(removed)
        return []
    if not allow_empty:
        for pat in compiled:
            if not any(map(pat.matches, names)):
                raise _no_match(pat.text, names)
        known = set(names)
        for name in exact:
            if name not in known:
                raise _no_match(name, names, literal=True)
    wanted = set(exact)
    if len(compiled) == 1 and not wanted:
        chosen = list(filter(compiled[0].matches, names))
    else:
        tests = [p.matches for p in compiled]
        chosen = [n for n in names if n in wanted or any(t(n) for t in tests)]
    return _without(chosen, dropped)


def _without(names: list[str], dropped: Sequence[Pattern]) -> list[str]:
    for pat in dropped:
        names = list(filterfalse(pat.matches, names))
    return names
