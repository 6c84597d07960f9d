"""A contextual bandit (LinUCB) on a reduced prompt embedding, learning online from feedback.

The reward of a model is its quality minus lambda x normalised cost. The state is sums (per model: the
Gram matrix A and the vector b, and a count), so updates from several gateway replicas merge by
addition: each replica adds its `pending_delta()` to the shared state and reloads the merged sums.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from routers.base import CandidateScore, RoutingDecision, RoutingOutcome, RoutingRequest
from routers.embedding.base import Embedder

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class Projection:
    """x -> [W^T (x - mean), 1]: a PCA reduction plus a bias feature."""

    mean: F64  # (d,)
    components: F64  # (d, r)

    @classmethod
    def fit(cls, x: F32, dim: int) -> Projection:
        """PCA of training embeddings, keeping `dim` components."""
        mean = x.mean(axis=0).astype(np.float64)
        _, _, vt = np.linalg.svd(x.astype(np.float64) - mean, full_matrices=False)
        return cls(mean=mean, components=vt[:dim].T.copy())

    def __call__(self, x: F32) -> F64:
        z = (x.astype(np.float64) - self.mean) @ self.components
        return np.hstack([z, np.ones((len(z), 1))])


class LinUCB:
    """Per-arm ridge regressions of reward on features, with an upper-confidence bonus."""

    def __init__(self, n_arms: int, dim: int, alpha: float = 0.5, ridge: float = 1.0) -> None:
        self.alpha = alpha
        self.a = np.stack([np.eye(dim) * ridge for _ in range(n_arms)])  # (m, r, r)
        self.b = np.zeros((n_arms, dim))
        self.n = np.zeros(n_arms)
        self._delta_a, self._delta_b, self._delta_n = np.zeros_like(self.a), np.zeros_like(self.b), np.zeros(n_arms)
        self._base = (self.a.copy(), self.b.copy(), self.n.copy())
        self._refresh()

    def _refresh(self) -> None:
        self.a_inv = np.linalg.inv(self.a)
        self.theta = np.einsum("mij,mj->mi", self.a_inv, self.b)

    def ucb(self, z: F64) -> tuple[F64, F64]:
        """Per arm: the estimated reward and the upper confidence bound, for one feature vector z."""
        mean = self.theta @ z
        width = np.sqrt(np.einsum("i,mij,j->m", z, self.a_inv, z))
        return mean, mean + self.alpha * width

    def update(self, arm: int, z: F64, reward: float, refresh: bool = True) -> None:
        """Add one observation (and remember it as part of the delta not yet flushed)."""
        outer = np.outer(z, z)
        for target_a, target_b, target_n in ((self.a, self.b, self.n),
                                             (self._delta_a, self._delta_b, self._delta_n)):
            target_a[arm] += outer
            target_b[arm] += reward * z
            target_n[arm] += 1
        if refresh:
            self._refresh()

    def pending_delta(self) -> tuple[F64, F64, F64]:
        """The sums added since the last call (and forget them): what a replica flushes to the store."""
        out = (self._delta_a.copy(), self._delta_b.copy(), self._delta_n.copy())
        self._delta_a[:] = 0
        self._delta_b[:] = 0
        self._delta_n[:] = 0
        return out

    def load(self, a: F64, b: F64, n: F64) -> None:
        """Replace the state with merged sums (plus this replica's unflushed delta)."""
        self.a, self.b, self.n = a + self._delta_a, b + self._delta_b, n + self._delta_n
        self._refresh()

    def set_base(self, a: F64, b: F64, n: F64) -> None:
        """The state learned offline (the artifact's warm start), to which shared online updates are added."""
        self._base = (a.copy(), b.copy(), n.copy())
        self.load(a, b, n)

    def online_observations(self) -> float:
        """Observations learned since the warm start (this replica's and, once merged, every replica's)."""
        return float(self.n.sum() - self._base[2].sum())

    def merge(self, a: F64, b: F64, n: F64) -> None:
        """State = the base + the sums every replica has flushed (`a`, `b`, `n`) + this replica's unflushed
        delta."""
        self.load(self._base[0] + a, self._base[1] + b, self._base[2] + n)


class BanditRouter:
    """Routes by LinUCB over the models; `observe` with a quality (feedback) updates the chosen arm.

    `queue_penalty` is subtracted from an arm's upper bound per request waiting in its queue (live load is
    not part of the learned reward, so that load does not teach the bandit that a model is bad).
    """

    needs_embedding = True

    def __init__(self, name: str, models: Sequence[str], projection: Projection, bandit: LinUCB, *,
                 cost_ref: float, mean_costs: F64, lam: float = 0.0, embedder: Embedder | None = None,
                 version: str = "", max_pending: int = 100_000, queue_penalty: float = 0.0) -> None:
        self.name, self.models, self.projection, self.bandit = name, list(models), projection, bandit
        self.cost_ref, self.mean_costs, self.lam = cost_ref, mean_costs, lam
        self.embedder, self.version = embedder, version
        self._pending: OrderedDict[str, tuple[F64, int]] = OrderedDict()
        self._max_pending = max_pending
        self.queue_penalty = queue_penalty

    def targets(self) -> Sequence[str]:
        """The models (arms)."""
        return list(self.models)

    def reward(self, arm: int, quality: float, cost_usd: float | None = None) -> float:
        """Quality minus lambda x normalised cost (the arm's mean cost when the actual one is unknown)."""
        cost = self.mean_costs[arm] if cost_usd is None else cost_usd
        return float(quality - self.lam * cost / self.cost_ref)

    def features(self, req: RoutingRequest) -> F64:
        """The request's reduced feature vector."""
        if req.embedding is not None:
            x = req.embedding.reshape(1, -1).astype(np.float32, copy=False)
        elif self.embedder is not None:
            x = self.embedder.embed([req.text])
        else:
            raise ValueError(f"policy {self.name!r} needs the prompt's embedding and has no embedder")
        z: F64 = self.projection(x)[0]
        return z

    def route(self, req: RoutingRequest) -> RoutingDecision:
        """Choose the arm with the highest upper confidence bound among the candidates."""
        z = self.features(req)
        mean, ucb = self.bandit.ucb(z)
        if self.queue_penalty and req.queue:
            ucb = ucb - self.queue_penalty * np.array([req.queue.get(m, 0.0) for m in self.models])
        names = [m for m in self.models if m in req.candidates] or self.models
        cols = [self.models.index(m) for m in names]
        order = sorted(cols, key=lambda j: -ucb[j])
        ranking = tuple(
            CandidateScore(name=self.models[j], score=float(ucb[j]), predicted_quality=float(mean[j]),
                           predicted_cost_usd=float(self.mean_costs[j]))
            for j in order
        )
        chosen = order[0]
        self._pending[req.request_id] = (z, chosen)
        while len(self._pending) > self._max_pending:
            self._pending.popitem(last=False)
        reason = (f"LinUCB: {self.models[chosen]} (estimated reward {mean[chosen]:.3f}, "
                  f"bound {ucb[chosen]:.3f}, {int(self.bandit.n[chosen])} observations)")
        return RoutingDecision(chosen=self.models[chosen], ranking=ranking, reason=reason, policy=self.name,
                               version=self.version)

    def context(self, request_id: str) -> tuple[F64, int] | None:
        """The features and arm of a request this instance routed (what feedback for it must learn from)."""
        return self._pending.get(request_id)

    def learn(self, z: F64, arm: int, quality: float, cost_usd: float | None = None) -> None:
        """Learn one scored outcome from its features and arm (feedback that reached another replica than
        the one that routed the request carries these through the shared store)."""
        self.bandit.update(arm, z, self.reward(arm, quality, cost_usd))

    def observe(self, outcome: RoutingOutcome) -> None:
        """Learn from a routed request's quality; outcomes without one (or unknown ids) teach nothing."""
        if outcome.quality is None:
            return
        entry = self._pending.pop(outcome.request_id, None)
        if entry is None:
            return
        z, arm = entry
        self.bandit.update(arm, z, self.reward(arm, outcome.quality, outcome.cost_usd))
