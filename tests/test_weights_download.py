"""`python -m monai.bundle download_large_files` fetches every bundle's pretrained files to where its configs look.

Each bundle is copied, its ``large_files.yml`` URLs are pointed at a local HTTP server on 127.0.0.1 that serves
small stand-in files, and the real command runs in a subprocess. Then every weights key of the paper configs
(``*_weights``, ``*_pretrained``, ``*_checkpoint``, ``*vocab``; not ``checkpoint``, the bundle's own trained
``models/model.pt``) must name a file that landed, or a folder holding
one. Also: no entry has an empty URL, every URL is https, and a hash is given as a pair (type and value) or not
at all.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "large_files.yml").is_file())
WEIGHT_KEY = re.compile(r"(weights|pretrained|checkpoint|vocab|_tower_dir)$")
#: config files that are not weights variants (the paper configs, the size variants, the run modes)
_NOT_WEIGHT_VARIANTS = {"train", "inference", "evaluate", "multi_gpu_train", "small", "tiny", "metadata"}


def _entries(bundle: str) -> list[dict]:
    return yaml.safe_load((ROOT / "bundles" / bundle / "large_files.yml").read_text())["large_files"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_large_files_entries_are_complete(bundle):
    entries = _entries(bundle)
    assert entries, f"{bundle}: large_files.yml lists nothing"
    paths = [e["path"] for e in entries]
    assert len(set(paths)) == len(paths), f"{bundle}: a path is listed twice"
    for e in entries:
        assert e.get("url"), f"{bundle}: {e['path']} has an empty url (download_large_files crashes on it)"
        assert urlparse(e["url"]).scheme == "https", e["url"]
        assert bool(e.get("hash_type")) == bool(e.get("hash_val")), f"{bundle}: {e['path']}: hash type without value"
        assert not Path(e["path"]).is_absolute() and ".." not in Path(e["path"]).parts, e["path"]


class _StandIns(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def stand_in_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIns)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _copy_bundle(bundle: str, dest: Path) -> Path:
    src = ROOT / "bundles" / bundle
    out = dest / bundle
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("models", "eval", "__pycache__", "runs"))
    (out / "models").mkdir()
    return out


def _configured_weight_paths(bundle_dir: Path) -> dict[str, Path]:
    """Every weights key of the paper train and inference configs, alone and with each weights variant (e.g.
    MedCLIPSeg's ``unimedclip.json``, ViLMedSAM's ``biomedclip.json``), parsed with the copy as ``bundle_root``."""
    from vlseg.bundles import bundle_context, load_parser

    variants = [None] + sorted(p.stem for p in (bundle_dir / "configs").glob("*.json")
                               if p.stem not in _NOT_WEIGHT_VARIANTS)
    found = {}
    for base, variant in ((b, v) for b in ("train.json", "inference.json") for v in variants):
        with bundle_context(bundle_dir):
            parser = load_parser(bundle_dir, variant, base=base)
            for key in list(parser.config.keys()):
                if not WEIGHT_KEY.search(key) or key.startswith("require_") or key == "checkpoint":
                    continue  # ``checkpoint``: this project's own trained model.pt, made by training, not fetched
                value = parser.get_parsed_content(key)
                if isinstance(value, (str, os.PathLike)) and str(value):
                    found[f"{base}+{variant or 'paper'}:{key}"] = Path(value)
    return found


@pytest.mark.parametrize("bundle", BUNDLES)
def test_download_large_files_lands_where_configs_look(bundle, tmp_path, stand_in_server):
    copy = _copy_bundle(bundle, tmp_path)
    port = stand_in_server.server_address[1]
    entries = _entries(bundle)
    files, served = {}, []
    for i, e in enumerate(entries):
        url_path = f"/{i}/{Path(urlparse(e['url']).path).name or 'file'}"
        files[url_path] = f"stand-in {bundle} {e['path']}\n".encode()
        served.append(url_path)
        e["url"] = f"http://127.0.0.1:{port}{url_path}"
        e.pop("hash_type", None), e.pop("hash_val", None)  # the stand-ins cannot match published hashes
    _StandIns.files = files
    (copy / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))

    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(copy)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for e, url_path in zip(entries, served):
        target = copy / e["path"]
        assert target.is_file(), f"{e['path']} did not land"
        assert target.read_bytes() == files[url_path]

    landed = {(copy / e["path"]).resolve() for e in entries}
    configured = _configured_weight_paths(copy)
    assert configured, f"{bundle}: no weights keys found in the paper configs"
    for key, path in configured.items():
        path = path.resolve()
        covered = path in landed or (path.is_dir() and any(p.parent == path for p in landed))
        assert covered, (f"{bundle} {key} reads {path.relative_to(copy) if path.is_relative_to(copy) else path}, "
                         f"which large_files.yml does not fetch")
