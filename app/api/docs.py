"""The OpenAPI schema and the Swagger page, behind a key like every route but health's.

With auth on, fetch the schema with a key (`curl -H "Authorization: Bearer $KEY"
localhost:8000/openapi.json`); the Swagger page needs the key too, so a browser sees it only
through a proxy that adds the header, or with `auth.enabled: false`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
def openapi(request: Request) -> dict[str, Any]:
    """The OpenAPI schema of every route."""
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/docs")
def docs() -> HTMLResponse:
    """Swagger UI over /openapi.json."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="llm-api")
