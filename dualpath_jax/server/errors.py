"""The server's failures answered as OpenAI's error bodies.

Every refusal a client can meet, whether our own checks (`APIError`),
pydantic's validation of the body, Starlette's HTTP errors or the body
limit's, leaves as `{"error": {"message", "type", "param", "code"}}` with
its status, and is counted in `dualpath_requests_rejected_total` by status.
Validation errors name the field as OpenAI's `param` does
(`messages[0].role`), a union's members by their types, and a body that is
not JSON at all says why (empty, another Content-Type, not UTF-8).
"""

from __future__ import annotations

from typing import Callable

import fastapi
from fastapi import responses
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dualpath_jax.server.engine_loop import ShuttingDown
from dualpath_jax.server.prometheus import ServerMetrics
from dualpath_jax.server.protocol import APIError

ErrorResponder = Callable[[APIError], responses.JSONResponse]

# FastAPI's detail for a body it could not parse by any other error than a
# JSON one (fastapi.routing; the same in every version since 0.100).
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def install_error_handlers(app: fastapi.FastAPI,
                           metrics: ServerMetrics) -> ErrorResponder:
  """Answers `app`'s errors as OpenAI's bodies; returns the function that
  turns an `APIError` into its response (counted), for the middleware that
  refuses bodies before a route runs."""

  def error_response(err: APIError) -> responses.JSONResponse:
    metrics.rejected.labels(str(err.status_code)).inc()
    return responses.JSONResponse(err.body(), status_code=err.status_code)

  @app.exception_handler(APIError)
  async def _api_error(request, err: APIError):
    del request
    return error_response(err)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request, err: RequestValidationError):
    return error_response(_validation_api_error(
        err.errors(), request.headers.get("content-type")))

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, err: StarletteHTTPException):
    del request
    if err.status_code == 400 and err.detail == _FASTAPI_BODY_ERROR:
      # FastAPI's answer to a body json.loads could not even decode (bytes
      # that are not UTF-8): the JSON error it is, named as such.
      return error_response(APIError(
          "the request body is not valid JSON (not UTF-8 text)",
          code="invalid_json"))
    return error_response(APIError(str(err.detail), status_code=err.status_code,
                                   type="invalid_request_error"))

  return error_response


def generation_error(error: BaseException) -> APIError:
  """The error a request whose generation ended in `error` answers: 503
  when the server is shutting down (retry elsewhere), else 500."""
  if isinstance(error, ShuttingDown):
    return APIError(str(error), status_code=503, type="server_error",
                    code="shutting_down")
  return APIError(f"generation failed: {error}", status_code=500,
                  type="server_error")


def _validation_api_error(errors: list[dict],
                          content_type: str | None) -> APIError:
  """Pydantic's errors of a request body as one `APIError` naming the first
  bad field (`errors`: `RequestValidationError.errors()`)."""
  first = errors[0] if errors else {}
  if tuple(first.get("loc", ())) == ("body",):  # no JSON object at all
    if first.get("type") == "missing":
      why = "the request body is empty"
    elif content_type is None or \
        not content_type.split(";")[0].strip().endswith("json"):
      why = f"the request body is not JSON (Content-Type: {content_type})"
    else:
      why = "the request body must be a JSON object"
    return APIError(
        f"{why}; send a JSON object with Content-Type: application/json",
        code="invalid_json")
  if first.get("type") == "json_invalid":  # its loc is a character offset
    where = first.get("loc", ("body", None))[-1]
    why = (first.get("ctx") or {}).get("error", "")
    return APIError(f"the request body is not valid JSON ({why}, at "
                    f"character {where})", code="invalid_json")
  param = _param_name(first.get("loc", ()))
  msg = first.get("msg", "invalid request")
  tags = [loc[-1] for loc in (e.get("loc", ()) for e in errors)
          if _param_name(loc) == param and _is_type_tag(loc[-1])]
  if len(tags) > 1:  # a union: each member's error names its type
    msg = f"Input should be one of {' | '.join(tags)}"
  value = first.get("input")
  if isinstance(value, float) and value != value:
    msg = "Input should be a number, not NaN"
  return APIError(f"{param}: {msg}" if param else msg, param=param,
                  code="invalid_value" if param else "invalid_json")


def _is_type_tag(part: object) -> bool:
  """Whether a pydantic error location part names a union member's type
  ("str", "list[int]") rather than a field."""
  return isinstance(part, str) and (
      "[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def _param_name(loc: tuple) -> str | None:
  """A request error's location as the `param` OpenAI uses:
  `messages[0].role`, without pydantic's "body" and union type tags."""
  name = ""
  for part in loc:
    if part == "body" or _is_type_tag(part):
      continue
    name += f"[{part}]" if isinstance(part, int) else (
        f".{part}" if name else str(part))
  return name or None
