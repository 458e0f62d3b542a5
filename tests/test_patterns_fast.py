"""Each pattern compiles to one regular expression whose ``match``/``search`` is called per
name (no Python loop over a name's prefixes or components); it selects exactly what the
language's rules, written out the slow way, select."""

from __future__ import annotations

import fnmatch
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from paramctl.patterns import is_bare_word, parse_pattern, select


def by_the_rules(pattern: str, name: str) -> bool:
    """DESIGN's pattern rules, one by one (paramctl 0.1's matcher)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if is_bare_word(pattern):
        return pattern in name.split(".")
    if not any(c in pattern for c in "*?["):
        return name == pattern or name.startswith(pattern + ".")
    glob = re.compile(fnmatch.translate(pattern))
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(glob.match(p) for p in prefixes)


names = st.lists(st.sampled_from(["a", "b", "ab", "0", "1", "", "a\nb", "[x]"]), min_size=1,
                 max_size=5).map(".".join)
patterns = st.one_of(
    st.lists(st.sampled_from(["a", "b", "*", "?", ".", "[ab]", "[!a]", "0", "[0-1]", "ab"]),
             min_size=1, max_size=6).map("".join),
    st.sampled_from(["re:^a", "re:b$", "re:a.b", "re:\\.0\\b"]),
)


@settings(max_examples=3000, deadline=None)
@given(patterns, names)
def test_compiled_patterns_follow_the_rules(pattern: str, name: str) -> None:
    assert parse_pattern(pattern)(name) == by_the_rules(pattern, name)


@settings(max_examples=300, deadline=None)
@given(st.lists(names, max_size=12, unique=True), st.lists(patterns, max_size=3),
       st.lists(patterns, max_size=2))
def test_select_keeps_order_and_rules(pool: list[str], include: list[str],
                                      exclude: list[str]) -> None:
    want = [n for n in pool if any(by_the_rules(p, n) for p in include)
            and not any(by_the_rules(p, n) for p in exclude)]
    if include or not exclude:  # only excludes: a usage error where nothing is the default
        assert select(pool, include, exclude, allow_empty=True) == want
    if not include:
        everything = [n for n in pool if not any(by_the_rules(p, n) for p in exclude)]
        assert select(pool, [], exclude, default_all=True) == everything
