"""Bad input against a real ``monailabel start_server`` (issue 8): every case gets a 4xx with a clear message,
never a 500, and the server keeps answering.

One server is started for the module with the toy bundle (``tests/data/toy_bundle``) and, for the mixed-bundle load
test (``test_reliability_load``), the real ``uavls`` bundle, both ``tiny`` with random-init checkpoints (serving needs
weights that fit, not good ones), on a free 127.0.0.1 port, no trainers. The bad-input cases use the toy bundle.
Small limits (``max_slices``, ``max_upload_bytes``) are passed as ``--conf`` so the limit cases stay fast. The
server gets its own temporary folder (``TMPDIR``), where MONAI Label writes uploads, so the tests can check that
nothing is left there. The server is stopped by its own process id, children first.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

requests = pytest.importorskip("requests")
from PIL import Image  # noqa: E402

from vlseg.app_support.server import start_server, stop_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
TOY = REPO / "tests" / "data" / "toy_bundle"
MAX_SLICES = 64
MAX_UPLOAD = 256 * 1024  # --conf max_upload_bytes 256K
#: real bundles served next to the toy one (a copy of each, without its checkpoints, gets a random-init tiny one)
REAL_BUNDLES = [n for n in ("uavls",) if (REPO / "bundles" / n / "configs" / "tiny.json").is_file()]
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ file makers
def _png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _jpg(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG")
    return b.getvalue()


def _png_header_claiming(w: int, h: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``w`` x ``h`` RGB pixels (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def _nii(arr: np.ndarray) -> bytes:
    import nibabel as nib

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.nii.gz")
        nib.save(nib.Nifti1Image(arr, np.eye(4)), p)
        return Path(p).read_bytes()


def _vol(*shape) -> np.ndarray:
    return RNG.random(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    bundles = root / "bundles"
    bundles.mkdir()
    ignore = shutil.ignore_patterns("*.pt", "*.ts", "runs", "eval", "__pycache__", "vlseg_checkpoint.json",
                                    "monailabel_train.json")
    served = [shutil.copytree(TOY, bundles / "toy", ignore=ignore)]
    served += [shutil.copytree(REPO / "bundles" / n, bundles / n, ignore=ignore) for n in REAL_BUNDLES]
    subprocess.run([sys.executable, "-m", "vlseg.app_support.checkpoints", "--variant", "tiny", "--random-init"]
                   + [a for b in served for a in ("--bundle", str(b))], check=True, timeout=600, stdout=subprocess.DEVNULL)
    studies = root / "studies"
    studies.mkdir()
    Image.fromarray(RGB).save(studies / "img_0.png")
    other = np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(other).save(studies / "img_1.png")  # a second image for the load test
    outside = root / "outside"
    outside.mkdir()
    Image.fromarray(RGB).save(outside / "secret.png")
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside / "secret.png", studies / "link_out.png")  # a symlink leaving the studies folder
    app = root / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    conf = {"bundles_dir": bundles, "variant": "tiny", "skip_trainers": "true", "max_slices": MAX_SLICES,
            "store_uncertainty": "false", "max_upload_bytes": "256K"}
    tmp = root / "server_tmp"
    tmp.mkdir()
    handle = start_server(app, studies, conf, log_path=root / "server.log", timeout=300,
                          env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false",
                               "TMPDIR": str(tmp)})
    try:
        models = requests.get(f"{handle.url}/info/", timeout=30).json()["models"]
        assert sorted(models) == sorted(b.name for b in served), (sorted(models), handle.log_tail())
        yield {"url": handle.url, "root": root, "studies": studies, "outside": outside, "handle": handle, "tmp": tmp,
               "models": sorted(models)}
    finally:
        stop_server(handle)
        assert handle.proc.poll() is not None


def _upload(server, name: str, data: bytes, params: dict | None = None):
    return requests.post(f"{server['url']}/infer/toy", params={"output": "json"},
                         files={"file": (name, data), "params": (None, json.dumps(params or {"text": "polyp"}))},
                         timeout=120)


def _by_id(server, image: str, params: dict | None = None, model: str = "toy"):
    return requests.post(f"{server['url']}/infer/{model}", params={"image": image, "output": "json"},
                         files={"params": (None, json.dumps(params or {"text": "polyp"}))}, timeout=120)


def _raw_params(server, raw: bytes):
    return requests.post(f"{server['url']}/infer/toy", params={"image": "img_0", "output": "json"},
                         files={"params": (None, raw)}, timeout=60)


def _save_label(server, image: str, label: bytes, tag: str = "final", params: dict | None = None):
    return requests.put(f"{server['url']}/datastore/label", params={"image": image, "tag": tag},
                        files={"label": ("label.png", label),
                               "params": (None, json.dumps(params or {"text": "polyp"}))},
                        timeout=60)


# ------------------------------------------------------------------------------------------------ the matrix
# name -> (request maker, expected status, substring of the message)
CASES = {
    # corrupt files
    "truncated_png": (lambda s: _upload(s, "a.png", _png(RGB)[:100]), 422, "cannot read the image"),
    "truncated_jpg": (lambda s: _upload(s, "a.jpg", _jpg(RGB)[:200]), 422, "cannot read the image"),
    "garbage_nifti": (lambda s: _upload(s, "a.nii.gz", b"not a nifti file"), 422, "cannot read the volume"),
    "truncated_nifti": (lambda s: _upload(s, "a.nii.gz", _nii(_vol(16, 16, 4))[:100]), 422, "cannot read the volume"),
    "text_named_png": (lambda s: _upload(s, "a.png", b"hello, I am text"), 422, "cannot read the image"),
    "zero_size_file": (lambda s: _upload(s, "a.png", b""), 422, "cannot read the image"),
    "one_pixel": (lambda s: _upload(s, "a.png", _png(np.zeros((1, 1), np.uint8))), 422, "too small"),
    "bomb_header_20000": (lambda s: _upload(s, "a.png", _png_header_claiming(20000, 20000)), 413, "max_image_pixels"),
    "unsupported_type": (lambda s: _upload(s, "a.txt", b"text"), 415, "unsupported image type"),
    # volumes
    "volume_too_many_slices": (lambda s: _upload(s, "a.nii.gz", _nii(_vol(4, 4, MAX_SLICES + 1))), 413, "max_slices"),
    "volume_nan": (lambda s: _upload(s, "a.nii.gz", _nii(np.full((16, 16, 2), np.nan, np.float32))), 422, "NaN"),
    "volume_inf": (lambda s: _upload(s, "a.nii.gz", _nii(np.full((16, 16, 2), np.inf, np.float32))), 422, "infinite"),
    "volume_4d": (lambda s: _upload(s, "a.nii.gz", _nii(_vol(8, 8, 2, 3))), 422, "expected a 3D volume"),
    # prompts
    "prompt_empty": (lambda s: _by_id(s, "img_0", {"text": ""}), 422, "empty"),
    "prompt_whitespace": (lambda s: _by_id(s, "img_0", {"text": "  \t \n "}), 422, "empty"),
    "prompt_10000_chars": (lambda s: _by_id(s, "img_0", {"text": "x" * 10000}), 422, "10000 characters"),
    "prompt_control_chars": (lambda s: _by_id(s, "img_0", {"text": "po\x07lyp"}), 422, "control"),
    "prompt_nul": (lambda s: _by_id(s, "img_0", {"text": "polyp\x00"}), 422, "control"),
    "prompt_config_code": (lambda s: _by_id(s, "img_0", {"text": "$__import__('os').system('x')"}), 422,
                           "may not start"),
    "prompt_not_string": (lambda s: _by_id(s, "img_0", {"text": ["polyp"]}), 422, "prompt"),
    "prompt_lone_surrogate": (lambda s: _raw_params(s, b'{"text": "\\udcff polyp"}'), 422, "non-printable"),
    "params_not_json": (lambda s: _raw_params(s, b"{nope"), 422, "params"),
    "params_not_object": (lambda s: _raw_params(s, b"[1, 2]"), 422, "params"),
    # models and parameters
    "unknown_model": (lambda s: _by_id(s, "img_0", model="nope"), 404, "unknown model"),
    "num_samples_negative": (lambda s: _by_id(s, "img_0", {"text": "polyp", "num_samples": -3}), 422,
                             "num_samples must be between"),
    "num_samples_huge": (lambda s: _by_id(s, "img_0", {"text": "polyp", "num_samples": 10**9}), 422,
                         "num_samples must be between"),
    "num_samples_text": (lambda s: _by_id(s, "img_0", {"text": "polyp", "num_samples": "many"}), 422,
                         "num_samples must be an integer"),
    "seed_list": (lambda s: _by_id(s, "img_0", {"text": "polyp", "seed": [1]}), 422, "seed must be an integer"),
    "axis_out_of_range": (lambda s: _by_id(s, "img_0", {"text": "polyp", "axis": 7}), 422, "axis must be between"),
    "inline_not_bool": (lambda s: _by_id(s, "img_0", {"text": "polyp", "uncertainty_inline": "maybe"}), 422,
                        "true or false"),
    "device_code": (lambda s: _by_id(s, "img_0", {"text": "polyp", "device": "$print(1)"}), 422, "unknown device"),
    "model_filename_traversal": (lambda s: _by_id(s, "img_0", {"text": "polyp", "model_filename": "../../x.pt"}), 422,
                                 "model_filename must be one of"),
    "result_extension": (lambda s: _by_id(s, "img_0", {"text": "polyp", "result_extension": ".exe"}), 422,
                         "result_extension"),
    # image ids
    "id_traversal": (lambda s: _by_id(s, "../../../etc/passwd"), 404, "not in the datastore"),
    "id_url_encoded_traversal": (lambda s: requests.post(f"{s['url']}/infer/toy?image=..%2F..%2Foutside%2Fsecret.png"
                                                         "&output=json", timeout=60), 404, "not in the datastore"),
    "id_absolute_outside": (lambda s: _by_id(s, str(s["outside"] / "secret.png")), 404, "not in the datastore"),
    "id_symlink_leaving_studies": (lambda s: _by_id(s, "link_out"), 404, "not in the datastore"),
    # labels
    "label_shape_mismatch": (lambda s: _save_label(s, "img_0", _png(np.zeros((10, 10), np.uint8))), 422, "shape"),
    "label_image_traversal": (lambda s: _save_label(s, "../../evil", _png(np.zeros((64, 64), np.uint8))), 404,
                              "not in the datastore"),
    "label_tag_traversal": (lambda s: _save_label(s, "img_0", _png(np.zeros((64, 64), np.uint8)), tag="../../evil"),
                            422, "invalid label tag"),
    "label_corrupt_file": (lambda s: _save_label(s, "img_0", b"not a png"), 422, "cannot read the label"),
    "label_bad_prompt": (lambda s: _save_label(s, "img_0", _png(np.zeros((64, 64), np.uint8)), params={"text": "   "}),
                         422, "empty"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_4xx_and_server_keeps_answering(server, name):
    make, status, fragment = CASES[name]
    r = make(server)
    assert r.status_code == status, f"{name}: {r.status_code} {r.text[:500]}"
    assert "Traceback" not in r.text
    try:
        detail = str(r.json().get("detail"))
    except ValueError:
        detail = r.text
    assert fragment in detail, f"{name}: {detail!r}"
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def test_matrix_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name, data, shape", [
    ("rgba.png", _png(RNG.integers(0, 255, (64, 48, 4), dtype=np.uint8)), [64, 48]),
    ("gray16.png", _png(RNG.integers(0, 65535, (40, 64), dtype=np.uint16)), [40, 64]),
    ("singleton.nii.gz", _nii(_vol(32, 24, 1)), [32, 24, 1]),
])
def test_unusual_but_valid_inputs_succeed(server, name, data, shape):
    r = _upload(server, name, data)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["shape"] == shape


def test_nothing_written_outside_the_studies_folder(server):
    """The traversal cases above left nothing outside the datastore and did not touch the outside files."""
    root = server["root"]
    assert sorted(p.name for p in server["outside"].iterdir()) == ["secret.png", "secret.txt"]
    assert not list(root.rglob("evil*"))
    assert not list(Path("/").glob("evil*"))


def test_request_cannot_choose_a_bundle_or_config(server):
    """Parameters naming another bundle folder or a config file are not used: the toy bundle answers as usual."""
    other = server["root"] / "not_a_bundle"
    (other / "configs").mkdir(parents=True, exist_ok=True)
    marker = other / "touched"
    (other / "configs" / "inference.json").write_text(json.dumps({"x": f"$open('{marker}', 'w')"}))
    params = {"text": "polyp", "bundle_path": str(other), "path": str(other), "config_paths": [str(other)],
              "config_file": str(other / "configs" / "inference.json"), "bundles_dir": str(other)}
    r = _by_id(server, "img_0", params)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["model"] == "toy" and not marker.exists()
    r = requests.post(f"{server['url']}/infer/..%2Fnot_a_bundle", params={"image": "img_0"}, timeout=60)
    assert r.status_code == 404 and not marker.exists()


def test_server_binds_to_loopback_and_still_serves_a_valid_request(server):
    import psutil

    conns = [c for c in psutil.Process(server["handle"].proc.pid).net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN]
    assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns), conns
    r = _by_id(server, "img_0", {"text": "small polyp", "num_samples": 2, "seed": 3})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["shape"] == [64, 64] and r.json()["prompt"] == "small polyp"


# ------------------------------------------------------------------------------------------------ upload size limit
def _temp_files(server) -> set:
    """Files in the server's temporary folder (MONAI Label writes each upload there as ``tmpXXXXXXXX<suffix>``)."""
    return {p.name for p in server["tmp"].iterdir() if p.is_file()}


