"""Redis globs read in the worker: a glob split into its literal prefix and the rest, and the
batch matcher's fast path (the rest's test compiled once for every subject whose glob ends
alike, none for `*`) agreeing with the whole glob's regular expression, key by key."""

from __future__ import annotations

import itertools
import re

import pytest

from lethe.activities.cache import _Globs, _Matcher, glob_escape
from lethe.activities.redis_glob import glob_regex, literal_prefix, split_glob


@pytest.mark.parametrize(
    ("glob", "prefix", "rest"),
    [
        ("p:s1:*", "p:s1:", "*"),
        ("p:\\*:*", "p:*:", "*"),  # an escaped id stays in the prefix, unescaped
        ("p:\\[0-9\\]\\?:?x", "p:[0-9]?:", "?x"),
        ("p:\\\\:[ab]", "p:\\:", "[ab]"),
        ("t?:[a-c]*:s1", "t", "?:[a-c]*:s1"),
        ("exact", "exact", ""),
        ("ends\\", "ends\\", ""),  # a last backslash is itself
        ("*", "", "*"),
        ("a\nb*", "a\nb", "*"),
        ("é:\\é*", "é:é", "*"),
    ],
)
def test_split_glob_gives_the_literal_prefix_and_the_rest(
    glob: str, prefix: str, rest: str
) -> None:
    assert split_glob(glob) == (prefix, rest)
    assert literal_prefix(glob) == prefix


def _whole(glob: str, key: bytes) -> bool:
    return re.fullmatch(glob_regex(glob), key, re.DOTALL) is not None


TEMPLATES = [
    "p:{id}:*",  # the rest is `*`: a prefix match is the whole test
    "p:{id}:**",
    "p:{id}:?[a-c]*",  # the same rest for every subject, compiled once
    "p:{id}:[^x]",
    "p:{id}",  # no rest: the key is the prefix
    "t?:[a-c]*:{id}",  # the id in the rest: one test per subject
    "c:\\[{id}\\]?",
]
IDS = ["s1", "s10", "s", "*", "?", "[0-9]", "\\", "s1*", "-", "é", "a\nb"]
TAILS = ["", ":", ":x", ":a", ":ab", ":zz", "0", "0:x", "]", "]!", "]!!", "\n", ":é"]
HEADS = ["p:", "c:[", "t1:b-", "tx:d:", "t:a:"]


def _keys() -> list[bytes]:
    return [f"{h}{i}{t}".encode() for h, i, t in itertools.product(HEADS, IDS, TAILS)]


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_batch_matcher_agrees_with_each_subject_s_whole_glob(template: str) -> None:
    globs = [template.replace("{id}", glob_escape(i)) for i in IDS]
    matcher = _Matcher(list(enumerate(globs)), _Globs())
    checked = 0
    for key in _keys():
        expected = [n for n, glob in enumerate(globs) if _whole(glob, key)]
        assert sorted(matcher.owners(key)) == expected, key
        checked += bool(expected)
    assert checked > 0  # some keys match: the test is not vacuous


def test_a_key_that_shares_the_prefix_but_not_the_rest_is_not_the_subject_s() -> None:
    globs = [f"p:{glob_escape(i)}:?[a-c]*" for i in ("s1", "*")]
    matcher = _Matcher(list(enumerate(globs)), _Globs())
    assert matcher.owners(b"p:s1:xa") == [0]
    assert matcher.owners(b"p:s1:xd") == []  # the prefix, not the rest
    assert matcher.owners(b"p:s1:x") == []
    assert matcher.owners(b"p:*:xb-more") == [1]
    assert matcher.owners(b"p:s:xa") == []  # `*` in an id is only itself
    assert matcher.match == "p:*"  # the common literal prefix, escaped, for SCAN


def test_the_rest_is_read_once_for_every_subject_and_for_the_next_pass() -> None:
    globs = _Globs()
    first = [globs.parts(f"p:{glob_escape(i)}:?x*") for i in IDS]
    again = [globs.parts(f"p:{glob_escape(i)}:?x*") for i in IDS]
    assert {id(part.rest) for part in first + again} == {id(first[0].rest)}
    assert first[0].rest is not None
    assert {globs.parts(f"p:{i}:*").rest for i in ("a", "b")} == {None}  # `*`: no regex
    assert [p.prefix for p in first[:4]] == [b"p:s1:", b"p:s10:", b"p:s:", b"p:*:"]


def test_one_subject_s_glob_is_its_own_scan_match() -> None:
    matcher = _Matcher([(3, "p:\\?:*")], _Globs())
    assert matcher.match == "p:\\?:*"
    assert matcher.owners(b"p:?:k") == [3]
    assert matcher.owners(b"p:x:k") == []
