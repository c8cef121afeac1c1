"""The annotation page's JavaScript modules (apps/vlseg/web/annotate) against the Python side, in Node (no browser,
no server; about a second): the file formats the page reads and writes (NIfTI, .npy, 8-bit PNG) through nibabel,
numpy and Pillow, the grey window of volumes against the app's ``window_to_uint8``, the slice layout, the draft
coding, the fill tool against scipy's connected regions, the colour table and the work-list order. Skips without
Node 18+ (the browser test, tests/test_annotation_page.py, runs the same modules in Chromium).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "apps" / "vlseg" / "web" / "annotate"

SCRIPT = """
const [input] = process.argv.slice(-1);
const web = process.env.VLSEG_WEB;
const f = await import(web + "/formats.js"), v = await import(web + "/volume.js"), d = await import(web + "/draft.js");
const t = await import(web + "/tools.js"), view = await import(web + "/view.js"), w = await import(web + "/worklist.js");
const inp = JSON.parse(require_fs.readFileSync(input, "utf8"));
const b64 = (u8) => Buffer.from(u8).toString("base64");
const out = {};
// NIfTI: read (gz, float32) -> stack -> back; write a uint8 label on the image's grid
const nii = await f.readNifti(new Uint8Array(Buffer.from(inp.nifti, "base64")));
const stack = v.fromNifti(nii.dims, nii.data);
out.dims = nii.dims;
out.stack = Array.from(stack);
out.window = Array.from(v.windowToU8(nii.data));
const mask = Uint8Array.from(stack, (x) => (x > 400 ? 2 : 0));
out.mask_nifti = b64(await f.writeNiftiU8(nii.header, nii.littleEndian, nii.dims, v.toNifti(nii.dims, mask)));
// .npy in C and Fortran order -> stack order
for (const k of ["npy_c", "npy_f"]) {
  const a = f.readNpy(f.base64ToBytes(inp[k]));
  out[k] = {shape: a.shape, stack: Array.from(v.fromNumpy(a.shape, a.data))};
}
// 8-bit grey PNG of a label
const lab = Uint8Array.from(inp.label2d.data);
out.png = b64(await f.encodePngGray8(lab, inp.label2d.w, inp.label2d.h));
// drafts: run-length code round trip
out.rle = d.rleEncode(lab);
out.rle_back = Array.from(d.rleDecode(out.rle, lab.length));
// fill from a seed, brush disc
const filled = lab.slice();
out.fill_changed = t.floodFill(filled, inp.label2d.w, inp.label2d.h, inp.seed[0], inp.seed[1], 1);
out.filled = Array.from(filled);
const disc = new Uint8Array(15 * 15);
out.disc_changed = t.paintDisc(disc, 15, 15, 7, 7, 3, 1);
out.disc = Array.from(disc);
out.lut = view.LUT;
out.order = w.orderImages(inp.objects).map((r) => r.id);
out.key = w.scoreKey({scoring: {uncertainty: {score: "mi_top5"}}});
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def js():
    node = shutil.which("node")
    if not node:
        pytest.skip("Node.js is not installed (the browser test covers the same modules)")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    if major < 18:
        pytest.skip(f"Node {major} has no CompressionStream / Blob streams (18+ needed)")
    return node


