"""The audit trail of HTTP API calls: what is recorded, how it is masked, how it is stored.

A row (:class:`CallRecord`) says who called (the key's id, the source address), what
(method, path, query, the JSON body with its secrets masked), when, the answer's status,
how long it took, and what the call created (order numbers, command and job ids read from
the answer). :func:`mask` and :func:`mask_text` hide secrets: values of keys named like
``secret``, ``password``, ``token``, ``api_key`` or ``...key``, and anything that looks
like a chargegw API key (``cgw_...``), a webhook secret (``whsec_...``) or a bearer token.

Storing, with group commit (:class:`CallAuditWriter`): the API awaits
:meth:`CallAuditWriter.record` before it sends a call's answer, so a client that saw an
answer knows its call is on record. Rows that arrive while a write is in flight are
written together by the next one (a COPY in one transaction): one commit for many calls
under load, one round trip when idle. While the database is unavailable, rows are held in
memory (at most ``max_unsaved``, for :meth:`CallAuditWriter.retry`) and the answer is not
held up; a row that cannot be kept (the buffer overflows, the database refuses its values,
the process stops with rows unsaved) is written to the log at error level, never dropped
silently. A crash between a call's own commit and its audit row's loses that row; the
client then got no answer.

:func:`purge` deletes rows past the retention in batches, one process at a time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import asyncpg
import structlog
from pydantic import BaseModel, Field

from chargegw.domain.pages import Page, Where, page_of
from chargegw.metrics import Metrics
from chargegw.store import errors as store_errors
from chargegw.store.database import Connection
from chargegw.store.values import safe_json, safe_text

__all__ = [
    "BODY_LIMIT",
    "AuditedCall",
    "CallAuditWriter",
    "CallRecord",
    "audit_body",
    "created_refs",
    "is_json",
    "is_secret_name",
    "list_calls",
    "mask",
    "mask_query",
    "mask_text",
    "purge",
    "upkeep",
]

log = structlog.get_logger("chargegw.domain.call_audit")

#: the masked body kept in a row, in bytes of JSON text
BODY_LIMIT = 8 * 1024
#: what the masked value of a secret reads
MASKED = "***"
#: longest a read query may run
QUERY_TIMEOUT_S = 10.0
#: longest a write may wait for a connection and run before its rows are held for a retry
WRITE_TIMEOUT_S = 2.0
#: after a failed write, rows go straight to the retry buffer this long
BACKOFF_S = 1.0
#: rows per COPY
MAX_BATCH = 500
#: rows held in memory while the database is unavailable
MAX_UNSAVED = 10_000
#: how often :func:`upkeep` retries held rows, and purges
RETRY_EVERY_S = 5.0
PURGE_EVERY_S = 600.0
#: rows deleted per purge transaction
PURGE_BATCH = 5000
#: ids of one kind read from an answer, at most
MAX_REFS = 100
#: JSON nodes of an answer looked at, at most
_MAX_NODES = 10_000

_COLUMNS = (
    "at",
    "request_id",
    "key_id",
    "key_name",
    "key_fingerprint",
    "auth_failure",
    "source",
    "method",
    "path",
    "query",
    "body",
    "body_excerpt",
    "body_bytes",
    "status",
    "duration_ms",
    "device_id",
    "order_nos",
    "command_ids",
    "job_ids",
    "resource_id",
)


def _safe(text: str | None) -> str | None:
    return None if text is None else safe_text(text)


class CallRecord(NamedTuple):
    """One audited call, in the column order of ``call_audit`` (written with COPY)."""

    at: dt.datetime
    request_id: str
    key_id: str | None
    key_name: str | None
    key_fingerprint: str | None
    auth_failure: str | None
    source: str | None
    method: str
    path: str
    query: str
    #: masked JSON text, at most :data:`BODY_LIMIT` bytes
    body: str | None
    body_excerpt: str | None
    body_bytes: int
    status: int
    duration_ms: float
    device_id: str | None
    order_nos: list[str]
    command_ids: list[int]
    job_ids: list[int]
    resource_id: str | None

    def storable(self) -> CallRecord:
        """The row with every text made storable (no NUL, no lone surrogate)."""
        return self._replace(
            request_id=safe_text(self.request_id),
            key_id=_safe(self.key_id),
            key_name=_safe(self.key_name),
            key_fingerprint=_safe(self.key_fingerprint),
            auth_failure=_safe(self.auth_failure),
            source=_safe(self.source),
            method=safe_text(self.method),
            path=safe_text(self.path),
            query=safe_text(self.query),
            body_excerpt=_safe(self.body_excerpt),
            device_id=_safe(self.device_id),
            order_nos=[safe_text(n) for n in self.order_nos],
            resource_id=_safe(self.resource_id),
        )

    def summary(self) -> dict[str, Any]:
        """The row for a log line: everything but the body."""
        shown = self._asdict()
        shown.pop("body")
        shown.pop("body_excerpt")
        shown["at"] = self.at.isoformat()
        return shown


class AuditedCall(BaseModel):
    """One call of the audit trail."""

    id: int
    at: dt.datetime = Field(description="when the request arrived")
    request_id: str = Field(description="the `X-Request-Id` of the answer")
    key_id: str | None = Field(description="the API key's id; null when no key was identified")
    key_name: str | None
    key_fingerprint: str | None = Field(
        description="the first 16 hex digits of the SHA-256 of the key presented: the start "
        "of the stored key's `key_hash`"
    )
    auth_failure: str | None = Field(description="why the key was refused, if it was")
    source: str | None = Field(description="the client's address", examples=["203.0.113.7"])
    method: str = Field(examples=["POST"])
    path: str = Field(examples=["/api/v1/devices/04CEAA40/ports/1/start"])
    query: str = Field(description="the query string, secrets masked")
    body: Any = Field(description="the JSON body with secrets masked, when at most 8 KiB")
    body_excerpt: str | None = Field(
        description="a longer JSON body: its first 8 KiB, masked; null otherwise"
    )
    body_bytes: int = Field(description="the size of the body as sent")
    status: int = Field(examples=[202])
    duration_ms: float
    device_id: str | None = Field(description="the device the path names")
    order_nos: list[str] = Field(description="order numbers in the answer")
    command_ids: list[int] = Field(description="command ids in the answer")
    job_ids: list[int] = Field(description="job ids in the answer")
    resource_id: str | None = Field(description="the `id` of what the call answered with")


# ---------------------------------------------------------------- masking

_SECRET_WORDS = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "token",
        "tokens",
        "apikey",
        "apikeys",
        "credential",
        "credentials",
        "authorization",
    }
)
_LAST_WORDS = frozenset({"key", "keys"})
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_WORDS = re.compile(r"[a-z0-9]+")
_SECRET_VALUES = (
    (re.compile(r"cgw_[A-Za-z0-9_\-]{6,}"), "cgw_" + MASKED),
    (re.compile(r"whsec_[A-Za-z0-9+/=_\-]{6,}"), "whsec_" + MASKED),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+"), r"\1 " + MASKED),
)
#: a JSON member whose value is a string, a number or a boolean, in text that may be cut
_JSON_MEMBER = re.compile(
    r'"((?:[^"\\]|\\.)*)"(\s*:\s*)(?:"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+\-]*|true|false)'
)


def is_secret_name(name: str) -> bool:
    """Whether a field or parameter named ``name`` holds a secret: a word like secret,
    password or token anywhere in it, or ``key`` as its last word (``api_key``,
    ``signingKey``; not ``key_id``)."""
    words = _WORDS.findall(_CAMEL.sub(r"\1_\2", name).lower())
    if not words:
        return False
    return words[-1] in _LAST_WORDS or any(w in _SECRET_WORDS for w in words)


def mask_text(text: str) -> str:
    """``text`` with API keys, webhook secrets and bearer tokens in it masked."""
    if "cgw_" not in text and "whsec_" not in text and not _maybe_token(text):
        return text
    for pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    return text


def _maybe_token(text: str) -> bool:
    lowered = text.lower()
    return "bearer" in lowered or "basic" in lowered


def mask(value: Any) -> Any:
    """A JSON value with the values of secret-named members masked (``"***"``; null and
    empty values stay as they are, to show their absence) and secrets in strings masked."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and infinities: not JSON, jsonb would refuse the row
    if isinstance(value, dict):
        return {
            k: (MASKED if v not in (None, "") else v) if is_secret_name(str(k)) else mask(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def _mask_members(text: str) -> str:
    """JSON text (maybe cut short) with string values of secret-named members masked."""

    def member(match: re.Match[str]) -> str:
        if is_secret_name(match.group(1)):
            return f'"{match.group(1)}"{match.group(2)}"{MASKED}"'
        return match.group(0)

    return mask_text(_JSON_MEMBER.sub(member, text))


def mask_query(query: str) -> str:
    """A query string with secret-named parameters and secret-looking values masked."""
    if not query:
        return ""
    parts = []
    for part in query.split("&"):
        name, sep, _ = part.partition("=")
        parts.append(f"{name}{sep}{MASKED}" if sep and is_secret_name(name) else part)
    return mask_text("&".join(parts))


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` bytes of ``text`` in UTF-8, cut at a character boundary."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type is JSON (``application/json`` or ``application/...+json``)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def audit_body(
    raw: bytes, content_type: str | None, complete: bool
) -> tuple[str | None, str | None]:
    """(masked JSON text, excerpt) of a request body for its row.

    A JSON body (``content_type``), read whole (``complete``), that decodes: masked, as
    JSON text if that is at most :data:`BODY_LIMIT` bytes, else its first
    :data:`BODY_LIMIT` bytes as the excerpt. JSON that does not decode, or was not read
    whole: an excerpt of the text, masked as far as text can be. Other bodies: neither
    (the row keeps their size).
    """
    if not raw or not is_json(content_type):
        return None, None
    text = raw.decode("utf-8", "replace")
    if complete:
        try:
            masked = safe_json(mask(json.loads(text)))
        except (ValueError, RecursionError):
            pass  # not JSON, or nested too deep to walk: the text's excerpt
        else:
            if len(masked.encode()) <= BODY_LIMIT:
                return masked, None
            return None, _cut(masked, BODY_LIMIT)
    return None, _cut(_mask_members(text), BODY_LIMIT)


# ---------------------------------------------------------------- what a call created


class Refs(NamedTuple):
    """What an answer names: order numbers, command ids, job ids, its own ``id``."""

    order_nos: list[str]
    command_ids: list[int]
    job_ids: list[int]
    resource_id: str | None


def _ints(value: Any) -> Iterator[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif isinstance(value, list):
        yield from (v for v in value if isinstance(v, int) and not isinstance(v, bool))


def created_refs(answer: Any) -> Refs:
    """The order numbers (``order_no``), command ids (``command_id``, ``command_ids``,
    ``..._command_id``) and job ids (``job_id``) anywhere in a JSON answer, each kind at
    most :data:`MAX_REFS`, and the answer's top-level ``id``."""
    orders: dict[str, None] = {}
    commands: dict[int, None] = {}
    jobs: dict[int, None] = {}
    resource = None
    if isinstance(answer, dict) and answer.get("id") is not None:
        found = answer["id"]
        resource = str(found) if isinstance(found, str | int) else None
    stack = [answer]
    seen = 0
    while stack and seen < _MAX_NODES:
        node = stack.pop()
        seen += 1
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for name, value in node.items():
            if name == "order_no" and isinstance(value, str):
                orders[value] = None
            elif name in ("command_id", "command_ids") or str(name).endswith("_command_id"):
                commands.update(dict.fromkeys(_ints(value)))
            elif name in ("job_id", "job_ids"):
                jobs.update(dict.fromkeys(_ints(value)))
            elif isinstance(value, dict | list):
                stack.append(value)
    return Refs(list(orders)[:MAX_REFS], list(commands)[:MAX_REFS], list(jobs)[:MAX_REFS], resource)


# ---------------------------------------------------------------- storing


class CallAuditWriter:
    """Writes audit rows with group commit; holds them while the database is away.

    ``pool`` is read at every write (it may be None while there is none). ``clock`` is
    injectable for tests. See the module docstring for what happens to a row that cannot
    be written.
    """

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | None],
        metrics: Metrics | None = None,
        *,
        max_batch: int = MAX_BATCH,
        max_unsaved: int = MAX_UNSAVED,
        timeout_s: float = WRITE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self.max_batch = max_batch
        self.max_unsaved = max_unsaved
        self.timeout_s = timeout_s
        self._clock = clock
        self._pending: list[tuple[CallRecord, asyncio.Future[bool]]] = []
        self._unsaved: collections.deque[CallRecord] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._failing_until = 0.0
        self._failing_reason: str | None = None

    @property
    def unsaved(self) -> int:
        """Rows held for a retry."""
        return len(self._unsaved)

    async def record(self, row: CallRecord) -> bool:
        """Store ``row``; True once it is committed, False when it is held for a retry.

        Cancelling the caller does not cancel the write."""
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[bool] = loop.create_future()
        self._pending.append((row.storable(), stored))
        self._start(loop)
        return await asyncio.shield(stored)

    async def retry(self) -> None:
        """Write the rows held for a retry (and wait for that write)."""
        if self._unsaved:
            self._failing_until = 0.0
            self._start(asyncio.get_running_loop())
        if self._task is not None:
            await asyncio.wait({self._task})

    async def close(self) -> None:
        """Finish the write in flight; log every row still held (they would be lost)."""
        if self._task is not None:
            await asyncio.wait({self._task})
        while self._unsaved:
            row = self._unsaved.popleft()
            log.error("call audit row not stored: the process stops", **row.summary())
            self._lost("shutdown")
        self._gauge()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="call-audit-write")
            self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("call audit writer failed", exc_info=task.exception())

    async def _run(self) -> None:
        while True:
            batch = self._pending[: self.max_batch]
            del self._pending[: len(batch)]
            failing = self._clock() < self._failing_until
            older: list[CallRecord] = []
            if not failing:
                room = self.max_batch - len(batch)
                older = [self._unsaved.popleft() for _ in range(min(room, len(self._unsaved)))]
            if not batch and not older:
                return
            rows = [row for row, _ in batch]
            stored = False
            try:
                if failing:
                    self._keep(rows)
                else:
                    stored = await self._write(older, rows)
            except BaseException:
                # a defect, or the loop going away: hold the rows, answer the callers
                self._keep([*older, *rows])
                raise
            finally:
                for _, done in batch:
                    if not done.done():
                        done.set_result(stored)
                self._gauge()

    async def _write(self, older: list[CallRecord], rows: list[CallRecord]) -> bool:
        """Write ``older`` (held rows) and ``rows``; on failure hold them all."""
        pool = self._pool()
        if pool is None:
            self._failed(older, rows, "no database pool")
            return False
        try:
            async with asyncio.timeout(self.timeout_s):
                async with pool.acquire() as conn:
                    await _insert(conn, [*older, *rows])
        except store_errors.DB_ERRORS as exc:
            if store_errors.is_row_error(exc):
                return await self._one_by_one(pool, [*older, *rows])
            self._failed(older, rows, store_errors.reason(exc))
            return False
        self._recovered()
        return True

    async def _one_by_one(self, pool: asyncpg.Pool, rows: list[CallRecord]) -> bool:
        """A batch the database refused for a row's values: each row alone, the refused
        ones logged."""
        for i, row in enumerate(rows):
            try:
                async with asyncio.timeout(self.timeout_s):
                    async with pool.acquire() as conn:
                        await _insert(conn, [row])
            except store_errors.DB_ERRORS as exc:
                if not store_errors.is_row_error(exc):
                    self._failed([], rows[i:], store_errors.reason(exc))
                    return False
                log.error("call audit row refused by the database", error=str(exc), **row.summary())
                self._lost("rejected")
        self._recovered()
        return True

    def _failed(self, older: list[CallRecord], rows: list[CallRecord], reason: str) -> None:
        self._unsaved.extendleft(reversed(older))
        self._keep(rows)
        self._failing_until = self._clock() + BACKOFF_S
        if self._failing_reason is None:
            log.warning("call audit rows held: the database is unavailable", reason=reason)
        self._failing_reason = reason

    def _recovered(self) -> None:
        self._failing_until = 0.0
        if self._failing_reason is not None:
            log.info("call audit rows stored again", held=len(self._unsaved))
        self._failing_reason = None

    def _keep(self, rows: list[CallRecord]) -> None:
        self._unsaved.extend(rows)
        while len(self._unsaved) > self.max_unsaved:
            row = self._unsaved.popleft()
            log.error("call audit row not stored: too many held", **row.summary())
            self._lost("overflow")

    def _lost(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.api_audit_lost_total.labels(reason=reason).inc()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.api_audit_unsaved.set(len(self._unsaved))

    def purged(self, deleted: int | None) -> None:
        """Count a purge pass in the housekeeping metrics (None: it failed)."""
        if self._metrics is None:
            return
        if deleted is None:
            self._metrics.housekeeping_failed("call_audit")
        else:
            self._metrics.housekeeping_done("call_audit", deleted=deleted)


async def _insert(conn: Connection, rows: list[CallRecord]) -> None:
    await conn.copy_records_to_table(
        "call_audit", records=rows, columns=_COLUMNS, timeout=WRITE_TIMEOUT_S
    )


@dataclasses.dataclass
class _Schedule:
    next_purge: float = 0.0


async def upkeep(
    writer: CallAuditWriter,
    pool: Callable[[], asyncpg.Pool | None],
    retention_days: int,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run forever: retry held rows every :data:`RETRY_EVERY_S`, purge rows older than
    ``retention_days`` every :data:`PURGE_EVERY_S` (errors are logged and retried)."""
    schedule = _Schedule()
    while True:
        await writer.retry()
        current = pool()
        if current is not None and clock() >= schedule.next_purge:
            schedule.next_purge = clock() + PURGE_EVERY_S
            try:
                writer.purged(await purge(current, retention_days))
            except store_errors.DB_ERRORS as exc:
                writer.purged(None)
                log.warning("call audit purge failed, retrying", reason=store_errors.reason(exc))
                schedule.next_purge = clock() + RETRY_EVERY_S * 12
        await asyncio.sleep(RETRY_EVERY_S)


async def purge(pool: asyncpg.Pool, retention_days: int, *, batch: int = PURGE_BATCH) -> int:
    """Delete rows older than ``retention_days``, ``batch`` per transaction, while no other
    process is purging; the number deleted."""
    total = 0
    while True:
        async with pool.acquire(timeout=WRITE_TIMEOUT_S) as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext('chargegw.call_audit_purge'))"
            )
            if not locked:
                return total
            deleted = await conn.fetchval(
                """WITH gone AS (
                       DELETE FROM call_audit WHERE id IN (
                           SELECT id FROM call_audit
                            WHERE at < now() - make_interval(days => $1)
                            ORDER BY at LIMIT $2)
                       RETURNING 1)
                   SELECT count(*) FROM gone""",
                retention_days,
                batch,
                timeout=QUERY_TIMEOUT_S,
            )
        total += int(deleted)
        if deleted < batch:
            return total


# ---------------------------------------------------------------- reading


async def list_calls(
    conn: Connection,
    *,
    key_id: str | None = None,
    method: str | None = None,
    path_prefix: str | None = None,
    status: int | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    device_id: str | None = None,
    order_no: str | None = None,
    before: int | None = None,
    limit: int,
) -> Page[AuditedCall]:
    """Calls newest first (by id), filtered, with ids below ``before``; ``since``
    inclusive, ``until`` exclusive, ``path_prefix`` a plain prefix (no wildcards)."""
    where = Where()
    if key_id is not None:
        where.add("key_id = {}", key_id)
    if method is not None:
        where.add("method = {}", method)
    if path_prefix:
        escaped = path_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.add("path LIKE {} || '%'", escaped)
    if status is not None:
        where.add("status = {}", status)
    if since is not None:
        where.add("at >= {}", since)
    if until is not None:
        where.add("at < {}", until)
    if device_id is not None:
        where.add("device_id = {}", device_id)
    if order_no is not None:
        where.add("order_nos @> ARRAY[{}]::text[]", order_no)
    if before is not None:
        where.add("id < {}", before)
    query = f"""SELECT id, {", ".join(_COLUMNS)} FROM call_audit {where.sql()}
                 ORDER BY id DESC {where.limit(limit)}"""
    rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    items = [
        AuditedCall(**{**dict(r), "body": None if r["body"] is None else json.loads(r["body"])})
        for r in rows
    ]
    return page_of(items, limit)
