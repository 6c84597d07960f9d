"""Quality and cost predictors on prompt embeddings: what a cost-aware router trades off.

Every predictor maps L2-normalised embeddings (n x d), and optionally the prompts' raw text statistics
(`routers.textstats.prompt_stats`, n x 8), to an (n x m) matrix, one column per model. Each is fully
described by plain arrays, so artifacts need no pickle and a store can hold them. Scores may be NaN
(unknown); predictors skip unknowns model by model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from routers.textstats import TextStats

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Weighting = Literal["uniform", "softmax"]


def _masked_weighted_mean(weights: F64, values: F64) -> F64:
    """Per model, the weighted mean of neighbours' values ignoring NaN; NaN where no neighbour is known.

    weights: (n, k); values: (n, k, m).
    """
    known = ~np.isnan(values)
    w = weights[:, :, None] * known
    total = w.sum(axis=1)
    out = (w * np.nan_to_num(values)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, out / np.where(total > 0, total, 1), np.nan)


@dataclass
class KnnIndex:
    """The training prompts' embeddings and, per model, their scores and costs."""

    embeddings: F32  # (N, d), L2-normalised
    scores: F64  # (N, m), NaN = unknown
    costs: F64 | None  # (N, m) USD, or None when the table has no costs

    def neighbours(self, x: F32, k: int) -> tuple[npt.NDArray[np.intp], F64]:
        """Indices (n, k) of the k most similar training prompts and their cosine similarities."""
        n_index = len(self.embeddings)
        k = min(k, n_index)
        # Cosine (both sides are normalised). For one live request a matrix-vector product is markedly
        # faster than a 1-row matrix product.
        sims = (self.embeddings @ x[0])[None, :] if len(x) == 1 else x @ self.embeddings.T
        # The k largest without negating a copy: partition at n - k and keep the upper part.
        idx = np.argpartition(sims, n_index - k, axis=1)[:, n_index - k:]
        return idx, np.take_along_axis(sims, idx, axis=1).astype(np.float64)


class KnnPredictor:
    """Predicted quality = (weighted) mean score of the k nearest training prompts, per model.

    `softmax` weights neighbours by exp(similarity / temperature), so closer prompts count more.
    """

    kind = "knn"
    uses_text_stats = False

    def __init__(self, index: KnnIndex, k: int = 20, weighting: Weighting = "softmax", temperature: float = 0.05):
        self.index, self.k, self.weighting, self.temperature = index, k, weighting, temperature
        # Where no neighbour knows a model, fall back to that model's training mean.
        self._prior = np.nan_to_num(np.nanmean(index.scores, axis=0), nan=0.0)
        costs = index.costs
        self._mean_cost: F64 = np.zeros(index.scores.shape[1]) if costs is None else np.nanmean(costs, axis=0)

    def _weights(self, sims: F64) -> F64:
        if self.weighting == "uniform":
            return np.ones_like(sims)
        z: F64 = (sims - sims.max(axis=1, keepdims=True)) / self.temperature
        return np.exp(z)

    def predict(self, x: F32, stats: F64 | None = None) -> F64:
        """(n, m) predicted quality in [0, 1] (`stats` is not used by kNN)."""
        return self.predict_with_cost(x)[0]

    def predict_cost(self, x: F32) -> F64 | None:
        """(n, m) predicted cost in USD from the neighbours' costs, or None without costs."""
        return self.predict_with_cost(x)[1]

    def predict_with_cost(self, x: F32, stats: F64 | None = None) -> tuple[F64, F64 | None]:
        """Quality and cost from one neighbour search (the search is most of a decision's time)."""
        idx, sims = self.index.neighbours(x, self.k)
        w = self._weights(sims)
        q = _masked_weighted_mean(w, self.index.scores[idx])
        q = np.where(np.isnan(q), self._prior, q)
        if self.index.costs is None:
            return q, None
        c = _masked_weighted_mean(w, self.index.costs[idx])
        return q, np.where(np.isnan(c), self._mean_cost, c)


