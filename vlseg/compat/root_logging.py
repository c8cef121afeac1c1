"""Calling libraries that log through the ROOT logger without letting them configure it.

open_clip logs with the module-level ``logging.info(...)`` / ``logging.warning(...)``. In a process whose root
logger has no handler yet, each such call runs ``logging.basicConfig()``, which installs a stderr handler on the
root logger for the rest of the process: a process-wide change made on the caller's behalf (and the reason a
user's own ``basicConfig`` later does nothing). :func:`root_logging_untouched` keeps the root logger non-empty for
the duration of a call with a handler that passes WARNING and above to Python's last-resort handler (what an
unconfigured process shows anyway) and drops the rest; it is removed on exit. A process that has configured
logging is left alone.
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["root_logging_untouched"]


class _LastResort(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is not None:
            logging.lastResort.handle(record)


@contextlib.contextmanager
def root_logging_untouched():
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    guard = _LastResort()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)
