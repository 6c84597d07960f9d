"""`RouteOptions`: the per-request routing choices a client may send in the body's `turnout` field."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class RouteOptions(BaseModel):
    """The `turnout` body field (the `openai` SDK's `extra_body`): per-request routing choices."""

    model_config = ConfigDict(extra="forbid")

    policy: StrictStr | None = Field(default=None, min_length=1)
    max_cost_usd: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | None = None
    min_quality: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    candidates: list[StrictStr] | None = Field(default=None, min_length=1)
