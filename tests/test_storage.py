"""Stage inputs and outputs by URI (file:// here; s3:// and gs:// take the same pyarrow path)."""

from __future__ import annotations

import json

import pytest

from pagellm.cli import main
from pagellm.errors import InputError
from pagellm.storage import (
    exists,
    fetch,
    join,
    local_copy,
    output,
    read_text,
    remove,
    staged,
    subdirs,
    train_storage,
    write_text,
)


def test_fetch_and_output_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr("pagellm.storage.CACHE", tmp_path / "cache")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("alpha")
    local = fetch(f"file://{src}")
    assert local != src and (local / "sub" / "a.txt").read_text() == "alpha"
    assert fetch(str(src)) == src  # a path is used in place
    with pytest.raises(InputError, match="does not exist"):
        fetch(f"file://{tmp_path}/missing")

    dest = f"file://{tmp_path}/dest"
    with output(dest) as staged:
        (staged / "x.json").write_text("{}")
        assert not (tmp_path / "dest" / "x.json").exists()  # uploaded only when the stage succeeds
    assert (tmp_path / "dest" / "x.json").read_text() == "{}"
    with pytest.raises(RuntimeError):
        with output(f"file://{tmp_path}/failed") as staged:
            (staged / "half.json").write_text("{")
            raise RuntimeError("stage failed")
    assert not (tmp_path / "failed").exists()
    with output(dest, resume=True) as staged:  # a resumed stage starts from what the URI holds
        assert (staged / "x.json").exists()
    assert (
        train_storage("s3://bucket/run", "sft") == "s3://bucket/run/sft/logs/ray_train"
        and train_storage("/local") is None
    )


def test_role_actor_helpers_read_and_write_a_uri_in_private_directories(tmp_path):
    """What PPO's role actors and driver use on a node that shares nothing with the others but
    the URI: private copies (two ranks of one node never share a staging directory), writes
    that land only when the block succeeds, small files and listings."""
    uri = f"file://{tmp_path}/bucket/run"
    with staged(join(uri, "ckpt", "policy")) as one, staged(join(uri, "ckpt", "policy")) as two:
        assert one != two and not str(one).startswith(str(tmp_path))
        (one / "module.safetensors").write_text("weights")
        (two / "optim_rank1.pt").write_text("shard 1")
    assert sorted(p.name for p in (tmp_path / "bucket" / "run" / "ckpt" / "policy").iterdir()) == [
        "module.safetensors",
        "optim_rank1.pt",
    ]  # the two ranks' parts merge
    with pytest.raises(RuntimeError):
        with staged(join(uri, "half")) as d:
            (d / "x").write_text("x")
            raise RuntimeError("actor died")
    assert not exists(join(uri, "half"))
    write_text(join(uri, "ckpt", "state.json"), '{"iteration": 2}')
    assert json.loads(read_text(join(uri, "ckpt", "state.json"))) == {"iteration": 2}
    assert subdirs(uri) == ["ckpt"] and subdirs(join(uri, "missing")) == []
    with local_copy(join(uri, "ckpt")) as copy:
        kept = copy
        assert (copy / "policy" / "optim_rank1.pt").read_text() == "shard 1"
    assert not kept.exists()  # removed once read
    with local_copy(tmp_path / "bucket") as same:
        assert same == tmp_path / "bucket"  # a path is used in place
    with pytest.raises(InputError, match="does not exist"):
        with local_copy(join(uri, "missing")):
            pass
    remove(join(uri, "ckpt"))
    assert subdirs(uri) == [] and join("s3://b/run/", "x", "y") == "s3://b/run/x/y"


def test_reward_and_evaluate_read_and_write_uris(tiny_stages, tmp_path, monkeypatch):
    """`pagellm reward` with every location a URI: Ray Train checkpoints under the output URI,
    the heads uploaded; `pagellm evaluate` from URIs to a URI."""
    monkeypatch.setattr("pagellm.storage.CACHE", tmp_path / "cache")
    root = tiny_stages["root"]
    uri = lambda p: f"file://{p}"  # noqa: E731
    out = tmp_path / "reward"
    code = main(
        [
            "reward",
            "--data",
            uri(root / "data"),
            "--sft",
            uri(root / "sft"),
            "--out",
            uri(out),
            *tiny_stages["overrides"],
            # what this test is about is where the stage reads and writes: no policy-sampled pairs
            # and no agreement pages (tests/test_train.py covers both): CI time
            "reward.policy_pairs=false",
            "reward.agreement_users=0",
        ]
    )
    assert code == 0
    assert (out / "coarse" / "reward_head.safetensors").exists() and (out / "fine" / "reward_head.safetensors").exists()
    assert any((out / "logs" / "ray_train" / "reward_coarse").glob("checkpoint_*"))
    assert json.loads((out / "metrics.json").read_text())["accuracy"]["coarse"]["all"] >= 0

    code = main(
        [
            "evaluate",
            "--model",
            uri(root / "sft"),
            "--data",
            uri(root / "data"),
            "--split",
            "test",
            "--out",
            uri(tmp_path / "eval"),
            "eval.page_items=20",
            *tiny_stages["overrides"],
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["users"] > 0