def _new_temp_files(server, before: set, wait: float = 5.0) -> list:
    """Temporary files that appeared since ``before`` and are still there after up to ``wait`` seconds (MONAI
    Label removes a successful upload in a background task right after the answer)."""
    deadline = time.time() + wait
    while True:
        new = sorted(_temp_files(server) - before)
        if not new or time.time() > deadline:
            return new
        time.sleep(0.2)


def _noise_png(side: int) -> bytes:
    return _png(np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8))


def _studies_snapshot(server) -> dict:
    return {str(p.relative_to(server["studies"])): p.stat().st_size for p in server["studies"].rglob("*")
            if p.is_file() and p.name != "datastore_v2.json"}


def test_oversize_upload_gets_413_and_nothing_is_written(server):
    data = _noise_png(400)  # ~480 KB of random pixels: over the 256 KiB limit
    assert len(data) > MAX_UPLOAD
    before, temp = _studies_snapshot(server), _temp_files(server)
    r = _upload(server, "big.png", data)
    assert r.status_code == 413, r.text[:500]
    detail = r.json()["detail"]
    assert "max_upload_bytes" in detail and str(MAX_UPLOAD) in detail, detail
    assert _new_temp_files(server, temp) == []
    assert _studies_snapshot(server) == before
    # the limit guards every upload endpoint, label saves included
    r = _save_label(server, "img_0", data)
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"], r.text[:500]
    assert _new_temp_files(server, temp) == [] and _studies_snapshot(server) == before
    # the server answers the next valid request
    r = _by_id(server, "img_0", {"text": "polyp", "num_samples": 2, "seed": 1})
    assert r.status_code == 200, r.text[:500]


