"""Resource URIs and patterns: ``arbor://<kind>/<operation>/<path>``.

A resource URI names one thing an action touches, such as ``arbor://agent/send/workers/7``.
A pattern names a set of them: in a pattern the operation may be ``*``, a path segment
``*`` matches exactly one segment, and a last segment ``**`` matches one or more segments.

Arbor normalises by rejecting. Parsing accepts only the canonical spelling and raises
`InvalidResource` for anything else, so one resource has exactly one spelling, and no
traversal, percent-encoding or case trick can make a URI match a pattern that its
canonical form does not match. The grammar:

- the scheme is ``arbor://``, in lowercase;
- the kind and operation are lowercase names from `OPERATIONS`;
- the path has one or more segments separated by ``/``. A segment starts with an ASCII
  letter, digit or ``_`` and goes on with letters, digits, ``.``, ``_`` and ``-``, the
  rule for agent name segments. So ``.``, ``..``, empty segments, ``%``, ``\\``,
  whitespace, control and non-ASCII characters are all rejected;
- path segments are case-sensitive and match exactly: ``Workers`` is not ``workers``;
- an agent, topic or capability path may start with a namespace and a colon, such as
  ``arbor://agent/send/team-b:workers/*``. A path without one is in the namespace
  ``default``, which is never written out. A pattern matches resources of its own
  namespace only; the namespace part takes no wildcard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from arbor.errors import InvalidArguments, InvalidResource
from arbor.names import DEFAULT_NAMESPACE, NAMESPACED_KINDS, SEPARATOR, join, validate_namespace

SCHEME = "arbor://"

# The operations of each resource kind.
OPERATIONS: dict[str, frozenset[str]] = {
    "agent": frozenset({"spawn", "send", "ask", "stop", "inspect"}),
    "capability": frozenset({"grant", "delegate", "revoke"}),
    "secret": frozenset({"read"}),
    "audit": frozenset({"read"}),
    "command": frozenset({"run", "inspect"}),
    "topic": frozenset({"publish", "subscribe"}),
}

# Longer URIs are rejected before any other work, so a check never scans a huge string.
MAX_URI_LENGTH = 1024

ANY_SEGMENT = "*"
ANY_SUFFIX = "**"
ANY_OPERATION = "*"

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# Visible ASCII only: everything from space down and DEL and above is rejected.
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]*")


@dataclass(frozen=True)
class Resource:
    """One concrete resource: a kind, an operation and a path without wildcards."""

    kind: str
    operation: str
    path: tuple[str, ...]
    namespace: str = DEFAULT_NAMESPACE

    def __str__(self) -> str:
        return f"{SCHEME}{self.kind}/{self.operation}/{join(self.namespace, '/'.join(self.path))}"


@dataclass(frozen=True)
class Pattern:
    """A set of resources: the operation may be ``*``, path segments ``*`` or a last ``**``."""

    kind: str
    operation: str
    path: tuple[str, ...]
    namespace: str = DEFAULT_NAMESPACE

    def __str__(self) -> str:
        return f"{SCHEME}{self.kind}/{self.operation}/{join(self.namespace, '/'.join(self.path))}"

    @property
    def operations(self) -> frozenset[str]:
        """The operations this pattern matches: all of its kind's when it names ``*``."""
        if self.operation == ANY_OPERATION:
            return OPERATIONS[self.kind]
        return frozenset({self.operation})

    def matches(self, resource: Resource | str) -> bool:
        """Return whether ``resource`` is in this pattern's set.

        A string is parsed first, and a string that does not parse matches nothing.
        """
        if isinstance(resource, str):
            try:
                resource = parse_resource(resource)
            except InvalidResource:
                return False
        if resource.kind != self.kind or resource.namespace != self.namespace:
            return False
        if self.operation not in (ANY_OPERATION, resource.operation):
            return False
        return path_matches(self.path, resource.path)

    def covers(self, other: Pattern) -> bool:
        """Return whether every resource ``other`` matches is also matched by this pattern."""
        if other.kind != self.kind or other.namespace != self.namespace:
            return False
        if not other.operations <= self.operations:
            return False
        return path_covers(self.path, other.path)


