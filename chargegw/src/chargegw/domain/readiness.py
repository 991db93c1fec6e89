"""What readiness probes ask the database."""

from __future__ import annotations

from chargegw.store.database import Connection


async def read_only(conn: Connection) -> bool:
    """Whether the session is read-only (a standby, or ``default_transaction_read_only``):
    reads pass there, writes do not."""
    setting = await conn.fetchval("SELECT current_setting('transaction_read_only')")
    return bool(setting == "on")
