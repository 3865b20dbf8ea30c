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