class ProbePredictor:
    """A logistic probe per model on the embedding (and, when fitted with them, the prompts' text
    statistics): P(good answer | prompt).

    Graded scores in [0, 1] are fitted as soft labels (each row twice, as 1 with weight s and as 0 with
    weight 1 - s), which is the cross-entropy of the graded score.
    """

    kind = "probe"

    def __init__(self, coef: F64, intercept: F64, text_stats: TextStats | None = None) -> None:
        self.coef, self.intercept = coef, intercept  # (m, d [+ statistics]), (m,)
        self.text_stats = text_stats

    @property
    def uses_text_stats(self) -> bool:
        """Whether `predict` needs the prompts' raw text statistics."""
        return self.text_stats is not None

    @classmethod
    def fit(cls, x: F32, scores: F64, c: float = 1.0, stats: F64 | None = None) -> ProbePredictor:
        """Fit one regularised logistic regression per model (C = `c`); with `stats` (the training
        prompts' raw text statistics) they are standardised and appended to the embedding."""
        # Imported here: scikit-learn (with scipy) costs the gateway ~100 MiB resident and only training fits.
        from sklearn.linear_model import LogisticRegression

        text_stats = TextStats.fit(stats) if stats is not None else None
        feats = text_stats.features(x, stats) if text_stats is not None and stats is not None else x
        m, d = scores.shape[1], feats.shape[1]
        coef, intercept = np.zeros((m, d)), np.zeros(m)
        for j in range(m):
            s = scores[:, j]
            keep = ~np.isnan(s)
            xs, sj = feats[keep], s[keep]
            if len(sj) == 0:
                continue
            mean = float(sj.mean())
            if mean <= 0.0 or mean >= 1.0:  # a model always right or always wrong: a constant
                intercept[j] = np.log(max(mean, 1e-4) / max(1 - mean, 1e-4))
                continue
            xx = np.vstack([xs, xs])
            yy = np.concatenate([np.ones(len(sj)), np.zeros(len(sj))])
            ww = np.concatenate([sj, 1.0 - sj])
            keep_w = ww > 0
            lr = LogisticRegression(C=c, max_iter=1000)
            lr.fit(xx[keep_w], yy[keep_w], sample_weight=ww[keep_w])
            coef[j], intercept[j] = lr.coef_[0], lr.intercept_[0]
        return cls(coef, intercept, text_stats)

    def predict(self, x: F32, stats: F64 | None = None) -> F64:
        """(n, m) predicted quality in [0, 1]; `stats` (raw text statistics) is required when the probe
        was fitted with them."""
        if self.text_stats is not None:
            if stats is None:
                raise ValueError("this probe uses the prompts' text statistics; pass stats=prompt_stats(texts)")
            feats = self.text_stats.features(x, stats)
        else:
            feats = x.astype(np.float64)
        z = feats @ self.coef.T + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def predict_with_cost(self, x: F32, stats: F64 | None = None) -> tuple[F64, F64 | None]:
        """A probe predicts no cost."""
        return self.predict(x, stats), None

    def predict_cost(self, x: F32) -> F64 | None:
        """A probe predicts no cost."""
        return None


class EnsemblePredictor:
    """A weighted mean of a kNN and a probe prediction (the weight is chosen by cross-validation)."""

    kind = "ensemble"

    def __init__(self, knn: KnnPredictor, probe: ProbePredictor, knn_weight: float) -> None:
        self.knn, self.probe, self.knn_weight = knn, probe, knn_weight

    @property
    def uses_text_stats(self) -> bool:
        """Whether `predict` needs the prompts' raw text statistics (only through a probe that counts)."""
        return self.knn_weight < 1.0 and self.probe.uses_text_stats

    def predict(self, x: F32, stats: F64 | None = None) -> F64:
        """(n, m) predicted quality in [0, 1]."""
        return self.predict_with_cost(x, stats)[0]

    def predict_cost(self, x: F32) -> F64 | None:
        """Costs come from the kNN part."""
        return self.knn.predict_cost(x)

    def predict_with_cost(self, x: F32, stats: F64 | None = None) -> tuple[F64, F64 | None]:
        """Blended quality and the kNN part's cost, from one neighbour search (the probe part is skipped
        when its weight is 0, and the kNN part when it is 1)."""
        w = self.knn_weight
        q_knn, c = self.knn.predict_with_cost(x)
        if w >= 1.0:
            return q_knn, c
        return w * q_knn + (1 - w) * self.probe.predict(x, stats), c
