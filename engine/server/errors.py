"""OpenAI's error shape for every error the server answers, whoever raised it.

OpenAI clients read `error.message`, `param` and `code` from any failed request; FastAPI's and
Starlette's own `{"detail": ...}` bodies would reach them as an error with no message.
"""
from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """Raised anywhere in a handler; answered in OpenAI's error shape with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type, param, code, headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def bad_value(error: ValueError) -> APIError:
    """Engine and SamplingParams errors start with the field they are about ("max_tokens: ...")."""
    field = re.match(r"(?:SamplingParams\.)?(\w+)\s*[=:]", str(error))
    return APIError(400, str(error), param=field.group(1) if field else None)


async def _invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
    """A 400 naming the first bad field, where FastAPI would answer 422 in its own shape."""
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body" and not isinstance(part, int)]
    message = f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid request')}"
    return error_response(APIError(400, message, param=location[0] if location else None))


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors: an unknown path (404), a wrong method (405, with its
    `Allow` header), and the 400 for a body that `json.loads` fails on without a JSONDecodeError
    (bytes that are not UTF-8, nesting deeper than the recursion limit), whose cause says which."""
    message = str(error.detail)
    if error.__cause__ is not None:
        message = f"{message}: {error.__cause__}"
    elif error.status_code in (404, 405):
        message = f"{message}: {request.method} {request.url.path}"
    kind = "invalid_request_error" if error.status_code < 500 else "internal_error"
    return error_response(APIError(error.status_code, message, kind, headers=error.headers))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_body)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