def _run(node, tmp_path, inputs: dict) -> dict:
    (tmp_path / "in.json").write_text(json.dumps(inputs))
    script = "import * as require_fs from 'node:fs';\n" + SCRIPT
    r = subprocess.run([node, "--input-type=module", "-e", script, str(tmp_path / "in.json")],
                       capture_output=True, text=True, timeout=60, env={"VLSEG_WEB": WEB.as_uri(), "PATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_page_modules_match_the_python_side(js, tmp_path):
    import nibabel as nib
    from PIL import Image
    from scipy import ndimage

    sys.path.insert(0, str(REPO / "apps" / "vlseg"))
    try:
        from lib.imageio import window_to_uint8
    finally:
        sys.path.remove(str(REPO / "apps" / "vlseg"))

    rng = np.random.default_rng(0)
    vol = (np.abs(rng.normal(300, 120, size=(7, 5, 3))) ** 1.1).astype(np.float32)  # rows != cols != slices
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    affine[:3, 3] = [-10, 4, 3]
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "v.nii.gz"))
    u = rng.uniform(0, 1, size=(6, 4, 3)).astype(np.float32)
    npy = {}
    for key, arr in (("npy_c", np.ascontiguousarray(u)), ("npy_f", np.asfortranarray(u))):
        buf = io.BytesIO()
        np.save(buf, arr)
        npy[key] = base64.b64encode(buf.getvalue()).decode()
    label = (rng.uniform(size=(9, 11)) > 0.6).astype(np.uint8) * 3
    background = label == 0
    seed = tuple(int(x) for x in np.argwhere(background)[0])
    objects = {"a": {"image": {"info": {"vlseg_uncertainty_top5": 0.2}}, "labels": {}},
               "b": {"image": {"info": {"vlseg_uncertainty_top5": 0.9}}, "labels": {}},
               "c": {"image": {"info": {}}, "labels": {}},
               "d": {"image": {"info": {"vlseg_uncertainty_top5": 0.99}}, "labels": {"final": {}}},
               "e": {"image": {"info": {"vlseg_uncertainty_top5": 0.5}}, "labels": {}}}
    out = _run(js, tmp_path, {"nifti": base64.b64encode((tmp_path / "v.nii.gz").read_bytes()).decode(), **npy,
                              "label2d": {"data": label.ravel().tolist(), "w": 11, "h": 9}, "seed": seed,
                              "objects": objects})

    # slice layout: stack [k, r, c] = vol[r, c, k], as the app cuts volumes
    assert out["dims"] == [7, 5, 3]
    np.testing.assert_allclose(np.asarray(out["stack"]).reshape(3, 7, 5), vol.transpose(2, 0, 1), rtol=1e-6)
    # the page's grey window = the app's window_to_uint8 (NIfTI order in both)
    ref = window_to_uint8(vol)
    page = np.asarray(out["window"], np.uint8).reshape(vol.shape, order="F")
    assert np.abs(page.astype(int) - ref.astype(int)).max() <= 1 and (page != ref).mean() < 0.05
    # the uint8 label NIfTI the page submits for a volume: nibabel reads the mask on the image's grid
    (tmp_path / "m.nii.gz").write_bytes(base64.b64decode(out["mask_nifti"]))
    m = nib.load(str(tmp_path / "m.nii.gz"))
    assert m.get_data_dtype() == np.uint8
    np.testing.assert_allclose(m.affine, affine, atol=1e-5)
    expected = (vol > 400).astype(np.uint8) * 2
    assert 0 < expected.mean() < 2 and np.array_equal(np.asarray(m.dataobj), expected)
    # the inline .npy map in either memory order
    for key in ("npy_c", "npy_f"):
        assert out[key]["shape"] == [6, 4, 3]
        np.testing.assert_array_equal(np.asarray(out[key]["stack"], np.float32).reshape(3, 6, 4), u.transpose(2, 0, 1))
    # the 2D label PNG: 8-bit grey, the label values exactly
    with Image.open(io.BytesIO(base64.b64decode(out["png"]))) as im:
        assert im.mode == "L" and im.size == (11, 9)
        assert np.array_equal(np.asarray(im), label)
    assert out["rle_back"] == label.ravel().tolist()
    # fill = exactly the seed's 4-connected background region; a disc of radius 3 = 29 pixels
    regions, _ = ndimage.label(background)
    filled = np.asarray(out["filled"]).reshape(9, 11)
    assert np.array_equal(filled == 1, regions == regions[seed]) and out["fill_changed"] == (regions == regions[seed]).sum()
    yy, xx = np.mgrid[:15, :15]
    assert np.array_equal(np.asarray(out["disc"]).reshape(15, 15) == 1, (yy - 7) ** 2 + (xx - 7) ** 2 <= 9)
    # colour table: 256 distinct colours from dark (certain) to bright (uncertain)
    lut = np.asarray(out["lut"])
    assert lut.shape == (256, 3) and len({tuple(c) for c in lut}) == 256 and lut[0].sum() < lut[-1].sum()
    # work list: unlabelled by score (highest first), then unscored, then labelled
    assert out["order"] == ["b", "e", "a", "c", "d"]
    assert out["key"] == "vlseg_uncertainty_mi_top5"  # the strategies' --conf scoring_score
