"""Inference off the event loop: MONAI Label's ``POST /infer/{model}`` served from a bounded worker pool.

MONAI Label 0.8.5's infer endpoint is an ``async def`` that runs the whole inference (``run_inference``) itself, so
the server's event loop stands still while an image is segmented: every other request (``/info``, ``/datastore``,
a load balancer's health check) waits behind every inference queued before it (``GET /info/`` took 18 s during a
24-request burst, issue 15).

:func:`install_infer_queue` puts a route in front of that one on MONAI Label's FastAPI app: same path and method,
the same parameters and authentication dependency (the signature of MONAI Label's endpoint), but its endpoint
awaits MONAI Label's own ``run_inference`` in :class:`InferQueue`'s thread pool. MONAI Label's route stays in
place behind it (and keeps describing the endpoint in ``/openapi.json``); nothing of MONAI Label is patched.

* ``workers`` threads run inferences (default 1: the bundles' networks and the app's infer tasks, with their
  caches, are not promised to be thread-safe; more workers only pay where the model releases the GIL);
* at most ``workers + queue`` requests are admitted at a time (running or waiting). The check is made when a
  request's headers arrive, before its body is read; a request over the limit gets ``503`` with a
  ``Retry-After`` header (its body, up to 16 MiB, is read and dropped first so that the client reads the answer);
* admitted requests run first in, first out (one FIFO work queue), so a burst completes spread over its length,
  in the order its requests arrived;
* every admitted answer carries ``X-Vlseg-Infer: seq=<n>; wait=<s>; run=<s>`` (its place in the arrival order,
  seconds waited in the queue, seconds of inference), and :meth:`InferQueue.stats` counts them.

``workers`` 0 (:func:`queue_from_conf`) leaves MONAI Label's synchronous endpoint alone: the behaviour before.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

logger = logging.getLogger(__name__)

__all__ = ["InferQueue", "install_infer_queue", "queue_from_conf", "DEFAULTS"]

#: ``--conf`` keys and their defaults
DEFAULTS = {"infer_workers": 1, "infer_queue": 64, "infer_retry_after": 5}
_DRAIN_BYTES = 16 << 20
#: the admitted request's record, filled by :meth:`InferQueue.run`, read when its answer starts
_TICKET: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("vlseg_infer_ticket", default=None)


def _conf_int(conf: dict, key: str, minimum: int) -> int:
    value = conf.get(key, DEFAULTS[key])
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"--conf {key} must be a whole number >= {minimum}, got {value!r}")
    return number


class InferQueue:
    """``workers`` inference threads, at most ``workers + queue`` requests admitted, ``Retry-After`` seconds for
    the refused ones. Admission counts live on the event loop's thread; the work runs in the pool."""

    def __init__(self, workers: int = 1, queue: int = 64, retry_after: int = 5):
        if int(workers) < 1 or int(queue) < 0 or int(retry_after) < 1:
            raise ValueError(f"InferQueue needs workers >= 1, queue >= 0, retry_after >= 1; got {workers}, {queue}, "
                             f"{retry_after}")
        self.workers, self.queue, self.retry_after = int(workers), int(queue), int(retry_after)
        self.capacity = self.workers + self.queue
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="vlseg-infer")
        self._seq = itertools.count(1)
        self.pending = 0  # admitted and not answered yet (waiting, running, or its answer being sent)
        self.counts = {"admitted": 0, "rejected": 0, "completed": 0, "failed": 0}

    # ------------------------------------------------------------------ admission (event loop thread)
    def try_admit(self) -> bool:
        if self.pending >= self.capacity:
            self.counts["rejected"] += 1
            return False
        self.pending += 1
        self.counts["admitted"] += 1
        return True

    def release(self) -> None:
        self.pending -= 1

    def refusal(self) -> str:
        return (f"the inference queue is full ({self.pending} requests running or waiting, at most {self.capacity}: "
                f"server settings --conf infer_workers {self.workers}, --conf infer_queue {self.queue}); "
                f"retry after {self.retry_after} s")

    # ------------------------------------------------------------------ work
    async def run(self, fn: Callable, /, **kwargs):
        """``fn(**kwargs)`` in the pool, in arrival order; the caller's event loop stays free meanwhile."""
        ticket = _TICKET.get()
        record = ticket if ticket is not None else {}
        record["seq"] = next(self._seq)
        queued = time.perf_counter()

        def call():
            started = time.perf_counter()
            record["wait"] = started - queued
            try:
                return fn(**kwargs)
            finally:
                record["run"] = time.perf_counter() - started

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except BaseException:
            self.counts["failed"] += 1
            raise
        self.counts["completed"] += 1
        return result

    def stats(self) -> dict:
        return {"workers": self.workers, "queue": self.queue, "retry_after_s": self.retry_after,
                "pending": self.pending, **self.counts}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def queue_from_conf(conf: dict) -> Optional[InferQueue]:
    """The queue that ``--conf infer_workers / infer_queue / infer_retry_after`` ask for; None for
    ``infer_workers 0`` (MONAI Label's synchronous endpoint). Raises ``ValueError`` naming the bad key."""
    workers = _conf_int(conf, "infer_workers", 0)
    queue = _conf_int(conf, "infer_queue", 0)
    retry_after = _conf_int(conf, "infer_retry_after", 1)
    return InferQueue(workers, queue, retry_after) if workers > 0 else None


