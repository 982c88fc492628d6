"""Capability tokens: Biscuit tokens that grant a principal the operations on a pattern.

A token is a chain of blocks signed with Ed25519 (Biscuit v3, through ``biscuit-python``).
The authority signs block 0 with the cluster's private key when it issues a capability.
Anyone who holds a token can append a block that delegates it to another principal,
offline and without the private key. Each block carries two things:

- a fact ``arbor_block(hex:...)`` holding the block's terms as canonical JSON, which
  Arbor reads back to list and to narrow capabilities;
- Datalog checks generated from those same terms (expiry, resource, delegation depth,
  holder, allowed callers, maximum uses), which any Biscuit authorizer enforces.

Loading a token verifies every signature, then regenerates each block's Datalog from its
JSON terms and requires the result to equal the signed block exactly. A block with other
facts, rules or checks, or one that widens its parent, makes the whole token invalid.
Because of that, evaluating the terms in Python (`CapabilityVerifier`) gives the same
decision as running the Biscuit authorizer on the checks. A test compares the two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import biscuit_auth

from arbor.errors import CapabilityDenied, InvalidCapability, InvalidResource
from arbor.security.blocks import (
    MAX_BLOCKS,
    CapabilityBlock,
    block_datalog,
    block_from_terms,
    find_widening,
    make_block,
)
from arbor.security.uri import Pattern, parse_pattern

# Longer token strings are rejected before they are decoded.
MAX_TOKEN_LENGTH = 64 * 1024

_TERMS_FACT = re.compile(r"arbor_block\(hex:([0-9a-f]+)\);\n")


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 key pair as text: ``ed25519/<hex>`` and ``ed25519-private/<hex>``."""

    public_key: str
    private_key: str = field(repr=False)


def generate_keypair() -> KeyPair:
    """Generate a new random signing key pair for a `CapabilityAuthority`.

    Store the private key as a secret (it issues any capability); hand the public key to
    every `CapabilityVerifier`.
    """
    pair = biscuit_auth.KeyPair()
    return KeyPair(public_key=str(pair.public_key), private_key=str(pair.private_key))


class CapabilityToken:
    """A signed capability, held by the principal named in its last block.

    The token string (`to_string`) is a bearer credential. Anyone who has it can present it
    and delegate narrower copies, so it never belongs in a log. ``repr`` shows only the id.
    Build tokens with `CapabilityAuthority.issue` or `delegate`, or load them with
    `from_string`.
    """

    def __init__(
        self, biscuit: biscuit_auth.Biscuit, text: str, blocks: tuple[CapabilityBlock, ...]
    ):
        self._biscuit = biscuit
        self._text = text
        self.blocks = blocks
        self.revocation_ids: tuple[str, ...] = tuple(biscuit.revocation_ids)

    @classmethod
    def from_string(cls, text: str, public_key: str) -> CapabilityToken:
        """Verify and parse a token string made by `to_string`.

        Raises:
            InvalidCapability: the string is not a token signed for ``public_key``, or one
                of its blocks is not an Arbor block or widens the block before it.
        """
        return load_token(text, parse_public_key(public_key))

    def to_string(self) -> str:
        """Return the token as URL-safe base64, for storage and transfer."""
        return self._text

    @property
    def id(self) -> str:
        """The revocation id of the last block, which identifies this token."""
        return self.revocation_ids[-1]

    @property
    def parent_id(self) -> str | None:
        """The id of the token this one was delegated from, or None for an issued token."""
        return self.revocation_ids[-2] if len(self.revocation_ids) > 1 else None

    @property
    def principal(self) -> str:
        """The holder: the principal named by the last block."""
        return self.blocks[-1].principal

    @property
    def pattern(self) -> Pattern:
        """The resource pattern granted (the last block's, which is the narrowest)."""
        return self.blocks[-1].pattern

    @property
    def operations(self) -> frozenset[str]:
        """The operations granted on `pattern`."""
        return self.blocks[-1].operations

    @property
    def expires_at(self) -> datetime:
        """The end of validity, UTC; the token is valid strictly before it."""
        return self.blocks[-1].expires_at

    @property
    def depth(self) -> int:
        """How many more times this token may be delegated."""
        return self.blocks[-1].depth

    @property
    def max_uses(self) -> int | None:
        """The lowest use limit of any block in the chain, or None when no block has one."""
        limits = [block.max_uses for block in self.blocks if block.max_uses is not None]
        return min(limits) if limits else None

    @property
    def allowed_callers(self) -> frozenset[str] | None:
        """The callers a check must name, or None when any caller is accepted."""
        return self.blocks[-1].allowed_callers

    def __repr__(self) -> str:
        return (
            f"CapabilityToken(id={self.id[:16]}..., principal={self.principal!r}, "
            f"pattern='{self.pattern}', operations={sorted(self.operations)}, "
            f"expires_at={self.expires_at.isoformat()}, depth={self.depth})"
        )


