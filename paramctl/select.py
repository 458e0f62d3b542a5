"""The pattern language shared by every command: names in, names out, pure.

* A glob (``encoder.*``, ``*.bias``, ``layers.[0-5].*``) is matched case-sensitively against
  the full dotted name; ``*`` crosses dots.
* A pattern also selects a module: it matches a name when it matches the name or any dotted
  prefix of it (``encoder`` and ``*.attn`` select everything under those modules).
* ``re:EXPR`` is a regular expression searched in the name (anchor with ``^``/``$``).
* ``!PATTERN`` (or an entry of ``excludes``) removes matches; excludes win over includes.

>>> select(["a.weight", "a.bias", "b.weight"], ["*.weight", "!b"])
['a.weight']
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from paramctl.errors import NoMatchError, UsageError

__all__ = ["Pattern", "parse_pattern", "select", "split_patterns"]

_Matcher = Callable[[str], bool]


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern; ``text`` is what the user wrote (without ``!``)."""

    text: str
    matches: _Matcher

    def __call__(self, name: str) -> bool:
        return self.matches(name)


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


def parse_pattern(text: str) -> Pattern:
    """Compile one pattern; a malformed regular expression is a usage error."""
    if text.startswith("re:"):
        expr = text[3:]
        try:
            regex = re.compile(expr)
        except re.error as exc:
            raise UsageError(f"invalid regular expression {text!r}: {exc}") from None
        return Pattern(text, lambda name: regex.search(name) is not None)
    if not text:
        raise UsageError("empty pattern; use '*' to select everything")
    if not any(c in text for c in "*?["):
        return Pattern(text, lambda name: name == text or name.startswith(text + "."))
    regex = re.compile(fnmatch.translate(text))
    return Pattern(text, lambda name: any(regex.match(p) for p in _prefixes(name)))


def split_patterns(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``!PATTERN`` excludes from includes."""
    includes = [p for p in patterns if not p.startswith("!")]
    excludes = [p[1:] for p in patterns if p.startswith("!")]
    return includes, excludes


def _no_match(pattern: str, names: Sequence[str]) -> NoMatchError:
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    close = difflib.get_close_matches(probe, names, n=3, cutoff=0.4)
    if not close:
        # Prefix-style patterns are usually module names: compare against modules too.
        modules = sorted({p for n in names for p in _prefixes(n)})
        close = difflib.get_close_matches(probe, modules, n=3, cutoff=0.4)
    hint = f"; closest names: {', '.join(close)}" if close else ""
    return NoMatchError(
        f"pattern {pattern!r} matched no parameter{hint} (use --allow-empty to accept)"
    )


def select(
    names: Sequence[str],
    patterns: Sequence[str],
    excludes: Sequence[str] = (),
    *,
    exact: Sequence[str] = (),
    allow_empty: bool = False,
) -> list[str]:
    """Return the names selected by ``patterns`` and ``exact``, minus ``excludes``.

    Order follows ``names``. With no includes at all, every name is selected (so
    ``list`` without a pattern shows everything). ``exact`` names (from
    ``--names-from``) match literally. A pattern, exclude or exact name that matches no
    name raises :class:`NoMatchError` unless ``allow_empty``.

    >>> select(["enc.0.w", "enc.1.w", "dec.w"], ["enc"], ["enc.1"])
    ['enc.0.w']
    """
    includes, bang = split_patterns(patterns)
    compiled = [parse_pattern(p) for p in includes]
    dropped = [parse_pattern(p) for p in [*excludes, *bang]]
    known = set(names)
    if not allow_empty:
        for pat in [*compiled, *dropped]:
            if not any(pat(n) for n in names):
                raise _no_match(pat.text, names)
        for name in exact:
            if name not in known:
                raise _no_match(name, names)
    wanted = set(exact)
    if not compiled and not exact:
        chosen = list(names)
    else:
        chosen = [n for n in names if n in wanted or any(p(n) for p in compiled)]
    return [n for n in chosen if not any(p(n) for p in dropped)]
