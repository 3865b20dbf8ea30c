"""Typed config: paper defaults, YAML files, dotted overrides, errors that name the key."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import pytest
from omegaconf import OmegaConf

from pagellm.config import DEFAULT_YAML_HEADER, PageLLMConfig, config_yaml, load_config
from pagellm.errors import ConfigError
from tests.conftest import REPO


def test_paper_defaults():
    cfg = load_config()
    assert cfg.data.positive_threshold == 3.0 and cfg.data.split == [0.8, 0.1, 0.1]
    assert cfg.data.category_cap == 0.4
    assert (cfg.sft.meta_epochs, cfg.sft.meta_lr, cfg.sft.batch_size) == (3, 5e-5, 32)
    assert (cfg.sft.ft_epochs, cfg.sft.ft_lr) == (10, 2e-5)
    assert (cfg.reward.epochs, cfg.reward.lr, cfg.reward.batch_size) == (5, 1e-5, 64)
    assert (cfg.ppo.clip, cfg.ppo.lr, cfg.ppo.batch_size, cfg.ppo.kl_beta) == (0.2, 1e-5, 64, 0.1)


def test_default_yaml_matches_dataclasses():
    assert load_config(REPO / "configs" / "default.yaml") == PageLLMConfig()


def _walk(cfg, prefix=""):
    for f in dataclasses.fields(cfg):
        yield f"{prefix}{f.name}", f
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            yield from _walk(getattr(cfg, f.name), f"{prefix}{f.name}.")


def test_default_yaml_is_generated_and_every_field_has_its_help():
    """configs/default.yaml is `pagellm config` of the defaults: every field, every help line."""
    text = (REPO / "configs" / "default.yaml").read_text()
    assert text == DEFAULT_YAML_HEADER + config_yaml(PageLLMConfig()), (
        "regenerate: pagellm config > configs/default.yaml"
    )
    keys = list(_walk(PageLLMConfig()))
    assert len(keys) > 100
    for key, f in keys:
        help_text = f.metadata.get("help", "")
        assert len(help_text.split()) >= 2, f"{key} has no help"
        assert " ".join(help_text.split())[:40] in " ".join(line.lstrip("# ") for line in text.splitlines()), key


def test_config_command_prints_the_merged_configuration_with_help(tmp_path):
    from pagellm.cli import main

    out = tmp_path / "merged.yaml"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["config", "--config", str(REPO / "configs" / "amazon2014.yaml"), "ppo.kl_beta=0.05"]) == 0
    out.write_text(buffer.getvalue())
    assert "# per-token KL penalty against the reference policy" in buffer.getvalue()
    merged = load_config(out)
    assert merged == load_config(REPO / "configs" / "amazon2014.yaml", ["ppo.kl_beta=0.05"])
    assert merged.ppo.kl_beta == 0.05 and merged.data.rating_min == 1.0


def _config_command(*argv: str) -> tuple[PageLLMConfig, str]:
    """`pagellm config ARGV` through the CLI: the configuration it resolves and its stderr."""
    from pagellm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["config", *argv]) == 0
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(PageLLMConfig), OmegaConf.create(out.getvalue()))
    ), err.getvalue()


def test_profiles_are_the_packaged_files_and_warn_only_without_one():
    embedded, err = _config_command("--profile", "embedded")
    assert embedded == load_config(REPO / "pagellm" / "configs" / "embedded.yaml") and err == ""
    assert embedded.sft.meta_lr != PageLLMConfig().sft.meta_lr
    quick, _ = _config_command("--profile", "quickstart", "ppo.kl_beta=0.05")
    assert quick == load_config(
        [REPO / "pagellm" / "configs" / n for n in ("embedded.yaml", "quickstart.yaml")], ["ppo.kl_beta=0.05"]
    )
    # profiles come before --config files, which come before overrides
    layered, _ = _config_command(
        "--profile", "embedded", "--profile", "paper", "--config", str(REPO / "configs" / "amazon2014.yaml")
    )
    assert (
        layered.model.item_init == "p5" and layered.data.rating_min == 1.0 and layered.sft.ft_lr == embedded.sft.ft_lr
    )
    assert _stage_warning("--profile", "embedded") == ""
    # a data set config alone leaves the paper's learning rates on a from-scratch model: warned once
    err = _stage_warning("--config", str(REPO / "configs" / "amazon2014.yaml"))
    assert err.count("--profile embedded") == 1 and "from scratch" in err
    # a pretrained model is what the paper's rates are for: no warning
    assert _stage_warning("model.name_or_path=some/gpt2") == ""


def _stage_warning(*argv: str) -> str:
    """What `pagellm sft ARGV` prints on stderr while resolving its configuration."""
    from pagellm.cli import _config, build_parser, resolve_profiles

    args = build_parser().parse_args(["sft", "--data", "d", "--out", "o", *argv])
    resolve_profiles(args)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        _config(args)
    return err.getvalue()


@pytest.mark.parametrize("name", ["amazon2014.yaml", "movielens.yaml"])
def test_dataset_configs_load(name):
    assert ":" in load_config(REPO / "configs" / name).data.dataset


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  category_cap: 0.3\n  rk_swaps: 3\n")
    cfg = load_config(path, ["data.rk_swaps=4", "ppo.kl_beta=0.05"])
    assert (cfg.data.category_cap, cfg.data.rk_swaps, cfg.ppo.kl_beta) == (0.3, 4, 0.05)


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.no_such_key=1", "data.no_such_key"),
        ("nosection.x=1", "nosection"),
        ("data.category_cap=abc", "data.category_cap"),
        ("data.rk_swaps=1.5", "data.rk_swaps"),
        ("data.category_cap=1.5", "data.category_cap"),
        ("data.split=[0.5,0.5]", "data.split"),
        ("data.golden_fraction=0", "data.golden_fraction"),
        ("data.pair_families=[np,xx]", "data.pair_families"),
        ("data.pair_families=[rk,rk]", "data.pair_families"),
        ("ppo.policy.resources={pool_a: 1}", "ppo.colocate"),  # one bundle cannot span two kinds of node
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_bad_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  categroy_cap: 0.3\n")
    with pytest.raises(ConfigError, match=r"data\.categroy_cap.*bad\.yaml|bad\.yaml.*data\.categroy_cap"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["data.category_cap"])


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    """Every file in configs/ loads over the embedded profile (a renamed key fails here)."""
    cfg = load_config([REPO / "pagellm" / "configs" / "embedded.yaml", REPO / "configs" / name])
    if name == "paper.yaml":  # the paper's recipe where our defaults deviate (docs/deviations.md)
        assert cfg.data.golden_candidates == "outside_prompt" and cfg.data.empty_history_windows
        assert cfg.data.pair_families == ["np", "rk", "d", "rd"] and cfg.model.item_init == "p5"
        assert cfg.eval.page_mode == "generate" and cfg.model.user_tokens and cfg.sft.next_item_epochs == 0
        assert cfg.reward.fine_model == "lm" and cfg.ppo.fine_objective == "sampled" and cfg.ppo.fine_weight == 1.0
        assert cfg.reward.fine_vaes == 1 and not cfg.reward.fine_itemknn and not cfg.reward.fine_ease
        assert cfg.reward.fine_sasrecs == 0


def _numeric_fields(cls=PageLLMConfig, prefix=""):
    """(dotted key, field) for every int / float field of the tree, Optional ones included."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _numeric_fields(type(default), f"{prefix}{f.name}.")
        elif str(f.type).replace("Optional[", "").rstrip("]") in ("int", "float"):
            yield f"{prefix}{f.name}", f