class CapabilityAuthority:
    """Issues capability tokens, signed with the cluster's private key.

    Example:
        >>> keys = generate_keypair()
        >>> authority = CapabilityAuthority(keys.private_key)
        >>> token = authority.issue(
        ...     "coordinator", "arbor://agent/*/workers/**", ["send", "ask"],
        ...     expires_at=datetime(2030, 1, 1, tzinfo=timezone.utc), depth=1,
        ... )
        >>> token.principal
        'coordinator'
    """

    def __init__(self, private_key: str | bytes) -> None:
        """Create an authority from an Ed25519 private key.

        Args:
            private_key: the ``ed25519-private/<hex>`` text that `generate_keypair`
                returns, or the key's 32 raw bytes (as a cluster signing key read from a
                secret provider).

        Raises:
            InvalidCapability: the key is in neither form (the message omits the key).
        """
        try:
            if isinstance(private_key, bytes):
                key = biscuit_auth.PrivateKey.from_bytes(
                    private_key, biscuit_auth.Algorithm.Ed25519
                )
            else:
                key = biscuit_auth.PrivateKey(private_key)
        except (ValueError, TypeError):
            raise InvalidCapability(
                "private key is invalid; expected the 'ed25519-private/<hex>' text that "
                "generate_keypair() returns, or 32 raw bytes"
            ) from None
        self._private_key = key
        self.public_key = str(biscuit_auth.KeyPair.from_private_key(self._private_key).public_key)

    def __repr__(self) -> str:
        return f"CapabilityAuthority(public_key={self.public_key!r})"

    def issue(
        self,
        principal: str,
        resource_pattern: str | Pattern,
        operations: Iterable[str] | None = None,
        *,
        expires_at: datetime,
        max_uses: int | None = None,
        allowed_callers: Iterable[str] | None = None,
        depth: int = 0,
    ) -> CapabilityToken:
        """Issue a capability that grants ``principal`` the operations on a pattern.

        Args:
            principal: the holder, an agent name or an API key id.
            resource_pattern: such as ``arbor://agent/*/workers/**``.
            operations: a subset of the pattern's operations; None means all of them.
            expires_at: a timezone-aware end of validity, rounded down to whole seconds.
            max_uses: allowed checks over this token and every token delegated from it.
            allowed_callers: the callers a check must name; None accepts any caller.
            depth: how many times the token may be delegated in a chain; 0 forbids it.

        Raises:
            InvalidCapability: an argument is malformed; the message names it.
            InvalidResource: the pattern does not parse.
        """
        block = make_block(
            0, principal, resource_pattern, operations, expires_at, depth, max_uses, allowed_callers
        )
        source, parameters = block_datalog(block)
        biscuit = biscuit_auth.BiscuitBuilder(source, parameters).build(self._private_key)
        return CapabilityToken(biscuit, biscuit.to_base64(), (block,))