def test_oversize_chunked_upload_without_content_length_gets_413(server):
    """A streamed (chunked) body has no Content-Length: it is counted while it arrives and cut off at the limit."""
    import uuid

    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{\"text\": \"polyp\"}}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    data = _noise_png(400)

    def body():  # a generator: requests sends it with Transfer-Encoding: chunked
        yield head
        for i in range(0, len(data), 32 * 1024):
            yield data[i:i + 32 * 1024]
        yield f"\r\n--{boundary}--\r\n".encode()

    temp = _temp_files(server)
    r = requests.post(f"{server['url']}/infer/toy", params={"output": "json"}, data=body(), timeout=120,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text[:500]
    assert "max_upload_bytes" in r.json()["detail"]
    assert _new_temp_files(server, temp) == []
    assert _by_id(server, "img_0").status_code == 200


def test_upload_within_the_limit_works_and_is_cleaned_up(server):
    data = _noise_png(256)  # ~197 KB: under the 256 KiB limit
    assert 150_000 < len(data) < MAX_UPLOAD
    temp = _temp_files(server)
    r = _upload(server, "near_limit.png", data, {"text": "polyp", "num_samples": 2})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["shape"] == [256, 256]
    assert _new_temp_files(server, temp) == []  # MONAI Label's background task removed the upload after the answer


def test_failed_uploads_leave_no_temporary_files(server):
    """An upload the app refuses (4xx) is removed too (MONAI Label's own clean-up runs only after a success)."""
    temp = _temp_files(server)
    for name, data in (("bad.png", b"not a png"), ("bad.nii.gz", b"not a nifti"),
                       ("bomb.png", _png_header_claiming(20000, 20000))):
        assert _upload(server, name, data).status_code in (413, 422)
    assert _new_temp_files(server, temp) == []
    # refused label saves too (unreadable label, wrong shape, bad prompt): the datastore deletes the upload
    wrong_shape = _png(np.zeros((17, 23), dtype=np.uint8))
    for data, info in ((b"not a png", {"text": "polyp"}), (wrong_shape, {"text": "polyp"}),
                       (_png(np.zeros((64, 64), dtype=np.uint8)), {"text": "\x00\x01"})):
        r = _save_label(server, "img_0", data, params=info)
        assert 400 <= r.status_code < 500, r.text[:300]
    assert _new_temp_files(server, temp) == []


def test_max_upload_bytes_values():
    from vlseg.app_support.upload_limit import DEFAULT_MAX_UPLOAD_BYTES, parse_size

    assert parse_size("256K") == MAX_UPLOAD and parse_size("1GiB") == DEFAULT_MAX_UPLOAD_BYTES == 2**30
    assert parse_size("512M") == 512 * 2**20 and parse_size("1000") == 1000 and parse_size(0) == 0
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_documented_server_commands_bind_loopback():
    """Every ``monailabel start_server`` command line in the docs, scripts and app passes ``--host 127.0.0.1``
    (MONAI Label's own default is 0.0.0.0), and the start helper the demo and tests use defaults to it."""
    import inspect
    import re

    from vlseg.app_support import server as server_mod

    files = [REPO / "README.md", APP / "README.md", APP / "main.py", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "bundles").glob("*/docs/README.md")), *sorted((REPO / "scripts").glob("*.*"))]
    commands = []
    for f in files:
        text = re.sub(r"\\\n\s*", " ", f.read_text(errors="replace"))  # join continued shell lines
        commands += [(f.name, m.group(0)) for m in re.finditer(r"monailabel start_server --app[^\n`]*", text)]
    assert len(commands) >= 3, commands
    bad = [(name, c) for name, c in commands if not re.search(r"--host 127\.0\.0\.1\b", c)]
    assert not bad, f"start_server commands without --host 127.0.0.1: {bad}"
    assert inspect.signature(server_mod.start_server).parameters["host"].default == "127.0.0.1"
