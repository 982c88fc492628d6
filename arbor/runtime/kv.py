"""Arbor's keys in Ray's internal key-value store, which lives in the cluster's GCS.

The keys hold small facts that processes of one Ray cluster share without a database
round trip: the cluster's id for the cluster lease, the restart that `arbor.restore`
caused, and each agent's mailbox limit. A new Ray cluster starts with none of them.
"""

from __future__ import annotations

from ray.experimental import internal_kv

NAMESPACE = b"arbor"
CLUSTER_ID = b"cluster-id"


def rollback_key(name: str) -> bytes:
    """Return the key that marks a restart Arbor caused, with its reason as the value.

    `arbor.restore` writes ``rollback`` there and a handler time limit ``timeout``, for the
    next incarnation's `on_recover`.
    """
    return f"rollback/{name}".encode()


def start_failures_key(name: str) -> bytes:
    """Return the key that counts an agent's failed restarts in a row."""
    return f"start-failures/{name}".encode()


def max_pending_key(name: str) -> bytes:
    """Return the key of agent ``name``'s ``max_pending`` limit."""
    return f"max-pending/{name}".encode()


def get(key: bytes) -> bytes | None:
    """Return the value under ``key``, or None."""
    value: bytes | None = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
    return value


def put(key: bytes, value: bytes, overwrite: bool = True) -> bool:
    """Store ``value`` under ``key``; returns whether the key existed before."""
    existed: bool = internal_kv._internal_kv_put(key, value, overwrite, namespace=NAMESPACE)
    return existed


def delete(key: bytes) -> None:
    """Remove ``key`` if it exists."""
    internal_kv._internal_kv_del(key, namespace=NAMESPACE)
