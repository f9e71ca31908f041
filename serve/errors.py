"""Every failure leaves the server as ``{"error": {message, type, param, code}}`` (OpenAI's shape),
so OpenAI clients raise their usual typed exceptions and the message names the problem."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.schemas import ErrorBody, ErrorResponse

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    """A request we refuse (4xx) or could not serve (5xx), with OpenAI's error fields."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, ErrorBody(message=message, type=type, param=param, code=code)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), status_code=self.status, headers=headers)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic/FastAPI validation error as a 400 naming the field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(f"malformed JSON body: {detail}", code="invalid_json")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return APIError("the request needs a JSON body", code="invalid_json")
    where = _location(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return APIError(f"{where}: {first.get('msg')}{more}", param=where, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Route FastAPI's own errors and unexpected exceptions through the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(str(exc.detail), status=exc.status_code, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error",
                        code="internal_error").response()
