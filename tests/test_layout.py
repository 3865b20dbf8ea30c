"""The package layout holds: subpackages import downwards only, the data directory's file names
live in ``pagellm.data`` alone, and hash bucketing exists once (README "Code map")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "pagellm"
BASE = {"config", "errors", "storage", "ray_utils", "outputs", "buckets"}
# what each part of the package may import from pagellm (itself always)
ALLOWED = {
    "errors": set(),
    "outputs": set(),
    "buckets": set(),
    "config": {"errors"},
    "storage": {"errors"},
    "ray_utils": {"config"},
    "model": {"config", "errors"},
    "data": {"config", "errors", "ray_utils", "storage"},
    "train": BASE | {"model", "data", "eval"},
    "eval": BASE | {"model", "data"},
    "serve": BASE | {"model", "data"},
    "rl": BASE | {"model", "data", "train", "eval"},
    "run": BASE | {"model", "data", "train", "rl", "eval"},
    "tune": BASE | {"model", "data", "train", "rl", "eval"},
    "experiments": BASE | {"model", "data", "train", "rl", "eval", "run"},
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "__init__.py" and path.name != "cli.py":
            yield path


def part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    """Every pagellm part a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            if name.startswith("pagellm."):
                found.add(name.split(".")[1])
    return found


@pytest.mark.parametrize("path", list(modules()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downwards_only(path):
    own = part(path)
    assert own in ALLOWED, f"{path.relative_to(REPO)}: add its part to the README code map and to ALLOWED"
    assert imported_parts(path) - ALLOWED[own] - {own} == set()


def test_serving_imports_no_training_stage():
    for path in (PACKAGE / "serve").glob("*.py"):
        assert not imported_parts(path) & {"train", "rl"}, path.name


def test_data_directory_layout_and_bucketing_are_written_once():
    data_files = (
        "items.parquet",
        "interactions.parquet",
        "stats.json",
        '"split" /',
        '/ "split"',
        '/ "ft"',
        '/ "pairs"',
        '"eval" / f"',
    )
    for path in modules():
        text = path.read_text()
        if part(path) != "data":
            assert not [f for f in data_files if f in text], (
                f"{path.relative_to(REPO)} names a data-stage file: use DataDir"
            )
        if path.name != "buckets.py" and path.relative_to(PACKAGE) != Path(
            "data/rules.py"
        ):  # rules seeds an RNG by user
            assert "crc32" not in text, f"{path.relative_to(REPO)} hashes by hand: use pagellm.buckets"


def test_every_result_figure_is_embedded_in_its_readme():
    """A PNG under docs/results is shown by the nearest README above it, so readers see it."""
    results = REPO / "docs" / "results"
    for png in sorted(results.rglob("*.png")):
        readme = next(d / "README.md" for d in png.parents if (d / "README.md").exists())
        rel = png.relative_to(readme.parent).as_posix()
        assert f"]({rel})" in readme.read_text(), f"{readme.relative_to(REPO)} does not embed {rel}"
