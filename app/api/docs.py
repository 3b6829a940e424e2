"""The OpenAPI schema and the Swagger page, behind a key like every route but health's.

With auth on, fetch the schema with a key (`curl -H "Authorization: Bearer $KEY"
localhost:8000/openapi.json`); the Swagger page needs the key too, so a browser sees it only
through a proxy that adds the header, or with `auth.enabled: false`.

Every error a route can answer is documented, with the one error body, in one place:
`errors()` builds the `responses=` of a route's own failures (a model not found, a key not
found, ...), and `document()` adds what follows from how the route is mounted and what it
takes (a key: 401/429/503; an admin key: 403; a body: 408/413/422; parameters: 422), plus
the security schemes. A schemathesis run in the tests holds the server to this document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute

from app.auth.deps import authenticate, require_admin
from app.errors import ERROR_TABLE, ErrorBody, effective_routes

router = APIRouter(include_in_schema=False)

#: What each status means here, before the list of its codes (from app.errors.ERROR_TABLE).
MEANING = {
    400: "The request is well-formed but cannot be served as asked (over the model's "
         "context, a capability or parameter value the model does not support, a rule "
         "of the admin API).",
    401: "No valid API key.",
    403: "The key may not do this (an admin route, a model outside its allowed_models).",
    404: "The model or key named does not exist.",
    408: "The body arrived slower than server.body_read_timeout allows.",
    413: "The body is larger than server.max_body_bytes.",
    422: "The body or a parameter does not match this schema (or is not JSON).",
    429: "Over a limit of the key (rpm, tpm, max_parallel, a quota), or too many failed "
         "authentications from this address; Retry-After says when to retry.",
    500: "The model's engine failed; the server log has the details.",
    503: "The model is loading, its queue is full, or the key store is unreachable; "
         "Retry-After says when to retry.",
    504: "The request took longer than its model's request_timeout.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                               "schema": {"type": "integer"}}}

#: Failures of the routes that run a model, and of those that generate with it.
MODEL_ERRORS = (403, 404, 503)
GENERATION_ERRORS = (400, *MODEL_ERRORS, 500, 504)
#: Failures of the routes that name a key (/admin/keys/{key_id}...).
KEY_ERRORS = (404,)
#: One server-sent event, as schemathesis and OpenAPI 3.1 read an event stream's `schema`.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
    "retry": {"type": "integer"}}}

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "The API key."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "The API key, as an alternative to the Authorization header."},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` entries: each status with the error body and its codes."""
    return {status: _error_response(status) for status in statuses}


def _error_response(status: int) -> dict[str, Any]:
    codes = sorted({spec.code for _, spec in ERROR_TABLE if spec.status == status and spec.code})
    listed = f" Codes: {', '.join(f'`{c}`' for c in codes)}." if codes else ""
    response: dict[str, Any] = {"model": ErrorBody, "description": MEANING[status] + listed}
    if status in (429, 503):
        response["headers"] = RETRY_AFTER
    return response


def event_stream(description: str) -> dict[int | str, dict[str, Any]]:
    """The `responses` entry of a 200 that is (or, when asked, may be) an event stream."""
    return {200: {"description": description,
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


@router.get("/openapi.json")
def openapi(request: Request) -> dict[str, Any]:
    """The OpenAPI schema of every route."""
    return document(request.app)


@router.get("/docs")
def docs() -> HTMLResponse:
    """Swagger UI over /openapi.json."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="llm-api")


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema (built once, then cached by FastAPI) with the mounting's errors and
    the security schemes added, once."""
    schema: dict[str, Any] = app.openapi()
    if not schema.get("components", {}).get("securitySchemes"):
        _add_mounting_errors(schema, app.routes)
        _name_models(schema, list(app.state.settings.models))
    return schema


def _name_models(schema: dict[str, Any], names: list[str]) -> None:
    """`model` in a request (a body field, a path parameter) is one of the served models'
    names: any other is a 404, so the document lists them."""
    for component in schema["components"]["schemas"].values():
        if component.get("additionalProperties") is False:  # a request body (StrictSchema)
            _name_model(component.get("properties", {}).get("model"), names)
    for path in schema["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "model" and parameter.get("in") == "path":
                    _name_model(parameter.get("schema"), names)


def _name_model(field: dict[str, Any] | None, names: list[str]) -> None:
    for branch in (field or {}).get("anyOf", [field or {}]):
        if branch.get("type") == "string":
            branch["enum"] = names


def _add_mounting_errors(schema: dict[str, Any], routes: Iterable[Any]) -> None:
    schema.setdefault("components", {})["securitySchemes"] = _SECURITY_SCHEMES
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    schema["components"].setdefault("schemas", {}).setdefault(
        "ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
    details = schema["components"]["schemas"]["ErrorBody"].pop("$defs", {})
    schema["components"]["schemas"].update(details)
    for route in effective_routes(routes):
        original = getattr(route, "original_route", route)
        if not isinstance(original, APIRoute) or not route.include_in_schema:
            continue
        calls = _dependency_calls(route.dependant)
        statuses = _mounting_statuses(route, calls)
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):  # FastAPI's own 422 documents its body, not ours
                if str(status) not in responses or status == 422:
                    response = _error_response(status)
                    del response["model"]
                    response["content"] = {"application/json": {"schema": error_ref}}
                    responses[str(status)] = response
            if authenticate in calls:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
    for unused in ("HTTPValidationError", "ValidationError"):  # what FastAPI's 422 named
        schema["components"]["schemas"].pop(unused, None)


def _mounting_statuses(route: Any, calls: set[Callable[..., Any]]) -> set[int]:
    statuses: set[int] = set()
    if authenticate in calls:  # a key is checked, the request counted, the store read
        statuses |= {401, 429, 503}
    if require_admin in calls:
        statuses.add(403)
    if route.body_field is not None or route.openapi_extra and \
            "requestBody" in route.openapi_extra:  # read bounded, parsed, validated
        statuses |= {408, 413, 422}
    if route.dependant.path_params or route.dependant.query_params:
        statuses.add(422)
    return statuses


def _dependency_calls(dependant: Dependant) -> set[Callable[..., Any]]:
    """Every function the route depends on, directly or through other dependencies."""
    calls: set[Callable[..., Any]] = set()
    pending = list(dependant.dependencies)
    while pending:
        sub = pending.pop()
        if sub.call is not None:
            calls.add(sub.call)
        pending.extend(sub.dependencies)
    return calls
