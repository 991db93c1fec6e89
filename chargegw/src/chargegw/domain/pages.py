"""Keyset pages for the repositories' list queries.

A list query fetches one row more than a page (:meth:`Where.limit`) to know whether
another page follows; :func:`page_of` cuts the rows to the page. The API turns the key
of the last item into its opaque cursor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """Up to a page of items, in the list's order; ``more``: items follow the last one."""

    items: list[T]
    more: bool


def page_of(rows: Sequence[T], limit: int) -> Page[T]:
    """The first ``limit`` of ``rows`` (fetched with :meth:`Where.limit`)."""
    return Page(list(rows[:limit]), len(rows) > limit)


class Where:
    """Collects ``AND``-ed conditions and their numbered parameters."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[Any] = []

    def add(self, condition: str, *values: Any) -> None:
        """``condition`` uses ``{}`` placeholders, one per value, filled with ``$n``."""
        numbers = []
        for value in values:
            self.args.append(value)
            numbers.append(f"${len(self.args)}")
        self.conditions.append(condition.format(*numbers))

    def sql(self) -> str:
        """The ``WHERE`` clause ('' without conditions)."""
        return "WHERE " + " AND ".join(self.conditions) if self.conditions else ""

    def limit(self, limit: int) -> str:
        """A LIMIT clause fetching one row more than a page, to know if another follows."""
        self.args.append(limit + 1)
        return f"LIMIT ${len(self.args)}"
