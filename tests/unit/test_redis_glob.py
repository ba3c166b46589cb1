"""Redis globs read in the worker: a glob split into its literal prefix, middle and literal
suffix, and the batch matcher's fast path (subjects looked up by prefix and suffix, the middle's
test compiled once for every subject whose middle is alike, none for `*`) agreeing with the
whole glob's regular expression, key by key."""

from __future__ import annotations

import itertools
import re

import pytest

from lethe.activities.cache import _Globs, _Matcher, glob_escape
from lethe.activities.redis_glob import glob_parts, glob_regex, literal_prefix, split_glob


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
    "p:{id}:*",  # the middle is `*`: prefix (and an empty suffix) are the whole test
    "p:*:{id}",  # the id in the suffix: looked up by it
    "p:*{id}",
    "p:?{id}:*",
    "p:?:{id}",  # a middle of one byte between prefix and suffix
    "p:[ab]?{id}",  # the id in the middle: one test per subject
    "p:{id}:**",
    "p:{id}:?[a-c]*",  # the same middle for every subject, compiled once
    "p:{id}:[^x]",
    "p:{id}",  # no glob character: the key is the prefix
    "t?:[a-c]*:{id}",  # the id in the suffix, the middle shared
    "c:\\[{id}\\]?",
]
IDS = ["s1", "s10", "s", "*", "?", "[0-9]", "\\", "s1*", "-", "é", "a\nb"]
TAILS = ["", ":", ":x", ":a", ":ab", ":zz", "0", "0:x", "]", "]!", "]!!", "\n", ":é"]
HEADS = ["p:", "p:x", "p:ab", "p:x:", "p:xy:", "c:[", "t1:b-", "tx:d:", "t:a:"]


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


def test_the_middle_is_read_once_for_every_subject_and_for_the_next_pass() -> None:
    globs = _Globs()
    first = [globs.parts(f"p:{glob_escape(i)}:?x*") for i in IDS]
    again = [globs.parts(f"p:{glob_escape(i)}:?x*") for i in IDS]
    assert {id(part.middle) for part in first + again} == {id(first[0].middle)}
    assert first[0].middle is not None
    assert {globs.parts(f"p:{i}:*").middle for i in ("a", "b")} == {None}  # `*`: no regex
    assert [p.prefix for p in first[:4]] == [b"p:s1:", b"p:s10:", b"p:s:", b"p:*:"]
    # The id after the glob: the suffix holds it, the middle is shared.
    after = [globs.parts(f"t:*:{glob_escape(i)}") for i in ("s1", "*")]
    assert [(p.prefix, p.suffix, p.middle) for p in after] == [
        (b"t:", b":s1", None),
        (b"t:", b":*", None),
    ]


@pytest.mark.parametrize(
    ("glob", "parts"),
    [
        ("p:s1:*", (b"p:s1:", b"*", b"")),
        ("t:*:s1", (b"t:", b"*", b":s1")),
        ("t?:[a-c]*:\\*", (b"t", b"?:[a-c]*", b":*")),
        ("x[ab]y*z\\?", (b"x", b"[ab]y*", b"z?")),
        ("c:\\[s1\\]?", (b"c:[s1]", b"?", b"")),
        ("p:[a", (b"p:", b"[a", b"")),  # a class that never closes runs to the end
        ("exact\\", (b"exact\\", b"", b"")),
        ("é*é", ("é".encode(), b"*", "é".encode())),
    ],
)
def test_glob_parts_gives_prefix_middle_and_suffix(
    glob: str, parts: tuple[bytes, bytes, bytes]
) -> None:
    assert glob_parts(glob) == parts


def test_one_subject_s_glob_is_its_own_scan_match() -> None:
    matcher = _Matcher([(3, "p:\\?:*")], _Globs())
    assert matcher.match == "p:\\?:*"
    assert matcher.owners(b"p:?:k") == [3]
    assert matcher.owners(b"p:x:k") == []