def delegate(
    token: CapabilityToken,
    to_principal: str,
    resource_pattern: str | Pattern | None = None,
    operations: Iterable[str] | None = None,
    *,
    expires_at: datetime | None = None,
    max_uses: int | None = None,
    allowed_callers: Iterable[str] | None = None,
    depth: int | None = None,
) -> CapabilityToken:
    """Derive a narrower token for ``to_principal`` by appending a block; no key needed.

    Every argument left as None keeps the parent's value, with two exceptions. ``depth``
    becomes the parent's remaining depth minus one. ``max_uses`` adds no limit of its own,
    but the parent's limits still apply and every use of the child counts against them.

    Raises:
        CapabilityDenied: the request widens the parent (a pattern it does not cover, an
            operation it lacks, a later expiry, more uses, more callers, a depth not below
            the parent's remaining depth) or the parent's depth is exhausted.
        InvalidCapability: an argument is malformed.
        InvalidResource: the pattern does not parse.
    """
    parent = token.blocks[-1]
    pattern = parent.pattern if resource_pattern is None else parse_pattern(resource_pattern)
    requested = str(pattern)
    if parent.depth < 1:
        raise CapabilityDenied(
            token.principal,
            requested,
            "delegate",
            f"token {token.id[:16]} has no delegation depth left; ask its issuer for a "
            "token with a higher depth",
        )

    if operations is None:
        # When the parent grants none of the new pattern's operations, asking for all of
        # them makes find_widening name the operations that are missing.
        operations = (parent.operations & pattern.operations) or pattern.operations
    child = make_block(
        parent.index + 1,
        to_principal,
        pattern,
        operations,
        parent.expires_at if expires_at is None else expires_at,
        parent.depth - 1 if depth is None else depth,
        max_uses,
        parent.allowed_callers if allowed_callers is None else allowed_callers,
    )
    widening = find_widening(token.blocks, child)
    if widening is not None:
        raise CapabilityDenied(token.principal, requested, "delegate", widening)

    source, parameters = block_datalog(child)
    biscuit = token._biscuit.append(biscuit_auth.BlockBuilder(source, parameters))
    return CapabilityToken(biscuit, biscuit.to_base64(), (*token.blocks, child))


def parse_public_key(public_key: str) -> biscuit_auth.PublicKey:
    """Parse an ``ed25519/<hex>`` public key.

    Raises:
        InvalidCapability: the text is not such a key.
    """
    try:
        return biscuit_auth.PublicKey(public_key)
    except (ValueError, TypeError):
        raise InvalidCapability(
            f"public key {public_key!r} is invalid; expected the 'ed25519/<hex>' text that "
            "generate_keypair() returns"
        ) from None


def load_token(text: str, public_key: biscuit_auth.PublicKey) -> CapabilityToken:
    """Verify a token string's signatures and rebuild its blocks.

    Raises:
        InvalidCapability: the signature, the encoding or a block is invalid.
    """
    if not isinstance(text, str):
        raise InvalidCapability(f"a token must be a string, got {type(text).__name__}")
    if len(text) > MAX_TOKEN_LENGTH:
        raise InvalidCapability(f"token is longer than {MAX_TOKEN_LENGTH} characters")
    try:
        biscuit = biscuit_auth.Biscuit.from_base64(text, public_key)
    except biscuit_auth.BiscuitValidationError as error:
        raise InvalidCapability(
            f"token does not verify with public key {public_key}: {error}; it was altered, "
            "or signed by another authority"
        ) from None

    count = biscuit.block_count()
    if count > MAX_BLOCKS:
        raise InvalidCapability(f"token has {count} blocks; at most {MAX_BLOCKS} are accepted")
    blocks: list[CapabilityBlock] = []
    for index in range(count):
        block = _read_block(biscuit, index)
        if blocks:
            widening = find_widening(tuple(blocks), block)
            if widening is not None:
                raise InvalidCapability(f"token block {index} widens its parent: {widening}")
        blocks.append(block)
    return CapabilityToken(biscuit, text, tuple(blocks))


def _read_block(biscuit: biscuit_auth.Biscuit, index: int) -> CapabilityBlock:
    """Rebuild block ``index`` from its terms, and require its Datalog to be Arbor's."""
    if biscuit.block_external_key(index) is not None:
        raise InvalidCapability(f"token block {index} is a third-party block; Arbor makes none")
    source = biscuit.block_source(index)
    found = _TERMS_FACT.match(source)
    if found is None:
        raise InvalidCapability(f"token block {index} has no Arbor terms; Arbor did not make it")
    try:
        terms = json.loads(bytes.fromhex(found.group(1)))
        block = block_from_terms(terms, index)
    except (ValueError, KeyError, TypeError, InvalidResource, InvalidCapability) as error:
        raise InvalidCapability(f"token block {index} has invalid terms: {error}") from None

    expected_source, parameters = block_datalog(block)
    if str(biscuit_auth.BlockBuilder(expected_source, parameters)) != source:
        raise InvalidCapability(
            f"token block {index} contains Datalog that its terms do not produce; Arbor did "
            "not make it"
        )
    return block
