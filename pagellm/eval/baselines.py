"""Baseline recommenders under PageLLM's protocol, scored with the same metric code.

Every baseline sees exactly the data stage's split: it is fit on the training positives
(r > 3) of ``split/train.parquet``; for a user of split S its history is that user's positives
before S (train; train + validation for test) and every item the user interacted with before S
is masked (full ranking over the catalogue). Pages are the top ``k`` items by score.

popularity  items by their number of training positives
itemknn     item-item cosine similarity of the training positives (top ``neighbours`` per item);
            a user's score for an item is the sum of its similarities to the user's history
userknn     user-user cosine similarity of the history to every training user's positives (top
            ``neighbours``, the user's own row left out); a user's score for an item is the sum
            of the similarities of the neighbours who have it
bprmf       matrix factorisation with the BPR loss (Rendle et al., 2009)
sasrec      self-attentive sequential model (Kang & McAuley, 2018) as RecBole builds it: causal
            Transformer over the positive history, every prefix a sample, full softmax over items
multivae    variational autoencoder over a user's positive set with a multinomial likelihood
            (Liang et al., 2018): the user's history in, scores over all items out
ease        shallow linear autoencoder in closed form (Steck, 2019): item-item weights
            B = I - P diag(1 / diag P), P = (X'X + l2 I)^-1, diagonal 0; a user's score for an
            item is the sum of B's rows of the history
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pagellm.data.layout import DataDir
from pagellm.errors import InputError
from pagellm.eval.metrics import ndcg_at_k
from pagellm.model.multivae import MultiVAE
from pagellm.model.sasrec import SASRec, right_pad

log = logging.getLogger(__name__)
BASELINES = ("popularity", "itemknn", "userknn", "bprmf", "sasrec", "multivae", "ease")


@dataclass
class Protocol:
    items: list[str]  # index -> item id
    train_pos: pd.DataFrame  # user_id, item, ts (item as index), training positives
    users: pd.DataFrame  # user_id, history (item indices, time order), seen (indices), target (ids)


def load_protocol(data_dir: Path, split: str, positive_threshold: float = 3.0) -> Protocol:
    """The data directory's split with item ids as indices into the catalogue."""
    data = DataDir(data_dir)
    items = data.read_items(["item_id"]).column("item_id").to_pylist()
    index = {item: k for k, item in enumerate(items)}
    view = data.eval_users(split, positive_threshold)
    unknown = {i for seen in view.seen for i in seen} - index.keys()
    if unknown:
        raise InputError(
            f"{data_dir}: interactions name {len(unknown)} items missing from {data.items_path.name}, e.g. {sorted(unknown)[:5]}"
        )
    users = pd.DataFrame(
        {
            "user_id": view.user_id,
            "history": [[index[i] for i in h] for h in view.history],
            "seen": [[index[i] for i in s] for s in view.seen],
            "target": view.target,
        }
    )
    train = data.read_split("train").to_pandas().sort_values(["user_id", "ts"], kind="stable")
    train = train[train.rating > positive_threshold].assign(item=lambda t: t.item_id.map(index))
    return Protocol(items, train[["user_id", "item", "ts"]], users)


def reindexed(p: Protocol, items: list[str]) -> Protocol:
    """``p`` with its items in the order of ``items`` (e.g. a policy's item block), so a model
    trained on it scores columns in that order. Every item of ``p`` must be in ``items``."""
    missing = set(p.items) - set(items)
    if missing:
        raise InputError(f"{len(missing)} catalogue items have no place in the new order, e.g. {sorted(missing)[:5]}")
    position = {item: k for k, item in enumerate(items)}
    new = np.array([position[i] for i in p.items])
    users = p.users.assign(
        history=[new[h].tolist() for h in p.users.history], seen=[new[s].tolist() for s in p.users.seen]
    )
    return Protocol(list(items), p.train_pos.assign(item=new[p.train_pos.item.to_numpy()]), users)


