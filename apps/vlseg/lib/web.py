"""The 2D annotation page (``web/annotate/``), served by MONAI Label's own FastAPI app at ``/vlseg/``.

The page is static HTML + JavaScript that talks only to MONAI Label's REST API (``/info``, ``/datastore``,
``/infer``, ``/train``, ``/scoring``, ``/activelearning``); this module only mounts its folder. MONAI Label creates
the app instance (and so imports ``main.py``) in its start-up event, once Starlette's routes exist; a route added
then is still found, since the router looks its routes up on every request (unlike the middleware stack, see
``vlseg.app_support.upload_limit``).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["ANNOTATE_DIR", "ANNOTATE_PATH", "install_annotation_page"]

#: the page's static files (index.html, JavaScript modules, style.css)
ANNOTATE_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "web", "annotate"))
#: where the page is served
ANNOTATE_PATH = "/vlseg"


def install_annotation_page(api=None, directory: str = ANNOTATE_DIR, path: str = ANNOTATE_PATH) -> bool:
    """Mount ``directory`` at ``path`` (``/vlseg/`` gives ``index.html``) on MONAI Label's FastAPI app
    (``monailabel.app.app`` unless ``api``), once. False when MONAI Label's app is not importable (the scoring and
    training subprocesses import ``main.py`` too) or the folder is missing (logged)."""
    if api is None:
        try:
            from monailabel.app import app as api
        except Exception:
            return False
    if not os.path.isfile(os.path.join(directory, "index.html")):
        logger.error("vlseg: annotation page not served: %s has no index.html", directory)
        return False
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    if any(isinstance(r, Mount) and r.path == path for r in api.router.routes):
        return True
    api.mount(path, StaticFiles(directory=directory, html=True), name="vlseg_annotate")
    logger.info("vlseg: annotation page at %s/ (files: %s)", path, directory)
    return True
