"""Config specs of the routing policies, one pydantic model per registered `type`.

They live here, not in the gateway, so that the routing library can be configured and tested on its
own; the gateway's config embeds `PolicySpec` as a discriminated union on `type`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = None


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


PolicySpec = Annotated[FixedSpec | WeightedSpec, Field(discriminator="type")]
