"""Ray Serve application (paper 4.6, 5.3): policy arms behind an A/B router, and R_c as a CPU
ranking feature.

  ABRouter     FastAPI ingress: validates requests (4xx with a message, never a 5xx for bad
               input), assigns each user to an arm by a salted hash of the user id (``ab.py``),
               forwards to that arm, retries once when a replica dies under a request, and
               records per-arm request counts and latency as Ray Serve metrics
  PagePolicy   one arm: a policy checkpoint and its tokenizer; batches requests with
               ``@serve.batch`` and writes each page with the page mode of evaluation (no
               repeats, no seen items). Its own deployment per arm (``PagePolicy_<arm>``), or,
               with ``colocate``, loaded inside the router's replicas: one actor hop fewer per
               request (bench/serve_latency.py)
  CoarseRanker the coarse reward head on CPU: scores each caller-given candidate as a one-item
               page for the user and returns the candidates sorted by R_c

``build_app`` is the import path of ``serve run`` / ``serve deploy`` (cluster/serve.yaml) and of
``pagellm serve``; its arguments are ``AppArgs``.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from pagellm.config import PAGE_MODES, EvalConfig
from pagellm.errors import InputError
from pagellm.model.artifact import TILT_DIR, require_policy
from pagellm.model.ensemble import lm_dirs
from pagellm.serve.ab import assign, check_split
from pagellm.serve.api import (
    MAX_BODY_BYTES,
    MAX_K,
    PageRequest,
    RankRequest,
    ServingData,
    validation_errors,
)
from pagellm.storage import fetch, is_uri

log = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` of an application in cluster/serve.yaml)."""

    arms: dict[str, str] = Field(description="arm name -> policy directory (SFT_DIR or PPO_DIR/policy)")
    data: str = Field(description="the data-stage output whose users and items the replicas cache")
    split: Optional[dict[str, float]] = Field(None, description="arm -> traffic weight; None: even")
    ranker: Optional[str] = Field(None, description="REWARD_DIR of `pagellm reward` (its coarse head serves /v1/rank)")
    salt: str = Field("pagellm-ab-1", description="A/B hash salt: a new salt reshuffles users across arms")
    prompt_items: int = Field(20, ge=1, description="history items in a prompt (data.prompt_max_items of training)")
    positive_threshold: float = Field(
        3.0,
        description="r > this is a positive (data.positive_threshold of training): prompts and the popularity "
        "fallback are built from positives, as the data stage builds evaluation prompts",
    )
    page_mode: Literal[PAGE_MODES] = Field(EvalConfig.page_mode, description="how pages are written (eval.page_mode)")
    hybrid_items: int = Field(
        EvalConfig.hybrid_items, ge=1, description="hybrid mode: slots decoded (eval.hybrid_items)"
    )
    max_batch_size: int = Field(16, ge=1, description="@serve.batch: requests generated together")
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="@serve.batch: how long a batch waits to fill; 0: a batch is what queued while the previous one "
        "ran (a request at concurrency 1 waits the full wait: 1 ms cost 2.3 ms of p50, docs/benchmarks.md)",
    )
    colocate: bool = Field(
        False,
        description="the arms' policies load inside the router's replicas (policy_replicas of them, each with "
        "router_cpus + policy_cpus x arms): no router -> policy hop, the lowest latency (docs/benchmarks.md); "
        "False: one deployment per arm, placed and scaled apart, and a request whose policy replica dies is "
        "retried on another",
    )
    policy_replicas: int = Field(1, ge=1)
    policy_cpus: float = Field(0.5, gt=0, description="CPUs per policy replica")
    policy_gpus: float = Field(0.0, ge=0, description="GPUs per policy replica (0: CPU)")
    ranker_cpus: float = Field(0.25, gt=0)
    router_cpus: float = Field(0.1, gt=0)


def model_version(model_dir: str | Path) -> str:
    """directory name @ the first 8 hex digits of the weights' sha256: what served a page. A
    policy's R_f tilt (``fine_tilt/``: its Multi-VAE and weight) is part of what writes its pages,
    so it enters the hash too: the same LM with and without it are two versions. An ensemble
    policy hashes its members' weights in order."""
    weights = [d / "model.safetensors" for d in lm_dirs(model_dir)]
    if not all(w.exists() for w in weights):
        return f"{Path(model_dir).name}@unknown"
    digest = hashlib.sha256()
    for w in weights:
        digest.update(w.read_bytes())
    tilt = Path(model_dir) / TILT_DIR
    for part in sorted(tilt.iterdir()) if tilt.is_dir() else []:
        digest.update(part.read_bytes())
    return f"{Path(model_dir).name}@{digest.hexdigest()[:8]}"


