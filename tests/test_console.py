"""What a user reads on the console: the stage counter and one line per finished epoch."""

from __future__ import annotations

import json

from pagellm.outputs import EpochLines, StageTimer, append_jsonl, write_jsonl


def _epoch(epoch: int, seconds: float, **extra) -> dict:
    return {"stage": "meta", "epoch": epoch, "step": 10 * epoch, "train_loss": 2.0 / epoch, "valid_loss": 3.0 / epoch,
            "valid_ndcg@100": 0.01 * epoch, "epoch_seconds": seconds, **extra}  # fmt: skip


def test_epoch_lines_one_per_epoch_with_eta(tmp_path, capsys):
    log = tmp_path / "meta.jsonl"
    append_jsonl(log, {"stage": "meta", "epoch": 0, "step": 1, "loss": 9.0})  # a step record: no line
    lines = EpochLines(log, "meta", epochs=3, select="ndcg@100")
    lines.poll()
    assert capsys.readouterr().out == ""  # written before this fit started: a resumed run's history
    append_jsonl(log, _epoch(1, 10.0))
    with log.open("a") as fh:
        fh.write(json.dumps(_epoch(2, 20.0))[:30])  # half a line: waits for the rest
    lines.poll()
    out = capsys.readouterr().out.splitlines()
    assert out == ["  meta epoch 1/3: train loss 2.0000, valid loss 3.0000, ndcg@100 0.0100 (10 s; ETA 20 s)"]
    with log.open("a") as fh:
        fh.write(json.dumps(_epoch(2, 20.0))[30:] + "\n")
    lines.poll()
    assert capsys.readouterr().out.strip().endswith("(20 s; ETA 15 s)")  # 1 epoch left x mean 15 s
    # a resume cuts the log back to epoch 1 and appends again: only the new epochs are printed
    write_jsonl(log, [_epoch(1, 10.0)])
    append_jsonl(log, _epoch(2, 12.0, stopped_early=True))
    lines.poll()
    assert capsys.readouterr().out.strip() == (
        "meta epoch 2/3: train loss 1.0000, valid loss 1.5000, ndcg@100 0.0200 (12 s; stopped early)"
    )


def test_epoch_lines_thread_prints_the_last_epoch_on_exit(tmp_path, capsys):
    log = tmp_path / "reward_fine.jsonl"
    with EpochLines(log, "reward_fine", epochs=1, select="loss", every_s=60):
        append_jsonl(log, {"epoch": 1, "train_loss": 0.7, "valid_loss": 0.69, "epoch_seconds": 4.0})
    assert capsys.readouterr().out == "  reward_fine epoch 1/1: train loss 0.7000, valid loss 0.6900 (4 s; ETA 0 s)\n"


def test_stage_timer_counts_stages(capsys):
    timer = StageTimer({"data": "data stage", "sft": "SFT"})
    with timer.stage("data"):
        pass
    with timer.stage("sft"):
        print("training")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[1/2] data stage" and out[1].startswith("[1/2] data stage: done in ")
    assert out[2:4] == ["[2/2] SFT", "training"] and out[4].startswith("[2/2] SFT: done in ")
    assert set(timer.seconds) == {"data", "sft"}
