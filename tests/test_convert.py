"""Tests of the dataset converters (vlseg.data.convert) and the prepare_* CLI wrappers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlseg.data.convert import (
    MEDCLIPSEG_TEST_VARIANTS,
    BinarizeLabeld,
    ConversionError,
    convert_lvit,
    convert_medclipseg,
    convert_medvlsm,
    load_datalist,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} not found (present in CI)")


# ----------------------------------------------------------------------------------------------
# tiny synthetic data sets
# ----------------------------------------------------------------------------------------------
def _image(path: Path, seed: int = 0, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[2:7, 3:9] = 255
    img = Image.fromarray(np.stack([m] * 3, -1)) if path.suffix.lower() in (".jpg", ".jpeg") else Image.fromarray(m)
    img.save(path)
    return path


def _xlsx(path: Path, rows: list[tuple], gt: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gt:
        df = pd.DataFrame(rows, columns=["Image", "Description", "Ground Truth"])
    else:
        df = pd.DataFrame(rows, columns=["Image", "Description"])
    df.to_excel(path, index=False, engine="openpyxl")
    return path


def _mcs_rows(stems, desc="a polyp\n"):
    # MedCLIPSeg writes .png names while the files are .jpg
    return [(f"{s}.png", f"{desc.strip()} {s}\n", f"{s}.png") for s in stems]


def make_medclipseg(root: Path, extra_problems: bool = False) -> Path:
    """Folder layout: Train a,b,c / Val d / Test e,f; jpg files, .png names in the xlsx."""
    split_stems = {"Train": ["a", "b", "c"], "Val": ["d"], "Test": ["e", "f"]}
    for i, (split, stems) in enumerate(split_stems.items()):
        for j, s in enumerate(stems):
            _image(root / f"{split}_Folder" / "img" / f"{s}.jpg", seed=10 * i + j)
            _mask(root / f"{split}_Folder" / "label" / f"{s}.jpg")
    pdir = root / "Prompts_Folder"
    train_rows = _mcs_rows(split_stems["Train"])
    if extra_problems:
        train_rows.append(("ghost.png", "no such image", "ghost.png"))  # row without image
        _image(root / "Train_Folder" / "img" / "nomask.jpg")  # row whose mask is missing
        train_rows.append(("nomask.png", "mask missing", "nomask.png"))
        _image(root / "Train_Folder" / "img" / "orphan.jpg")  # image without row
        train_rows.append(("a.png", "duplicate row", "a.png"))
    _xlsx(pdir / "Train_text.xlsx", train_rows)
    _xlsx(pdir / "Val_text.xlsx", _mcs_rows(split_stems["Val"]))
    _xlsx(pdir / "Train_text_10.xlsx", _mcs_rows(["b"]))
    _xlsx(pdir / "Train_text_50.xlsx", _mcs_rows(["a", "b"]))
    _xlsx(pdir / "Val_text_10.xlsx", _mcs_rows(["d"]))
    for v in MEDCLIPSEG_TEST_VARIANTS:
        stems = split_stems["Test"] if not (extra_problems and v == "contradictory") else ["e"]
        _xlsx(pdir / f"Test_text_{v}.xlsx", _mcs_rows(stems, desc=f"{v} text"))
    return root


def make_medvlsm(root: Path) -> Path:
    for i, s in enumerate(["a", "b", "c", "d"]):
        _image(root / "images" / f"{s}.jpg", seed=i)
        _mask(root / "masks" / f"{s}.jpg")

    def entry(s, nested=True):
        prompts = {
            "p0": "",
            "p1": "polyp",
            "p6": f"one polyp {s}, located in center",
            "p7": ["polyp which is x", "polyp which is y"],
            "p9": [f"one polyp {s} which is x located in center", f"one polyp {s} which is y located in center"],
        }
        e = {"img_name": f"{s}.jpg", "mask_name": f"{s}.jpg", "bbox": [1, 2, 8, 6], "segment_id": s}
        if nested:
            e["prompts"] = prompts
        else:
            e.update(prompts)
        return e

    anns = root / "anns"
    anns.mkdir(parents=True)
    (anns / "train.json").write_text(json.dumps([entry("a"), entry("b", nested=False)]))
    (anns / "val.json").write_text(json.dumps([entry("c")]))
    (anns / "test.json").write_text(json.dumps([entry("d")]))
    (anns / "testB.json").write_text(json.dumps([entry("d")]))
    return root


def make_lvit(root: Path) -> Path:
    split_stems = {"Train": ["t1", "t2"], "Val": ["v1"], "Test": ["s1", "s2"]}
    for split, stems in split_stems.items():
        ext = ".tif" if split == "Test" else ".png"
        for s in stems:
            _image(root / f"{split}_Folder" / "img" / f"{s}{ext}")
            _mask(root / f"{split}_Folder" / "labelcol" / f"{s}.png")
        rows = [(f"{s}.png", f"The nuclei of {s} are dense.\n") for s in stems]
        _xlsx(root / f"{split}_Folder" / f"{split}_text.xlsx", rows, gt=False)
    return root


def _counts(dl, split):
    return dl["match_report"]["splits"][split]["counts"]


# ----------------------------------------------------------------------------------------------
# MedCLIPSeg
# ----------------------------------------------------------------------------------------------
def test_medclipseg_folder_layout(tmp_path):
    root = make_medclipseg(tmp_path / "Kvasir")
    dl = convert_medclipseg(root)
    assert dl["source_layout"] == "medclipseg"
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [3, 1, 2]
    rep = dl["match_report"]
    assert rep["n_unmatched"] == 0 and rep["ok"]
    assert _counts(dl, "training")["matched"] == 3
    a = dl["training"][0]
    assert a["id"] == "a" and a["image"].endswith("Train_Folder/img/a.jpg") and a["label"].endswith("Train_Folder/label/a.jpg")
    assert a["text"] == "a polyp a"  # trailing newline stripped
    assert a["prompts"] == {"original": "a polyp a"}
    for it in dl["test"]:
        assert set(it["prompts"]) == set(MEDCLIPSEG_TEST_VARIANTS)
        assert it["text"] == it["prompts"]["original"] == f"original text {it['id']}"
    assert [it["id"] for it in dl["subsets"]["10"]["training"]] == ["b"]
    assert [it["id"] for it in dl["subsets"]["50"]["training"]] == ["a", "b"]
    assert [it["id"] for it in dl["subsets"]["10"]["validation"]] == ["d"]
    assert "25" not in dl["subsets"]


def test_medclipseg_report_counts_and_strict(tmp_path):
    root = make_medclipseg(tmp_path / "ds", extra_problems=True)
    dl = convert_medclipseg(root)
    c = _counts(dl, "training")
    assert c["rows"] == 6 and c["matched"] == 3
    assert c["rows_without_image"] == 1 and c["rows_without_mask"] == 1
    assert c["images_without_row"] == 1 and c["duplicate_rows"] == 1
    um = dl["match_report"]["splits"]["training"]["unmatched"]
    assert um["rows_without_image"][0]["image"] == "ghost.png"
    assert um["rows_without_mask"][0]["image"] == "nomask.png"
    assert um["images_without_row"][0].endswith("orphan.jpg")
    v = dl["match_report"]["prompt_variants"]["test/contradictory"]
    assert v["counts"]["matched"] == 1 and v["unmatched"]["items_without_row"] == ["f"]
    assert dl["match_report"]["n_unmatched"] == 5
    assert not dl["match_report"]["ok"]
    with pytest.raises(ConversionError, match="strict"):
        convert_medclipseg(root, tmp_path / "out.json", strict=True)
    assert not (tmp_path / "out.json").exists()  # nothing written in strict failure


def test_medclipseg_flat_layout(tmp_path):
    src = make_medclipseg(tmp_path / "src")
    images, masks = tmp_path / "flat" / "images", tmp_path / "flat" / "masks"
    for split in ("Train", "Val", "Test"):
        for p in (src / f"{split}_Folder" / "img").iterdir():
            _image(images / p.name)
        for p in (src / f"{split}_Folder" / "label").iterdir():
            _mask(masks / p.name)
    _image(images / "unlisted.jpg")  # in no table
    dl = convert_medclipseg(images_dir=images, masks_dir=masks, prompts_dir=src / "Prompts_Folder")
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [3, 1, 2]
    assert {it["id"] for it in dl["validation"]} == {"d"}
    un = dl["match_report"]["unassigned"]
    assert un["counts"]["images_without_row"] == 1 and un["counts"]["images_without_mask"] == 1
    assert dl["match_report"]["n_unmatched"] == 2
    with pytest.raises(ConversionError):
        convert_medclipseg(images_dir=images, masks_dir=masks, prompts_dir=src / "Prompts_Folder", strict=True)
    with pytest.raises(ConversionError, match="both"):
        convert_medclipseg(images_dir=images, prompts_dir=src / "Prompts_Folder")


def test_stem_matching_is_exact_and_reports_ambiguity(tmp_path):
    root = tmp_path / "ds"
    _image(root / "Train_Folder" / "img" / "Case1.jpg")
    _mask(root / "Train_Folder" / "label" / "Case1.png")
    _image(root / "Train_Folder" / "img" / "dup.jpg")
    _image(root / "Train_Folder" / "img" / "dup.png")
    _mask(root / "Train_Folder" / "label" / "dup.png")
    _xlsx(
        root / "Prompts_Folder" / "Train_text.xlsx",
        [("case1.png", "lower-case name", "case1.png"), ("Case1.bmp", "other ext", "Case1.tif"), ("dup.bmp", "two files", "dup.png")],
    )
    dl = convert_medclipseg(root)
    c = _counts(dl, "training")
    # "case1" != "Case1" (case-sensitive, no fuzzy matching); "Case1.bmp" -> Case1.jpg by stem
    assert c["matched"] == 1 and c["rows_without_image"] == 1 and c["ambiguous"] == 1
    assert dl["training"][0]["image"].endswith("Case1.jpg") and dl["training"][0]["label"].endswith("Case1.png")
    from vlseg.data.convert import _stem

    assert [_stem(n) for n in ("a.PNG", "b.nii.gz", "case.01", "TCGA-1.2.tif", " d.png\n")] == ["a", "b", "case.01", "TCGA-1.2", "d"]


def test_datalist_paths_resolve_with_monai(tmp_path):
    from monai.data import load_decathlon_datalist

    root = make_medclipseg(tmp_path / "Kvasir")
    # output inside the data folder -> relative paths
    inside = root / "datalist.json"
    convert_medclipseg(root, inside)
    raw = json.loads(inside.read_text())
    assert not Path(raw["training"][0]["image"]).is_absolute()
    # output elsewhere -> absolute paths
    outside = tmp_path / "elsewhere" / "kvasir.json"
    convert_medclipseg(root, outside)
    assert Path(json.loads(outside.read_text())["training"][0]["image"]).is_absolute()
    for path in (inside, outside):
        for split in ("training", "validation", "test"):
            items = load_decathlon_datalist(path, data_list_key=split, base_dir=path.parent)
            assert items and all(Path(it["image"]).is_file() and Path(it["label"]).is_file() for it in items)
            assert all(isinstance(it["text"], str) and it["text"] for it in items)
    # a folder as output -> <folder>/datalist.json
    convert_medclipseg(root, tmp_path / "outdir")
    assert (tmp_path / "outdir" / "datalist.json").is_file()


def test_copy_option(tmp_path):
    root = make_lvit(tmp_path / "mon")
    out = tmp_path / "copied" / "dl.json"
    convert_lvit(root, out, copy=True)
    raw = json.loads(out.read_text())
    first = raw["test"][0]
    assert first["image"] == "test/images/s1.tif" and first["label"] == "test/labels/s1.png"
    items = load_datalist(out, "test")
    assert all(Path(it["image"]).is_file() for it in items)
    assert str(tmp_path / "copied") in items[0]["image"]


# ----------------------------------------------------------------------------------------------
# MedVLSM
# ----------------------------------------------------------------------------------------------
def test_medvlsm(tmp_path):
    root = make_medvlsm(tmp_path / "kvasir_polyp")
    dl = convert_medvlsm(root=root)
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [2, 1, 1]
    a, b = dl["training"]
    assert a["prompts"]["p7"] == "polyp which is x" and a["prompts"]["p7_all"] == ["polyp which is x", "polyp which is y"]
    assert a["text"] == a["prompts"]["p9"] == "one polyp a which is x located in center"
    assert a["bbox"] == [1, 2, 8, 6] and a["prompts"]["p0"] == ""
    assert b["prompts"]["p6"] == "one polyp b, located in center"  # top-level p-keys are read too
    rep = dl["match_report"]
    assert rep["n_unmatched"] == 0 and rep["unused_json"] == ["testB.json"]
    assert rep["unassigned"]["counts"]["used"] == 4

    dl = convert_medvlsm(root / "anns", images_dir=root / "images", masks_dir=root / "masks", default_prompt="p6", variant_index=1)
    assert dl["training"][0]["text"] == "one polyp a, located in center"
    assert dl["training"][0]["prompts"]["p9"] == "one polyp a which is y located in center"

    dl = convert_medvlsm(root=root, split_files={"training": "train.json", "testB": "testB.json"})
    assert len(dl["testB"]) == 1 and dl["extra_splits"] == ["testB"]

    with pytest.raises(ConversionError, match="variant_index"):
        convert_medvlsm(root=root, variant_index=5)


def test_medvlsm_unmatched(tmp_path):
    root = make_medvlsm(tmp_path / "ds")
    (root / "masks" / "b.jpg").unlink()
    _image(root / "images" / "extra.jpg")
    entries = json.loads((root / "anns" / "val.json").read_text())
    entries.append({**entries[0], "img_name": "zzz.jpg", "mask_name": "zzz.jpg"})
    (root / "anns" / "val.json").write_text(json.dumps(entries))
    dl = convert_medvlsm(root=root)
    assert _counts(dl, "training")["rows_without_mask"] == 1
    assert _counts(dl, "validation")["rows_without_image"] == 1
    un = dl["match_report"]["unassigned"]["counts"]
    assert un["images_without_row"] == 1 and un["images_without_mask"] == 1  # extra.jpg has neither
    assert dl["match_report"]["n_unmatched"] == 4
    with pytest.raises(ConversionError):
        convert_medvlsm(root=root, strict=True)


# ----------------------------------------------------------------------------------------------
# LViT
# ----------------------------------------------------------------------------------------------
def test_lvit(tmp_path):
    root = make_lvit(tmp_path / "MoNuSeg")
    dl = convert_lvit(root)
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [2, 1, 2]
    assert dl["match_report"]["n_unmatched"] == 0
    s1 = dl["test"][0]
    assert s1["image"].endswith("s1.tif") and s1["label"].endswith("labelcol/s1.png")
    assert s1["text"] == "The nuclei of s1 are dense."

    _image(root / "Val_Folder" / "img" / "lonely.png")  # neither row nor mask
    (root / "Train_Folder" / "labelcol" / "t2.png").unlink()
    dl = convert_lvit(root)
    assert _counts(dl, "training")["rows_without_mask"] == 1
    assert _counts(dl, "validation")["images_without_row"] == 1
    assert _counts(dl, "validation")["images_without_mask"] == 1
    with pytest.raises(ConversionError):
        convert_lvit(root, strict=True)


# ----------------------------------------------------------------------------------------------
# BinarizeLabeld and load_datalist
# ----------------------------------------------------------------------------------------------
def test_binarize_jpeg_mask(tmp_path):
    h, w = 64, 80
    truth = np.zeros((h, w), bool)
    truth[10:40, 20:60] = True
    path = tmp_path / "m.jpg"
    Image.fromarray(np.stack([truth.astype(np.uint8) * 255] * 3, -1)).save(path, quality=60)
    arr = np.asarray(Image.open(path)).transpose(2, 0, 1)  # [3, H, W] with JPEG noise
    noisy = np.unique(arr)
    assert len(noisy) > 2  # JPEG really added intermediate values
    for reduction in ("mean", "max"):
        out = BinarizeLabeld("label", reduction=reduction)({"label": arr})["label"]
        assert out.shape == (1, h, w) and out.dtype == np.float32
        assert set(np.unique(out)) <= {0.0, 1.0}
        assert (out[0].astype(bool) == truth).mean() > 0.99

    # torch / MetaTensor through MONAI's loader
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    d = Compose([LoadImaged("label"), EnsureChannelFirstd("label"), BinarizeLabeld("label")])({"label": str(path)})
    t = d["label"]
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape[0] == 1
    assert set(torch.unique(t).tolist()) <= {0.0, 1.0}
    assert abs(float(t.sum()) - truth.sum()) / truth.sum() < 0.02
    assert hasattr(t, "meta")  # MetaTensor kept

    # [H, W] masks already in {0, 1}, and in [0, 1] floats
    unit = truth.astype(np.uint8)
    out = BinarizeLabeld("label")({"label": unit})["label"]
    assert out.shape == (1, h, w) and (out[0] == unit).all()
    out = BinarizeLabeld("label")({"label": torch.from_numpy(unit * 0.9)})["label"]
    assert out.shape == (1, h, w) and torch.equal(out[0], torch.from_numpy(unit).float())


def test_load_datalist(tmp_path):
    root = make_medclipseg(tmp_path / "Kvasir")
    path = root / "dl.json"
    convert_medclipseg(root, path)
    items = load_datalist(path, "test", prompt_key="contradictory")
    assert [it["text"] for it in items] == ["contradictory text e", "contradictory text f"]
    assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in items)
    assert load_datalist(path, "test")[0]["text"] == "original text e"
    sub = load_datalist(path, "training", subset="50")
    assert [it["id"] for it in sub] == ["a", "b"] and Path(sub[0]["label"]).is_file()
    assert [it["id"] for it in load_datalist(path, "validation", subset=10)] == ["d"]
    with pytest.raises(ValueError, match="available prompt keys.*original"):
        load_datalist(path, "training", prompt_key="p9")
    with pytest.raises(ValueError, match="no subset '25'"):
        load_datalist(path, "training", subset="25")
    with pytest.raises(ValueError, match="no split"):
        load_datalist(path, "nope")


# ----------------------------------------------------------------------------------------------
# CLI wrappers
# ----------------------------------------------------------------------------------------------
def _cli(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_wrappers(tmp_path, capsys):
    mcs = make_medclipseg(tmp_path / "mcs", extra_problems=True)
    out = tmp_path / "o"
    assert _cli("prepare_medclipseg")(["--root", str(mcs), "--output", str(out / "mcs.json")]) == 0
    assert "rows_without_image=1" in capsys.readouterr().out
    assert _cli("prepare_medclipseg")(["--root", str(mcs), "--output", str(out / "x.json"), "--strict"]) == 1
    assert "strict" in capsys.readouterr().err

    vl = make_medvlsm(tmp_path / "vl")
    argv = ["--prompts-dir", str(vl / "anns"), "--images-dir", str(vl / "images"), "--masks-dir", str(vl / "masks")]
    assert _cli("prepare_medvlsm")(argv + ["--output", str(out / "vl.json"), "--default-prompt", "p1", "--strict"]) == 0
    assert load_datalist(out / "vl.json", "training")[0]["text"] == "polyp"
    argv += ["--split-file", "training=train.json", "--split-file", "test=testB.json"]
    assert _cli("prepare_medvlsm")(argv + ["--output", str(out / "vl2.json"), "--quiet"]) == 0
    assert len(json.loads((out / "vl2.json").read_text())["test"]) == 1

    lv = make_lvit(tmp_path / "lv")
    assert _cli("prepare_lvit")(["--root", str(lv), "--output", str(out / "lv.json"), "--strict"]) == 0
    assert len(load_datalist(out / "lv.json", "training")) == 2


# ----------------------------------------------------------------------------------------------
# the real shared data (../shared/data)
# ----------------------------------------------------------------------------------------------
KVASIR = SHARED / "kvasir_seg"


@pytest.mark.shared
@needs_shared
def test_shared_kvasir_medvlsm(tmp_path):
    dl = convert_medvlsm(KVASIR / "prompts" / "medvlsm", tmp_path / "dl.json", images_dir=KVASIR / "images", masks_dir=KVASIR / "masks")
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [800, 100, 100]
    assert dl["match_report"]["n_unmatched"] == 0
    for split in ("training", "validation", "test"):
        items = load_datalist(tmp_path / "dl.json", split, prompt_key="p6")
        assert all(it["text"] and len(it["prompts"]["p9_all"]) == 5 and len(it["bbox"]) == 4 for it in items)
    ids = [set(it["id"] for it in dl[s]) for s in ("training", "validation", "test")]
    assert len(set.union(*ids)) == 1000


@pytest.mark.shared
@needs_shared
def test_shared_kvasir_medclipseg(tmp_path):
    dl = convert_medclipseg(
        images_dir=KVASIR / "images",
        masks_dir=KVASIR / "masks",
        prompts_dir=KVASIR / "prompts" / "medclipseg",
        output=tmp_path / "dl.json",
        strict=True,
    )
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [800, 100, 100]
    assert dl["match_report"]["n_unmatched"] == 0
    assert {k: len(v["training"]) for k, v in dl["subsets"].items()} == {"10": 80, "25": 200, "50": 400}
    assert {k: len(v["validation"]) for k, v in dl["subsets"].items()} == {"10": 10, "25": 25, "50": 50}
    for it in dl["test"]:
        assert set(it["prompts"]) == set(MEDCLIPSEG_TEST_VARIANTS)
        assert all(it["prompts"].values())
    # same split as the MedVLSM JSONs
    vl = {json.loads(Path(KVASIR / "prompts" / "medvlsm" / "test.json").read_text())[i]["img_name"].rsplit(".", 1)[0] for i in range(100)}
    assert {it["id"] for it in dl["test"]} == vl


@pytest.mark.shared
@needs_shared
def test_shared_monuseg_lvit(tmp_path):
    dl = convert_lvit(SHARED / "monuseg", tmp_path / "dl.json", strict=True)
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [24, 6, 14]
    assert dl["match_report"]["n_unmatched"] == 0
    assert all(it["image"].endswith(".tif") for it in dl["test"])
    for split in ("training", "validation", "test"):
        assert all(isinstance(it["text"], str) and it["text"].strip() for it in dl[split])
