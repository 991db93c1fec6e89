"""Why a domain service refuses a request, for the API to answer with a status.

``detail`` is a message, or a dict with ``error`` (the message), ``field`` and keys of
the refusal's own (``commands``, ``conflict`` ...).
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request refused; ``detail`` is the answer's message or a dict (see above)."""

    def __init__(self, detail: str | dict[str, Any]) -> None:
        super().__init__(detail if isinstance(detail, str) else detail.get("error", ""))
        self.detail = detail


class NotFoundError(RequestError):
    """Something the request names does not exist (404)."""


class ConflictError(RequestError):
    """The request conflicts with the current state (409)."""


class InvalidError(RequestError):
    """The request cannot be carried out as given (422)."""