def parse_resource(text: str) -> Resource:
    """Parse a concrete resource URI such as ``arbor://agent/send/workers/7``.

    Raises:
        InvalidResource: naming the URI and the rule it breaks; wildcards are rejected too.
    """
    kind, operation, path, namespace = _split(text, allow_wildcards=False)
    return Resource(kind, operation, path, namespace)


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse a resource pattern such as ``arbor://agent/*/workers/**``.

    A `Pattern` passes through unchanged.

    Raises:
        InvalidResource: naming the pattern and the rule it breaks.
    """
    if isinstance(text, Pattern):
        return text
    kind, operation, path, namespace = _split(text, allow_wildcards=True)
    return Pattern(kind, operation, path, namespace)


def pattern_covers(parent: Pattern | str, child: Pattern | str) -> bool:
    """Return whether every resource that ``child`` matches is also matched by ``parent``.

    Delegation uses this to allow only narrowing: a delegated pattern must be covered by
    the pattern it is derived from.

    Raises:
        InvalidResource: either pattern does not parse.
    """
    return parse_pattern(parent).covers(parse_pattern(child))


def path_matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    """Return whether a concrete ``path`` matches a pattern path."""
    if pattern and pattern[-1] == ANY_SUFFIX:
        prefix = pattern[:-1]
        if len(path) <= len(prefix):
            return False
    else:
        prefix = pattern
        if len(path) != len(prefix):
            return False
    return all(want in (ANY_SEGMENT, got) for want, got in zip(prefix, path, strict=False))


def path_covers(parent: tuple[str, ...], child: tuple[str, ...]) -> bool:
    """Return whether every path the ``child`` pattern matches also matches ``parent``.

    A parent literal covers only the same literal, a parent ``*`` covers any one segment
    (literal or ``*``), and a parent ``**`` covers one or more segments of any kind. A child
    ``**`` therefore needs a parent ``**`` at the same index or earlier.
    """
    parent_suffix = bool(parent) and parent[-1] == ANY_SUFFIX
    child_suffix = bool(child) and child[-1] == ANY_SUFFIX
    parent_prefix = parent[:-1] if parent_suffix else parent

    if parent_suffix:
        # The child must fix at least as many leading segments as the parent's prefix,
        # and at least one more segment (its own ** counts) for the parent's **.
        if len(child) <= len(parent_prefix):
            return False
    else:
        if child_suffix or len(child) != len(parent):
            return False

    for want, got in zip(parent_prefix, child, strict=False):
        if got == ANY_SUFFIX:
            return False
        if want != ANY_SEGMENT and want != got:
            return False
    return True


def _split(text: str, allow_wildcards: bool) -> tuple[str, str, tuple[str, ...], str]:
    if not isinstance(text, str):
        raise InvalidResource(repr(text), f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_URI_LENGTH:
        raise InvalidResource(text[:64] + "...", f"longer than {MAX_URI_LENGTH} characters")
    if not _PRINTABLE_ASCII.fullmatch(text):
        position = next(i for i, char in enumerate(text) if not "\x21" <= char <= "\x7e")
        raise InvalidResource(
            text,
            f"character {text[position]!r} at position {position} is not allowed; URIs hold "
            "visible ASCII only, with no whitespace, control or non-ASCII characters",
        )
    for char, rule in (
        ("%", "percent-encoding is not accepted; write every character plainly"),
        ("\\", "backslashes are not accepted; separate path segments with '/'"),
        ("?", "query strings are not part of a resource URI"),
        ("#", "fragments are not part of a resource URI"),
    ):
        if char in text:
            raise InvalidResource(text, rule)
    if not text.startswith(SCHEME):
        if text.lower().startswith(SCHEME):
            raise InvalidResource(text, "the scheme must be lowercase 'arbor://'")
        raise InvalidResource(text, "expected the form arbor://<kind>/<operation>/<path>")

    parts = text[len(SCHEME) :].split("/")
    if len(parts) < 3:
        raise InvalidResource(text, "expected the form arbor://<kind>/<operation>/<path>")
    kind, operation, path = parts[0], parts[1], tuple(parts[2:])

    _check_kind(text, kind)
    _check_operation(text, kind, operation, allow_wildcards)
    namespace = DEFAULT_NAMESPACE
    if SEPARATOR in path[0]:
        namespace, _, first = path[0].partition(SEPARATOR)
        _check_namespace(text, kind, namespace)
        path = (first, *path[1:])
    for index, segment in enumerate(path):
        _check_segment(text, segment, last=index == len(path) - 1, allow_wildcards=allow_wildcards)
    return kind, operation, path, namespace


def _check_namespace(text: str, kind: str, namespace: str) -> None:
    if kind not in NAMESPACED_KINDS:
        kinds = ", ".join(sorted(NAMESPACED_KINDS))
        raise InvalidResource(
            text, f"{kind} paths have no namespace; only {kinds} paths start with '<namespace>:'"
        )
    if namespace == DEFAULT_NAMESPACE:
        raise InvalidResource(
            text, "the namespace 'default' is written without a prefix; drop 'default:'"
        )
    try:
        validate_namespace(namespace)
    except InvalidArguments as error:
        raise InvalidResource(text, str(error)) from None


def _check_kind(text: str, kind: str) -> None:
    if kind in OPERATIONS:
        return
    known = ", ".join(sorted(OPERATIONS))
    if kind.lower() in OPERATIONS:
        raise InvalidResource(text, f"kind {kind!r} must be lowercase; kinds are {known}")
    raise InvalidResource(text, f"unknown kind {kind!r}; kinds are {known}")


def _check_operation(text: str, kind: str, operation: str, allow_wildcards: bool) -> None:
    valid = OPERATIONS[kind]
    if operation in valid:
        return
    if operation == ANY_OPERATION:
        if allow_wildcards:
            return
        raise InvalidResource(text, "a resource names one operation; '*' is for patterns only")
    known = ", ".join(sorted(valid))
    if operation.lower() in valid:
        raise InvalidResource(
            text, f"operation {operation!r} must be lowercase; {kind} operations are {known}"
        )
    raise InvalidResource(
        text, f"unknown operation {operation!r} for kind {kind!r}; {kind} operations are {known}"
    )


def _check_segment(text: str, segment: str, last: bool, allow_wildcards: bool) -> None:
    if _SEGMENT.fullmatch(segment):
        return
    if segment == "":
        raise InvalidResource(text, "empty path segment ('//' or a trailing '/')")
    if segment in (".", ".."):
        raise InvalidResource(text, f"path segment {segment!r} is not allowed (no traversal)")
    if segment in (ANY_SEGMENT, ANY_SUFFIX):
        if not allow_wildcards:
            raise InvalidResource(
                text, f"wildcard {segment!r} is for patterns only; a resource names one path"
            )
        if segment == ANY_SUFFIX and not last:
            raise InvalidResource(text, "'**' may only be the last path segment")
        return
    raise InvalidResource(
        text,
        f"path segment {segment!r} is invalid; a segment starts with a letter, digit or '_' "
        "and contains only letters, digits, '.', '_' and '-'",
    )
