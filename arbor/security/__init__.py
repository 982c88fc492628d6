"""Capabilities: resource URIs, signed tokens, delegation and local checks.

This package depends only on `arbor.errors` and libraries, so the registry, the runtime
and the gateway can all use it.
"""

from __future__ import annotations

from arbor.security.blocks import CapabilityBlock
from arbor.security.capability import (
    CapabilityAuthority,
    CapabilityToken,
    KeyPair,
    delegate,
    generate_keypair,
)
from arbor.security.uri import (
    OPERATIONS,
    Pattern,
    Resource,
    parse_pattern,
    parse_resource,
    pattern_covers,
)
from arbor.security.verifier import CapabilityVerifier, Decision

__all__ = [
    "OPERATIONS",
    "CapabilityAuthority",
    "CapabilityBlock",
    "CapabilityToken",
    "CapabilityVerifier",
    "Decision",
    "KeyPair",
    "Pattern",
    "Resource",
    "delegate",
    "generate_keypair",
    "parse_pattern",
    "parse_resource",
    "pattern_covers",
]