def _top_k(scores: np.ndarray, seen: list, k: int) -> np.ndarray:
    scores = scores.astype(np.float64, copy=True)
    scores[seen] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    top = np.argpartition(-scores, k - 1)[:k] if k > 0 else np.array([], dtype=int)
    return top[np.lexsort((top, -scores[top]))]  # by score, ties by item index


def pages_from_scores(p: Protocol, users: list[str], items: list[str], scores: np.ndarray, k: int = 100):
    """Pages of a model scored elsewhere (RecBole): ``scores`` [len(users), len(items)] with its
    own user and item order, masked and cut to ``k`` by ``_top_k`` like every baseline here.
    Returns the pages in ``p.users`` order and the number of users the model could not score
    (no history for a sequence model), whose page is empty."""
    column = {item: j for j, item in enumerate(p.items)}
    unknown = [i for i in items if i not in column]
    if unknown:
        raise InputError(f"scored items missing from the catalogue, e.g. {unknown[:5]}")
    full = np.full((len(users), len(p.items)), -np.inf)
    full[:, [column[i] for i in items]] = scores
    row = {u: r for r, u in enumerate(users)}
    pages, missing = [], 0
    for user in p.users.itertuples(index=False):
        if user.user_id not in row:
            pages.append([])
            missing += 1
            continue
        pages.append([p.items[j] for j in _top_k(full[row[user.user_id]], user.seen, k)])
    return pages, missing


def popularity_scores(p: Protocol) -> np.ndarray:
    return np.bincount(p.train_pos.item.to_numpy(), minlength=len(p.items)).astype(np.float64)


def _training_users(p: Protocol) -> dict[str, int]:
    """Row of each user with a training positive in ``_user_item_matrix``."""
    return {u: k for k, u in enumerate(p.train_pos.user_id.unique())}


def _user_item_matrix(p: Protocol, dtype=np.float32) -> np.ndarray:
    """The binary training-positive matrix [users with a positive, items]."""
    users = _training_users(p)
    x = np.zeros((len(users), len(p.items)), dtype=dtype)
    x[p.train_pos.user_id.map(users).to_numpy(), p.train_pos.item.to_numpy()] = 1.0
    return x


def itemknn_similarity(p: Protocol, neighbours: int = 100) -> np.ndarray:
    """Cosine similarity of item columns of the binary user x item matrix, top-``neighbours``."""
    x = _user_item_matrix(p)
    norms = np.sqrt(x.sum(0)) + 1e-12
    sim = (x.T @ x) / norms[:, None] / norms[None, :]
    np.fill_diagonal(sim, 0.0)
    return _nearest(sim, neighbours)


def _nearest(sim: np.ndarray, neighbours: int) -> np.ndarray:
    """``sim`` with each row's ``neighbours`` largest entries kept (ties at the cut kept too), 0 elsewhere."""
    if neighbours >= sim.shape[1]:
        return sim
    cut = np.partition(sim, -neighbours, axis=1)[:, -neighbours][:, None]
    return np.where(sim >= cut, sim, 0.0)