# numbers whose only limits are relations to other fields (each: a value that breaks one)
RELATION_ONLY = {
    "data.positive_threshold": "99",  # >= rating_max: no rating could be a positive
    "data.negative_threshold": "4.5",  # > positive_threshold
    "data.rating_min": "6",  # >= rating_max
    "data.rating_max": "0.2",  # <= rating_min
}


def _bad_values(key: str, f) -> list[str]:
    """Values just outside each declared bound (and a non-finite one for floats)."""
    bounds, is_int = f.metadata["bounds"], "int" in str(f.type)
    step = 1 if is_int else 0.5
    bad = {"ge": lambda v: v - step, "gt": lambda v: v, "le": lambda v: v + step, "lt": lambda v: v}
    values = [repr(bad[kind](limit)) for kind, limit in bounds.items()]
    return values + ([] if is_int else ["inf", "nan"])


NUMERIC = list(_numeric_fields())


def test_every_number_has_a_range_or_a_relation():
    assert len(NUMERIC) > 100
    unchecked = [k for k, f in NUMERIC if not f.metadata["bounds"] and k not in RELATION_ONLY]
    assert unchecked == []


@pytest.mark.parametrize("key,f", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_a_bad_number_is_a_config_error_naming_its_key(key, f):
    values = [RELATION_ONLY[key]] if key in RELATION_ONLY else _bad_values(key, f)
    for value in values:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(overrides=[f"{key}={value}"])
    load_config(overrides=[f"{key}={_default(key)}"])  # and its default passes


def _default(key: str):
    value = PageLLMConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return "null" if value is None else value
