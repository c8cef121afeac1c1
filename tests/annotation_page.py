"""Browser-side helpers of tests/test_annotation_page.py: start headless Chromium, wait for the page, read its
state (messages, work list, the canvases' pixels, the stored draft) and draw on it."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
                 "--disable-dev-shm-usage"]


def chromium_missing() -> str:
    missing = [p for p in ("chromium", "chromedriver") if not shutil.which(p)]
    if missing:
        return (f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver; "
                "bash scripts/install_viewer_deps.sh)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (requirements.txt)"
    return ""


def start_chromium(args=None):
    """Headless Chromium through chromedriver (selenium), with the browser log kept; ``args``: Chromium's command
    line (default :data:`CHROMIUM_ARGS`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for a in list(args or CHROMIUM_ARGS) + [f"--user-data-dir={tempfile.mkdtemp(prefix='vlseg_chromium_')}"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def wait(driver, cond, timeout=120, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: cond())
    except Exception:
        raise AssertionError(f"timed out waiting for {what}; page message: {message(driver)!r}") from None


def message(driver) -> str:
    return driver.execute_script("return document.getElementById('message').className + ': ' + "
                                 "document.getElementById('message').textContent")


def idle(driver):
    return driver.execute_script("return document.body.dataset.busy !== '1'")


def worklist(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#worklist li')].map(li => li.dataset.id)")


LAYERS_JS = """
const read = (id) => { const c = document.getElementById(id);
  return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); };
const s = window.vlsegAnnotate;
return {w: s.image.width, h: s.image.height, slice: s.slice, kind: s.image.kind, id: s.image.id,
        mask: read('mask-layer'), heat: read('heat-layer'),
        lut: JSON.parse(document.getElementById('colourbar').dataset.lut)};
"""


def layers(driver) -> dict:
    out = driver.execute_script(LAYERS_JS)
    h, w = out["h"], out["w"]
    out["mask"] = np.asarray(out["mask"], np.uint8).reshape(h, w, 4)
    out["heat"] = np.asarray(out["heat"], np.uint8).reshape(h, w, 4)
    out["lut"] = np.asarray(out["lut"], np.int32)
    return out


def stage(driver) -> str:
    return driver.execute_script("return document.getElementById('stage').dataset.imageId")


def check_overlays(page: dict, mask: np.ndarray, unc: np.ndarray) -> None:
    """The page's mask and heat-map canvases show the server's mask and map (slice ``page["slice"]`` of a volume)
    pixel for pixel: mask pixels opaque exactly where the mask is set; heat pixels in the colour-bar colour of the
    map's value (within one of 256 levels: the stored map is 16-bit)."""
    if mask.ndim == 3:
        mask, unc = mask[:, :, page["slice"]], unc[:, :, page["slice"]]
    assert mask.shape == (page["h"], page["w"]) == unc.shape
    assert np.array_equal(page["mask"][:, :, 3] > 0, mask > 0)
    lut = page["lut"]
    assert len({tuple(c) for c in lut}) == 256  # every level its own colour: the colour check has teeth
    idx = np.clip(np.rint(unc * 255), 0, 255).astype(int)
    heat = page["heat"][:, :, :3].astype(np.int32)
    near = [np.all(heat == lut[np.clip(idx + d, 0, 255)], axis=2) for d in (-1, 0, 1)]
    assert np.logical_or.reduce(near).all(), "heat-map pixels are not the server's uncertainty map"
    assert np.all(page["heat"][:, :, 3] == 255)


def stroke(driver, rows_cols: list[tuple[int, int]]):
    """Drag the left button through image pixels (row, col) on the mask canvas."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "mask-layer")
    st = driver.execute_script("const s = window.vlsegAnnotate; return [s.image.width, s.image.height]")
    rect = driver.execute_script("const b = arguments[0].getBoundingClientRect(); return [b.width, b.height]", canvas)
    at = lambda rc: (int((rc[1] + 0.5) / st[0] * rect[0] - rect[0] / 2),  # noqa: E731  offsets from the centre
                     int((rc[0] + 0.5) / st[1] * rect[1] - rect[1] / 2))
    chain = ActionChains(driver).move_to_element_with_offset(canvas, *at(rows_cols[0])).click_and_hold()
    for rc in rows_cols[1:]:
        chain = chain.move_to_element_with_offset(canvas, *at(rc))
    chain.release().perform()


def draft(driver) -> np.ndarray | None:
    """The page's stored draft of the open image (localStorage, run-length coded), as its mask stack."""
    d = driver.execute_script("""
      const s = window.vlsegAnnotate, key = Object.keys(localStorage).find(k => k.endsWith(':' + s.image.id));
      return key ? JSON.parse(localStorage.getItem(key)) : null;""")
    if d is None:
        return None
    runs = [tuple(int(x) for x in r.split("*")) for r in d["rle"].split(",") if r]
    return np.concatenate([np.full(n, v, np.uint8) for v, n in runs])
