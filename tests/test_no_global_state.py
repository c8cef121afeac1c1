"""Library code changes no process-wide state: building every bundle's network and tokenizer leaves the
environment variables and the root logger as they were.

Third-party libraries that set variables at import time are imported before the snapshot. Runs in a fresh
interpreter WITHOUT ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` (a user with internet has
neither), so a library that sets them for the whole process is caught.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import json, logging, os, sys
from pathlib import Path
# third-party libraries that set variables when they are imported (MONAI: CUBLAS_WORKSPACE_CONFIG, open_clip:
# TOKENIZERS_PARALLELISM): imported first, so that only what vlseg does is measured
import monai, monai.bundle, open_clip, open_clip.tokenizer, segment_anything, timm, transformers
root = logging.getLogger()
before_env = dict(os.environ)
before_root = (list(root.filters), list(root.handlers), root.level)
from vlseg.bench.bundles import load_bundle_model
from vlseg.text.tokenizers import build_tokenizer
built = []
for name in ("medclipseg", "uavls", "vilmedsam"):
    model = load_bundle_model(Path(sys.argv[1]) / name, "tiny")
    built.append(type(model.network).__name__)
for spec in ("minilm", "cxr-bert", "open_clip:ViT-B-16"):
    build_tokenizer(spec, 16)
after_env = dict(os.environ)
changed = sorted(k for k in set(before_env) | set(after_env) if before_env.get(k) != after_env.get(k))
print("RESULT " + json.dumps({
    "built": built,
    "env_changed": changed,
    "root_filters": len(root.filters) - len(before_root[0]),
    "root_handlers": len(root.handlers) - len(before_root[1]),
    "root_level_changed": root.level != before_root[2],
}))
"""


def test_building_bundles_changes_no_process_state():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT / "bundles")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["built"]) == 3
    assert result["env_changed"] == [], f"library code changed environment variables: {result['env_changed']}"
    assert result["root_filters"] == 0, "library code added filters to the root logger"
    assert result["root_handlers"] == 0, "library code added handlers to the root logger"
    assert not result["root_level_changed"], "library code changed the root logger's level"
