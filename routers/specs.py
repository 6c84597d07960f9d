"""Config specs of the routing policies, one pydantic model per registered `type`.

They live here, not in the gateway, so that the routing library can be configured and tested on its
own; the gateway's config embeds `PolicySpec` as a discriminated union on `type`.

Every policy may name a `shadow` policy (decided on every request, recorded, never executed) and opt in
to session `affinity`. Learned policies (`knn`, `cost_aware`, `bandit`) point at a trained artifact and
may map the artifact's model names onto this config's worker or model names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AffinitySpec(_Model):
    """Keep the turns of one conversation (the `user` field or an `x-session-id` header) on the model
    chosen for its first turn, while that model has a healthy worker and is a candidate."""

    enabled: bool = True
    ttl_s: _Positive = 1800.0


class _Spec(_Model):
    description: str | None = None
    shadow: str | None = Field(default=None, description="Another policy decided alongside, never executed.")
    affinity: AffinitySpec | None = None


class FixedSpec(_Spec):
    """Always send to one worker (or model)."""

    type: Literal["fixed"]
    worker: str = Field(min_length=1)


class WeightedSpec(_Spec):
    """Pick at random, in proportion to the weights (e.g. a canary split)."""

    type: Literal["weighted"]
    weights: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(min_length=1)
    seed: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _some_weight(self) -> WeightedSpec:
        if sum(self.weights.values()) <= 0:
            raise ValueError("weights must not all be zero")
        return self


class LambdaTarget(_Model):
    """Set lambda from a target instead of directly; exactly one field. Calibrated on the artifact's
    training prompts: `max_cost_usd` = largest mean predicted cost per request, `min_quality` = smallest
    mean predicted quality, `strong_share` = largest share of requests sent to the strongest model."""

    max_cost_usd: _Positive | None = None
    min_quality: Annotated[float, Field(ge=0, le=1)] | None = None
    strong_share: Annotated[float, Field(ge=0, le=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LambdaTarget:
        given = [k for k in ("max_cost_usd", "min_quality", "strong_share") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of max_cost_usd, min_quality, strong_share (got {given or 'none'})")
        return self


class _LearnedSpec(_Spec):
    artifact: str = Field(min_length=1, description="Directory written by `turnout train` (relative paths "
                                                    "are taken from the config file's directory).")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Artifact model name -> this config's worker or model name; unmapped names are used as is.")
    queue_penalty: _NonNegative = Field(
        default=0.0, description="Utility subtracted per request waiting at a model's least loaded worker.")
    fallback: str | None = Field(
        default=None, min_length=1,
        description="The candidate (this config's name) that answers when the policy cannot decide because the "
                    "prompt's embedding failed (e.g. a remote embedder is down); default: the policy's first "
                    "available candidate.")


class _UtilitySpec(_LearnedSpec):
    lambda_: _NonNegative | None = Field(default=None, alias="lambda")
    target: LambdaTarget | None = None
    budget_usd_per_hour: _Positive | None = None

    @model_validator(mode="after")
    def _one_lambda_source(self) -> _UtilitySpec:
        given = [k for k, v in (("lambda", self.lambda_), ("target", self.target),
                                ("budget_usd_per_hour", self.budget_usd_per_hour)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"set lambda in one way only, not {' and '.join(given)}")
        return self


class KnnSpec(_UtilitySpec):
    """Quality and cost from the nearest training prompts; argmax quality - lambda x cost."""

    type: Literal["knn"]


class CostAwareSpec(_UtilitySpec):
    """An ensemble quality predictor (kNN + logistic probe); argmax quality - lambda x cost."""

    type: Literal["cost_aware"]


class BanditSpec(_LearnedSpec):
    """LinUCB warm-started from a routing table, learning from `POST /v1/feedback`."""

    type: Literal["bandit"]
    lambda_: _NonNegative | None = Field(default=None, alias="lambda")
    alpha: _NonNegative | None = None


LearnedSpec = KnnSpec | CostAwareSpec | BanditSpec
PolicySpec = Annotated[FixedSpec | WeightedSpec | KnnSpec | CostAwareSpec | BanditSpec, Field(discriminator="type")]
