"""The console's pages, its sign-in and sign-out, and the headers that guard them.

Signing in takes an API key (a form POST, checked like an API call's key) and opens a
session (:mod:`chargegw.domain.console_sessions`): the browser keeps its token in an
HttpOnly, SameSite=Strict cookie, and the page carries the session's CSRF token, which
the modules send in ``X-CSRF-Token`` with every request that changes something. The API
authenticates such a request by its session (:func:`chargegw.api.app.require_api_key`),
so scopes, device limits, validation, rate limits and the call audit are the API's.
Without keys (localhost mode) a page opens a local session by itself and says so.

Every console answer carries a Content-Security-Policy without inline scripts or styles,
``X-Frame-Options: DENY`` and ``nosniff``; templates autoescape everything.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import urllib.parse
from pathlib import Path
from typing import Any

import jinja2
import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chargegw import __version__
from chargegw.api import app as api_app
from chargegw.api.app import ApiState
from chargegw.api.errors import RETRY_AFTER_S
from chargegw.console import i18n
from chargegw.domain import auth, console_sessions
from chargegw.domain.event_types import EVENT_TYPES
from chargegw.store import errors as store_errors

__all__ = ["CSP", "PAGES", "install"]

log = structlog.get_logger("chargegw.console")

ROOT = "/console"
STATIC = f"{ROOT}/static"
LANG_COOKIE = "chargegw_lang"
#: the largest sign-in form read
MAX_FORM_BYTES = 4096

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]

_DIR = Path(__file__).parent
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_DIR / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclasses.dataclass(frozen=True)
class Page:
    """A console page: its path under ``/console``, template, module and scope."""

    name: str
    path: str
    template: str
    scope: auth.Scope = auth.Scope.READ
    #: shown in the navigation
    nav: bool = True


#: the pages, in the navigation's order; each template names its module
PAGES: tuple[Page, ...] = (
    Page("overview", "/", "overview.html"),
    Page("devices", "/devices", "devices.html"),
    Page("device", "/devices/{device_id}", "device.html", nav=False),
    Page("orders", "/orders", "orders.html"),
    Page("order", "/orders/{order_no}", "order.html", nav=False),
    Page("billing", "/billing", "billing.html", auth.Scope.BILLING),
    Page("params", "/params", "params.html", auth.Scope.READ),
    Page("firmware", "/firmware", "firmware.html", auth.Scope.READ),
    Page("admin", "/admin", "admin.html", auth.Scope.ADMIN),
)


@dataclasses.dataclass(frozen=True)
class Viewer:
    """Who looks at a page: the session's key, its CSRF token, the page's language."""

    key: auth.ApiKeyInfo
    csrf_token: str
    lang: str
    #: the console runs without keys (localhost mode)
    local: bool


class _SignInRequiredError(Exception):
    pass


class _ForbiddenHostError(Exception):
    """Localhost mode, reached under a name that is not loopback (DNS rebinding)."""


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.chargegw
    return state


def _lang(request: Request) -> str:
    return i18n.negotiate(request.cookies.get(LANG_COOKIE), request.headers.get("accept-language"))


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _set_session_cookie(response: Response, request: Request, token: str, max_age: float) -> None:
    response.set_cookie(
        api_app.SESSION_COOKIE,
        token,
        max_age=int(max_age),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


async def _viewer(request: Request) -> tuple[Viewer, str | None]:
    """The viewer of a page request, and the token of a session opened for it (localhost
    mode); :class:`_SignInRequiredError` without a live session whose key may be used from
    here in the console."""
    state = _state(request)
    lang = _lang(request)
    token = request.cookies.get(api_app.SESSION_COOKIE)
    if state.pool is None:
        raise api_app.DatabaseUnavailableError("no database pool")
    if not state.auth_required:
        try:
            api_app.check_local_host(request, state)
        except auth.KeyRefusedError:
            raise _ForbiddenHostError from None
    async with state.pool.acquire(timeout=auth.LOOKUP_TIMEOUT_S) as conn:
        session = None
        if token:
            session = await console_sessions.session_for(
                conn, token, idle_timeout_s=state.console.idle_timeout_s
            )
        if not state.auth_required:
            if session is not None and session.key_hash == api_app.LOCAL_SESSION:
                return Viewer(auth.LOCAL_KEY, session.csrf_token, lang, local=True), None
            # no session, or one from when keys were configured: a local one now
            new_token, session = await console_sessions.open_session(
                conn, api_app.LOCAL_SESSION, lifetime_s=state.console.session_lifetime_s
            )
            return Viewer(auth.LOCAL_KEY, session.csrf_token, lang, local=True), new_token
    if session is None or session.key_hash == api_app.LOCAL_SESSION:
        raise _SignInRequiredError
    try:
        key = await auth.authenticate_hash(
            state.pool, state.api_keys, session.key_hash, cache=state.key_cache
        )
    except auth.KeyRefusedError:
        raise _SignInRequiredError from None
    if key.hmac_required or not key.allows_address(_client(request)):
        raise _SignInRequiredError
    return Viewer(key, session.csrf_token, lang, local=False), None


def _client(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def _render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    lang: str = context["lang"]
    body = _env.get_template(template).render(
        t=lambda key, **values: i18n.translate(lang, key, **values),
        version=__version__,
        static=STATIC,
        root=ROOT,
        **context,
    )
    return HTMLResponse(body, status_code=status)


def _page_config(request: Request, viewer: Viewer, page: Page, params: dict[str, str]) -> str:
    """What the page's modules start from, as JSON for a ``<script type="application/json">``
    with ``<``, ``>`` and ``&`` escaped, so no string can end the element."""
    state = _state(request)
    config = {
        "page": page.name,
        "params": params,
        "lang": viewer.lang,
        "timezone": state.console.timezone,
        "csrf": viewer.csrf_token,
        "scopes": sorted(s.value for s in viewer.key.scopes),
        "admin": viewer.key.has_scope(auth.Scope.ADMIN),
        "key": {"id": viewer.key.key_id, "name": viewer.key.name},
        "local": viewer.local,
        "strings": i18n.catalogue(viewer.lang),
        "event_types": list(EVENT_TYPES),
        "stream": _stream_filter(viewer.key),
    }
    text = json.dumps(config, ensure_ascii=False)
    # no device string can close the element or open a comment in it
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


#: a key limited to more devices and gateways than this gets no live updates (the URL
#: of the stream names them all)
MAX_STREAM_SUBJECTS = 100


def _stream_filter(key: auth.ApiKeyInfo) -> dict[str, list[str]] | None:
    """The event stream's filter for the key: none for a key that may see every device,
    its devices and gateways for a limited one (the API refuses it an unfiltered stream);
    None (no live updates) when they are too many to name, or for a key without ``read``."""
    if not key.has_scope(auth.Scope.READ):  # the stream is a read
        return None
    if not key.limited_to_devices:
        return {}
    devices = sorted(key.allowed_device_ids or ())
    gateways = sorted(key.allowed_gateway_ids or ())
    if len(devices) + len(gateways) > MAX_STREAM_SUBJECTS:
        return None
    return {"device_id": devices, "gateway_id": gateways}


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path, never another site."""
    if value and value.startswith(ROOT + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return ROOT + "/"


def _sign_in_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = urllib.parse.urlencode({"next": target})
    return RedirectResponse(f"{ROOT}/login?{query}", status_code=303)


def _page_handler(page: Page) -> Any:
    async def handler(request: Request) -> Response:
        try:
            viewer, new_token = await _viewer(request)
        except _SignInRequiredError:
            return _sign_in_redirect(request)
        except _ForbiddenHostError:
            return Response("without API keys the console answers loopback names only", 403)
        except store_errors.DB_ERRORS as exc:
            if not store_errors.is_unavailable(exc):
                raise
            return _unavailable(request, store_errors.reason(exc))
        except api_app.DatabaseUnavailableError as exc:
            return _unavailable(request, exc.reason)
        params = {k: str(v) for k, v in request.path_params.items()}
        allowed = viewer.key.has_scope(page.scope)
        response = _render(
            page.template if allowed else "forbidden.html",
            status=200 if allowed else 403,
            lang=viewer.lang,
            viewer=viewer,
            page=page,
            pages=[p for p in PAGES if p.nav],
            params=params,
            config=_page_config(request, viewer, page, params),
            path=request.url.path,
        )
        if new_token is not None:
            _set_session_cookie(
                response, request, new_token, _state(request).console.session_lifetime_s
            )
        return response

    handler.__name__ = f"console_{page.name}"
    return handler


def _unavailable(request: Request, reason: str) -> HTMLResponse:
    lang = _lang(request)
    response = _render(
        "unavailable.html", status=503, lang=lang, reason=reason, path=request.url.path
    )
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def login_form(request: Request) -> Response:
    """The sign-in page; straight to the console while the API runs without keys."""
    state = _state(request)
    if not state.auth_required:
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    return _render(
        "login.html",
        lang=_lang(request),
        next=_safe_next(request.query_params.get("next")),
        error=None,
        path=request.url.path,
    )


async def login(request: Request) -> Response:
    """Check the key of the sign-in form and open a session: 303 to the console; the form
    again with the reason (401) for a refused key."""
    state = _state(request)
    lang = _lang(request)
    body = await request.body()
    form = urllib.parse.parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace"))
    next_path = _safe_next((form.get("next") or [""])[0])

    def refused(key: str, status: int = 401) -> Response:
        return _render(
            "login.html",
            status=status,
            lang=lang,
            next=next_path,
            error=i18n.translate(lang, key),
            path=request.url.path,
        )

    if len(body) > MAX_FORM_BYTES:
        return refused("login.error_invalid", 413)
    try:
        api_app._check_origin(request)
    except auth.KeyRefusedError:
        return refused("login.error_cross_site", 403)
    if not state.auth_required:
        return RedirectResponse(next_path, status_code=303)
    presented = (form.get("api_key") or [""])[0].strip()
    if state.pool is None:
        return _unavailable(request, "no database pool")
    try:
        info = await auth.authenticate(state.pool, state.api_keys, presented, cache=state.key_cache)
        if not info.allows_address(_client(request)):
            return refused("login.error_network", 403)
        if info.hmac_required:
            return refused("login.error_signed_only", 403)
        async with state.pool.acquire(timeout=auth.LOOKUP_TIMEOUT_S) as conn:
            old = request.cookies.get(api_app.SESSION_COOKIE)
            if old:
                await console_sessions.close(conn, old)
            token, _ = await console_sessions.open_session(
                conn, auth.hash_key(presented), lifetime_s=state.console.session_lifetime_s
            )
    except auth.KeyRefusedError as exc:
        request.state.auth_failure = exc.reason
        state.metrics.api_auth_refused_total.labels(reason=exc.reason.value).inc()
        reason = {
            auth.Reason.MISSING_KEY: "login.error_missing",
            auth.Reason.KEY_EXPIRED: "login.error_expired",
            auth.Reason.KEY_REVOKED: "login.error_revoked",
        }.get(exc.reason, "login.error_invalid")
        return refused(reason)
    except auth.NeedsDatabaseError:
        return _unavailable(request, "no database pool")
    except store_errors.DB_ERRORS as exc:
        if not store_errors.is_unavailable(exc):
            raise
        return _unavailable(request, store_errors.reason(exc))
    log.info("console sign-in", key_id=info.key_id)
    response = RedirectResponse(next_path, status_code=303)
    _set_session_cookie(response, request, token, state.console.session_lifetime_s)
    return response


async def logout(request: Request) -> Response:
    """End the session (the form carries its CSRF token) and go to the sign-in page; the
    cookie stays while the database cannot end the session."""
    state = _state(request)
    token = request.cookies.get(api_app.SESSION_COOKIE)
    body = await request.body()
    form = urllib.parse.parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace"))
    sent = (form.get("csrf") or [""])[0]
    response = RedirectResponse(f"{ROOT}/login", status_code=303)
    if token:
        if state.pool is None:
            return _unavailable(request, "no database pool")
        try:
            async with state.pool.acquire(timeout=auth.LOOKUP_TIMEOUT_S) as conn:
                session = await console_sessions.session_for(
                    conn, token, idle_timeout_s=state.console.idle_timeout_s
                )
                if session is not None and not hmac.compare_digest(
                    sent.encode(), session.csrf_token.encode()
                ):
                    return Response("missing or wrong CSRF token", status_code=403)
                await console_sessions.close(conn, token)
        except store_errors.DB_ERRORS as exc:
            if not store_errors.is_unavailable(exc):
                raise
            return _unavailable(request, store_errors.reason(exc))
    response.delete_cookie(api_app.SESSION_COOKIE, path="/")
    return response


async def choose_language(request: Request) -> Response:
    """``/console/lang/{code}?next=...``: remember the language (a year), back to the page."""
    code = request.path_params["code"]
    response = RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    if code in i18n.LANGUAGES:
        response.set_cookie(
            LANG_COOKIE,
            code,
            max_age=365 * 86400,
            path=ROOT,
            samesite="strict",
            secure=_secure(request),
        )
    return response


class _SecurityHeaders:
    """The console's security headers on every answer under ``/console``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not scope["path"].startswith(ROOT):
            if scope["path"].startswith("/api/") and _has_session_cookie(scope):
                await self.app(scope, receive, _no_store(send))
            else:
                await self.app(scope, receive, send)
            return

        async def add(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
                if not scope["path"].startswith(STATIC):
                    message["headers"].append((b"cache-control", b"no-store"))
            await send(message)

        await self.app(scope, receive, add)


def _has_session_cookie(scope: Scope) -> bool:
    cookie_name = api_app.SESSION_COOKIE.encode() + b"="
    return any(k == b"cookie" and cookie_name in v for k, v in scope.get("headers", []))


def _no_store(send: Send) -> Send:
    """API answers to a console session: never kept by a shared cache."""

    async def add(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {k.lower() for k, _ in headers}
            if b"cache-control" not in names:
                headers.append((b"cache-control", b"no-store"))
            headers.append((b"vary", b"Cookie"))
            headers.append((b"x-content-type-options", b"nosniff"))
            message["headers"] = headers
        await send(message)

    return add


def install(app: FastAPI) -> None:
    """Serve the console on ``app`` (an application of :func:`chargegw.api.app.create_app`)."""
    router = APIRouter(include_in_schema=False)
    router.add_api_route(f"{ROOT}/login", login_form, methods=["GET"])
    router.add_api_route(f"{ROOT}/login", login, methods=["POST"])
    router.add_api_route(f"{ROOT}/logout", logout, methods=["POST"])
    router.add_api_route(f"{ROOT}/lang/{{code}}", choose_language, methods=["GET"])
    for page in PAGES:
        router.add_api_route(ROOT + page.path, _page_handler(page), methods=["GET"])
    app.include_router(router)
    app.add_api_route(ROOT, lambda: RedirectResponse(ROOT + "/"), include_in_schema=False)
    app.mount(STATIC, StaticFiles(directory=_DIR / "static"), name="console-static")
    app.add_middleware(_SecurityHeaders)
