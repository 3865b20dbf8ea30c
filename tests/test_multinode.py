"""PPO on a Ray cluster of three nodes started on this machine (Ray's own multi-node test
utility, in its own process: tests/cluster_nodes.py; separate raylets with their own
resources), the nodes sharing nothing but a storage URI: inputs, role checkpoints and metrics go
through it. The node holding the policy is killed mid-run and the run resumed from the URI
loses no iteration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import REPO
from test_ppo import PPO_QUICK

from pagellm.outputs import read_jsonl
from pagellm.storage import upload

ITERATIONS = 6


class Nodes:
    """tests/cluster_nodes.py as a subprocess: worker nodes by pool, killed and added on request."""

    def __init__(self, *pools: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "cluster_nodes.py"), *pools],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
        first = self._answer()
        self.address, self.ids = first["address"], first["nodes"]

    def _answer(self) -> dict:
        for line in self.proc.stdout:  # Ray may print to stdout too: the answer is the JSON line
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"the cluster helper exited ({self.proc.wait()})")

    def kill(self, pool: str) -> str:
        self.proc.stdin.write(f"kill {pool}\n")
        self.proc.stdin.flush()
        return self._answer()["killed"]

    def add(self, spec: str) -> str:
        self.proc.stdin.write(f"add {spec}\n")
        self.proc.stdin.flush()
        pool = spec.partition(":")[0]
        self.ids[pool] = self._answer()["nodes"][pool]
        return self.ids[pool]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)


def test_ppo_roles_on_two_nodes_resume_from_the_uri_after_a_node_dies(tiny_stages, tmp_path):
    bucket = tmp_path / "bucket"  # the object store stand-in: reached only as file:// URIs
    uri = f"file://{bucket}"
    for stage in ("data", "sft", "reward"):
        upload(tiny_stages["root"] / stage, f"{uri}/{stage}")
    cluster = Nodes(f"pool_a:{tmp_path / 'cache_a'}", f"pool_b:{tmp_path / 'cache_b'}")
    try:
        policy_node, other_node = cluster.ids["pool_a"], cluster.ids["pool_b"]
        pins = [f"ppo.{role}.resources={{pool_a: 1}}" for role in ("policy", "reference")]
        pins += [f"ppo.{role}.resources={{pool_b: 1}}" for role in ("critic", "coarse", "fine")]
        args = [
            sys.executable,
            "-m",
            "pagellm.cli",
            "ppo",
            *("--data", f"{uri}/data", "--sft", f"{uri}/sft", "--reward", f"{uri}/reward", "--out", f"{uri}/ppo"),
            *tiny_stages["overrides"],
            *PPO_QUICK,
            f"ppo.max_iterations={ITERATIONS}",
            "ppo.checkpoint_every=2",
            "ppo.eval_every=100",
            "ppo.colocate=false",  # one bundle per actor: the roles are on different nodes
            *pins,
        ]
        env = {
            **os.environ,
            "RAY_ADDRESS": cluster.address,
            "OMP_NUM_THREADS": "1",
            "PAGELLM_CACHE": str(tmp_path / "cache_driver"),
        }
        log = tmp_path / "ppo_first_run.log"  # a file, not a pipe: nobody reads a pipe while we wait
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        first = bucket / "ppo" / "checkpoints" / "iter_000002" / "state.json"
        deadline = time.time() + 400
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.exists(), f"no checkpoint at the URI before the deadline: {log.read_text()[-3000:]}"
        assert cluster.kill("pool_a") == policy_node  # the policy and reference actors die with their node
        proc.wait(timeout=300)
        assert proc.returncode != 0, "PPO cannot finish without its policy"
        saved = max(int(d.name.split("_")[1]) for d in (bucket / "ppo" / "checkpoints").glob("iter_*/"))
        assert saved < ITERATIONS and (bucket / "ppo" / "metrics.jsonl").exists()  # the metrics went along

        replacement = cluster.add(f"pool_a:{tmp_path / 'cache_a2'}")
        done = subprocess.run([*args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        cluster.stop()

    records = read_jsonl(bucket / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(ITERATIONS + 1)), "every iteration exactly once"
    events = read_jsonl(bucket / "ppo" / "events.jsonl")
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["iteration"] >= 2
    final = json.loads((bucket / "ppo" / "checkpoints" / f"iter_{ITERATIONS:06d}" / "state.json").read_text())
    assert final["normalizer"]["count"] == ITERATIONS * 16  # the state carried on across the two runs
    # each run put the roles where the custom resources said: policy/reference on pool_a's node
    placed = [e for e in events if e["event"] == "roles"]
    assert [e["iteration"] for e in placed] == [0, resumed[0]["iteration"]]
    for run, policy_at in zip(placed, (policy_node, replacement)):
        assert run["storage"] == f"{uri}/ppo"
        assert {n for r in ("policy", "reference") for n in run["nodes"][r]} == {policy_at}
        assert {n for r in ("critic", "coarse", "fine") for n in run["nodes"][r]} == {other_node}
    assert (bucket / "ppo" / "policy" / "config.json").exists() and "ppo: iteration 6" in done.stdout
