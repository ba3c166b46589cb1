"""What request bodies and parameters share: the base of every body (a field the API does not
know is refused, not ignored), and the shapes of free text, names and moments."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Body(BaseModel):
    """A request body; unknown fields are a 422 naming them."""

    model_config = ConfigDict(extra="forbid")


def _in_range(moment: datetime) -> datetime:
    """A moment that has a UTC time (year 1 with a positive offset, or 9999 with a negative one,
    has none)."""
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is out of range once in UTC") from None
    return moment


Moment = Annotated[datetime, AfterValidator(_in_range)]
"""A time parameter: refused (422) when it cannot be expressed in UTC."""
TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
"""Free text (a reason, a note): lines and tabs, no other control character (PostgreSQL refuses
a NUL byte; the rest have no business in evidence)."""
NAME = r"^[^\x00-\x1f\x7f]+$"
"""A name on one line: no control character."""
