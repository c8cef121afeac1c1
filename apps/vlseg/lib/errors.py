"""HTTP answers for request errors raised by MONAI Label's own endpoints before the app sees the request.

MONAI Label's ``/infer`` endpoint runs ``json.loads(params)`` and ``request.update(params)`` itself; a ``params``
form field that is not JSON, not UTF-8 or not a JSON object would otherwise end as a 500. The datastore
endpoints raise ``ImageNotFoundException`` for unknown image ids (also a 500). These handlers answer 422 / 404 with
the reason instead; every other error keeps FastAPI's plain 500 (no stack trace in the answer).
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

__all__ = ["install_request_error_handlers"]


def _json(status: int, detail: str):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"detail": detail})


async def _bad_params(request, exc):
    return _json(422, f"params must be a UTF-8 JSON object: {type(exc).__name__}: {exc}")


async def _type_error(request, exc):
    if "dictionary update sequence" in str(exc):  # request.update(<JSON that is not an object>)
        return _json(422, "params must be a JSON object ({\"key\": value, ...})")
    logger.error("vlseg: internal error on %s: %s", request.url.path, exc, exc_info=exc)
    return _json(500, "internal server error (details in the server log)")


async def _not_found(request, exc):
    return _json(404, str(exc) or "not found")


def install_request_error_handlers() -> bool:
    """Register the handlers on MONAI Label's FastAPI app (once); False when it is not importable."""
    try:
        from monailabel.app import app as api
        from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
    except Exception:  # the tasks also run outside the server
        return False
    if getattr(api.state, "vlseg_error_handlers", False):
        return True
    api.add_exception_handler(json.JSONDecodeError, _bad_params)
    api.add_exception_handler(UnicodeDecodeError, _bad_params)
    api.add_exception_handler(TypeError, _type_error)
    api.add_exception_handler(ImageNotFoundException, _not_found)
    api.add_exception_handler(LabelNotFoundException, _not_found)
    api.state.vlseg_error_handlers = True
    # the app is created while the server starts, after Starlette built its middleware stack from the handlers
    # it had then: drop the stack so that the next request builds it again with these handlers
    api.middleware_stack = None
    return True
