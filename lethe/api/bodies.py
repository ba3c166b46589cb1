"""The base of every request body: a field the API does not know is refused, not ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Body(BaseModel):
    """A request body; unknown fields are a 422 naming them."""

    model_config = ConfigDict(extra="forbid")
