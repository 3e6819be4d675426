"""Errors in each provider's shape, so their client libraries raise their usual exceptions.

OpenAI: `{"error": {"message", "type", "param", "code"}}`; Anthropic: `{"type": "error",
"error": {"type", "message"}}`. The app's error handlers ask `provider_of(path)` first; the
Tinker API keeps its `{"detail": ...}`.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse

Provider = Literal["openai", "anthropic"]
OPENAI_PREFIXES = ("/oai/api/v1/", "/v1/")
ANTHROPIC_PREFIXES = ("/anthropic/api/v1/", "/anthropic/v1/")

OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def provider_of(path: str) -> Provider | None:
    if path.startswith(OPENAI_PREFIXES):
        return "openai"
    if path.startswith(ANTHROPIC_PREFIXES):
        return "anthropic"
    return None


def error_response(
    provider: Provider, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    if provider == "openai":
        kind = (
            "server_error" if status >= 500 else OPENAI_TYPES.get(status, "invalid_request_error")
        )
        code = "model_not_found" if status == 404 and "model" in message else None
        if "context" in message and "exceeds" in message:
            code = "context_length_exceeded"
        body: dict = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    else:
        kind = (
            "api_error" if status >= 500 else ANTHROPIC_TYPES.get(status, "invalid_request_error")
        )
        body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)
