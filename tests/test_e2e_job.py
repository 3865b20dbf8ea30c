"""End to end as on a cluster: `ray start --head`, `ray job submit` the pipeline (the embedded
default with a tiny model), check its outputs and report, `serve deploy` cluster/serve.yaml on
those outputs and ask it for a page over HTTP, stop the head."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml
from conftest import REPO, free_port

from pagellm.run import STAGES

TINY_RUN = [
    "data.dataset=synthetic:3000",
    "train.num_workers=1",  # two ranks and DeepSpeed's shard merge: tests/test_train.py
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.bpe_vocab_size=300",
    # one SFT fit (golden-list fine-tuning from the initialised LM): under `ray start --head` each
    # Ray Train fit costs ~20 s of start-up and shutdown; meta and next-item pre-training run in
    # tests/conftest.py's tiny stages (tests/test_train.py)
    "sft.meta_epochs=0",
    "sft.next_item_epochs=0",
    "sft.ft_epochs=1",
    "reward.epochs=1",
    "ppo.max_iterations=2",
    "ppo.batch_size=16",
    "ppo.eval_max_users=16",
    "eval.page_items=20",
    "eval.report_baselines=[popularity,itemknn]",
    "reward.agreement_users=0",  # tests/test_train.py covers the agreement
    # the embedded profile's R_f with one Multi-VAE and one SASRec instead of three of each (~30 s
    # of CI); the seeds' ensemble: tests/test_ppo.py's collaborative fine reward
    "reward.fine_vaes=1",
    "reward.fine_sasrecs=1",
]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_ray_job_submit_pipeline_then_serve_deploy(tmp_path):
    # a loaded machine starts the dashboard agent slowly; the raylet waits 15 s for it by default
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "RAY_agent_register_timeout_ms": "120000",
        "RAY_raylet_start_wait_time_s": "120",
        # a throwaway head: stop at SIGTERM without draining the node first (Ray waits up to 30 s for
        # Serve's replicas, which never finish on their own)
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    # every port the head binds is free (other Ray instances on this machine hold the defaults,
    # e.g. the dashboard agent's 52365)
    gcs, dashboard, http, agent, metrics = (free_port() for _ in range(5))
    head = subprocess.Popen(
        [
            _bin("ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        out = tmp_path / "run"
        for _ in range(30):  # the job agent starts a little after the dashboard answers
            job = subprocess.run(
                [
                    _bin("ray"),
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--working-dir",
                    ".",
                    "--runtime-env",
                    "cluster/runtime_env.yaml",
                    "--",
                    sys.executable,
                    "ray_jobs/run.py",
                    "--out",
                    str(out),
                    *TINY_RUN,
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0 and "succeeded" in (job.stdout + job.stderr).lower(), (job.stdout + job.stderr)[
            -4000:
        ]
        logs = job.stdout
        assert "report:" in logs
        # the console: a counter per stage, one line per epoch of each Ray Train fit, no split bars
        for k, name in enumerate(STAGES.values(), start=1):
            assert f"[{k}/{len(STAGES)}] {name}: done in " in logs, logs[-4000:]
        for fit in ("golden_ft", "reward_coarse"):
            assert sum(line.startswith(f"  {fit} epoch 1/1: ") for line in logs.splitlines()) == 1, fit
        # the embedded profile's R_f: a Multi-VAE, ItemKNN, EASE and a SASRec fitted in the driver,
        # one line for it
        fine_lines = [line for line in logs.splitlines() if line.startswith("  reward_fine: ")]
        assert len(fine_lines) == 1 and re.fullmatch(
            r"  reward_fine: 1 Multi-VAE \+ [0-9.]+ x ItemKNN \(\d+ neighbours\) \+ [0-9.]+ x EASE \(L2 \d+\) "
            r"\+ [0-9.]+ x 1 SASRec, validation NDCG@100 0\.\d{4}",
            fine_lines[0],
        ), fine_lines
        assert not [line for line in logs.splitlines() if "split(" in line and "%|" in line]  # Ray Data split bars
        # the workers' output stays in Ray's log files, copied beside the run (-v forwards it)
        assert "RayTrainWorker pid=" not in logs and "TrainController pid=" not in logs
        # from the first stage to the report: no blank lines (the tokenizer trainer's bars), no
        # third-party warnings, one wandb line of ours instead of wandb's own
        # a progress bar's carriage returns reach the job log as line breaks of their own (a bare
        # "\r" line): a bar redraw, not a blank line printed by anyone
        lines = logs.split("\n")
        report_line = next(k for k, line in enumerate(lines) if line.startswith("report: "))
        chain = lines[lines.index(f"[1/{len(STAGES)}] {STAGES['data']}") : report_line + 1]

        # (the tokenizer trainer printed 3 blank lines.) A tqdm bar's first draw starts with a
        # carriage return, which reaches the job log as a line break: the empty line before a
        # bar's first draw ("?it/s]", "?fit/s]": the PPO and the R_f Multi-VAE fits' bars) is its own
        def first_draw(line: str) -> bool:
            return re.search(r"\?\w+/s\]", line) is not None

        blank = [
            k
            for k, line in enumerate(chain)
            if not line.strip() and "\r" not in line and not (k + 1 < len(chain) and first_draw(chain[k + 1]))
        ]
        assert chain and not blank, [chain[max(0, k - 2) : k + 2] for k in blank]
        assert not [line for line in chain if "Warning" in line or line.startswith("wandb:")], chain
        assert sum("wandb run (offline)" in line for line in chain) == 1, chain
        assert len(logs.split("\n")) < 150, logs
        assert (out / "logs" / "ray").is_dir() and any((out / "logs" / "ray").glob("worker-*.out"))

        # the embedded default (no --config) with its extra windows, every stage's outputs, the report
        summary = json.loads((out / "run.json").read_text())
        stats = summary["stats"]
        assert (
            stats["dataset"] == "synthetic:3000" and stats["ft_rows"] > stats["ft_users"] and stats["pairs_total"] > 0
        )
        assert (out / "sft" / "model.safetensors").exists() and (out / "ppo" / "policy" / "model.safetensors").exists()
        # ppo.fine_objective=closed_form: the PPO policy carries R_f at fine_weight / kl_beta (Serve's arm B too)
        tilt = json.loads((out / "ppo" / "policy" / "fine_tilt" / "tilt.json").read_text())
        assert tilt["weight"] == pytest.approx(
            summary["config"]["ppo"]["fine_weight"] / summary["config"]["ppo"]["kl_beta"]
        )
        assert [json.loads(line)["iteration"] for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()] == [
            0,
            1,
            2,
        ]
        tests = summary["test_metrics"]
        assert set(tests) == {"SFT (reference)", "PPO (R_c + R_f)", "popularity", "itemknn"}
        assert all(
            0 <= m["ndcg@100"] <= 1 and m["users"] == tests["SFT (reference)"]["users"] > 0 for m in tests.values()
        )
        report = (out / "report.md").read_text()
        assert (
            "| SFT (reference) |" in report
            and "| PPO (R_c + R_f) |" in report
            and "| popularity |" in report
            and "Best baseline: " in report
            and "user by user" in report
            and (out / "report.png").stat().st_size > 0
        )
        # each policy against the best baseline, user by user, with an interval around its mean
        best = summary["best_baseline"]
        assert tests[best]["ndcg@100"] == max(tests[n]["ndcg@100"] for n in ("popularity", "itemknn"))
        paired = summary["paired_vs_best_baseline"]
        assert set(paired) == {"SFT (reference)", "PPO (R_c + R_f)"}
        for policy, diff in paired.items():
            low, high = diff["ndcg@100"]["ci95"]
            assert low <= diff["ndcg@100"]["mean"] <= high and diff["users"] == tests[policy]["users"]
            assert abs(diff["ndcg@100"]["mean"] - (tests[policy]["ndcg@100"] - tests[best]["ndcg@100"])) < 1e-9

        # cluster/serve.yaml, pointed at the job's outputs, deployed to the same head
        config = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
        config["http_options"] = {"host": "127.0.0.1", "port": http}
        args = config["applications"][0]["args"]
        args.update(
            arms={"A": str(out / "sft"), "B": str(out / "ppo" / "policy")},
            data=str(out / "data"),
            ranker=str(out / "reward"),
            policy_cpus=0.2,
        )
        config["applications"][0]["deployments"] = [
            {**d, **({"ray_actor_options": {"num_cpus": 0.1}} if d["name"] in ("CoarseRanker", "ABRouter") else {})}
            for d in config["applications"][0]["deployments"]
        ]
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
        deploy = subprocess.run(
            [_bin("serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", address],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        url, answer = f"http://127.0.0.1:{http}", None
        user = pq.read_table(out / "data" / "eval" / "test.parquet", columns=["user_id"]).column("user_id")[0].as_py()
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                answer = requests.post(f"{url}/v1/page", json={"user_id": user, "k": 5}, timeout=60)
                if answer.status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not up yet, or its first page still generating on a loaded machine
            time.sleep(2)
        assert answer is not None and answer.status_code == 200, answer.text if answer is not None else "no answer"
        assert answer.json()["arm"] in ("A", "B") and len(answer.json()["items"]) == 5
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert set(health["arms"]) == {"A", "B"} and health["ranker"]
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of the head's still running
        except ProcessLookupError:
            pass