def _userknn_similarity(p: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each user's history (binary) against every training user's positives [users of
    ``p``, training users], the user's own training row 0 (its items the history already holds),
    and the training matrix the neighbours' items come from."""
    x = _user_item_matrix(p)
    history = _binary_rows(list(p.users.history), len(p.items)).numpy()

    def unit(m: np.ndarray) -> np.ndarray:  # binary rows to unit length
        return m / np.sqrt(np.maximum(m.sum(1, keepdims=True), 1.0))

    sim = unit(history) @ unit(x).T
    own = _training_users(p)
    rows = [(r, own[u]) for r, u in enumerate(p.users.user_id) if u in own]
    if rows:
        sim[tuple(zip(*rows))] = 0.0
    return sim, x


def userknn_scores(p: Protocol, neighbours: int = 100) -> np.ndarray:
    """Scores [users of ``p``, items]: the ``neighbours`` training users most similar to each user
    (``_userknn_similarity``), an item's score the sum of the similarities of those who have it."""
    sim, x = _userknn_similarity(p)
    return _nearest(sim, neighbours) @ x


def _item_item_scores(sim: np.ndarray, q: Protocol) -> np.ndarray:
    """Each user's sum of the rows of an item-item matrix (ItemKNN's similarity, EASE's weights)
    over their history."""
    return np.stack([sim[h].sum(0) if h else np.zeros(len(q.items)) for h in q.users.history])


def _item_gram(p: Protocol) -> np.ndarray:
    """X'X of the binary training-positive matrix (float64), what EASE inverts."""
    x = _user_item_matrix(p, np.float64)
    return x.T @ x


def _ease_from_gram(gram: np.ndarray, l2: float) -> np.ndarray:
    inverse = np.linalg.inv(gram + l2 * np.eye(len(gram)))
    weights = inverse / -np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


def ease_weights(p: Protocol, l2: float) -> np.ndarray:
    """EASE's item-item weights [items, items] (Steck, 2019) from the training positives: the
    ridge regression of every item's column on all the others, with a zero diagonal, in closed
    form. One inverse of the item Gram matrix (float64; ~20 s for MovieLens's 9.7k items on 2 CPUs)."""
    return _ease_from_gram(_item_gram(p), l2)


def validation_ndcg(scores: np.ndarray, val: Protocol, k: int = 100) -> float:
    """Mean NDCG@k of full-ranking pages from ``scores`` [val users, items] on the validation
    split: the number every trained baseline selects its epoch (or ItemKNN, UserKNN their neighbourhood) by."""
    return float(
        np.mean(
            [
                ndcg_at_k([val.items[j] for j in _top_k(row, seen, k)], target, k)
                for row, seen, target in zip(scores, val.users.seen, val.users.target)
            ]
        )
    )


class BestEpoch:
    """Early stopping on validation NDCG@100: scored after every epoch, stop after ``patience``
    epochs without a better score, the best epoch's parameters restored. Without a validation
    protocol every epoch runs and the last is kept. ``progress=False`` hides the epoch bar (a
    caller whose output is a job log, where every redraw is a line)."""

    def __init__(
        self,
        modules: list[nn.Module],
        val: Protocol | None,
        scores,
        patience: int = 10,
        name: str = "",
        progress: bool = True,
    ):
        self.modules, self.val, self.scores, self.patience = modules, val, scores, patience
        self.best, self.best_epoch, self.state, self.history = -1.0, 0, None, []
        self.bar = tqdm(desc=f"{name} epochs".strip(), unit="epoch", disable=not progress)

    def stop(self, epoch: int) -> bool:
        self.bar.update()
        if self.val is None:
            return False
        for m in self.modules:
            m.eval()
        with torch.no_grad():
            score = validation_ndcg(self.scores(self.val), self.val)
        for m in self.modules:
            m.train()
        self.history.append(score)
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            self.state = [copy.deepcopy(m.state_dict()) for m in self.modules]
        self.bar.set_postfix(val_ndcg=f"{score:.4f}", best=f"{self.best:.4f}@{self.best_epoch}")
        return epoch - self.best_epoch >= self.patience

    def fit(self, opt, loss_of, rows: int, batch_size: int, epochs: int, rng) -> None:
        """At most ``epochs`` epochs of shuffled mini-batches over ``rows`` training rows
        (``loss_of(batch indices)``), stopping by patience; the best epoch restored."""
        for m in self.modules:
            m.train()
        for epoch in range(1, epochs + 1):
            for b in np.array_split(rng.permutation(rows), max(1, math.ceil(rows / batch_size))):
                loss = loss_of(b)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if self.stop(epoch):
                break
        self.restore()

    def restore(self) -> None:
        self.bar.close()
        if self.state is not None:
            for m, state in zip(self.modules, self.state):
                m.load_state_dict(state)
        for m in self.modules:
            m.eval()
        if self.val is not None:
            log.info("best validation NDCG@100 %.4f at epoch %d of %d", self.best, self.best_epoch, len(self.history))


def train_bprmf(
    p: Protocol,
    dim: int = 64,
    epochs: int = 100,
    lr: float = 1e-2,
    reg: float = 1e-4,
    seed: int = 0,
    val: Protocol | None = None,
    patience: int = 10,
):
    """Returns a function from a protocol to its users' scores [users, items]."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    users = {u: k for k, u in enumerate(p.train_pos.user_id.unique())}
    u_idx = torch.as_tensor(p.train_pos.user_id.map(users).to_numpy().copy())
    i_idx = torch.as_tensor(p.train_pos.item.to_numpy().copy())
    user_emb, item_emb = nn.Embedding(len(users) + 1, dim), nn.Embedding(len(p.items), dim)  # last row: unknown
    nn.init.normal_(user_emb.weight, std=0.1)
    nn.init.normal_(item_emb.weight, std=0.1)
    with torch.no_grad():
        user_emb.weight[-1] = 0.0  # a user without training positives scores every item 0

    def scores(q: Protocol) -> np.ndarray:
        rows = torch.as_tensor([users.get(u, len(users)) for u in q.users.user_id])
        return (user_emb(rows) @ item_emb.weight.T).detach().numpy()

    opt = torch.optim.Adam([*user_emb.parameters(), *item_emb.parameters()], lr=lr)
    best = BestEpoch([user_emb, item_emb], val, scores, patience, "BPR-MF")
    for epoch in range(1, epochs + 1):
        order = torch.as_tensor(rng.permutation(len(u_idx)))
        for lo in range(0, len(order), 1024):
            b = order[lo : lo + 1024]
            neg = torch.as_tensor(rng.integers(0, len(p.items), len(b)))
            u, i, j = user_emb(u_idx[b]), item_emb(i_idx[b]), item_emb(neg)
            loss = -torch.nn.functional.logsigmoid((u * i).sum(1) - (u * j).sum(1)).mean() + reg * (
                u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()
            ) / len(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if best.stop(epoch):
            break
    best.restore()
    scores.selection = best
    return scores


def train_sequences(p: Protocol) -> list[list[int]]:
    """Each training user's positives (item indices) in time order."""
    return list(p.train_pos.sort_values(["user_id", "ts"], kind="stable").groupby("user_id").item.agg(list))


def windows_per_batch(labels: torch.Tensor, targets_per_batch: int) -> int:
    """Windows per batch so that a batch holds ~``targets_per_batch`` targets: an epoch takes as
    many batches as prefix samples in batches of ``targets_per_batch`` would."""
    return math.ceil(len(labels) * targets_per_batch / max(int((labels >= 0).sum()), 1))


def sasrec_windows(seqs: list[list[int]], max_len: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Every next-item target of the sequences (item indices) once, in windows of ``max_len``
    inputs: inputs [W, max_len] right-padded with 0 (items shift by 1) and labels [W, max_len]
    (the item after each input position, -100 where no target is trained). A sequence of up to
    ``max_len + 1`` items is one window (all its targets); a longer one takes windows every
    ``max_len // 2`` items, each target trained in the window that gives it the longest history
    (``max_len // 2 + 1`` to ``max_len`` items before it, where a prefix sample has ``max_len``)."""
    hop = max(1, max_len // 2)
    inputs, labels = [], []
    for seq in seqs:
        start, first = 0, 1  # the window's first item, its first trained target
        while first < len(seq):
            window = seq[start : start + max_len + 1]
            x, y = torch.zeros(max_len, dtype=torch.long), torch.full((max_len,), -100)
            x[: len(window) - 1] = torch.as_tensor(window[:-1]) + 1
            y[first - start - 1 : len(window) - 1] = torch.as_tensor(window[first - start :])
            inputs.append(x)
            labels.append(y)
            first, start = start + max_len + 1, start + hop
    if not inputs:
        return torch.zeros(0, max_len, dtype=torch.long), torch.zeros(0, max_len, dtype=torch.long)
    return torch.stack(inputs), torch.stack(labels)


def train_sasrec(
    p: Protocol,
    epochs: int = 100,
    lr: float = 1e-3,
    max_len: int = 50,
    seed: int = 0,
    val: Protocol | None = None,
    patience: int = 10,
    batch_size: int = 2048,
    progress: bool = True,
) -> SASRec:
    """Every next positive of a user's training positives is a target with the items before it
    (at most ``max_len``) as its history, RecBole's sequential augmentation; full-softmax
    cross-entropy over items, Adam (RecBole's defaults: lr 1e-3, batches of 2048 targets). The
    targets of one sequence are read off one causal pass (``sasrec_windows``) rather than a pass
    per prefix: the same targets and about as many steps per epoch at a fraction of the compute
    (docs/baselines.md)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    inputs, labels = sasrec_windows(train_sequences(p), max_len)
    model = SASRec(len(p.items), max_len=max_len)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = BestEpoch([model], val, lambda q: sasrec_scores(model, q), patience, f"SASRec seed {seed}", progress)
    best.fit(
        opt,
        lambda b: model.window_loss(inputs[b], labels[b]),
        len(inputs),
        windows_per_batch(labels, batch_size),
        epochs,
        rng,
    )
    model.selection = best
    return model


def sasrec_scores(model: SASRec, q: Protocol) -> np.ndarray:
    """Logits at the last item of each user's history (its last ``max_len`` items)."""
    with torch.no_grad():
        seq, lengths = right_pad([[i + 1 for i in h] for h in q.users.history], model.max_len)
        return torch.cat([model(seq[lo : lo + 256], lengths[lo : lo + 256]) for lo in range(0, len(seq), 256)]).numpy()


def _binary_rows(rows: list[list[int]], n_items: int) -> torch.Tensor:
    x = torch.zeros(len(rows), n_items)
    for r, items in enumerate(rows):
        x[r, items] = 1.0
    return x


def train_multivae(
    p: Protocol,
    epochs: int = 200,
    lr: float = 1e-3,
    beta_max: float = 0.2,
    anneal_steps: int = 20000,
    seed: int = 0,
    val: Protocol | None = None,
    patience: int = 10,
    progress: bool = True,
) -> MultiVAE:
    """Multinomial log-likelihood + beta * KL, beta annealed linearly to ``beta_max`` (the
    paper's partially regularised objective), on each user's set of training positives."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = _binary_rows(list(p.train_pos.groupby("user_id").item.agg(list)), len(p.items))
    model = MultiVAE(len(p.items))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = itertools.count()  # optimiser steps so far: the KL weight's annealing clock

    def loss_of(b: np.ndarray) -> torch.Tensor:
        logits, kl = model(x[b])
        nll = -(logits.log_softmax(1) * x[b]).sum(1).mean()
        return nll + min(beta_max, beta_max * next(steps) / anneal_steps) * kl

    best = BestEpoch([model], val, lambda q: multivae_scores(model, q), patience, f"Multi-VAE seed {seed}", progress)
    best.fit(opt, loss_of, len(x), 256, epochs, rng)
    model.selection = best
    return model


def multivae_scores(model: MultiVAE, q: Protocol) -> np.ndarray:
    with torch.no_grad():
        return model(_binary_rows(list(q.users.history), len(q.items)))[0].numpy()


ITEMKNN_NEIGHBOURS = (10, 20, 50, 100, 200, 400)  # candidates when a validation protocol is given


def best_itemknn_neighbours(p: Protocol, val: Protocol) -> int:
    """The ``ITEMKNN_NEIGHBOURS`` size whose ItemKNN (fitted on ``p``'s training positives)
    scores best on validation NDCG@100."""
    neighbours = max(
        ITEMKNN_NEIGHBOURS, key=lambda n: validation_ndcg(_item_item_scores(itemknn_similarity(p, n), val), val)
    )
    log.info("itemknn: %d neighbours (best validation NDCG@100)", neighbours)
    return neighbours


def best_userknn_neighbours(val: Protocol) -> int:
    """The ``ITEMKNN_NEIGHBOURS`` size whose UserKNN (the training positives, read from ``val``,
    the validation split's protocol) scores best on validation NDCG@100."""
    sim, x = _userknn_similarity(val)  # once for every candidate size
    neighbours = max(ITEMKNN_NEIGHBOURS, key=lambda n: validation_ndcg(_nearest(sim, n) @ x, val))
    log.info("userknn: %d neighbours (best validation NDCG@100)", neighbours)
    return neighbours


EASE_L2 = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)  # candidates when a validation protocol is given


def best_ease(p: Protocol, val: Protocol) -> tuple[float, np.ndarray]:
    """The ``EASE_L2`` penalty whose EASE (fitted on ``p``'s training positives) scores best on
    validation NDCG@100, and its weights."""
    best, gram = (-1.0, 0.0, None), _item_gram(p)  # one Gram matrix for every penalty
    for l2 in EASE_L2:
        weights = _ease_from_gram(gram, l2)
        ndcg = validation_ndcg(_item_item_scores(weights, val), val)
        best = max(best, (ndcg, l2, weights), key=lambda b: b[0])
    log.info("ease: l2 %g (best validation NDCG@100 %.4f)", best[1], best[0])
    return best[1], best[2]


def baseline_scores(
    name: str, p: Protocol, seed: int = 0, val: Protocol | None = None, epochs: int = 0, patience: int = 10
) -> np.ndarray:
    """Scores [users of ``p``, items] of one baseline. With ``val`` (the validation split's
    protocol) trained baselines keep their best epoch by validation NDCG@100 (stopping after
    ``patience`` epochs without a better one, at most ``epochs``, 0: the model's own default) and
    ItemKNN and UserKNN their neighbourhood size, EASE its L2 penalty that score best there; without it, the
    fixed defaults (every epoch, 100 neighbours, L2 500)."""
    budget = {"patience": patience, **({"epochs": epochs} if epochs else {})}
    if name == "popularity":
        return np.tile(popularity_scores(p), (len(p.users), 1))
    if name == "itemknn":
        neighbours = best_itemknn_neighbours(p, val) if val is not None else 100
        return _item_item_scores(itemknn_similarity(p, neighbours), p)
    if name == "userknn":
        return userknn_scores(p, best_userknn_neighbours(val) if val is not None else 100)
    if name == "ease":
        weights = best_ease(p, val)[1] if val is not None else ease_weights(p, 500.0)
        return _item_item_scores(weights, p)
    if name == "bprmf":
        return train_bprmf(p, seed=seed, val=val, **budget)(p)
    if name == "sasrec":
        return sasrec_scores(train_sasrec(p, seed=seed, val=val, **budget), p)
    if name == "multivae":
        return multivae_scores(train_multivae(p, seed=seed, val=val, **budget), p)
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside the block (None: left as they are), then restored."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def baseline_pages(
    name: str,
    p: Protocol,
    k: int = 100,
    seed: int = 0,
    val: Protocol | None = None,
    epochs: int = 0,
    patience: int = 10,
    threads: int | None = None,
) -> list[list[str]]:
    """Top-k pages (item ids) of one baseline for every evaluation user (``baseline_scores``).
    ``threads``: torch threads while it trains and scores. `pagellm run` and `compare` train the
    baselines in the driver while no Ray work runs, so they give it every core
    (``RayConfig.cores``): SASRec's epochs on Amazon run 1.4x faster on 2 threads than on 1,
    with the same validation scores (docs/benchmarks.md)."""
    with torch_threads(threads):
        scores = baseline_scores(name, p, seed, val, epochs, patience)
    return [[p.items[j] for j in _top_k(row, seen, k)] for row, seen in zip(scores, p.users.seen)]