class _Admission:
    """ASGI wrapper of the queued route: admit (or refuse with 503) before the body is read; add the timing
    header to the answer; free the place once the answer has been sent."""

    def __init__(self, app, queue: InferQueue):
        self.app, self.queue = app, queue

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        if not self.queue.try_admit():
            return await self._refuse(scope, receive, send)
        record: dict = {}
        token = _TICKET.set(record)

        async def send_with_timing(message):
            if message.get("type") == "http.response.start" and "seq" in record:
                value = f"seq={record['seq']}; wait={record.get('wait', 0.0):.3f}; run={record.get('run', 0.0):.3f}"
                message = {**message, "headers": [*message.get("headers", []), (b"x-vlseg-infer", value.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_timing)
        finally:
            _TICKET.reset(token)
            self.queue.release()

    async def _refuse(self, scope, receive, send):
        from starlette.responses import JSONResponse

        length = None
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
        complete = False
        if length is None or length <= _DRAIN_BYTES:  # read and drop the body: the client then reads the 503
            seen, more = 0, True
            while more and seen <= _DRAIN_BYTES:
                message = await receive()
                if message.get("type") != "http.request":
                    break
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
            complete = not more
        detail = self.queue.refusal()
        logger.warning("vlseg: %s %s refused: %s", scope.get("method"), scope.get("path"), detail)
        headers = {"Retry-After": str(self.queue.retry_after)}
        if not complete:
            headers["Connection"] = "close"
        await JSONResponse({"detail": detail}, status_code=503, headers=headers)(scope, receive, send)


def _monailabel_infer_route():
    """MONAI Label's infer endpoint, the function it runs, and the endpoint's full path."""
    from monailabel.config import settings
    from monailabel.endpoints import infer as ml_infer

    for route in ml_infer.router.routes:
        if getattr(route, "endpoint", None) is ml_infer.api_run_inference:
            return ml_infer.api_run_inference, ml_infer.run_inference, settings.MONAI_LABEL_API_STR + route.path
    raise LookupError("MONAI Label's POST /infer/{model} route was not found in monailabel.endpoints.infer")


def install_infer_queue(queue: InferQueue, api=None, endpoint: Callable = None, run: Callable = None,
                        path: str = None) -> bool:
    """Serve ``POST path`` of ``api`` (default: MONAI Label's ``/infer/{model}`` on ``monailabel.app.app``) from
    ``queue``: a route with ``endpoint``'s signature, in front of every other route, runs ``run`` with the
    endpoint's arguments that ``run`` takes. Replaces a queue installed before. False when MONAI Label's app is
    not importable (the app's tasks also run outside the server) or its endpoint does not fit ``run``."""
    from fastapi.routing import APIRoute

    try:
        if api is None:
            from monailabel.app import app as api
        if endpoint is None or run is None or path is None:
            ml_endpoint, ml_run, ml_path = _monailabel_infer_route()
            endpoint, run, path = endpoint or ml_endpoint, run or ml_run, path or ml_path
    except Exception as e:
        logger.info("vlseg: inference queue not installed (%s: %s)", type(e).__name__, e)
        return False
    signature = inspect.signature(endpoint)
    run_params = inspect.signature(run).parameters
    passed = [name for name in signature.parameters if name in run_params]
    missing = [n for n, p in run_params.items() if n not in passed and p.default is inspect.Parameter.empty]
    if missing:
        logger.error("vlseg: %s cannot be queued: its endpoint lacks %s of %s; it stays synchronous", path,
                     missing, getattr(run, "__name__", run))
        return False

    async def queued_endpoint(**kwargs):
        return await queue.run(run, **{name: kwargs[name] for name in passed})

    queued_endpoint.__signature__ = signature  # FastAPI reads the parameters (and MONAI Label's auth) from it
    queued_endpoint.__name__ = getattr(endpoint, "__name__", "infer") + "_queued"
    queued_endpoint.__doc__ = endpoint.__doc__

    for old in [r for r in api.router.routes if getattr(r, "vlseg_infer_queue", None) is not None]:
        api.router.routes.remove(old)
        if old.vlseg_infer_queue is not queue:
            old.vlseg_infer_queue.close()
    route = APIRoute(path, queued_endpoint, methods=["POST"], include_in_schema=False,
                     dependency_overrides_provider=api)
    route.app = _Admission(route.app, queue)
    route.vlseg_infer_queue = queue
    api.router.routes.insert(0, route)  # the first full match wins: MONAI Label's route is never reached
    logger.info("vlseg: POST %s runs in %d worker thread(s), up to %d more waiting; beyond that 503 with "
                "Retry-After %d s", path, queue.workers, queue.queue, queue.retry_after)
    return True
