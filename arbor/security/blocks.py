"""Capability blocks: the terms of one link of a token chain, and their Datalog checks.

Each block of a capability token carries its terms (holder, pattern, operations, expiry,
delegation depth, use limit, allowed callers) twice: as canonical JSON in a fact
``arbor_block(hex:...)``, and as the Datalog checks that `block_datalog` generates from
them. `find_widening` implements the rule that a delegated block only narrows its parent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from arbor.errors import InvalidCapability
from arbor.names import join
from arbor.security.uri import (
    ANY_SEGMENT,
    ANY_SUFFIX,
    SCHEME,
    Pattern,
    Resource,
    parse_pattern,
    path_covers,
)

# Version of the JSON terms in each block; a loader rejects versions it does not know.
FORMAT_VERSION = 1

# A token chain holds the issued block and at most MAX_DEPTH delegations, which bounds
# the work of loading a token that someone extended by hand.
MAX_DEPTH = 16
MAX_BLOCKS = MAX_DEPTH + 1

# Agent names (segments joined by '/') and API key ids such as "key:3f2a" both fit.
_PRINCIPAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@/-]*")
MAX_PRINCIPAL_LENGTH = 200

# A path segment as `arbor.security.uri` accepts it, for the regular expressions that
# the Datalog resource check matches against.
_SEGMENT_REGEX = "[A-Za-z0-9_][A-Za-z0-9._-]*"

# Names of the checks in a block, in the order `block_datalog` emits them. The verifier
# uses them to name the constraint that a failed Biscuit check stands for.
EXPIRY = "expiry"
RESOURCE = "resource"
DEPTH = "depth"
HOLDER = "holder"
CALLER = "caller"
USES = "uses"


@dataclass(frozen=True)
class CapabilityBlock:
    """One link of a token's chain: the holder it names and the limits it adds.

    Attributes:
        index: position in the chain; 0 is the block the authority issued.
        principal: the holder of the token when this is its last block.
        pattern: the resource pattern it grants.
        operations: the operations it grants, a subset of ``pattern.operations``.
        expires_at: end of validity, UTC, in whole seconds; the token is valid before it.
        depth: how many further delegations may follow this block.
        max_uses: how many allowed checks this block permits, counted over every token
            delegated from it, or None for no limit of its own.
        allowed_callers: the callers a check must name, or None for any caller.
    """

    index: int
    principal: str
    pattern: Pattern
    operations: frozenset[str]
    expires_at: datetime
    depth: int
    max_uses: int | None = None
    allowed_callers: frozenset[str] | None = None

    def allows(self, resource: Resource) -> bool:
        """Return whether this block's pattern and operations include ``resource``."""
        return resource.operation in self.operations and self.pattern.matches(resource)

    def check_names(self) -> tuple[str, ...]:
        """Return the constraint name of each Datalog check in this block, in order."""
        names = [EXPIRY, RESOURCE, DEPTH, HOLDER]
        if self.allowed_callers is not None:
            names.append(CALLER)
        if self.max_uses is not None:
            names.append(USES)
        return tuple(names)

    def terms(self) -> dict[str, Any]:
        """Return the block's terms as the JSON object stored in its ``arbor_block`` fact."""
        return {
            "version": FORMAT_VERSION,
            "index": self.index,
            "principal": self.principal,
            "pattern": str(self.pattern),
            "operations": sorted(self.operations),
            "expires_at": int(self.expires_at.timestamp()),
            "depth": self.depth,
            "max_uses": self.max_uses,
            "allowed_callers": (
                None if self.allowed_callers is None else sorted(self.allowed_callers)
            ),
        }


