"""The cluster lease: which Ray cluster's registry reconciles and runs the agents.

During a RayService upgrade two Ray clusters share one database for a while. Without a
lease both registries would recreate every agent and fence each other's incarnations
until the old cluster is deleted. With it, the new cluster takes the lease when its
registry first starts, and the old one stops reconciling and stops its agents.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arbor.errors import ClusterLeaseLost


@dataclass(frozen=True)
class ClusterLease:
    """The row that names the cluster running the agents.

    Attributes:
        holder: the id of the Ray cluster that holds the lease.
        generation: grows by one with every claim.
        claimed_at: when the holder took it.
    """

    holder: str
    generation: int
    claimed_at: datetime


class LeaseTables:
    """Lease methods for a store with ``_transaction`` and ``_retry``."""

    dialect: str
    # Provided by the store class that mixes this in.
    _transaction: Any
    _retry: Any

    def cluster_lease(self) -> ClusterLease | None:
        """Return the current lease, or None when no cluster has claimed one yet."""

        def step() -> ClusterLease | None:
            with self._transaction() as connection:
                row = connection.execute(
                    "SELECT holder, generation, claimed_at FROM arbor_cluster_lease WHERE id = 1"
                ).fetchone()
            return self._lease(row) if row else None

        result: ClusterLease | None = self._retry("cluster_lease", step)
        return result

    def claim_cluster_lease(self, cluster_id: str) -> ClusterLease:
        """Give the lease to ``cluster_id``. A claim by the current holder keeps the generation."""
        now = datetime.now(UTC)
        claimed_at = now if self.dialect == "postgresql" else now.timestamp()
        sql = (
            "INSERT INTO arbor_cluster_lease (id, holder, generation, claimed_at) "
            "VALUES (1, ?, 1, ?) "
            "ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, "
            "generation = arbor_cluster_lease.generation + 1, claimed_at = excluded.claimed_at "
            "WHERE arbor_cluster_lease.holder <> excluded.holder"
        )
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")

        def step() -> ClusterLease:
            with self._transaction() as connection:
                connection.execute(sql, (cluster_id, claimed_at))
                row = connection.execute(
                    "SELECT holder, generation, claimed_at FROM arbor_cluster_lease WHERE id = 1"
                ).fetchone()
            return self._lease(row)

        result: ClusterLease = self._retry("claim_cluster_lease", step)
        return result

    def check_cluster_lease(self, connection: Any, cluster_id: str | None) -> None:
        """Raise `ClusterLeaseLost` inside a transaction if another cluster holds the lease.

        The check passes without a cluster id (cells run without a registry) and before any
        cluster has claimed the lease.
        """
        if cluster_id is None:
            return
        row = connection.execute("SELECT holder FROM arbor_cluster_lease WHERE id = 1").fetchone()
        if row is not None and row[0] != cluster_id:
            raise ClusterLeaseLost(cluster_id, row[0])

    def _lease(self, row: tuple[Any, ...]) -> ClusterLease:
        claimed_at = row[2]
        if not isinstance(claimed_at, datetime):
            claimed_at = datetime.fromtimestamp(float(claimed_at), UTC)
        return ClusterLease(holder=row[0], generation=int(row[1]), claimed_at=claimed_at)
