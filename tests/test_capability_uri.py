"""Resource URI parsing, pattern matching and pattern coverage."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbor.errors import InvalidResource
from arbor.security.uri import (
    MAX_URI_LENGTH,
    OPERATIONS,
    Pattern,
    Resource,
    parse_pattern,
    parse_resource,
    pattern_covers,
)


@pytest.mark.parametrize(
    "text, kind, operation, path",
    [
        ("arbor://agent/send/workers/7", "agent", "send", ("workers", "7")),
        ("arbor://agent/spawn/w", "agent", "spawn", ("w",)),
        ("arbor://capability/revoke/tok_1", "capability", "revoke", ("tok_1",)),
        ("arbor://secret/read/db/password", "secret", "read", ("db", "password")),
        ("arbor://audit/read/all", "audit", "read", ("all",)),
        ("arbor://agent/ask/a.b/c-d/_e", "agent", "ask", ("a.b", "c-d", "_e")),
    ],
)
def test_parse_resource_valid(text: str, kind: str, operation: str, path: tuple[str, ...]) -> None:
    resource = parse_resource(text)
    assert resource == Resource(kind, operation, path)
    assert str(resource) == text


BAD_RESOURCES = [
    ("arbor://agent/send/workers/../admin", "traversal"),
    ("arbor://agent/send/workers/./7", "traversal"),
    ("arbor://agent/send/..", "traversal"),
    ("arbor://agent/send/workers//7", "empty path segment"),
    ("arbor://agent/send/workers/", "empty path segment"),
    ("arbor://agent/send/", "empty path segment"),
    ("arbor://agent/send", "expected the form"),
    ("arbor://agent/send/workers/%2e%2e/admin", "percent-encoding"),
    ("arbor://agent/send/workers%2Fadmin", "percent-encoding"),
    ("arbor://agent/send/workers/%252e", "percent-encoding"),
    ("arbor://agent/send/w%00", "percent-encoding"),
    ("arbor://agent/send/w\x00", "not allowed"),
    ("arbor://agent/send/w\n", "not allowed"),
    ("arbor://agent/send/w\t7", "not allowed"),
    ("arbor://agent/send/w 7", "not allowed"),
    ("arbor://agent/send/w\x7f", "not allowed"),
    ("arbor://agent/send/w\u00e9", "not allowed"),
    ("arbor://agent/send/\uff0e\uff0e/admin", "not allowed"),
    ("ARBOR://agent/send/w", "lowercase 'arbor://'"),
    ("Arbor://agent/send/w", "lowercase 'arbor://'"),
    ("arbor://Agent/send/w", "must be lowercase"),
    ("arbor://agent/SEND/w", "must be lowercase"),
    ("arbor://robot/send/w", "unknown kind"),
    ("arbor://secret/send/w", "unknown operation"),
    ("arbor://agent/*/w", "patterns only"),
    ("arbor://agent/send/*", "patterns only"),
    ("arbor://agent/send/w/**", "patterns only"),
    ("arbor://agent/send/w*", "is invalid"),
    ("arbor://agent/send/.hidden", "is invalid"),
    ("arbor://agent/send/...", "is invalid"),
    ("arbor://agent/send/-w", "is invalid"),
    ("arbor://agent/send/w\\..\\admin", "backslashes"),
    ("arbor://agent/send/w?x=1", "query strings"),
    ("arbor://agent/send/w#frag", "fragments"),
    ("arbor:/agent/send/w", "expected the form"),
    ("https://agent/send/w", "expected the form"),
    ("arbor://agent@host/send/w", "unknown kind"),
    ("", "expected the form"),
]


@pytest.mark.parametrize("text, rule", BAD_RESOURCES)
def test_parse_resource_rejects_tricks(text: str, rule: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        parse_resource(text)
    assert rule in str(caught.value)
    assert rule in caught.value.rule
    assert repr(text) in str(caught.value)


def test_parse_resource_rejects_long_uri() -> None:
    text = "arbor://agent/send/" + "a" * MAX_URI_LENGTH
    with pytest.raises(InvalidResource, match=f"longer than {MAX_URI_LENGTH}"):
        parse_resource(text)


def test_parse_resource_rejects_non_string() -> None:
    with pytest.raises(InvalidResource, match="expected a string, got bytes"):
        parse_resource(b"arbor://agent/send/w")  # type: ignore[arg-type]


def test_path_segments_are_case_sensitive() -> None:
    pattern = parse_pattern("arbor://agent/send/workers/*")
    assert pattern.matches("arbor://agent/send/workers/7")
    assert not pattern.matches("arbor://agent/send/Workers/7")
    assert not pattern.matches("arbor://agent/send/WORKERS/7")


@pytest.mark.parametrize(
    "text, rule",
    [
        ("arbor://agent/send/**/x", "'**' may only be the last"),
        ("arbor://*/send/x", "unknown kind '*'"),
        ("arbor://agent/send/w*", "is invalid"),
        ("arbor://agent/send/***", "is invalid"),
        ("arbor://agent/**/x", "unknown operation '**'"),
        ("arbor://agent/send/../**", "traversal"),
    ],
)
def test_parse_pattern_rejects(text: str, rule: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        parse_pattern(text)
    assert rule in caught.value.rule


@pytest.mark.parametrize(
    "pattern, uri, expected",
    [
        ("arbor://agent/send/workers/*", "arbor://agent/send/workers/7", True),
        ("arbor://agent/send/workers/*", "arbor://agent/send/workers/7/x", False),
        ("arbor://agent/send/workers/*", "arbor://agent/send/workers", False),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers/7/x/y", True),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers/7", True),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers", False),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workersx/7", False),
        ("arbor://agent/*/workers/7", "arbor://agent/stop/workers/7", True),
        ("arbor://agent/*/workers/7", "arbor://secret/read/workers/7", False),
        ("arbor://agent/send/*/7", "arbor://agent/send/eu/7", True),
        ("arbor://agent/send/*/7", "arbor://agent/send/eu/8", False),
        ("arbor://agent/ask/workers/7", "arbor://agent/send/workers/7", False),
        ("arbor://agent/send/workers/7", "arbor://agent/send/workers/7", True),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers/../admin", False),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers/%2e%2e/admin", False),
        ("arbor://agent/send/**", "arbor://agent/send/workers//7", False),
        ("arbor://agent/send/**", "not a uri", False),
    ],
)
def test_pattern_matches(pattern: str, uri: str, expected: bool) -> None:
    assert parse_pattern(pattern).matches(uri) is expected


@pytest.mark.parametrize(
    "parent, child, expected",
    [
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers/eu/*", True),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers/**", True),
        ("arbor://agent/send/workers/**", "arbor://agent/send/workers/eu/**", True),
        ("arbor://agent/send/workers/**", "arbor://agent/send/**", False),
        ("arbor://agent/send/workers/**", "arbor://agent/send/*/7", False),
        ("arbor://agent/send/workers/*", "arbor://agent/send/workers/7", True),
        ("arbor://agent/send/workers/*", "arbor://agent/send/workers/**", False),
        ("arbor://agent/send/workers/*", "arbor://agent/send/workers/7/8", False),
        ("arbor://agent/send/workers/7", "arbor://agent/send/workers/*", False),
        ("arbor://agent/*/workers/7", "arbor://agent/send/workers/7", True),
        ("arbor://agent/send/workers/7", "arbor://agent/*/workers/7", False),
        ("arbor://agent/send/workers/7", "arbor://secret/read/workers/7", False),
        ("arbor://agent/send/*/**", "arbor://agent/send/a/b/**", True),
        ("arbor://agent/send/*/*", "arbor://agent/send/a/**", False),
    ],
)
def test_pattern_covers(parent: str, child: str, expected: bool) -> None:
    assert pattern_covers(parent, child) is expected


def test_pattern_operations_expand_wildcard() -> None:
    assert parse_pattern("arbor://agent/*/x").operations == OPERATIONS["agent"]
    assert parse_pattern("arbor://agent/ask/x").operations == frozenset({"ask"})


# Property tests. Paths use a small alphabet so that generated patterns overlap often, and
# the literal "z" appears in no pattern, standing for every other segment.
LITERALS = ["a", "b"]
UNIVERSE_SEGMENTS = ["a", "b", "z"]
MAX_PATTERN_LENGTH = 3


@st.composite
def patterns(draw: st.DrawFn, kind: str = "agent") -> Pattern:
    length = draw(st.integers(1, MAX_PATTERN_LENGTH))
    path = [draw(st.sampled_from([*LITERALS, "*"])) for _ in range(length)]
    if draw(st.booleans()):
        path[-1] = "**"
    operation = draw(st.sampled_from(["*", "send", "ask"]))
    return Pattern(kind, operation, tuple(path))


def universe() -> list[Resource]:
    """Every resource with an operation in {send, ask, stop} and a path of up to 4 segments."""
    resources = []
    for length in range(1, MAX_PATTERN_LENGTH + 2):
        for path in itertools.product(UNIVERSE_SEGMENTS, repeat=length):
            for operation in ("send", "ask", "stop"):
                resources.append(Resource("agent", operation, path))
    return resources


UNIVERSE = universe()


@given(patterns(), patterns())
@settings(max_examples=400, deadline=None)
def test_covers_agrees_with_matching(parent: Pattern, child: Pattern) -> None:
    # covers must be sound (a covered child matches nothing the parent does not) and,
    # over this universe, complete (an uncovered child has a resource outside the parent).
    child_only = [r for r in UNIVERSE if child.matches(r) and not parent.matches(r)]
    assert parent.covers(child) == (not child_only), child_only[:3]


@given(patterns())
@settings(max_examples=200, deadline=None)
def test_pattern_normalisation_is_idempotent(pattern: Pattern) -> None:
    once = parse_pattern(str(pattern))
    assert once == pattern
    assert parse_pattern(str(once)) == once


URI_CHARACTERS = st.sampled_from(list("ab/.%2eEF*_-AZ\\?#:@ \x00\n\u00e9\uff0e"))


@given(st.text(URI_CHARACTERS, max_size=24))
@settings(max_examples=500, deadline=None)
def test_resource_normalisation_is_idempotent(suffix: str) -> None:
    text = "arbor://agent/send/" + suffix
    try:
        resource = parse_resource(text)
    except InvalidResource:
        return
    # Arbor normalises by rejecting: anything that parses is already canonical.
    assert str(resource) == text
    assert parse_resource(str(resource)) == resource
    assert all(segment not in (".", "..", "") for segment in resource.path)
    assert "%" not in text
