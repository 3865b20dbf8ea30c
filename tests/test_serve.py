"""Ray Serve over real HTTP: the A/B split, pages, the R_c ranker, bad requests, replica death."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from conftest import REPO, free_port

from pagellm.data.layout import DataDir
from pagellm.serve.ab import assign, parse_split
from pagellm.serve.api import MAX_BODY_BYTES, ServingData


def test_model_version_names_the_weights_and_the_fine_tilt(tmp_path):
    """`model` in every answer: the directory @ a hash of what writes its pages, so the same LM
    weights with an R_f tilt (ppo.fine_objective=closed_form) or another tilt weight are other
    versions, and a copy of a directory is the same version."""
    from pagellm.model.artifact import TILT_DIR
    from pagellm.serve.app import model_version

    plain, tilted = tmp_path / "a" / "policy", tmp_path / "b" / "policy"
    plain.mkdir(parents=True)
    (plain / "model.safetensors").write_bytes(b"weights")
    shutil.copytree(plain, tilted)
    assert model_version(plain) == model_version(tilted) and model_version(plain).startswith("policy@")
    (tilted / TILT_DIR).mkdir()
    (tilted / TILT_DIR / "collaborative.safetensors").write_bytes(b"multivae")
    (tilted / TILT_DIR / "tilt.json").write_text('{"weight": 0.7}')
    strong = model_version(tilted)
    assert strong != model_version(plain)
    (tilted / TILT_DIR / "tilt.json").write_text('{"weight": 1.0}')
    assert model_version(tilted) not in (strong, model_version(plain))
    assert model_version(tmp_path / "missing") == "missing@unknown"


def test_assignment_is_stable_and_follows_weights():
    split = parse_split("A=70,B=30", ["A", "B"])
    arms = Counter(assign(f"user{i}", split, "salt") for i in range(20_000))
    assert abs(arms["A"] / 20_000 - 0.7) < 0.02
    assert all(assign(f"user{i}", split, "salt") == assign(f"user{i}", split, "salt") for i in range(100))
    # another salt reshuffles users; a zero weight gets nobody
    assert sum(assign(f"user{i}", split, "salt") != assign(f"user{i}", split, "pepper") for i in range(1000)) > 200
    assert {assign(f"user{i}", {"A": 0.0, "B": 1.0}, "s") for i in range(200)} == {"B"}
    with pytest.raises(ValueError, match="arms"):
        parse_split("A=50,C=50", ["A", "B"])
    with pytest.raises(ValueError, match="ARM=WEIGHT"):
        parse_split("A=half", ["A"])


@pytest.fixture(scope="module")
def served(tiny_stages, tmp_path_factory):
    """Arm A: the tiny SFT policy; arm B: another checkpoint (its weights perturbed); the
    coarse ranker; two replicas per arm."""
    from ray import serve
    from transformers import AutoModelForCausalLM

    from pagellm.serve.app import AppArgs, build_app

    root = tiny_stages["root"]
    other = tmp_path_factory.mktemp("arm_b") / "policy"
    shutil.copytree(root / "sft", other, ignore=shutil.ignore_patterns("logs", "meta"))
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    model.save_pretrained(other)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(
        arms={"A": str(root / "sft"), "B": str(other)},
        data=str(root / "data"),
        ranker=str(root / "reward"),
        split={"A": 50, "B": 50},
        prompt_items=tiny_stages["cfg"].data.prompt_max_items,
        positive_threshold=tiny_stages["cfg"].data.positive_threshold,
        policy_replicas=2,
        policy_cpus=0.2,
        ranker_cpus=0.1,
        router_cpus=0.1,
    )
    serve.run(build_app(args), name="pagellm", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    data = ServingData.load(
        root / "data", tiny_stages["cfg"].data.prompt_max_items, tiny_stages["cfg"].data.positive_threshold
    )
    yield {"url": url, "data": data, "root": root, "arm_b": other, "args": args}
    serve.shutdown()


def _page(url: str, session=requests, **body) -> requests.Response:
    return session.post(f"{url}/v1/page", json=body, timeout=60)


def test_serving_prompts_are_the_evaluation_prompts(tiny_stages):
    """What a replica knows before the test split gives every test user exactly the prompt the
    data stage wrote (positives only, newest prompt_max_items) and, for a tilt, the whole history
    evaluation passes (every positive before the split); popularity counts positives."""
    root, cfg = tiny_stages["root"], tiny_stages["cfg"]
    data = ServingData.load(root / "data", cfg.data.prompt_max_items, cfg.data.positive_threshold, before="test")
    test = DataDir(root / "data").read_eval("test").to_pandas()
    assert len(test) > 20
    whole = DataDir(root / "data").eval_users("test", cfg.data.positive_threshold).set_index("user_id").history
    assert any(len(whole[u]) > len(p) for u, p in zip(test.user_id, test.prompt_items))  # some prompts are cut
    for user, prompt in zip(test.user_id, test.prompt_items):
        assert data.user_history(user, None) == list(prompt)
        assert data.whole_history(user, None) == list(whole[user])  # what a tilt reads (eval.tilt_history)
    assert data.whole_history(test.user_id[0], ["x"]) == ["x"]  # a request's history replaces it
    before = DataDir(root / "data").interactions_before("test")
    counts = before[before.rating > cfg.data.positive_threshold].item_id.value_counts()
    assert [counts[i] for i in data.popular] == sorted(counts.values, reverse=True)
    assert len(before[before.rating <= cfg.data.positive_threshold]) > 0  # the filter had work to do


def test_split_within_five_percent_and_sticky(served):
    url, data = served["url"], served["data"]
    users = list(data.history)[:600] + [f"new-user-{i}" for i in range(1400)]  # known and unseen ids

    def call(user):
        r = _page(url, user_id=user, k=1)
        assert r.status_code == 200, r.text
        return user, r.json()["arm"], r.json()["model"]

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(call, users))
    arms = Counter(arm for _, arm, _ in first)
    assert abs(arms["A"] / len(users) - 0.5) <= 0.05, arms
    assert len({(arm, model) for _, arm, model in first}) == 2  # each arm serves its own checkpoint
    with ThreadPoolExecutor(8) as pool:
        again = list(pool.map(call, users[::10]))
    assert all(arm == dict((u, a) for u, a, _ in first)[u] for u, arm, _ in again)


def test_pages_respect_history_exclusions_and_fall_back_to_popularity(served):
    url, data = served["url"], served["data"]
    user = next(u for u, items in data.history.items() if len(items) >= 3)
    page = _page(url, user_id=user, k=10).json()
    assert page["source"] == "policy" and page["known_user"] and len(page["items"]) == 10 == len(page["scores"])
    assert len(set(page["items"])) == 10 and not set(page["items"]) & data.seen[user]
    assert all(s <= 0 for s in page["scores"])  # log-probabilities
    # excluded items never come back; the same request gives the same page (greedy)
    second = _page(url, user_id=user, k=10, exclude=page["items"][:5]).json()
    assert not set(second["items"]) & set(page["items"][:5])
    assert _page(url, user_id=user, k=10).json()["items"] == page["items"]
    # k is honoured and a shorter page is the longer page's prefix
    assert _page(url, user_id=user, k=3).json()["items"] == page["items"][:3]
    # an unseen user: from the request's history, or from popularity
    history = data.history[user][-3:]
    fresh = _page(url, user_id="brand-new", k=5, history=history).json()
    assert fresh["source"] == "policy" and not fresh["known_user"] and not set(fresh["items"]) & set(history)
    cold = _page(url, user_id="brand-new", k=5, exclude=[data.popular[0]]).json()
    assert cold["source"] == "popularity" and cold["items"] == data.popular[1:6] and cold["scores"] is None


def test_colocated_arms_write_the_same_pages_in_one_replica(served):
    """``colocate``: the same arms loaded inside the router (no PagePolicy deployment), beside
    the split application: every user gets the same arm and the same page as there, and bad
    requests still get 4xx."""
    from ray import serve

    from pagellm.serve.app import build_app

    url, data, args = served["url"], served["data"], served["args"]
    colocated = args.model_copy(update={"colocate": True, "policy_replicas": 1})
    serve.run(build_app(colocated), name="colocated", route_prefix="/colocated", blocking=False)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            health = requests.get(f"{url}/colocated/healthz", timeout=5)
            if health.status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    try:
        assert health.json()["colocated"] and set(health.json()["arms"]) == {"A", "B"}
        deployments = serve.status().applications["colocated"].deployments
        assert set(deployments) == {"ABRouter", "CoarseRanker"}, set(deployments)
        users = [u for u, items in data.history.items() if items][:40] + ["brand-new"]
        for user in users:
            split_page = _page(url, user_id=user, k=10).json()
            same = _page(f"{url}/colocated", user_id=user, k=10).json()
            assert {k: same[k] for k in ("arm", "items", "source", "model")} == {
                k: split_page[k] for k in ("arm", "items", "source", "model")
            }
        assert len({_page(url, user_id=u, k=1).json()["arm"] for u in users}) == 2  # both arms served
        bad = _page(f"{url}/colocated", user_id="u", k=0)
        assert bad.status_code == 422 and "k" in bad.text
        unknown = _page(f"{url}/colocated", user_id="u", k=3, history=["missing-item"])
        assert unknown.status_code == 422 and "missing-item" in unknown.text
    finally:
        serve.delete("colocated")


def test_direct_ingress_answers_on_the_replica_port(served):
    """`pagellm serve --colocate --direct-ingress` on a Ray of its own prints the router
    replica's port, which answers pages itself (no proxy hop), the same as the proxy does and as
    the split application's arm A does for its users; Ctrl-C stops it cleanly. Its console: our
    lines, not Ray Serve's start-up infos."""
    url, data, root, args = served["url"], served["data"], served["root"], served["args"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagellm.cli", "serve", "--arm", f"A={root / 'sft'}", "--data", str(root / "data")]
        + ["--colocate", "--direct-ingress", "--port", str(port), "--policy-cpus", "0.2", "ray.num_cpus=1"]
        + [f"data.prompt_max_items={args.prompt_items}", f"data.positive_threshold={args.positive_threshold}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(300, lambda: os.killpg(proc.pid, signal.SIGKILL))  # never hang the suite
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("direct ingress (no proxy hop): "):
                break
        assert lines and lines[-1].startswith("direct ingress"), "".join(lines)[-3000:]
        # our start-up line, not Ray Serve's infos (serve.run's "New http_options will not be applied")
        assert any(line.startswith("pagellm serve: listening") for line in lines)
        assert not [line for line in lines if "Serve app" in line or "is ready at" in line], lines
        direct = int(lines[-1].split("port ")[1].split()[0])
        assert direct != port
        users = [u for u, items in data.history.items() if items and assign(u, args.split, args.salt) == "A"][:20]
        for user in users:
            page = _page(f"http://127.0.0.1:{direct}", user_id=user, k=10).json()
            assert page["items"] == _page(f"http://127.0.0.1:{port}", user_id=user, k=10).json()["items"]
            assert page["items"] == _page(url, user_id=user, k=10).json()["items"]
        assert requests.get(f"http://127.0.0.1:{direct}/healthz", timeout=30).json()["colocated"]
        assert _page(f"http://127.0.0.1:{direct}", user_id="u", k=0).status_code == 422
        # Ctrl-C: the router stops without Ray Serve's 30-s direct-ingress drain (--drain-s 0)
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stdout.read()
        assert proc.wait(timeout=90) == 0 and "failed to shut down" not in rest, rest[-3000:]
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_ranker_orders_candidates_by_coarse_reward(served):
    from transformers import AutoTokenizer

    from pagellm.model.modeling import RewardModel, score_lists
    from pagellm.model.prompts import PromptCodec, encode_list
    from pagellm.model.vocab import Vocab

    url, data, root = served["url"], served["data"], served["root"]
    user = next(iter(data.history))
    candidates = data.popular[:12]
    r = requests.post(f"{url}/v1/rank", json={"user_id": user, "candidates": candidates}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body["items"]) == sorted(candidates) and body["scores"] == sorted(body["scores"], reverse=True)
    # the same scores computed here from the saved head
    model = RewardModel.from_pretrained(root / "reward" / "coarse").eval()
    codec = PromptCodec(Vocab.from_tokenizer(AutoTokenizer.from_pretrained(root / "reward" / "coarse")))
    encoded = [encode_list(codec, user, data.user_history(user, None), [c]) for c in body["items"]]
    expected = score_lists(model, [e[0] for e in encoded], [e[1] for e in encoded], codec.vocab.pad_id)
    assert body["scores"] == pytest.approx([float(x) for x in expected], abs=1e-4)


@pytest.mark.parametrize(
    "body, status, says",
    [
        ("{not json", 400, "malformed JSON"),
        ("[1, 2]", 422, "JSON object"),
        (json.dumps({"k": 5}), 422, "user_id"),
        (json.dumps({"user_id": "u", "k": 0}), 422, "k"),
        (json.dumps({"user_id": "u", "k": 101}), 422, "k"),
        (json.dumps({"user_id": "u", "k": "ten"}), 422, "k"),
        (json.dumps({"user_id": "u", "k": "5"}), 422, "k"),  # no string-to-int coercion
        (json.dumps({"user_id": "u", "k": True}), 422, "k"),  # no bool-to-int coercion
        (json.dumps({"user_id": "u", "k": 5.0}), 422, "k"),
        (json.dumps({"user_id": "u", "history": ["no-such-item"]}), 422, "no-such-item"),
        (json.dumps({"user_id": "u", "exclude": ["nope-1", "nope-2"]}), 422, "nope-1"),
        (json.dumps({"user_id": "u", "history": ["x"] * 501}), 422, "history"),
        (json.dumps({"user_id": "u", "colour": "red"}), 422, "colour"),
        (json.dumps({"user_id": "u" * 200}), 422, "user_id"),
        (json.dumps({"user_id": "u", "history": ["a" * 200] * 400}), 413, "exceeds"),
    ],
)
def test_bad_page_requests_get_4xx(served, body, status, says):
    r = requests.post(f"{served['url']}/v1/page", data=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert says in r.text


def test_bad_rank_requests_get_4xx(served):
    url = served["url"]
    for body, says in (
        ({"user_id": "u", "candidates": []}, "candidates"),
        ({"user_id": "u", "candidates": ["a", "a"]}, "unique"),
        ({"user_id": "u", "candidates": ["missing-item"]}, "missing-item"),
    ):
        r = requests.post(f"{url}/v1/rank", json=body, timeout=60)
        assert r.status_code == 422 and says in r.text, r.text
    assert len(json.dumps({"user_id": "u", "history": ["a" * 200] * 400})) > MAX_BODY_BYTES


def test_killing_a_replica_loses_no_request(served):
    """Load from 4 threads while one replica of arm A is killed: the router retries requests
    whose replica died, Serve replaces the replica, and every request is answered."""
    import ray

    url, data = served["url"], served["data"]
    users = [
        u
        for u in list(data.history) + [f"x{i}" for i in range(3000)]
        if assign(u, {"A": 50, "B": 50}, "pagellm-ab-1") == "A"
    ][:400]
    statuses: list[int] = []
    stop = threading.Event()

    def load(offset: int):
        session = requests.Session()
        i = offset
        while not stop.is_set():
            try:
                statuses.append(_page(url, session, user_id=users[i % len(users)], k=5).status_code)
            except requests.RequestException as exc:  # a lost request
                statuses.append(repr(exc))
            i += 4

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "PagePolicy_A" in a["name"]]
    assert len(replicas) == 2
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert len(statuses) > 20
    assert Counter(statuses) == {200: len(statuses)}, Counter(statuses)
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert set(health["arms"]) == {"A", "B"}
