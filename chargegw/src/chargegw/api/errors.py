"""The one error shape of the HTTP API, and the guards that keep bad input from a 500.

Every 4xx and 5xx JSON answer has the same body (:class:`ErrorResponse`)::

    {"error": {"code": "validation_failed", "message": "limit: Input should be ...",
               "field": "limit", "details": [{"location": "query", "field": "limit", ...}]}}

``code`` is stable and meant for programs (:data:`CODES`; a router may pass its own),
``message`` is for people, ``field`` names the offending parameter or body field when
there is one, ``details`` lists every problem of a request that failed validation. 503
answers add ``reason`` (:class:`UnavailableResponse`). A router may add keys of its own
(``commands``, ``conflict``, ``order_no`` ...): they are documented where it raises them.

Routers keep raising ``HTTPException(status, "message")`` or ``HTTPException(status,
{"error": "message", "field": "port", ...})`` (or :func:`api_error`); the handlers
:func:`install` registers turn both into the shape above. :func:`error_responses` gives
the ``responses=`` of a route decorator for the statuses it can answer.

:func:`check_input` (a dependency :func:`chargegw.api.app.create_app` puts on every API
route) answers 422 for what PostgreSQL or JSON cannot hold, before a route sees it: a
NUL character in a path, query or header value or anywhere in a JSON body, a lone
surrogate in a JSON string, NaN, Infinity or an overflowing number (``1e400``) anywhere,
and an integer outside a signed 64 bits where the route declares an integer (a parameter
or a field of the body's model). :func:`bound_integers` writes that range into the
OpenAPI document.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

__all__ = [
    "CODES",
    "INT64_MAX",
    "INT64_MIN",
    "Error",
    "ErrorDetail",
    "ErrorResponse",
    "UnavailableError",
    "UnavailableResponse",
    "api_error",
    "bound_integers",
    "check_input",
    "error_body",
    "error_response",
    "error_responses",
    "from_detail",
    "install",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: the ``code`` of an error by HTTP status, unless the router gives its own
CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}

#: the code of the 503 a database outage answers
DATABASE_UNAVAILABLE = "database_unavailable"

Location = Literal["path", "query", "header", "cookie", "body"]
_LOCATIONS: frozenset[str] = frozenset(typing.get_args(Location))


# ---------------------------------------------------------------- models


class ErrorDetail(BaseModel):
    """One problem of a request that failed validation."""

    location: Location | None = Field(
        description="where the value was: path, query, header, cookie or body", examples=["query"]
    )
    field: str | None = Field(
        description="the parameter, or the body field as a dotted path (`groups.running1.x`)",
        examples=["limit"],
    )
    type: str = Field(
        description="what is wrong, as a stable word (pydantic's error types and a few more: "
        "`nul_character`, `out_of_range`, `finite_number`, `invalid_unicode`)",
        examples=["greater_than_equal"],
    )
    message: str = Field(examples=["Input should be greater than or equal to 1"])


class Error(BaseModel):
    """What went wrong. Routers may add keys of their own, named where they do."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(
        description="stable, for programs: `validation_failed`, `not_found`, `conflict`, "
        "`unauthorized`, `method_not_allowed`, `database_unavailable`, ...",
        examples=["not_found"],
    )
    message: str = Field(description="for people", examples=["device 04CEAA41 not found"])
    field: str | None = Field(
        default=None,
        description="the parameter or body field the error is about, when there is one",
        examples=[None],
    )
    details: list[ErrorDetail] = Field(
        default_factory=list, description="every problem of a request that failed validation"
    )


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx JSON answer."""

    error: Error


class UnavailableError(Error):
    """A 503: retry after ``Retry-After`` seconds."""

    code: str = Field(
        description="`database_unavailable` while the database is, `service_unavailable` "
        "for anything else",
        examples=[DATABASE_UNAVAILABLE],
    )
    message: str = Field(examples=["database unavailable"])
    reason: str = Field(
        description="why, for people (not for matching)",
        examples=["the database does not accept connections now"],
    )


class UnavailableResponse(BaseModel):
    """The body of a 503: the database (or another dependency) is unavailable now."""

    error: UnavailableError


# ---------------------------------------------------------------- bodies and responses


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    details: Sequence[Mapping[str, Any]] = (),
    **context: Any,
) -> dict[str, Any]:
    """The JSON body of an error answer with ``status``; ``context`` adds keys of its own."""
    error: dict[str, Any] = {
        "code": code or CODES.get(status) or ("internal_error" if status >= 500 else "error"),
        "message": message,
        "field": field,
        "details": [dict(d) for d in details],
    }
    error.update((k, v) for k, v in context.items() if k not in error)
    return {"error": error}


def _json_safe(value: Any) -> Any:
    """``value`` made serialisable as strict JSON: no NaN or Infinity, no stray objects."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v) for v in value]
    return str(value)


