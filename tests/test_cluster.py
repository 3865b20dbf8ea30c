"""Every manifest in cluster/ parses and agrees with the code: images, Ray version, entrypoints,
config paths, the Serve application and the runtime env."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import tomllib
import yaml
from conftest import REPO

from pagellm.cli import build_parser
from pagellm.config import load_config
from pagellm.serve.app import AppArgs

CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/pagellm"  # where cluster/Dockerfile puts the checkout
MANIFESTS = sorted(p for p in CLUSTER.rglob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _image_tag() -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"pagellm:{version}-gpu"


def _walk(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_every_manifest_is_covered_below():
    names = {p.relative_to(CLUSTER).as_posix() for p in MANIFESTS}
    assert names == {
        "serve.yaml",
        "runtime_env.yaml",
        "ray-cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/rayservice.yaml",
        "kuberay/pvc.yaml",
    }


def test_every_claim_the_manifests_mount_is_defined_read_write_many():
    """The claim the RayJob writes and the RayService reads is one PersistentVolumeClaim of
    cluster/kuberay/pvc.yaml, shareable across nodes."""
    claims = {d["metadata"]["name"]: d for d in _docs(CLUSTER / "kuberay" / "pvc.yaml")}
    assert all(d["kind"] == "PersistentVolumeClaim" for d in claims.values())
    mounted = {
        v["claimName"]
        for path in MANIFESTS
        if path.name != "pvc.yaml"
        for doc in _docs(path)
        for v in _walk(doc, "persistentVolumeClaim")
    }
    assert mounted == set(claims) == {"pagellm-runs"}
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert re.fullmatch(r"\d+(Gi|Ti)", claim["spec"]["resources"]["requests"]["storage"])


def test_dockerfile_base_matches_installed_ray_and_tag():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", text, re.M)
    assert base and base.group(1) == ray.__version__
    assert f"-t {_image_tag()}" in text


@pytest.mark.parametrize(
    "path", [p for p in MANIFESTS if p.name not in ("runtime_env.yaml", "serve.yaml", "pvc.yaml")], ids=lambda p: p.name
)
def test_images_and_ray_version_agree(path):
    docs = _docs(path)
    images = {i for d in docs for i in _walk(d, "image") if isinstance(i, str)}
    assert images == {_image_tag()}, images
    for version in (v for d in docs for v in _walk(d, "rayVersion")):
        assert version == ray.__version__


def test_cluster_launcher_config_validates_against_rays_schema():
    import jsonschema

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _docs(CLUSTER / "ray-cluster.yaml")[0]
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = _docs(CLUSTER / "runtime_env.yaml")[0]
    RuntimeEnv(**env)  # raises on unknown fields or bad values
    assert ".venv" in env["excludes"] and env["env_vars"]["WANDB_MODE"] == "offline"


def test_rayjob_entrypoint_runs_an_existing_job_with_existing_configs():
    job = _docs(CLUSTER / "kuberay" / "rayjob.yaml")[0]
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(IMAGE_ROOT)
    script = REPO / Path(argv[1]).relative_to(IMAGE_ROOT)
    assert script.exists() and script.parent.name == "ray_jobs"
    # ray_jobs/run.py is `pagellm run`: its arguments must parse, configs exist, overrides load
    args = build_parser().parse_args(["run", *argv[2:]])
    configs = [str(REPO / Path(c).relative_to(IMAGE_ROOT)) for c in args.config]
    assert all(Path(c).exists() for c in configs)
    cfg = load_config(configs, args.overrides)
    assert (
        cfg.train.use_gpu
        and sum(getattr(cfg.ppo, r).num_gpus for r in ("policy", "reference", "critic", "coarse", "fine")) <= 1.0
    )
    volumes = {m["mountPath"] for m in _walk(job, "volumeMounts") for m in m}
    assert any(args.out.startswith(v) for v in volumes)  # outputs on the shared volume


def test_serve_config_and_rayservice_deploy_the_same_application():
    from pagellm.serve import app as serve_app

    local = _docs(CLUSTER / "serve.yaml")[0]
    service = _docs(CLUSTER / "kuberay" / "rayservice.yaml")[0]
    assert service["kind"] == "RayService"
    remote = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (local, remote):
        (application,) = config["applications"]
        module, attr = application["import_path"].split(":")
        assert module == serve_app.__name__ and callable(getattr(serve_app, attr))
        args = AppArgs.model_validate(application["args"])
        expected = (
            {f"PagePolicy_{arm}" for arm in args.arms if not args.colocate}
            | {"ABRouter"}
            | ({"CoarseRanker"} if args.ranker else set())
        )
        assert {d["name"] for d in application["deployments"]} == expected
    strip = lambda a: {k: v for k, v in a.items() if k != "args"}  # noqa: E731
    assert strip(local["applications"][0]) == strip(remote["applications"][0])
    assert {k: v for k, v in local["applications"][0]["args"].items() if k not in ("arms", "data", "ranker")} == {
        k: v for k, v in remote["applications"][0]["args"].items() if k not in ("arms", "data", "ranker")
    }