def find_widening(parents: tuple[CapabilityBlock, ...], child: CapabilityBlock) -> str | None:
    """Return how ``child`` widens the chain ``parents``, or None if it only narrows.

    Every block before the child already narrows the one before it (`load_token` and
    `delegate` ensure it), so comparing with the last parent covers the whole chain,
    except for use limits, which are kept per block and compared with the lowest.
    """
    parent = parents[-1]
    if parent.depth < 1:
        return f"block {parent.index} allows no further delegation"
    if child.depth >= parent.depth:
        return (
            f"depth {child.depth} is not lower than the parent's remaining depth "
            f"{parent.depth}; use at most {parent.depth - 1}"
        )
    # Paths are compared on their own because the operations sets, not the pattern's
    # operation segment, say what a block grants: 'agent/*/x' granting only send is
    # narrower than 'agent/send/**'.
    same_scope = (parent.pattern.kind, parent.pattern.namespace) == (
        child.pattern.kind,
        child.pattern.namespace,
    )
    if not (same_scope and path_covers(parent.pattern.path, child.pattern.path)):
        return f"pattern '{child.pattern}' is wider than the parent's '{parent.pattern}'"
    extra = child.operations - parent.operations
    if extra:
        return (
            f"operations {sorted(extra)} are not granted by the parent, which grants "
            f"{sorted(parent.operations)}"
        )
    if child.expires_at > parent.expires_at:
        return (
            f"expiry {child.expires_at.isoformat()} is later than the parent's "
            f"{parent.expires_at.isoformat()}"
        )
    limits = [block.max_uses for block in parents if block.max_uses is not None]
    if limits and child.max_uses is not None and child.max_uses > min(limits):
        return f"max_uses {child.max_uses} is more than the parent's {min(limits)}"
    if parent.allowed_callers is not None:
        if child.allowed_callers is None:
            return f"the parent limits callers to {sorted(parent.allowed_callers)}"
        extra = child.allowed_callers - parent.allowed_callers
        if extra:
            return (
                f"allowed callers {sorted(extra)} are not among the parent's "
                f"{sorted(parent.allowed_callers)}"
            )
    return None


def make_block(
    index: int,
    principal: str,
    resource_pattern: str | Pattern,
    operations: Iterable[str] | None,
    expires_at: datetime,
    depth: int,
    max_uses: int | None,
    allowed_callers: Iterable[str] | None,
) -> CapabilityBlock:
    """Validate one block's terms and build it.

    Raises:
        InvalidCapability: a term is malformed; the message names it and the fix.
        InvalidResource: the pattern does not parse.
    """
    principal = validate_principal(principal, "principal")
    pattern = parse_pattern(resource_pattern)

    if isinstance(operations, str):
        raise InvalidCapability(
            f"operations must be a list of names such as ['send'], got the string {operations!r}"
        )
    granted = pattern.operations if operations is None else frozenset(operations)
    if not granted:
        raise InvalidCapability(
            "operations is empty, so the capability would grant nothing; pass None for all "
            f"of the pattern's operations ({sorted(pattern.operations)})"
        )
    unknown = granted - pattern.operations
    if unknown:
        raise InvalidCapability(
            f"operations {sorted(unknown)} are not matched by pattern '{pattern}', which "
            f"allows {sorted(pattern.operations)}"
        )

    if not isinstance(expires_at, datetime) or expires_at.tzinfo is None:
        raise InvalidCapability(
            f"expires_at must be a timezone-aware datetime, got {expires_at!r}; for example "
            "datetime(2030, 1, 1, tzinfo=timezone.utc)"
        )
    seconds = int(expires_at.timestamp())
    if seconds < 0:
        raise InvalidCapability(f"expires_at {expires_at.isoformat()} is before 1970")

    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
        raise InvalidCapability(f"depth must be an integer from 0 to {MAX_DEPTH}, got {depth!r}")
    if max_uses is not None and (
        isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 1
    ):
        raise InvalidCapability(f"max_uses must be a positive integer or None, got {max_uses!r}")

    callers: frozenset[str] | None = None
    if allowed_callers is not None:
        if isinstance(allowed_callers, str):
            raise InvalidCapability(
                "allowed_callers must be a list of principal names, got the string "
                f"{allowed_callers!r}"
            )
        callers = frozenset(validate_principal(name, "allowed caller") for name in allowed_callers)
        if not callers:
            raise InvalidCapability(
                "allowed_callers is empty, so no caller could use the capability; pass None "
                "to accept any caller"
            )

    return CapabilityBlock(
        index=index,
        principal=principal,
        pattern=pattern,
        operations=granted,
        expires_at=datetime.fromtimestamp(seconds, timezone.utc),
        depth=depth,
        max_uses=max_uses,
        allowed_callers=callers,
    )


