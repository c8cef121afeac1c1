"""A request-body size limit for MONAI Label's FastAPI app (uploads are written to disk before the app sees them).

MONAI Label's ``/infer``, ``/datastore`` and ``/session`` endpoints read a multipart upload completely (Starlette
spools it, the endpoint copies it to a temporary file) before any app code runs, so the app cannot refuse an
over-size file itself. :class:`BodySizeLimit` is a plain ASGI middleware in front of every endpoint:

* a request whose ``Content-Length`` exceeds the limit is answered ``413`` at once; its body is not read into any
  file (up to ``drain_bytes`` of it are read and dropped so that the client receives the answer instead of a
  connection reset while it is still sending);
* a request without ``Content-Length`` (chunked) is counted while it streams; once it passes the limit the body is
  cut off (the endpoint's parser fails, its half-spooled anonymous temporary file is closed and gone) and the
  answer is ``413``.

:func:`install_body_size_limit` adds it to ``monailabel.app.app``. MONAI Label creates the app instance (and so
imports the app's ``main.py``) in its start-up event, after Starlette built its middleware stack, where
``add_middleware`` is refused; so the middleware is put into ``user_middleware`` directly and the built stack is
dropped, and Starlette builds it again, with the limit, for the next request (the same mechanism as
``apps/vlseg/lib/errors.py``'s exception handlers).
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

__all__ = ["BodySizeLimit", "DEFAULT_MAX_UPLOAD_BYTES", "install_body_size_limit", "parse_size"]

#: 1 GiB: the largest NIfTI volume the app accepts by default (``max_volume_voxels`` 256e6 float32) fits.
DEFAULT_MAX_UPLOAD_BYTES = 1 << 30

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(value) -> int:
    """``1073741824``, ``"512M"``, ``"1GiB"`` -> bytes (binary units); 0 or a negative value means no limit."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().lower().replace(" ", "").replace("_", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    if not num or unit not in _UNITS:
        raise ValueError(f"not a size: {value!r} (bytes, or a number with K, M or G)")
    return int(float(num) * _UNITS[unit])


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: refuse HTTP requests whose body is larger than ``max_bytes`` with ``413`` (see module doc).

    ``conf_key`` is named in the answer so that the client knows which setting to change.
    """

    def __init__(self, app, max_bytes: int, conf_key: str = "max_upload_bytes", drain_bytes: int = 64 << 20):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.conf_key = conf_key
        self.drain_bytes = int(drain_bytes)

    def _detail(self, size: str) -> str:
        return (f"request body is {size}; the limit is {self.max_bytes} bytes (server setting "
                f"--conf {self.conf_key})")

    async def _answer_413(self, send, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or self.max_bytes <= 0:
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
                break
        if length is not None and length > self.max_bytes:
            logger.warning("vlseg: %s %s refused: Content-Length %d > %d bytes", scope.get("method"),
                           scope.get("path"), length, self.max_bytes)
            if length <= self.drain_bytes:  # read and drop the body: the client then reads the 413, not a reset
                more = True
                while more:
                    message = await receive()
                    more = message.get("type") == "http.request" and message.get("more_body", False)
            return await self._answer_413(send, self._detail(f"{length} bytes (Content-Length)"))

        state = {"received": 0, "exceeded": False, "started": False}

        async def counted_receive():
            message = await receive()
            if message.get("type") == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["exceeded"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if state["exceeded"] and not state["started"]:
                return  # the endpoint's own answer to the cut-off body (e.g. FastAPI's 400): ours replaces it
            if message.get("type") == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
            logger.warning("vlseg: %s %s refused: streamed body passed %d bytes", scope.get("method"),
                           scope.get("path"), self.max_bytes)
            await self._answer_413(send, self._detail(f"more than {self.max_bytes} bytes (streamed)"))


def install_body_size_limit(max_bytes: int, api=None, conf_key: str = "max_upload_bytes") -> bool:
    """Put :class:`BodySizeLimit` in front of MONAI Label's FastAPI app (``monailabel.app.app`` unless ``api``);
    replaces a limit installed before. False when MONAI Label's app is not importable (tasks outside the server)."""
    if api is None:
        try:
            from monailabel.app import app as api
        except Exception:
            return False
    from starlette.middleware import Middleware

    api.user_middleware[:] = [m for m in api.user_middleware if getattr(m, "cls", None) is not BodySizeLimit]
    if int(max_bytes) > 0:
        # outermost user middleware: the limit applies before CORS and every endpoint
        api.user_middleware.insert(0, Middleware(BodySizeLimit, max_bytes=int(max_bytes), conf_key=conf_key))
    api.middleware_stack = None  # rebuilt by Starlette on the next request, now with the limit
    logger.info("vlseg: request bodies limited to %d bytes (%s)", int(max_bytes), conf_key)
    return True
