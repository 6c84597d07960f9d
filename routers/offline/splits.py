"""Splitting a routing table: its train/test split and folds that keep repeated prompts together."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from routers.offline.dataset import IndexArray, RoutingData
from routers.offline.prices import TableError


def train_test(data: RoutingData, split: str = "test") -> tuple[IndexArray, IndexArray]:
    """Row indices (train, test) from the `split` column: train = "train" rows, test = rows equal to
    `split`, minus every test row whose exact prompt text also occurs in train (noted)."""
    if data.splits is None:
        raise TableError("the table has no 'split' column; use kfold() instead")
    if split == "train":
        raise ValueError("the evaluation split must differ from 'train'")
    train = np.flatnonzero(data.splits == "train")
    test = np.flatnonzero(data.splits == split)
    if test.size == 0:
        raise ValueError(f"no rows with split {split!r}; splits present: {sorted(set(data.splits.tolist()))}")
    seen = {data.prompts[i] for i in train}
    fresh = np.array([data.prompts[i] not in seen for i in test], dtype=bool)
    note = f"removed {int((~fresh).sum())} {split!r} rows whose prompt also occurs in train"
    if not fresh.all() and note not in data.notes:  # once, however often the split is asked for
        data.notes.append(note)
    return train, test[fresh]


def _prompt_groups(prompts: list[str]) -> tuple[IndexArray, IndexArray]:
    """A group id per row (one group per distinct prompt text) and each group's first row."""
    ids: dict[str, int] = {}
    group = np.array([ids.setdefault(p, len(ids)) for p in prompts], dtype=np.intp)
    first = np.full(len(ids), -1, dtype=np.intp)
    for row in range(len(group) - 1, -1, -1):
        first[group[row]] = row
    return group, first


def kfold(
    data: RoutingData, k: int = 5, seed: int = 0, stratify_by_task: bool = False
) -> list[tuple[IndexArray, IndexArray]]:
    """k (train, test) row-index pairs; rows sharing an exact prompt text always land in the same fold.

    Distinct prompts are shuffled (seeded) and dealt round-robin. With `stratify_by_task`, each task's
    prompts are dealt separately (a prompt belongs to the task of its first row), so every task is
    split k ways; the dealing continues from fold to fold across tasks so the folds stay balanced.
    """
    if k < 2:
        raise ValueError("k must be at least 2")
    group, first = _prompt_groups(data.prompts)
    if len(first) < k:
        raise ValueError(f"only {len(first)} distinct prompts for {k} folds")
    rng = np.random.default_rng(seed)
    fold_of_group = np.empty(len(first), dtype=np.intp)
    strata = data.tasks[first] if stratify_by_task else np.zeros(len(first), dtype=str)
    start = 0
    for task in sorted(set(strata.tolist())):  # sorted: independent of row order, so reproducible
        members = rng.permutation(np.flatnonzero(strata == task))
        fold_of_group[members] = (start + np.arange(members.size)) % k
        start = (start + members.size) % k
    fold = fold_of_group[group]
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def dedupe_within(data: RoutingData, idx: npt.NDArray[np.integer[Any]]) -> IndexArray:
    """`idx` keeping only the first occurrence of each exact prompt text (for evaluation sets)."""
    seen: set[str] = set()
    keep: list[int] = []
    for i in np.asarray(idx, dtype=np.intp).tolist():
        if data.prompts[i] not in seen:
            seen.add(data.prompts[i])
            keep.append(i)
    return np.array(keep, dtype=np.intp)
