"""The error body every route documents: ``{"error": "..."}``, and its OpenAPI entries."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorResponse(BaseModel):
    error: str


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the given statuses, each with the JSON error body."""
    return {code: {"model": ErrorResponse, "description": what} for code, what in descriptions.items()}
