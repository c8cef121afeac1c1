"""The torchvision import shim: imports work in every process, nms is correct, the hook is inert otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from vlseg.compat.torchvision_ops import nms_reference


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **env})


def _brute_force_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, xx2 - xx1) * max(0.0, yy2 - yy1)
            a = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            b = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            if inter / (a + b - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_reference_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    wh = torch.rand(60, 2, generator=g) * 20 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=g)
    for thr in (0.1, 0.5, 0.8):
        assert nms_reference(boxes, scores, thr).tolist() == _brute_force_nms(boxes.tolist(), scores.tolist(), thr)
    assert nms_reference(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_import_chain_in_fresh_process():
    """torchvision, open_clip, segment_anything and monailabel import in a fresh interpreter of this environment."""
    code = (
        "import torchvision, open_clip, segment_anything, timm, monailabel.interfaces.app, torch\n"
        "from vlseg.compat.torchvision_ops import ensure_torchvision_importable, nms_reference\n"
        "mode = ensure_torchvision_importable()\n"
        "b = torch.tensor([[0,0,10,10],[1,1,11,11],[50,50,60,60]], dtype=torch.float); s = torch.tensor([.9,.8,.7])\n"
        "print(mode, torch.ops.torchvision.nms(b, s, 0.5).tolist(), nms_reference(b, s, 0.5).tolist())\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    mode, *rest = r.stdout.split(maxsplit=1)
    assert mode in ("compiled", "schemas")
    assert "[0, 2] [0, 2]" in rest[0]


def test_hook_is_what_makes_the_import_work_here():
    """Where torchvision's compiled ops cannot load (this CPU machine), disabling the shim breaks the import;
    where they load (a CUDA machine, a CPU build), the shim reports 'compiled' and stays out of the way."""
    probe = _run("from vlseg.compat.torchvision_ops import compiled_ops_available as c; print(c())",
                 VLSEG_DISABLE_TORCHVISION_SHIM="1")
    assert probe.returncode == 0, probe.stderr
    compiled = probe.stdout.strip() == "True"
    r = _run("import torchvision", VLSEG_DISABLE_TORCHVISION_SHIM="1")
    if compiled:
        assert r.returncode == 0, r.stderr[-2000:]
    else:
        assert r.returncode != 0 and "torchvision::nms" in r.stderr
