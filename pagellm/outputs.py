"""What stages write beside their models: JSONL logs, stage timers and figures."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def append_jsonl(path: Path, record: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace the file with these records (a log cut back to a checkpoint)."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file (blank lines skipped); [] when it does not exist."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class StageTimer:
    """Wall time of consecutive stages: ``lap(stage)`` closes the stage that just ended."""

    def __init__(self, prefix: str = ""):
        self.prefix, self.seconds, self._clock = prefix, {}, time.perf_counter()

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        self.seconds[stage] = now - self._clock
        self._clock = now
        if self.prefix:
            print(f"[{self.prefix}] {stage} done in {self.seconds[stage]:.0f} s", flush=True)
        return self.seconds[stage]


@contextmanager
def figure(path: Path, ncols: int = 1, panel_size: tuple[float, float] = (5.0, 3.5), figsize=None) -> Iterator[tuple]:
    """A matplotlib figure of ``ncols`` panels (no display needed), saved to ``path`` and
    closed when the block ends. Yields (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize or (panel_size[0] * ncols, panel_size[1]), squeeze=False)
    try:
        yield fig, list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def bar_chart(
    rows: dict[str, dict[str, tuple[float, float]]],
    keys: tuple[str, ...],
    path: Path,
    title: str,
    pagellm: set[str] | None = None,
    paired: dict | None = None,
    reference: str | None = None,
) -> None:
    """Bars of the mean over seeds; PageLLM's in one colour, baselines in another. For a metric
    in ``paired`` (model -> metric -> {"ci95": ...} against ``reference``) the whisker is the
    model's paired 95% interval (drawn as reference mean + interval of the difference) and a
    dashed line marks the reference; for the other metrics it is the spread over seeds."""
    from matplotlib.patches import Patch

    colour = {True: "#c44e52", False: "#8c8c8c"}
    pagellm, paired = set(rows) if pagellm is None else pagellm, paired or {}
    with figure(path, len(keys), panel_size=(max(4.0, 0.45 * len(rows) + 1.5), 3.8)) as (fig, axes):
        names = list(rows)
        for ax, key in zip(axes, keys):
            means = [rows[n][key][0] for n in names]
            if reference is not None and any(key in p for p in paired.values()):
                ref = rows[reference][key][0]
                low = [m - (ref + paired[n][key]["ci95"][0]) if n in paired else 0.0 for n, m in zip(names, means)]
                high = [(ref + paired[n][key]["ci95"][1]) - m if n in paired else 0.0 for n, m in zip(names, means)]
                yerr = [[max(0.0, v) for v in low], [max(0.0, v) for v in high]]
                ax.axhline(ref, color="black", linestyle="--", linewidth=0.8)
            else:
                yerr = [rows[n][key][1] if rows[n][key][1] == rows[n][key][1] else 0.0 for n in names]
            ax.bar(names, means, yerr=yerr, capsize=3, color=[colour[n in pagellm] for n in names])
            ax.set_title(key)
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        handles = [Patch(color=colour[True], label="PageLLM"), Patch(color=colour[False], label="baselines")]
        note = f"whiskers: paired 95% interval vs {reference} (dashed)" if reference else "whiskers: sd over seeds"
        axes[0].legend(handles=handles, fontsize=7, title=note, title_fontsize=6)
        fig.suptitle(title)
