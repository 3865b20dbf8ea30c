"""What stages write beside their models: JSONL logs, stage timers and figures."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def shown_path(path) -> str:
    """``path`` relative to the working directory when it lies inside it, else as given: results
    that may be committed name their inputs by relative path, not by a machine's."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
    """Wall time of the consecutive stages of a job, announced as they start and end with a
    stage counter (``[3/6] reward heads``), so that a reader of the console knows where the job
    is and how much is left; ``seconds`` maps each stage to its wall time."""

    def __init__(self, stages: dict[str, str]):
        self.stages, self.seconds = stages, {}  # stage key -> what the console calls it

    @contextmanager
    def stage(self, key: str) -> Iterator[None]:
        tag = f"[{list(self.stages).index(key) + 1}/{len(self.stages)}] {self.stages[key]}"
        print(tag, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - start
        print(f"{tag}: done in {self.seconds[key]:.0f} s", flush=True)


class EpochLines:
    """Prints one line per finished epoch of a Ray Train fit from the driver, read from the log
    that the loop's rank 0 appends to (``train_loop``): stage, epoch/total, train and validation
    loss, the validation metric, seconds, ETA. The driver reads the log where it can (a local or
    shared run directory); Ray's own per-worker output stays in Ray's log files."""

    def __init__(self, log_path: Path, stage: str, epochs: int, select: str, every_s: float = 1.0):
        self.log_path, self.stage, self.epochs = Path(log_path), stage, epochs
        self.select, self.every_s = select, every_s
        self._seen = set(self._epoch_lines())  # a resumed run's earlier epochs are not news
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"epoch-lines-{stage}", daemon=True)
        self._seconds: list[float] = []

    def __enter__(self) -> "EpochLines":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the last epoch, written just before the fit returned

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def _epoch_lines(self) -> list[str]:
        """The log's finished-epoch records as written (whole lines only: a half-written one waits)."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text()
        return [line for line in text[: text.rfind("\n") + 1].splitlines() if '"epoch_seconds"' in line]

    def poll(self) -> None:
        """Print the epochs not printed yet. The whole (small) log is read each time, since a
        resumed fit rewrites it, cut back to its checkpoint, and then runs those epochs again."""
        for line in self._epoch_lines():
            if line in self._seen:
                continue
            self._seen.add(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            print(self.format(record), flush=True)

    def format(self, record: dict) -> str:
        self._seconds.append(record["epoch_seconds"])
        left = (self.epochs - record["epoch"]) * sum(self._seconds) / len(self._seconds)
        parts = [f"train loss {record['train_loss']:.4f}"] if "train_loss" in record else []
        parts += [f"valid loss {record['valid_loss']:.4f}"] if "valid_loss" in record else []
        metric = f"valid_{self.select}"
        parts += [f"{metric[6:]} {record[metric]:.4f}"] if self.select != "loss" and metric in record else []
        eta = "stopped early" if record.get("stopped_early") else f"ETA {left:.0f} s"
        return (
            f"  {self.stage} epoch {record['epoch']}/{self.epochs}: "
            + ", ".join(parts)
            + (f" ({record['epoch_seconds']:.0f} s; {eta})")
        )


@contextmanager
def figure(path: Path, ncols: int = 1, panel_size: tuple[float, float] = (5.0, 3.5), figsize=None) -> Iterator[tuple]:
    """A matplotlib figure of ``ncols`` panels, saved to ``path`` when the block ends. Yields
    (figure, list of axes). A bare ``Figure``, not pyplot: no display, and no process-wide figure
    registry, since SFT members and reward heads plot from driver threads side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize or (panel_size[0] * ncols, panel_size[1]))
    axes = fig.subplots(1, ncols, squeeze=False)
    yield fig, list(axes[0])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
            # long model names ("PageLLM PPO R_c + R_f on 2 SFT members (chain seeds 0, 1, 2)") would
            # otherwise take the figure's height from the bars
            ax.set_xticks(range(len(names)), [textwrap.fill(n, 28) for n in names])
            ax.set_title(key)
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        handles = [Patch(color=colour[True], label="PageLLM"), Patch(color=colour[False], label="baselines")]
        note = f"whiskers: paired 95% interval vs {reference} (dashed)" if reference else "whiskers: sd over seeds"
        axes[0].legend(handles=handles, fontsize=7, title=note, title_fontsize=6)
        fig.suptitle(title)