def error_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """``body`` (from :func:`error_body`) as a response that always serialises."""
    return JSONResponse(_json_safe(body), status_code=status, headers=dict(headers or {}))


def api_error(
    status: int,
    message: str,
    *,
    field: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTTPException:
    """An ``HTTPException`` the handlers answer in the error shape (raise it)."""
    detail: dict[str, Any] = {**context, "error": message, "field": field}
    if code is not None:
        detail["code"] = code
    return HTTPException(status, detail, headers=dict(headers) if headers else None)


_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request",
    401: "Missing or invalid API key",
    403: "Not allowed",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    503: "Unavailable now: retry after `Retry-After` seconds",
}

#: seconds a client should wait before retrying a 503
RETRY_AFTER_S = 5

RETRY_AFTER_HEADER: dict[str, dict[str, Any]] = {
    "Retry-After": {
        "description": f"seconds to wait before retrying ({RETRY_AFTER_S})",
        "schema": {"type": "integer"},
    }
}


def error_responses(*statuses: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route for the error statuses it answers, in the error shape.

    A status may come with its own description: ``error_responses((404, "No such
    device"), 409)``. 401, 422 and 503 are documented for every API route already.
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for item in statuses:
        status, description = item if isinstance(item, tuple) else (item, None)
        response: dict[str, Any] = {
            "model": UnavailableResponse if status == 503 else ErrorResponse,
            "description": description or _DESCRIPTIONS.get(status, "Error"),
        }
        if status == 503:
            response["headers"] = RETRY_AFTER_HEADER
        elif status == 401:
            response["headers"] = {
                "WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}
            }
        responses[status] = response
    return responses


# ---------------------------------------------------------------- handlers


def from_detail(status: int, detail: Any) -> dict[str, Any]:
    """An ``HTTPException``'s detail (a string, or a dict with ``error``/``field`` and
    keys of the router's own) as the error body."""
    if isinstance(detail, Mapping):
        context = {
            str(k): v
            for k, v in detail.items()
            if k not in ("error", "message", "code", "field", "details")
        }
        message = detail.get("error", detail.get("message"))
        field = detail.get("field")
        return error_body(
            status,
            str(message) if message is not None else _phrase(status),
            code=str(detail["code"]) if detail.get("code") else None,
            field=str(field) if field is not None else None,
            **context,
        )
    return error_body(status, str(detail) if detail is not None else _phrase(status))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


#: what FastAPI answers (400) when a JSON body cannot even be decoded (bad UTF-8, nesting)
_UNPARSEABLE_BODY = "There was an error parsing the body"


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """``HTTPException`` (the routers', and Starlette's 404 and 405) in the error shape."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        headers["Allow"] = allowed
    if exc.status_code == 400 and exc.detail == _UNPARSEABLE_BODY:
        detail = {"location": "body", "field": None, "type": "json_invalid"}
        body = error_body(
            422, "the body is not valid JSON", details=[{**detail, "message": exc.detail}]
        )
        return error_response(422, body, headers)
    return error_response(exc.status_code, from_detail(exc.status_code, exc.detail), headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """The methods the requested path answers to, over every route that matches it (a
    path served by several routes, one per method, lists them all): each method is
    matched against the app's routes as a request of its own would be."""
    allowed = []
    for method in _METHODS:
        scope = {
            "type": "http",
            "method": method,
            "path": request.scope["path"],
            "root_path": request.scope.get("root_path", ""),
            "headers": [],
            "query_string": b"",
        }
        for route in request.app.router.routes:
            if isinstance(route, Mount):  # only the docs' assets: GET and HEAD
                matched = isinstance(route.app, StaticFiles) and method in ("GET", "HEAD")
                matched = matched and route.matches(scope)[0] is not Match.NONE
            else:
                matched = route.matches(scope)[0] is Match.FULL
            if matched:
                allowed.append(method)
                break
    return ", ".join(allowed)


def _details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    details = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        location = loc[0] if loc and loc[0] in _LOCATIONS else None
        path = loc[1:] if location else loc
        details.append(
            {
                "location": location,
                "field": ".".join(path) or None,
                "type": str(error.get("type", "value_error")),
                "message": str(error.get("msg", "invalid value")),
            }
        )
    return details


async def validation_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation errors (and :func:`check_input`'s) as one 422.

    The input is not echoed: it may be what cannot be serialised (NaN, a NUL).
    """
    assert isinstance(exc, RequestValidationError)
    details = _details(exc.errors())
    messages = [f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details]
    field = details[0]["field"] if details else None
    body = error_body(422, "; ".join(messages) or "invalid input", field=field, details=details)
    return error_response(422, body)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A defect: 500 in the error shape. Starlette raises the exception on after this
    answer, so the server still logs it with its traceback."""
    return error_response(500, error_body(500, "internal server error"))


def install(app: FastAPI) -> None:
    """Answer every HTTP error of ``app`` in the error shape, and document it."""
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    app.add_exception_handler(Exception, internal_error_handler)


# ---------------------------------------------------------------- input guards


class _Problem(typing.NamedTuple):
    loc: tuple[str | int, ...]
    type: str
    msg: str


_SEQUENCES = (list, tuple, set, frozenset, Sequence)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_ISO_8601: dict[type, str] = {
    dt.datetime: "an ISO 8601 date and time (2024-05-01T08:00:00Z)",
    dt.date: "an ISO 8601 date (2024-05-01)",
    dt.time: "an ISO 8601 time (08:00:00)",
    dt.timedelta: "an ISO 8601 duration (PT15M)",
}
_INT64_MESSAGE = f"must be an integer from {INT64_MIN} to {INT64_MAX} (64 bits)"


def _scalar_type(annotation: Any) -> type | None:
    """``int`` for ``int``, ``int | None``, ``Annotated[int, ...]``, ``list[int]``; ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _scalar_type(args[0])
    if origin in (typing.Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        return _scalar_type(present[0]) if len(present) == 1 else None
    if origin in _SEQUENCES:
        return _scalar_type(args[0]) if args else None
    return annotation if isinstance(annotation, type) else None


def _parameter_problems(
    location: str, name: str, raw: str, kind: type | None
) -> Iterator[_Problem]:
    if "\x00" in raw:
        yield _Problem((location, name), "nul_character", "must not contain a NUL character")
        return
    if kind is None or issubclass(kind, bool):
        return
    if issubclass(kind, int):
        try:
            number = decimal.Decimal(raw.strip().replace("_", ""))
        except decimal.InvalidOperation:
            return  # not a number: the parameter's own validation says so
        integral = number.is_finite() and number == number.to_integral_value()
        if integral and not INT64_MIN <= number <= INT64_MAX:
            yield _Problem((location, name), "out_of_range", _INT64_MESSAGE)
    elif issubclass(kind, float):
        try:
            value = float(raw)
        except ValueError:
            return
        if not math.isfinite(value):
            yield _Problem((location, name), "finite_number", "must be a finite number")
    elif issubclass(kind, dt.date | dt.time | dt.timedelta) and _NUMBER.fullmatch(raw.strip()):
        # pydantic would read a number as a Unix timestamp (or seconds)
        yield _Problem((location, name), "iso_8601", f"must be {_ISO_8601.get(kind, 'ISO 8601')}")


def _body_problems(body: Any) -> Iterator[_Problem]:
    """What PostgreSQL or strict JSON cannot take anywhere in a decoded JSON body: NaN and
    infinities, NUL characters, lone surrogates."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [(("body",), body)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            yield from _text_problems(loc, value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                message = "must be a finite number (no NaN, Infinity or overflow such as 1e400)"
                yield _Problem(loc, "finite_number", message)
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from _text_problems((*loc, key), key)
                stack.append(((*loc, key), item))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in enumerate(value))


def _declared_problems(
    annotation: Any, value: Any, loc: tuple[str | int, ...]
) -> Iterator[_Problem]:
    """Where the body's model declares a type, the JSON value must be of that JSON type, as
    the OpenAPI document says (pydantic would coerce ``0`` to false, ``"5"`` to 5, a number
    to a timestamp), and an integer must fit in 64 bits. Free-form values (``Any``) are the
    domain's to check."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        yield from _declared_problems(args[0], value, loc)
    elif origin in (typing.Union, types.UnionType):
        first: list[_Problem] | None = None
        for arg in args:  # fine when one branch takes the value
            problems = list(_declared_problems(arg, value, loc))
            if not problems:
                return
            first = first if first is not None else problems
        yield from first or ()
    elif annotation is type(None):
        if value is not None:
            yield _Problem(loc, "none_required", "must be null")
    elif origin in _SEQUENCES and isinstance(value, list) and args:
        variadic = origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)
        for i, item in enumerate(value):
            if variadic or i < len(args):
                yield from _declared_problems(args[0] if variadic else args[i], item, (*loc, i))
    elif origin in (dict, Mapping) and isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            yield from _declared_problems(args[1], item, (*loc, key))
    elif not isinstance(annotation, type):
        return
    elif issubclass(annotation, BaseModel):
        if isinstance(value, dict):
            for name, info in annotation.model_fields.items():
                key = info.validation_alias
                key = key if isinstance(key, str) else info.alias or name
                if key in value:
                    yield from _declared_problems(info.annotation, value[key], (*loc, key))
    elif issubclass(annotation, bool):
        if not isinstance(value, bool):
            yield _Problem(loc, "bool_type", "must be true or false")
    elif issubclass(annotation, int) and not issubclass(annotation, enum.Enum):
        if isinstance(value, float):
            if not math.isfinite(value):
                return  # _body_problems says so
            integral = value.is_integer()
        else:
            integral = isinstance(value, int) and not isinstance(value, bool)
        if not integral:
            yield _Problem(loc, "int_type", "must be an integer")
        elif not INT64_MIN <= value <= INT64_MAX:
            yield _Problem(loc, "out_of_range", _INT64_MESSAGE)
    elif issubclass(annotation, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            yield _Problem(loc, "float_type", "must be a number")
    elif issubclass(annotation, dt.date | dt.time | dt.timedelta) and not isinstance(value, str):
        yield _Problem(loc, "iso_8601", f"must be {_ISO_8601.get(annotation, 'ISO 8601')}")


def _text_problems(loc: tuple[str | int, ...], text: str) -> Iterator[_Problem]:
    if "\x00" in text:
        yield _Problem(loc, "nul_character", "must not contain a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        yield _Problem(loc, "invalid_unicode", "must not contain a lone surrogate (\\ud800...)")


_Kinds = dict[tuple[str, str], type | None]
#: _parameter_types by id of the dependant (kept with it: an id can be reused)
_kinds_cache: dict[int, tuple[Dependant, _Kinds]] = {}


def _parameter_types(dependant: Dependant) -> _Kinds:
    """The scalar type of every path, query and header parameter of a route and of its
    dependencies, by (location, name); a model of parameters counts by its fields."""
    cached = _kinds_cache.get(id(dependant))
    if cached is not None and cached[0] is dependant:
        return cached[1]
    kinds: _Kinds = {}
    stack = [dependant]
    while stack:
        current = stack.pop()
        stack.extend(current.dependencies)
        for location, fields in (
            ("path", current.path_params),
            ("query", current.query_params),
            ("header", current.header_params),
        ):
            for field in fields:
                annotation = field.field_info.annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    for name, info in annotation.model_fields.items():
                        kinds[(location, info.alias or name)] = _scalar_type(info.annotation)
                else:
                    kinds[(location, field.alias)] = _scalar_type(annotation)
    if len(_kinds_cache) > 4096:  # apps made and dropped (tests): start again
        _kinds_cache.clear()
    _kinds_cache[id(dependant)] = (dependant, kinds)
    return kinds


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def check_input(request: Request) -> None:
    """422 for input PostgreSQL or JSON cannot hold, before the route sees it.

    Runs as a dependency, so the route (and its parameter types) is known: integers are
    checked only where the route declares an integer.
    """
    problems: list[_Problem] = []
    route = request.scope.get("route")
    kinds = _parameter_types(route.dependant) if isinstance(route, APIRoute) else {}
    for name, raw in request.path_params.items():
        if isinstance(raw, str):
            problems += _parameter_problems("path", name, raw, kinds.get(("path", name)))
    for name, raw in request.query_params.multi_items():
        problems += _parameter_problems("query", name, raw, kinds.get(("query", name)))
    for (location, name), kind in kinds.items():
        if location == "header" and (raw := request.headers.get(name.replace("_", "-"))):
            problems += _parameter_problems("header", name, raw, kind)
    if (
        isinstance(route, APIRoute)
        and route.body_field is not None
        and _is_json(request.headers.get("content-type"))
        and await request.body()
    ):
        try:
            body = await request.json()  # decoded already for the route: cached
        except (ValueError, RecursionError):
            body = None  # the route's own body validation answers for it
        problems += _body_problems(body)
        problems += _declared_problems(route.body_field.field_info.annotation, body, ("body",))
    if problems:
        raise RequestValidationError(
            [{"loc": p.loc, "type": p.type, "msg": p.msg} for p in problems]
        )


# ---------------------------------------------------------------- OpenAPI


def bound_integers(schema: Any) -> None:
    """Give every ``integer`` of an OpenAPI document without a bound the 64-bit one
    :func:`check_input` enforces, so generated clients and fuzzers know it."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "integer":
                if "maximum" not in node and "exclusiveMaximum" not in node:
                    node["maximum"] = INT64_MAX
                if "minimum" not in node and "exclusiveMinimum" not in node:
                    node["minimum"] = INT64_MIN
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
