"""Train one RecBole model on an export of PageLLM's split and write every evaluation user's
full-sort scores. Runs inside RecBole's own environment (``pagellm setup recbole``), started by
``pagellm/eval/recbole.py``: it imports nothing from pagellm.

Writes to --out: scores.npz (``scores`` float32 [users, items]), result.json (users and items
as RecBole tokens in row/column order, RecBole's own best validation and test metrics, epochs
run). RecBole's log and checkpoint go there too (the working directory is --out).

Settings fixed here, each for a known reason (docs/baselines.md "RecBole"):
- every model: early stopping on NDCG@100 of our validation split (``stopping_step`` = --patience)
- Pop: ``train_batch_size: 1`` and no negative sampling, one epoch: RecBole counts an item once
  per batch and counts sampled negatives too; so its counts equal the training positives exactly
- sequence models: the export's recbole-seq.yaml (no negative sampling: RecBole's CE loss)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

# RecBole 1.2.1 saves whole checkpoints (config, optimizer state) and reads them with torch.load,
# which refuses non-tensor objects since torch 2.6: allow them in this subprocess only, for the
# checkpoint this process itself just wrote.
torch.load = functools.partial(torch.load, weights_only=False)

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import ModelType, get_model, get_trainer, init_logger, init_seed  # noqa: E402

MODEL_SETTINGS = {"Pop": {"train_batch_size": 1, "train_neg_sample_args": None, "epochs": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="directory written by `pagellm export recbole`")
    parser.add_argument("--model", required=True, help="any RecBole model name, e.g. SASRec, LightGCN")
    parser.add_argument("--split", choices=("valid", "test"), required=True, help="whose scores to write")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--settings", default="{}", help="JSON of further RecBole settings for this model")
    args = parser.parse_args()

    out, export = Path(args.out).resolve(), Path(args.export).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # RecBole writes log/ and log_tensorboard/ into the working directory
    model_class = get_model(args.model)
    sequential = model_class.type == ModelType.SEQUENTIAL
    settings = {
        "seed": args.seed,
        "epochs": args.epochs,
        "stopping_step": args.patience,
        "eval_step": 1,
        "checkpoint_dir": str(out / "saved"),
        "show_progress": False,
        **MODEL_SETTINGS.get(args.model, {}),
        **json.loads(args.settings),
    }
    config_file = export / ("recbole-seq.yaml" if sequential else "recbole.yaml")
    config = Config(model=args.model, config_file_list=[str(config_file)], config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    valid_scores: list[float] = []  # one per epoch: RecBole keeps only the best
    valid_epoch = trainer._valid_epoch

    def record(*a, **k):
        score, result = valid_epoch(*a, **k)
        valid_scores.append(float(score))
        return score, result

    trainer._valid_epoch = record
    started = time.perf_counter()
    best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    train_seconds = time.perf_counter() - started

    # full-sort scores of the best model for every user of the requested split
    model.eval()
    uid_field = dataset.uid_field
    n_items = dataset.item_num
    rows: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for batch in valid_data if args.split == "valid" else test_data:
            interaction = batch[0].to(config["device"])
            scores = model.full_sort_predict(interaction).view(-1, n_items).float().cpu().numpy()
            for uid, row in zip(interaction[uid_field].cpu().tolist(), scores):
                rows.setdefault(uid, row[1:])  # column 0 is RecBole's padding item
    uids = sorted(rows)
    np.savez(out / "scores.npz", scores=np.stack([rows[u] for u in uids]).astype(np.float32))
    result = {
        "model": args.model,
        "sequential": sequential,
        "settings": {k: v for k, v in settings.items() if k != "checkpoint_dir"},
        "users": [str(t) for t in dataset.id2token(uid_field, uids)],
        "items": [str(t) for t in dataset.id2token(dataset.iid_field, list(range(1, n_items)))],
        "epochs_run": len(valid_scores),
        "best_epoch": int(np.argmax(valid_scores)) + 1 if valid_scores else None,
        "valid_ndcg@100_per_epoch": valid_scores,
        "train_seconds": train_seconds,
        "recbole_valid": {k: float(v) for k, v in (best_valid or {}).items()},
        "recbole_valid_score": float(best_valid_score),
        "recbole_test": {k: float(v) for k, v in (test_result or {}).items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
