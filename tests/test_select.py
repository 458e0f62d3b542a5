"""Unit tests of the pattern language: ``paramctl.patterns.select`` and ``parse_pattern``.

Pure functions over lists of names; no torch. Only the no-match hints and
``swapped_arguments_hint`` look at the current folder (a ``tmp_path``, via monkeypatch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from paramctl.errors import NoMatchError, ParamctlError, UsageError
from paramctl.patterns import (
    is_bare_word,
    parse_pattern,
    select,
    split_patterns,
    swapped_arguments_hint,
)

NAMES = [
    "embed.weight",
    "encoder.layers.0.attn.q_proj.weight",
    "encoder.layers.0.attn.q_proj.bias",
    "encoder.layers.0.attn_norm.weight",
    "encoder.layers.0.mlp.fc1.weight",
    "encoder.layers.1.attn.q_proj.weight",
    "encoder.layers.5.mlp.fc1.weight",
    "encoder.layers.6.mlp.fc1.weight",
    "encoder.layers.12.mlp.fc1.weight",
    "encoder2.weight",
    "decoder.attn.weight",
    "head.weight",
    "head.bias",
]


def pick(*indices: int) -> list[str]:
    return [NAMES[i] for i in indices]


# -- globs -------------------------------------------------------------------------------------
class TestGlob:
    def test_star_crosses_dots(self) -> None:
        assert select(NAMES, ["*.bias"]) == [
            "encoder.layers.0.attn.q_proj.bias",
            "head.bias",
        ]

    def test_star_in_the_middle_crosses_dots(self) -> None:
        assert select(NAMES, ["encoder.*.weight"]) == pick(1, 3, 4, 5, 6, 7, 8)

    def test_prefix_star(self) -> None:
        assert select(NAMES, ["encoder.*"]) == pick(1, 2, 3, 4, 5, 6, 7, 8)

    def test_character_class(self) -> None:
        # [0-5] is one character: layers 0, 1 and 5, not 6 and not 12.
        assert select(NAMES, ["encoder.layers.[0-5].*"]) == pick(1, 2, 3, 4, 5, 6)

    def test_negated_character_class(self) -> None:
        assert select(NAMES, ["encoder.layers.[!0].*"]) == pick(5, 6, 7)

    def test_question_mark_is_one_character(self) -> None:
        assert select(NAMES, ["encoder.layers.?.mlp.*"]) == pick(4, 6, 7)
        assert select(NAMES, ["encoder.layers.??.mlp.*"]) == pick(8)

    def test_case_sensitive(self) -> None:
        assert select(NAMES, ["*.Bias"], allow_empty=True) == []
        assert select(NAMES, ["HEAD"], allow_empty=True) == []

    def test_star_alone_selects_everything(self) -> None:
        assert select(NAMES, ["*"]) == NAMES


# -- modules -----------------------------------------------------------------------------------
class TestModulePrefix:
    def test_module_name_selects_everything_under_it(self) -> None:
        assert select(NAMES, ["encoder"]) == pick(1, 2, 3, 4, 5, 6, 7, 8)

    def test_module_name_is_not_a_string_prefix(self) -> None:
        assert "encoder2.weight" not in select(NAMES, ["encoder"])
        assert select(NAMES, ["encoder2"]) == ["encoder2.weight"]
        assert select(NAMES, ["enc"], allow_empty=True) == []

    def test_nested_module(self) -> None:
        assert select(NAMES, ["encoder.layers.0.attn"]) == pick(1, 2)

    def test_glob_selects_a_module(self) -> None:
        # `*.attn` names modules; everything under them is selected, `attn_norm` is not.
        assert select(NAMES, ["*.attn"]) == pick(1, 2, 5, 10)

    def test_glob_module_with_class(self) -> None:
        assert select(NAMES, ["encoder.layers.[01]"]) == pick(1, 2, 3, 4, 5)

    def test_glob_does_not_match_partial_segment(self) -> None:
        assert select(NAMES, ["*.q_pro"], allow_empty=True) == []

    def test_exact_full_name(self) -> None:
        assert select(NAMES, ["head.weight"]) == ["head.weight"]

    def test_full_name_is_not_a_prefix_of_a_longer_segment(self) -> None:
        names = ["a.w", "a.weight"]
        assert select(names, ["a.w"]) == ["a.w"]


# -- regular expressions -----------------------------------------------------------------------
class TestRegex:
    def test_search_anywhere(self) -> None:
        assert select(NAMES, ["re:attn"]) == pick(1, 2, 3, 5, 10)

    def test_search_is_not_fullmatch(self) -> None:
        assert select(NAMES, ["re:q_pr"]) == pick(1, 2, 5)

    def test_start_anchor(self) -> None:
        assert select(NAMES, [r"re:^encoder\."]) == pick(1, 2, 3, 4, 5, 6, 7, 8)

    def test_end_anchor(self) -> None:
        assert select(NAMES, ["re:bias$"]) == pick(2, 12)

    def test_both_anchors(self) -> None:
        assert select(NAMES, [r"re:^head\.weight$"]) == ["head.weight"]
        # a full-string regex on a module name does not do module-prefix matching
        assert select(NAMES, ["re:^head$"], allow_empty=True) == []

    def test_regex_alternation_and_classes(self) -> None:
        assert select(NAMES, [r"re:layers\.(1|12)\."]) == pick(5, 8)
        assert select(NAMES, [r"re:layers\.\d{2}\."]) == pick(8)

    def test_regex_is_case_sensitive(self) -> None:
        assert select(NAMES, ["re:HEAD"], allow_empty=True) == []
        assert select(NAMES, ["re:(?i)HEAD"]) == pick(11, 12)

    def test_dot_in_glob_is_literal(self) -> None:
        # In a glob `.` is a dot; in a regex it is any character.
        names = ["a.b", "axb"]
        assert select(names, ["a.b"]) == ["a.b"]
        assert select(names, ["re:^a.b$"]) == ["a.b", "axb"]

    def test_bad_regex_is_a_usage_error(self) -> None:
        with pytest.raises(UsageError) as info:
            select(NAMES, ["re:("])
        assert info.value.exit_code == 2
        assert "re:(" in str(info.value)

    def test_bad_regex_in_exclude_is_a_usage_error(self) -> None:
        with pytest.raises(UsageError):
            select(NAMES, ["*"], ["re:[a-"])
        with pytest.raises(UsageError):
            select(NAMES, ["!re:*x"])

    def test_parse_pattern_bad_regex(self) -> None:
        with pytest.raises(UsageError) as info:
            parse_pattern("re:[unclosed")
        assert info.value.exit_code == 2
        assert isinstance(info.value, ParamctlError)


# -- excludes ----------------------------------------------------------------------------------
class TestExclude:
    def test_bang_excludes(self) -> None:
        assert select(NAMES, ["head", "!head.bias"]) == ["head.weight"]

    def test_excludes_argument(self) -> None:
        assert select(NAMES, ["encoder"], ["encoder.layers.0"]) == pick(5, 6, 7, 8)

    def test_exclude_wins_over_include_whatever_the_order(self) -> None:
        assert select(NAMES, ["!*.bias", "head"]) == ["head.weight"]
        assert select(NAMES, ["head", "!*.bias"]) == ["head.weight"]
        assert select(NAMES, ["head.bias"], ["*.bias"], allow_empty=True) == []

    def test_exclude_a_module(self) -> None:
        assert select(NAMES, ["*.weight", "!encoder"]) == [
            "embed.weight", "encoder2.weight", "decoder.attn.weight", "head.weight",
        ]

    def test_only_excludes_start_from_everything(self) -> None:
        # Only for the commands that look (default_all); see TestEmptySelection.
        assert select(NAMES, ["!encoder", "!*.bias"], default_all=True) == [
            "embed.weight", "encoder2.weight", "decoder.attn.weight", "head.weight",
        ]

    def test_regex_exclude(self) -> None:
        assert select(NAMES, ["head", "!re:weight$"]) == ["head.bias"]

    def test_exclude_wins_over_exact(self) -> None:
        assert select(NAMES, [], ["head"], exact=["head.weight", "embed.weight"]) == [
            "embed.weight"
        ]

    def test_exclude_that_matches_nothing_is_not_an_error(self) -> None:
        assert select(NAMES, ["head"], ["haed"]) == pick(11, 12)
        assert select(NAMES, ["head"], ["haed"], allow_empty=True) == pick(11, 12)
        assert select(NAMES, ["*"], ["lora_*"]) == NAMES
        assert select(NAMES, ["*", "!lora_*", "!re:^nothing"]) == NAMES
        assert select(NAMES, [], ["lora_*"], default_all=True) == NAMES

    def test_a_bad_regex_in_an_exclude_that_would_match_nothing_is_still_an_error(
            self) -> None:
        with pytest.raises(UsageError):
            select(NAMES, ["*"], ["re:(lora"])

    def test_split_patterns(self) -> None:
        assert split_patterns(["a", "!b", "re:c", "!re:d"]) == (["a", "re:c"], ["b", "re:d"])


# -- order, exact names, no pattern ------------------------------------------------------------
class TestOrderAndExact:
    def test_order_follows_names_not_patterns(self) -> None:
        assert select(NAMES, ["head.bias", "embed", "head.weight"]) == [
            "embed.weight", "head.weight", "head.bias",
        ]

    def test_overlapping_patterns_give_no_duplicates(self) -> None:
        got = select(NAMES, ["head", "head.*", "*.bias", "re:^head"])
        assert got == ["encoder.layers.0.attn.q_proj.bias", "head.weight", "head.bias"]

    def test_no_patterns_selects_nothing_unless_default_all(self) -> None:
        assert select(NAMES, []) == []
        assert select(NAMES, [], default_all=True) == NAMES

    def test_exact_names_match_literally(self) -> None:
        names = ["a[0].w", "a0.w", "a.w", "ab"]
        assert select(names, [], exact=["a[0].w"]) == ["a[0].w"]
        # a module name is not an exact parameter name
        with pytest.raises(NoMatchError):
            select(names, [], exact=["a"])

    def test_exact_names_combine_with_patterns(self) -> None:
        assert select(NAMES, ["head.bias"], exact=["embed.weight"]) == [
            "embed.weight", "head.bias",
        ]

    def test_unknown_exact_name_is_an_error(self) -> None:
        with pytest.raises(NoMatchError) as info:
            select(NAMES, [], exact=["head.wieght"])
        assert "head.wieght" in str(info.value)
        assert "head.weight" in str(info.value)
        assert select(NAMES, [], exact=["head.wieght"], allow_empty=True) == []

    def test_empty_pattern_is_a_usage_error(self) -> None:
        with pytest.raises(UsageError):
            select(NAMES, [""])
        with pytest.raises(UsageError):
            select(NAMES, ["!"])


# -- no match ----------------------------------------------------------------------------------
class TestNoMatch:
    def test_exit_code_and_message(self) -> None:
        with pytest.raises(NoMatchError) as info:
            select(NAMES, ["head.wieght"])
        err = info.value
        assert err.exit_code == 3
        assert isinstance(err, ParamctlError)
        text = str(err)
        assert "'head.wieght'" in text
        assert "head.weight" in text  # the closest real name
        assert "\n" not in text

    def test_suggests_close_module_names(self) -> None:
        with pytest.raises(NoMatchError) as info:
            select(NAMES, ["heads"])
        hint = str(info.value).split("closest names:", 1)[1]
        assert "head" in hint

    def test_one_bad_pattern_among_good_ones_fails(self) -> None:
        with pytest.raises(NoMatchError) as info:
            select(NAMES, ["head", "encoder.layers.[7-9].*"])
        assert "'encoder.layers.[7-9].*'" in str(info.value)

    def test_regex_no_match(self) -> None:
        with pytest.raises(NoMatchError) as info:
            select(NAMES, ["re:^attn"])
        assert "'re:^attn'" in str(info.value)

    def test_nothing_close_still_names_the_pattern(self) -> None:
        with pytest.raises(NoMatchError) as info:
            select(NAMES, ["zzzzzzzz"])
        assert "'zzzzzzzz'" in str(info.value)

    def test_allow_empty(self) -> None:
        assert select(NAMES, ["zzz"], allow_empty=True) == []
        assert select(NAMES, ["zzz", "head.bias"], allow_empty=True) == ["head.bias"]
        assert select([], ["*"], allow_empty=True) == []

    def test_empty_name_list(self) -> None:
        assert select([], []) == []
        with pytest.raises(NoMatchError):
            select([], ["*"])


# -- parse_pattern -----------------------------------------------------------------------------
class TestParsePattern:
    def test_text_is_kept(self) -> None:
        assert parse_pattern("encoder.*").text == "encoder.*"
        assert parse_pattern("re:^a$").text == "re:^a$"

    @pytest.mark.parametrize(
        ("pattern", "name", "expected"),
        [
            ("encoder", "encoder.x.w", True),
            ("encoder", "encoder", True),
            ("encoder", "encoder2.w", False),
            ("encoder.x", "encoder.x.w", True),
            ("encoder.x", "encoder.xy.w", False),
            ("*.attn", "blocks.0.attn.q.weight", True),
            ("*.attn", "blocks.0.attn_norm.weight", False),
            ("*.bias", "a.b.c.bias", True),
            ("layers.[0-5].*", "layers.3.w", True),
            ("layers.[0-5].*", "layers.7.w", False),
            ("layers.[0-5].*", "layers.10.w", False),
            ("re:attn", "blocks.0.self_attn.w", True),
            ("re:^attn", "blocks.0.attn.w", False),
            ("re:w$", "blocks.0.attn.w", True),
            ("re:", "anything", True),
        ],
    )
    def test_matches(self, pattern: str, name: str, expected: bool) -> None:
        assert parse_pattern(pattern)(name) is expected

    def test_empty_pattern(self) -> None:
        with pytest.raises(UsageError) as info:
            parse_pattern("")
        assert info.value.exit_code == 2


# -- properties --------------------------------------------------------------------------------
_segment = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6),
    st.integers(min_value=0, max_value=30).map(str),
)
_name = st.lists(_segment, min_size=1, max_size=5).map(".".join)
_names = st.lists(_name, min_size=1, max_size=25, unique=True)
_glob = st.lists(
    st.one_of(_segment, st.sampled_from(["*", "?", "[0-5]", "[a-m]*", "*_*"])),
    min_size=1, max_size=4,
).map(".".join)
_regex = st.sampled_from([r"re:^[a-m]", r"re:\d", r"re:_$", r"re:\.0\.", "re:a", "re:^x"])
_pattern = st.one_of(_glob, _regex, _name)
# No example database: tests never write into the repository.
_props = settings(database=None, deadline=None)


@_props
@given(_names, st.lists(_pattern, max_size=4), st.lists(_pattern, max_size=2))
def test_result_is_ordered_subset(names: list[str], patterns: list[str],
                                  excludes: list[str]) -> None:
    # default_all: with no include, excludes alone are a usage error otherwise
    got = select(names, patterns, excludes, allow_empty=True, default_all=True)
    assert set(got) <= set(names)
    assert len(got) == len(set(got))
    positions = [names.index(n) for n in got]
    assert positions == sorted(positions)


@_props
@given(_names, st.data())
def test_literal_full_name_selects_itself(names: list[str], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(names))
    assert name in select(names, [name])
    # and everything a dotted name selects is that name or something under it; a bare
    # word selects every name holding it as a component (TestBareWord)
    if "." in name:
        assert all(n == name or n.startswith(name + ".") for n in select(names, [name]))
    else:
        assert all(name in n.split(".") for n in select(names, [name]))


@_props
@given(_names, _pattern)
def test_excluding_what_you_include_gives_nothing(names: list[str], pattern: str) -> None:
    assert select(names, [pattern], [pattern], allow_empty=True) == []
    assert select(names, [pattern, "!" + pattern], allow_empty=True) == []


@_props
@given(_names)
def test_star_selects_all_names_in_order(names: list[str]) -> None:
    assert select(names, ["*"]) == names
    assert select(names, ["re:"]) == names
    assert select(names, [], default_all=True) == names
    assert select(names, []) == []


@_props
@given(_names, _pattern)
def test_exclude_is_complement(names: list[str], pattern: str) -> None:
    included = select(names, [pattern], allow_empty=True)
    excluded = select(names, ["*"], [pattern], allow_empty=True)
    assert sorted(included + excluded) == sorted(names)
    assert not set(included) & set(excluded)


@_props
@given(_names, _pattern)
def test_no_match_iff_error(names: list[str], pattern: str) -> None:
    lenient = select(names, [pattern], allow_empty=True)
    if lenient:
        assert select(names, [pattern]) == lenient
    else:
        with pytest.raises(NoMatchError) as info:
            select(names, [pattern])
        assert repr(pattern) in str(info.value)


# -- bare words: a name component at any depth (PEFT's target_modules) ------------------------
LLAMA = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.q_proj.base.q.lora_A.default.weight",
    "model.norm.weight",
    "lm_head.weight",
    "enc.bias",
]


class TestBareWord:
    @pytest.mark.parametrize(
        ("pattern", "name", "expected"),
        [
            ("q_proj", "model.layers.0.self_attn.q_proj.weight", True),
            ("bias", "enc.bias", True),
            ("lora_A", "base.q.lora_A.default.weight", True),
            ("model", "model.norm.weight", True),  # a top-level module, as before
            ("lm_head", "lm_head", True),  # the whole name
            ("0", "model.layers.0.mlp.up_proj.weight", True),
            ("q_pro", "model.layers.0.self_attn.q_proj.weight", False),  # whole parts only
            ("proj", "model.layers.0.self_attn.q_proj.weight", False),
            ("Q_proj", "model.layers.0.self_attn.q_proj.weight", False),  # case-sensitive
            ("lora_A", "base.q.lora_AB.default.weight", False),
        ],
    )
    def test_matches(self, pattern: str, name: str, expected: bool) -> None:
        assert is_bare_word(pattern)
        assert parse_pattern(pattern)(name) is expected

    def test_selects_at_any_depth(self) -> None:
        assert select(LLAMA, ["q_proj"]) == [LLAMA[1], LLAMA[4], LLAMA[5]]
        assert select(LLAMA, ["lora_A"]) == [LLAMA[5]]
        assert select(LLAMA, ["bias"]) == ["enc.bias"]
        assert select(NAMES, ["bias"]) == ["encoder.layers.0.attn.q_proj.bias", "head.bias"]
        assert select(NAMES, ["attn"]) == pick(1, 2, 5, 10)  # not attn_norm

    def test_bare_word_excludes(self) -> None:
        assert select(LLAMA, ["q_proj", "!lora_A"]) == [LLAMA[1], LLAMA[4]]
        assert select(NAMES, ["*"], ["weight"]) == pick(2, 12)

    def test_dotted_plain_patterns_keep_their_meaning(self) -> None:
        # a dot makes it a full name or module path from the top, not a component
        assert select(NAMES, ["attn.q_proj"], allow_empty=True) == []
        assert select(NAMES, ["*.attn.q_proj"]) == pick(1, 2, 5)
        assert select(NAMES, ["head.bias"]) == ["head.bias"]
        assert select(NAMES, ["encoder.layers.0.attn"]) == pick(1, 2)

    @pytest.mark.parametrize("text", ["a.b", "q_*", "lay?rs", "[ab]", "re:q_proj", ""])
    def test_what_is_not_a_bare_word(self, text: str) -> None:
        assert not is_bare_word(text)


# -- an empty selection selects nothing --------------------------------------------------------
class TestEmptySelection:
    def test_no_includes_select_nothing(self) -> None:
        assert select(NAMES, []) == []
        assert select(NAMES, [], exact=[]) == []
        assert select(NAMES, [], allow_empty=True) == []
        assert select([], []) == []

    def test_default_all_is_for_the_commands_that_look(self) -> None:
        assert select(NAMES, [], default_all=True) == NAMES
        assert select(NAMES, ["!encoder"], default_all=True) == pick(0, 9, 10, 11, 12)
        # with an include, default_all changes nothing
        assert select(NAMES, ["head"], default_all=True) == pick(11, 12)

    def test_only_a_bang_exclude_is_a_usage_error(self) -> None:
        with pytest.raises(UsageError) as info:
            select(NAMES, ["!head"])
        assert info.value.exit_code == 2
        assert str(info.value) == ("only excludes given ('!head'): that selects nothing; "
                                   "write '*' '!head' to select everything but head")

    def test_only_an_excludes_argument_is_a_usage_error(self) -> None:
        with pytest.raises(UsageError) as info:
            select(NAMES, [], ["head"])
        assert str(info.value) == ("only excludes given ('!head'): that selects nothing; "
                                   "write '*' '!head' to select everything but head")

    def test_several_excludes_are_all_named(self) -> None:
        with pytest.raises(UsageError) as info:
            select(NAMES, ["!head", "!re:bias$"], ["embed"], allow_empty=True)
        assert str(info.value) == (
            "only excludes given ('!head' '!re:bias$' '!embed'): that selects nothing; "
            "write '*' '!head' '!re:bias$' '!embed' to select everything but head, "
            "re:bias$, embed")
        assert "\n" not in str(info.value)

    def test_the_suggested_fix_works(self) -> None:
        assert select(NAMES, ["*", "!head"]) == pick(*range(11))

    def test_exact_names_are_includes(self) -> None:
        assert select(NAMES, [], ["head"], exact=["head.bias", "embed.weight"]) == [
            "embed.weight"]
        assert select(NAMES, ["!head"], exact=["embed.weight"]) == ["embed.weight"]


# -- hints when nothing matches ----------------------------------------------------------------
def no_match(names: list[str], patterns: list[str], exact: Sequence[str] = ()) -> str:
    with pytest.raises(NoMatchError) as info:
        select(names, patterns, exact=exact)
    text = str(info.value)
    assert "\n" not in text
    assert info.value.exit_code == 3
    assert text.endswith(" (use --allow-empty to accept)")
    return text


class TestHints:
    @pytest.fixture(autouse=True)
    def _empty_cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # the file-name hint looks at the current folder: make it a known one
        monkeypatch.chdir(tmp_path)

    def test_closest_modules_for_a_module_typo(self) -> None:
        text = no_match(NAMES, ["encoder.layer.0"])
        assert "closest modules: encoder.layers.0" in text
        text = no_match(NAMES, ["encoder.layer.*"])
        assert "closest modules: encoder.layers" in text

    def test_closest_name_parts_for_a_bare_word(self) -> None:
        text = no_match(LLAMA, ["q_prj"])
        assert text == ("pattern 'q_prj' matched no parameter; closest name parts: q_proj, "
                        "k_proj, up_proj (use --allow-empty to accept)")

    def test_a_leaf_typo_names_leaves_only(self) -> None:
        text = no_match(NAMES, ["head.wieght"])
        assert "closest names: head.weight" in text
        assert "closest modules" not in text

    def test_names_differ_only_in_case(self) -> None:
        names = ["backbone.0.weight", "backbone.1.weight", "head.weight"]
        assert no_match(names, ["Backbone"]) == (
            "pattern 'Backbone' matched no parameter; names differ only in case: backbone "
            "(use --allow-empty to accept)")
        assert "differ only in case: backbone.0" in no_match(names, ["BACKBONE.0"])
        assert "differ only in case: head.weight" in no_match(names, ["Head.Weight"])
        assert ("differ only in case: backbone.0.weight, backbone.1.weight"
                in no_match(names, ["Backbone.*"]))
        assert "differ only in case: head.weight" in no_match(names, ["re:^HEAD"])
        assert "differ only in case: head.weight" in no_match(
            names, [], exact=["Head.weight"])

    def test_bracket_is_a_glob_character(self) -> None:
        names = ["a.[0].w", "a.[1].w"]
        text = no_match(names, ["a.[0].w"])
        assert text == (r"pattern 'a.[0].w' matched no parameter; '[' is a glob character: "
                        r"write 'a.[[]0].w' or 're:^a\.\[0\]\.w$' to match it literally "
                        "(use --allow-empty to accept)")
        # and both suggestions do
        assert select(names, ["a.[[]0].w"]) == ["a.[0].w"]
        assert select(names, [r"re:^a\.\[0\]\.w$"]) == ["a.[0].w"]
        # a module with a bracket
        text = no_match(names, ["a.[1]"])
        assert r"write 'a.[[]1]' or 're:^a\.\[1\](\.|$)'" in text
        assert select(names, ["a.[[]1]"]) == ["a.[1].w"]
        assert select(names, [r"re:^a\.\[1\](\.|$)"]) == ["a.[1].w"]
        # exact names (--names-from) already match literally
        assert select(names, [], exact=["a.[0].w"]) == ["a.[0].w"]

    def test_a_pattern_named_like_a_file_here_was_an_unquoted_glob(self,
                                                                   tmp_path: Path) -> None:
        (tmp_path / "model.pt").write_bytes(b"")
        (tmp_path / "runs").mkdir()
        assert no_match(NAMES, ["model.pt"]) == (
            "pattern 'model.pt' matched no parameter; 'model.pt' is a file in the current "
            "folder: the shell probably expanded an unquoted glob, so quote your patterns "
            "(use --allow-empty to accept)")
        assert "'runs' is a folder in the current folder" in no_match(NAMES, ["runs"])
        assert "quote your patterns" not in no_match(NAMES, ["model.pth"])

    def test_the_hint_is_only_a_hint(self) -> None:
        # every no-match still names the pattern first
        for pattern in ["zzz", "Head", "a.[0]", "re:^x", "x.*"]:
            assert no_match(NAMES, [pattern]).startswith(f"pattern {pattern!r} matched")


class TestSwappedArguments:
    @pytest.fixture(autouse=True)
    def _cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "model.pt").write_bytes(b"")
        (tmp_path / "shards").mkdir()

    def test_pattern_first_then_a_file(self) -> None:
        assert swapped_arguments_hint("*.bias", ["model.pt"]) == (
            "arguments swapped? the checkpoint comes first: paramctl freeze model.pt '*.bias'")
        assert swapped_arguments_hint("re:^head", ["-x", "model.pt"], command="list") == (
            "arguments swapped? the checkpoint comes first: paramctl list model.pt 're:^head'")
        assert swapped_arguments_hint("layers.[0-3]", ["shards"]) is not None

    def test_right_order_or_nothing_to_swap_with(self) -> None:
        assert swapped_arguments_hint("model.pt", ["*.bias"]) is None
        assert swapped_arguments_hint("*.bias", ["nothing.pt", "head"]) is None
        assert swapped_arguments_hint("*.bias", []) is None
        # a plain word or module path is not pattern-like enough to guess
        assert swapped_arguments_hint("encoder", ["model.pt"]) is None
        assert swapped_arguments_hint("pkg.mod:Model", ["model.pt"]) is None

    def test_a_real_path_with_glob_characters_is_a_source(self, tmp_path: Path) -> None:
        (tmp_path / "run[1].pt").write_bytes(b"")
        assert swapped_arguments_hint("run[1].pt", ["model.pt"]) is None


# -- properties of the new contract ------------------------------------------------------------
@_props
@given(_names, st.lists(_pattern, max_size=3))
def test_no_includes_select_nothing_or_refuse(names: list[str], excludes: list[str]) -> None:
    bang = ["!" + e for e in excludes]
    if excludes:
        with pytest.raises(UsageError):
            select(names, bang)
        with pytest.raises(UsageError):
            select(names, [], excludes, allow_empty=True)
    else:
        assert select(names, []) == []
        assert select(names, [], allow_empty=True) == []
    # the looking commands start from everything instead
    assert select(names, bang, default_all=True) == select(names, ["*"], excludes)


@_props
@given(_names, st.lists(_pattern, min_size=1, max_size=3), st.lists(_pattern, max_size=3))
def test_excludes_win(names: list[str], patterns: list[str], excludes: list[str]) -> None:
    got = select(names, patterns, excludes, allow_empty=True)
    removed = {n for n in names if any(parse_pattern(e)(n) for e in excludes)}
    assert not set(got) & removed
    kept = {n for n in names if any(parse_pattern(p)(n) for p in patterns)} - removed
    assert set(got) == kept


@_props
@given(_names, st.lists(_pattern, max_size=3))
def test_unmatched_excludes_never_raise(names: list[str], excludes: list[str]) -> None:
    assert select(names, ["*"], excludes) == select(names, ["*"], excludes, allow_empty=True)


@_props
@given(_names, _segment)
def test_bare_word_is_component_membership(names: list[str], word: str) -> None:
    assume(is_bare_word(word))
    want = [n for n in names if word in n.split(".")]
    assert select(names, [word], allow_empty=True) == want


@_props
@given(_names, _pattern)
def test_default_all_only_matters_without_includes(names: list[str], pattern: str) -> None:
    assert (select(names, [pattern], allow_empty=True, default_all=True)
            == select(names, [pattern], allow_empty=True))
