"""Pydantic models that cross a boundary: workflow and activity inputs and outputs, CLI JSON."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class Contract(BaseModel):
    """Base of every boundary model: immutable, and unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class HealthCheckRequest(Contract):
    """Asks a region's worker to answer, echoing a caller-chosen token."""

    token: str = Field(min_length=1, max_length=200)


class HealthCheckReport(Contract):
    """What the worker that ran the health check says about itself."""

    token: str
    task_queue: str
    worker_identity: str
    answered_at: datetime
