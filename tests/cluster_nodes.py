"""A Ray cluster of several nodes on this machine (Ray's ``cluster_utils``), driven from another
process through stdin/stdout, one JSON line per answer.

The multi-node test runs it as a subprocess rather than building the cluster inside pytest: a
``Cluster`` made in the test process left the session's own local Ray (the ``ray_session``
fixture) with a GCS that stopped answering a minute after the next in-process PPO run's actors
were killed (pytest then exits 1 with no report; seen in CI and reproduced). In its own process
the cluster shares nothing with the session's Ray.

    python tests/cluster_nodes.py POOL[:DIR] ...   -> {"address": ..., "nodes": {POOL: NODE_ID}}
    stdin "kill POOL"   -> {"killed": NODE_ID}      (its raylet and workers die with it)
    stdin "add POOL:DIR" -> {"nodes": {POOL: NODE_ID}}
    stdin "stop" or EOF -> every node removed, exit 0

Each worker node has 2 CPUs, the custom resource ``POOL`` (10) and ``PAGELLM_CACHE=DIR`` (its
own download cache: nodes share no files); the head has 1 CPU and no pool.
"""

from __future__ import annotations

import json
import sys

from ray.cluster_utils import Cluster


def main(pools: list[str]) -> None:
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {}

    def add(spec: str) -> None:
        pool, _, cache = spec.partition(":")
        nodes[pool] = cluster.add_node(num_cpus=2, resources={pool: 10}, env_vars={"PAGELLM_CACHE": cache or ""})
        cluster.wait_for_nodes()

    def say(answer: dict) -> None:
        print(json.dumps(answer), flush=True)

    try:
        for spec in pools:
            add(spec)
        say({"address": cluster.address, "nodes": {p: n.node_id for p, n in nodes.items()}})
        for line in sys.stdin:
            verb, _, arg = line.strip().partition(" ")
            if verb == "kill":
                node = nodes.pop(arg)
                cluster.remove_node(node)
                say({"killed": node.node_id})
            elif verb == "add":
                add(arg)
                pool = arg.partition(":")[0]
                say({"nodes": {pool: nodes[pool].node_id}})
            elif verb == "stop":
                break
    finally:  # node by node, the head last
        for node in [*cluster.worker_nodes, cluster.head_node]:
            cluster.remove_node(node)


if __name__ == "__main__":
    main(sys.argv[1:])
