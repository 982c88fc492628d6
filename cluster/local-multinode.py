"""Start a three-node Ray cluster on this machine, all on 127.0.0.1, and keep it up.

Run it with `python cluster/local-multinode.py`; it prints the address to pass as
ARBOR_RAY_ADDRESS and stops every node on Ctrl-C.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 100 * 1024**2, "node_ip_address": "127.0.0.1"}


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 0})
    for _ in range(3):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    print(f"cluster up: export ARBOR_RAY_ADDRESS={cluster.address}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.shutdown()


if __name__ == "__main__":
    main()