def validate_principal(name: object, role: str) -> str:
    """Return ``name`` if it is a valid principal name.

    Raises:
        InvalidCapability: naming the ``role`` ("principal", "allowed caller") and the rule.
    """
    if not isinstance(name, str):
        raise InvalidCapability(f"{role} must be a string, got {type(name).__name__}")
    if len(name) > MAX_PRINCIPAL_LENGTH or not _PRINCIPAL.fullmatch(name):
        raise InvalidCapability(
            f"{role} {name[:MAX_PRINCIPAL_LENGTH]!r} is invalid; use up to "
            f"{MAX_PRINCIPAL_LENGTH} characters from letters, digits, '.', '_', ':', '@', '/' "
            "and '-', starting with a letter, digit or '_'"
        )
    return name


def block_from_terms(terms: dict[str, Any], index: int) -> CapabilityBlock:
    if terms["version"] != FORMAT_VERSION:
        raise ValueError(f"format version {terms['version']!r} is not {FORMAT_VERSION}")
    if terms["index"] != index:
        raise ValueError(f"its index field is {terms['index']!r}, expected {index}")
    expires_at = terms["expires_at"]
    if isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise ValueError(f"expires_at {expires_at!r} is not an integer")
    return make_block(
        index,
        terms["principal"],
        terms["pattern"],
        terms["operations"],
        datetime.fromtimestamp(expires_at, timezone.utc),
        terms["depth"],
        terms["max_uses"],
        terms["allowed_callers"],
    )


def resource_regex(pattern: Pattern, operations: frozenset[str]) -> str:
    """Return a regular expression that matches the URIs of ``pattern`` with ``operations``.

    Segments contain only letters, digits, '.', '_' and '-', so '.' is the one character
    to escape.
    """
    parts = []
    for segment in pattern.path:
        if segment == ANY_SEGMENT:
            parts.append(_SEGMENT_REGEX)
        elif segment == ANY_SUFFIX:
            parts.append(f"{_SEGMENT_REGEX}(/{_SEGMENT_REGEX})*")
        else:
            parts.append(segment.replace(".", r"\."))
    alternatives = "|".join(sorted(operations))
    # Namespace names hold only lowercase letters, digits and '-', none of them special.
    path = join(pattern.namespace, "/".join(parts))
    return f"^{SCHEME}{pattern.kind}/({alternatives})/{path}$"


def block_datalog(block: CapabilityBlock) -> tuple[str, dict[str, Any]]:
    """Return the Datalog source and parameters of a block; `check_names` follows its order."""
    terms = json.dumps(block.terms(), sort_keys=True, separators=(",", ":")).encode()
    parameters: dict[str, Any] = {
        "terms": terms,
        "expires_at": block.expires_at,
        "resource_regex": resource_regex(block.pattern, block.operations),
        "last_index": block.index + block.depth,
        "index": block.index,
        "principal": block.principal,
    }
    lines = [
        "arbor_block({terms});",
        "check if time($time), $time < {expires_at};",
        "check if resource($resource), $resource.matches({resource_regex});",
        "check if delegation_depth($depth), $depth <= {last_index};",
        "check if delegation_depth($depth), $depth > {index} or principal({principal});",
    ]
    if block.allowed_callers is not None:
        alternatives = []
        for number, caller in enumerate(sorted(block.allowed_callers)):
            parameters[f"caller{number}"] = caller
            alternatives.append(f"$caller == {{caller{number}}}")
        lines.append(f"check if caller($caller), {' || '.join(alternatives)};")
    if block.max_uses is not None:
        parameters["max_uses"] = block.max_uses
        lines.append("check if use_count({index}, $count), $count <= {max_uses};")
    return "\n".join(lines), parameters