def _unknown(vocab, items) -> list[str]:
    return sorted({i for i in items or [] if i not in vocab.item_token})


def _unknown_response(unknown: list[str]) -> dict:
    return _bad(f"unknown item ids: {unknown[:20]}" + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""))


def _bad(message: str, status: int = 422, errors: Optional[list] = None) -> dict:
    return {"status": status, "error": message, **({"errors": errors} if errors else {})}


class PagePolicy:
    """One arm: a policy checkpoint writing pages of k items (a deployment of its own, or held by
    the router with ``colocate``)."""

    def __init__(
        self,
        policy_dir: str,
        data_dir: str,
        prompt_items: int,
        positive_threshold: float,
        max_batch_size: int,
        batch_wait_ms: float,
        use_gpu: bool,
        page_mode: str = EvalConfig.page_mode,
        hybrid_items: int = EvalConfig.hybrid_items,
    ):
        import torch

        from pagellm.model.artifact import load_policy

        torch.set_num_threads(1)
        policy_dir, data_dir = str(fetch(policy_dir)), str(fetch(data_dir))  # URIs: a local copy per replica
        self.policy = load_policy(policy_dir, torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu"))
        self.vocab, self.codec = self.policy.vocab, self.policy.codec
        self.version = model_version(policy_dir)
        self.data = ServingData.load(data_dir, prompt_items, positive_threshold)
        self.pages = EvalConfig(page_mode=page_mode, hybrid_items=hybrid_items)  # greedy, as evaluation
        self._generate.set_max_batch_size(max_batch_size)
        self._generate.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def page(self, request: dict) -> dict:
        """``request`` is a validated PageRequest as a dict; unknown item ids -> 422."""
        unknown = _unknown(self.vocab, (request["history"] or []) + (request["exclude"] or []))
        if unknown:
            return _unknown_response(unknown)
        user = request["user_id"]
        excluded = self.data.excluded(user, request["history"], request["exclude"])
        history = self.data.user_history(user, request["history"])
        known = user in self.data.seen or user in self.vocab.user_token
        if not history and user not in self.vocab.user_token:
            # nothing to condition on: the most popular items the user may see
            return {
                "items": self.data.popular_page(request["k"], excluded),
                "scores": None,
                "source": "popularity",
                "known_user": known,
                "model": self.version,
            }
        whole = tuple(self.data.whole_history(user, request["history"]))
        items, scores = await self._generate((user, tuple(history), tuple(sorted(excluded)), request["k"], whole))
        return {"items": items, "scores": scores, "source": "policy", "known_user": known, "model": self.version}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _generate(self, batch: list[tuple]) -> list[tuple[list[str], list[float]]]:
        return await asyncio.to_thread(self._write_pages, batch)

    def _write_pages(self, batch: list[tuple]) -> list[tuple[list[str], list[float]]]:
        """Pages for the batch (``Policy.write_tokens``, the evaluation's page mode, greedy), as
        long as its largest k; each is cut to its own k (greedy decoding with EOS banned for k
        steps, and ranking by score, write the same first k items at any longer length)."""
        k = max(r[3] for r in batch)
        users, histories, excluded, wants, wholes = zip(*batch)
        tokens, logprobs = self.policy.write_tokens(users, histories, excluded, k, self.pages, tilt_histories=wholes)
        return [
            ([self.vocab.token_item[t] for t in row[:want]], [round(lp, 5) for lp in scores[:want]])
            for row, scores, want in zip(tokens, logprobs, wants)
        ]

    def check_health(self) -> None:
        assert self.policy.model is not None


PagePolicyDeployment = serve.deployment(max_ongoing_requests=64, name="PagePolicy")(PagePolicy)


@serve.deployment(max_ongoing_requests=32)
class CoarseRanker:
    """R_c as a ranking feature on CPU: each candidate scored as the one-item page
    [prompt || item || eos] for the user; candidates returned by descending R_c."""

    def __init__(self, reward_dir: str, data_dir: str, prompt_items: int, positive_threshold: float):
        import torch

        from pagellm.model.artifact import load_codec
        from pagellm.model.modeling import RewardModel

        torch.set_num_threads(1)
        reward_dir, data_dir = fetch(reward_dir), str(fetch(data_dir))
        coarse = Path(reward_dir) / "coarse"
        self.model = RewardModel.from_pretrained(coarse).eval()
        self.codec = load_codec(coarse)
        self.vocab = self.codec.vocab
        self.version = model_version(coarse)
        self.data = ServingData.load(data_dir, prompt_items, positive_threshold)

    async def rank(self, request: dict) -> dict:
        unknown = _unknown(self.vocab, request["candidates"] + (request["history"] or []))
        if unknown:
            return _unknown_response(unknown)
        return await asyncio.to_thread(self._rank, request)

    def _rank(self, request: dict) -> dict:
        from pagellm.model.modeling import score_lists
        from pagellm.model.prompts import encode_list

        history = self.data.user_history(request["user_id"], request["history"])
        encoded = [encode_list(self.codec, request["user_id"], history, [c]) for c in request["candidates"]]
        scores = score_lists(self.model, [e[0] for e in encoded], [e[1] for e in encoded], self.vocab.pad_id)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return {
            "items": [request["candidates"][i] for i in order],
            "scores": [round(float(scores[i]), 5) for i in order],
            "model": self.version,
        }


app = FastAPI(title="PageLLM", description="whole-page recommendation: A/B policy arms and the R_c ranker")


def _retryable(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class ABRouter:
    def __init__(self, arms: dict, split: dict[str, float], salt: str, versions: dict[str, str], ranker=None):
        """``arms``: arm -> its deployment's handle, or (``colocate``) the PagePolicy arguments
        to load it here."""
        from ray.serve.metrics import Counter, Histogram

        arms = {arm: PagePolicy(**a) if isinstance(a, dict) else a for arm, a in arms.items()}
        self.arms, self.split, self.salt, self.versions, self.ranker = arms, split, salt, versions, ranker
        self.requests = Counter(
            "pagellm_requests",
            description="requests by route, arm and HTTP status",
            tag_keys=("route", "arm", "status"),
        )
        self.latency = Histogram(
            "pagellm_latency_ms",
            description="request latency (ms) by route and arm",
            boundaries=[5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560],
            tag_keys=("route", "arm"),
        )
        self.counts: dict[str, int] = {arm: 0 for arm in arms}  # this replica's, for /healthz

    async def _body(self, request: Request, model):
        """The validated request, or the 4xx response that says what is wrong with it."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"}, status_code=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}"}, status_code=413)
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse({"error": f"malformed JSON: {exc}"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=422)
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            return JSONResponse({"error": "invalid request", "errors": validation_errors(exc)}, status_code=422)

    async def _call(self, handle, method: str, body: dict) -> dict:
        """One retry when the replica died under the request (it is idempotent: greedy pages);
        a colocated arm is called in this replica."""
        if isinstance(handle, PagePolicy):
            return await getattr(handle, method)(body)
        try:
            return await getattr(handle, method).remote(body)
        except Exception as exc:  # noqa: BLE001 - only replica deaths are retried
            if not _retryable(exc):
                raise
            log.warning("replica died during %s, retrying once: %s", method, exc)
            return await getattr(handle, method).remote(body)

    def _respond(self, route: str, arm: str, started: float, result: dict, extra: dict) -> JSONResponse:
        status = result.pop("status", 200) if "error" in result else 200
        self.requests.inc(tags={"route": route, "arm": arm, "status": str(status)})
        self.latency.observe((time.perf_counter() - started) * 1000, tags={"route": route, "arm": arm})
        return JSONResponse({**extra, **result} if status == 200 else result, status_code=status)

    @app.post("/v1/page")
    async def page(self, request: Request):
        started = time.perf_counter()
        parsed = await self._body(request, PageRequest)
        if isinstance(parsed, JSONResponse):
            self.requests.inc(tags={"route": "page", "arm": "", "status": str(parsed.status_code)})
            return parsed
        arm = assign(parsed.user_id, self.split, self.salt)
        self.counts[arm] += 1
        result = await self._call(self.arms[arm], "page", parsed.model_dump())
        return self._respond("page", arm, started, result, {"user_id": parsed.user_id, "arm": arm})

    @app.post("/v1/rank")
    async def rank(self, request: Request):
        started = time.perf_counter()
        if self.ranker is None:
            return JSONResponse({"error": "no ranker deployed (start with --ranker REWARD_DIR)"}, status_code=404)
        parsed = await self._body(request, RankRequest)
        if isinstance(parsed, JSONResponse):
            self.requests.inc(tags={"route": "rank", "arm": "", "status": str(parsed.status_code)})
            return parsed
        result = await self._call(self.ranker, "rank", parsed.model_dump())
        return self._respond("rank", "ranker", started, result, {"user_id": parsed.user_id})

    def check_health(self) -> None:
        for arm in self.arms.values():
            if isinstance(arm, PagePolicy):
                arm.check_health()

    @app.get("/healthz")
    async def healthz(self):
        return {
            "status": "ok",
            "arms": {
                a: {"model": self.versions[a], "weight": self.split[a], "requests": self.counts[a]} for a in self.arms
            },
            "ranker": self.ranker is not None,
            "max_k": MAX_K,
            "colocated": any(isinstance(a, PagePolicy) for a in self.arms.values()),
        }


DIRECT_INGRESS_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"  # Ray Serve's switch, read when Ray starts
# how long a stopping direct-ingress replica keeps answering (Ray Serve: 30 s), read when Ray starts
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def direct_ingress_targets(app_name: str) -> list[tuple[str, int]]:
    """(node IP, port) of every ingress replica of ``app_name`` that answers HTTP itself (Ray
    Serve's direct ingress, on when Ray started with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``):
    a client or load balancer that calls them skips the proxy hop. Empty when it is off."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote(app_name))
    return [
        (t.ip, t.port)
        for g in groups
        if g.protocol == RequestProtocol.HTTP
        for t in g.targets
        if t.name.startswith("SERVE_REPLICA::")
    ]


def _where(location: str) -> str:
    """What a replica is given: a URI as is (it fetches its own copy), a path made absolute."""
    return location if is_uri(location) else str(Path(location).resolve())


def build_app(args: dict | AppArgs) -> serve.Application:
    """The application: one PagePolicy deployment per arm, the optional ranker, the router."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    if not args.arms:
        raise ValueError("at least one arm is needed (--arm NAME=POLICY_DIR)")
    local = {arm: fetch(directory) for arm, directory in args.arms.items()}  # URIs: checked on a local copy
    for arm, directory in local.items():
        try:
            require_policy(directory)
        except InputError as exc:
            raise InputError(f"arm {arm}: {exc}") from None
    split = args.split or {arm: 1.0 for arm in args.arms}
    check_split(split, list(args.arms))
    policy_args = {
        arm: dict(
            policy_dir=_where(directory),
            data_dir=_where(args.data),
            prompt_items=args.prompt_items,
            positive_threshold=args.positive_threshold,
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            use_gpu=args.policy_gpus > 0,
            page_mode=args.page_mode,
            hybrid_items=args.hybrid_items,
        )
        for arm, directory in args.arms.items()
    }
    if args.colocate:
        arms = policy_args
        router = {
            "num_replicas": args.policy_replicas,
            "ray_actor_options": {
                "num_cpus": args.router_cpus + args.policy_cpus * len(arms),
                "num_gpus": args.policy_gpus * len(arms),
            },
        }
    else:
        arms = {
            arm: PagePolicyDeployment.options(
                name=f"PagePolicy_{arm}",
                num_replicas=args.policy_replicas,
                ray_actor_options={"num_cpus": args.policy_cpus, "num_gpus": args.policy_gpus},
            ).bind(**kwargs)
            for arm, kwargs in policy_args.items()
        }
        router = {"ray_actor_options": {"num_cpus": args.router_cpus}}
    ranker = None
    if args.ranker:
        ranker = CoarseRanker.options(ray_actor_options={"num_cpus": args.ranker_cpus, "num_gpus": 0}).bind(
            _where(args.ranker), _where(args.data), args.prompt_items, args.positive_threshold
        )
    versions = {arm: model_version(directory) for arm, directory in local.items()}
    return ABRouter.options(**router).bind(arms, split, args.salt, versions, ranker)
