"""Tests of the synthetic demo-data generator (vlseg.data.demo).

The checks re-derive every property from the written files (not from the
generator's internals), so they test what downstream code will actually read.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vlseg.data import demo
from vlseg.data.demo import (
    CATEGORIES,
    PROMPT_KEYS,
    ensure_demo_dataset,
    generate_demo_dataset,
    text_blind_ceiling,
    volume_items,
)
from vlseg.data.volume_slices import window_to_uint8

APP = Path(__file__).resolve().parents[1] / "apps" / "vlseg"

SMALL = {"n_images": (6, 2, 2), "n_volumes": (1, 1, 2), "volume_shape": (64, 64, 10)}
SPLIT_FOLDERS = {"training": "train", "validation": "validation", "test": "test"}
GRID = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_small")
    return root, generate_demo_dataset(root, seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _by_image(items):
    groups = defaultdict(list)
    for item in items:
        groups[item["image_id"]].append(item)
    return groups


def _mask(root: Path, rel: str) -> np.ndarray:
    image = Image.open(root / rel)
    assert image.mode == "L"
    array = np.asarray(image)
    assert set(np.unique(array)) <= {0, 255}
    return array > 0


def _grid_word(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    height, width = mask.shape[:2]
    return GRID[min(int(3 * rows.mean() / height), 2)][min(int(3 * cols.mean() / width), 2)]


def _all_2d_items(datalist):
    """The items of the 2D (RGB) images, without the slices of volumes."""
    return [item for key in SPLIT_FOLDERS for item in datalist[key] if item.get("source") != "volume_slice"]


def _slice_items(datalist, key):
    return [item for item in datalist[key] if item.get("source") == "volume_slice"]


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = generate_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = generate_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        assert files_a[name] == files_b[name], name
    assert a != c
    assert files_a["images/train/train_0000.png"] != files_c["images/train/train_0000.png"]
    assert files_a["volumes/vol_000.nii.gz"] != files_c["volumes/vol_000.nii.gz"]


def test_split_sizes_do_not_change_other_images(tmp_path):
    """Each image has its own random stream: adding test images leaves training images unchanged."""
    generate_demo_dataset(tmp_path / "a", seed=0, n_images=(2, 1, 1), n_volumes=0)
    generate_demo_dataset(tmp_path / "b", seed=0, n_images=(2, 1, 3), n_volumes=0)
    for rel in ("images/train/train_0001.png", "images/test/test_0000.png", "labels/train/train_0000_obj1.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


# --------------------------------------------------------------------------- 2D content


def test_layout_counts_and_split_folders(small_set):
    root, datalist = small_set
    image_ids = {}
    for key, folder in SPLIT_FOLDERS.items():
        groups = _by_image(item for item in datalist[key] if item.get("source") != "volume_slice")
        assert len(groups) == SMALL["n_images"][list(SPLIT_FOLDERS).index(key)]
        for image_id, items in groups.items():
            assert {item["image"] for item in items} == {f"images/{folder}/{image_id}.png"}
            assert all(item["label"].startswith(f"labels/{folder}/{image_id}_obj") for item in items)
        image_ids[key] = set(groups)
    # splits are by image: no image id is shared
    assert not (image_ids["training"] & image_ids["validation"])
    assert not (image_ids["training"] & image_ids["test"])
    assert not (image_ids["validation"] & image_ids["test"])


def test_images_are_rgb_of_requested_size(small_set):
    root, datalist = small_set
    for item in _all_2d_items(datalist):
        image = Image.open(root / item["image"])
        assert image.mode == "RGB" and image.size == (192, 192)


def test_each_image_has_2_or_3_distinct_objects(small_set):
    _, datalist = small_set
    for items in _by_image(_all_2d_items(datalist)).values():
        assert 2 <= len(items) <= 3
        assert sorted(item["object_index"] for item in items) == list(range(len(items)))
        assert all(item["n_objects"] == len(items) for item in items)
        assert len({item["category"] for item in items}) == len(items)
        assert len({item["position"] for item in items}) == len(items)
        assert all(item["category"] in CATEGORIES for item in items)


def test_masks_single_connected_non_overlapping_and_positions_match(small_set):
    root, datalist = small_set
    for items in _by_image(_all_2d_items(datalist)).values():
        masks = [_mask(root, item["label"]) for item in items]
        for item, mask in zip(items, masks):
            assert mask.sum() > 0
            assert ndimage.label(mask)[1] == 1, item["label"]
            assert _grid_word(mask) == item["position"], item["label"]
        assert (np.sum(masks, axis=0) <= 1).all(), "objects of one image overlap"


def test_sizes_ordered_by_area(small_set):
    root, datalist = small_set
    areas = defaultdict(list)
    for item in _all_2d_items(datalist):
        areas[item["size"]].append(_mask(root, item["label"]).sum())
    ranges = [(min(areas[s]), max(areas[s])) for s in ("small", "medium", "large") if areas[s]]
    for (_, lower_max), (upper_min, _) in zip(ranges, ranges[1:]):
        assert lower_max < upper_min


def test_prompts(small_set):
    _, datalist = small_set
    assert datalist["prompt_keys"] == list(PROMPT_KEYS)
    every = [item for key in SPLIT_FOLDERS for item in datalist[key]] + datalist["volumes"]
    assert any(item.get("source") == "volume_slice" for item in every)
    for items in _by_image(every).values():
        for item in items:
            prompts = item["prompts"]
            assert set(prompts) == set(PROMPT_KEYS)
            assert all(isinstance(p, str) and p for p in prompts.values())
            assert prompts["p1"] == item["category"]
            assert item["text"] == prompts["p9"] == prompts["original"]
            for key in ("p2", "p5", "p7", "p8", "p9"):
                assert item["size"] in prompts[key]
            assert prompts["p3"] == f"{item['brightness']} {item['category']}"
            assert prompts["p4"] == f"{item['shape']} {item['category']}"
            assert prompts["p6"] == f"{item['category']} in the {item['position']}"
            assert prompts["p9"].endswith(f" in the {item['position']} of the image")
            assert prompts["missing_location"] + f" in the {item['position']} of the image" == prompts["p9"]
            assert prompts["underdescriptive"] == f"{item['category'].capitalize()} visible."
            assert prompts["overdescriptive"].startswith(prompts["p9"] + ", ")
            contradictory = prompts["contradictory"]
            assert item["category"] in contradictory
            assert f" in the {item['position']} of" not in contradictory
            assert f"one {item['size']} " not in contradictory
            other = items[item["other_object_index"]]
            assert other["object_index"] != item["object_index"]
            assert item["other_label"] == other["label"]
            assert prompts["other_object"] == other["prompts"]["p9"]


# --------------------------------------------------------------------------- MONAI + volumes


def test_load_decathlon_datalist_resolves_existing_paths(small_set):
    monai_data = pytest.importorskip("monai.data")
    root, _ = small_set
    for key in ("training", "validation", "test", "volumes"):
        items = monai_data.load_decathlon_datalist(str(root / "datalist.json"), True, key, base_dir=str(root))
        assert items
        for item in items:
            assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
            assert Path(item["image"]).is_absolute()


def test_volumes(small_set):
    nib = pytest.importorskip("nibabel")
    root, datalist = small_set
    groups = _by_image(datalist["volumes"])
    assert len(groups) == sum(SMALL["n_volumes"])
    for vol_id, items in groups.items():
        image = nib.load(str(root / items[0]["image"]))
        assert image.shape == SMALL["volume_shape"]
        assert image.get_data_dtype() == np.float32
        np.testing.assert_allclose(np.diag(image.affine), [1.0, 1.0, 2.5, 1.0])
        assert 2 <= len(items) <= 3 and len({it["category"] for it in items}) == len(items)
        masks = []
        for item in items:
            label = nib.load(str(root / item["label"]))
            assert label.shape == image.shape
            np.testing.assert_array_equal(label.affine, image.affine)
            assert label.get_data_dtype() == np.uint8
            mask = np.asanyarray(label.dataobj)
            assert set(np.unique(mask)) <= {0, 1}
            assert ndimage.label(mask)[1] == 1
            assert mask.any(axis=(0, 1)).sum() >= 3, "objects span several slices"
            assert _grid_word(mask.any(axis=2)) == item["position"]
            masks.append(mask)
        assert (np.sum(masks, axis=0) <= 1).all()


# --------------------------------------------------------------------------- ceiling


def test_text_blind_ceiling_is_low(tmp_path):
    datalist = generate_demo_dataset(tmp_path, seed=0, n_images=(0, 0, 30), n_volumes=0)
    stored = datalist["text_blind_ceiling"]
    ceiling = text_blind_ceiling(tmp_path / "datalist.json", tmp_path, split="test")
    print("text-blind ceiling (30 test images):", json.dumps(ceiling))
    assert ceiling == stored
    assert ceiling["n_images"] == 30 and ceiling["n_samples"] == len(datalist["test"])
    names = ("union", "random_object", "largest", "brightest", "most_salient")
    assert ceiling["max"] == max(ceiling[n] for n in names)
    # a single pick scores 1 on one sample per image and 0 elsewhere
    assert ceiling["largest"] == pytest.approx(30 / ceiling["n_samples"], abs=1e-4)
    assert ceiling["max"] < 0.6


def test_ceiling_in_datalist_and_readme(small_set):
    root, datalist = small_set
    assert datalist["text_blind_ceiling"]["split"] == "test"
    assert datalist["text_blind_ceiling"]["max"] is not None
    readme = (root / "README.md").read_text()
    assert "Text-blind ceiling" in readme and str(datalist["text_blind_ceiling"]["max"]) in readme
    assert json.loads((root / "datalist.json").read_text()) == datalist


# --------------------------------------------------------------------------- caching / API


def test_ensure_demo_dataset_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSEG_DEMO_DIR", str(tmp_path / "cache"))
    path = ensure_demo_dataset(**SMALL)
    assert path == tmp_path / "cache" / "datalist.json" and path.is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (path, tmp_path / "cache" / "images/train/train_0000.png")}
    assert ensure_demo_dataset(tmp_path / "cache", **SMALL) == path
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "second call must not regenerate"

    # different parameters regenerate, and stale files of the old set are removed
    ensure_demo_dataset(tmp_path / "cache", n_images=(1, 1, 1), n_volumes=0)
    assert json.loads(path.read_text())["params"]["n_images"] == [1, 1, 1]
    assert not (tmp_path / "cache" / "images/train/train_0005.png").exists()
    assert not (tmp_path / "cache" / "volumes").exists()


def test_missing_file_or_overwrite_triggers_regeneration(tmp_path):
    generate_demo_dataset(tmp_path, **SMALL)
    image = tmp_path / "images/test/test_0001.png"
    image.unlink()
    generate_demo_dataset(tmp_path, **SMALL)
    original = image.read_bytes()
    image.write_bytes(b"corrupted")  # not detected without overwrite (only existence is checked) ...
    generate_demo_dataset(tmp_path, **SMALL)
    assert image.read_bytes() == b"corrupted"
    generate_demo_dataset(tmp_path, overwrite=True, **SMALL)  # ... but overwrite rewrites everything
    assert image.read_bytes() == original


def test_default_root(monkeypatch):
    monkeypatch.delenv("VLSEG_DEMO_DIR", raising=False)
    assert demo.default_demo_root() == Path.home() / ".cache" / "vlseg" / "demo"


def test_cli_small(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--small", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "training" in out and "text-blind ceiling" in out
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert datalist["seed"] == 1 and datalist["params"]["n_images"] == list(demo.SMALL_N_IMAGES)
    assert datalist["params"]["n_volumes"] == list(demo.SMALL_N_VOLUMES)


# --------------------------------------------------------------------------- volume splits and slices


def test_volumes_have_their_own_split_and_test_volumes_are_held_out(small_set):
    _, datalist = small_set
    ids = {}
    for split, n in zip(SPLIT_FOLDERS, SMALL["n_volumes"]):
        vols = volume_items(datalist, split)
        assert all(item["split"] == split for item in vols)
        ids[split] = {item["image_id"] for item in vols}
        assert len(ids[split]) == n
        sliced = {item["volume_id"] for item in _slice_items(datalist, split)}
        assert sliced == (ids[split] if split != "test" else set()), split
    assert not (ids["training"] & ids["validation"]) and not (ids["test"] & (ids["training"] | ids["validation"]))
    assert ids["test"] == {"vol_000", "vol_001"}  # one count = test volumes, named as before the split existed
    slice_images = {item["image"] for key in SPLIT_FOLDERS for item in _slice_items(datalist, key)}
    assert not any(vol_id in image for vol_id in ids["test"] for image in slice_images)


def test_slice_items_are_the_apps_windowed_slices(small_set):
    nib = pytest.importorskip("nibabel")
    root, datalist = small_set
    depth = SMALL["volume_shape"][2]
    for split in ("training", "validation"):
        slices = _slice_items(datalist, split)
        vols = _by_image(volume_items(datalist, split))
        assert len(slices) == depth * sum(len(items) for items in vols.values())  # every slice x every object
        for item in slices:
            vol_item = next(v for v in vols[item["volume_id"]] if v["object_index"] == item["object_index"])
            volume = np.asarray(nib.load(str(root / vol_item["image"])).dataobj, dtype=np.float32)
            mask3d = np.asanyarray(nib.load(str(root / vol_item["label"])).dataobj) > 0
            k = item["slice_index"]
            image = Image.open(root / item["image"])
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), window_to_uint8(volume)[:, :, k])
            np.testing.assert_array_equal(_mask(root, item["label"]), mask3d[:, :, k])
            assert item["empty"] == (not mask3d[:, :, k].any())
            assert item["prompts"] == vol_item["prompts"] and item["text"] == vol_item["text"]
            assert item["image_id"] == f"{item['volume_id']}_s{k:02d}"
        assert any(item["empty"] for item in slices) and not all(item["empty"] for item in slices)


def test_window_is_the_apps_window():
    """The generator windows slices with the app's own function (one implementation, vlseg.data.volume_slices), and
    that function does what its docstring says: percentile window, integer 0..255 kept, fixed bounds clipped."""
    sys.path.insert(0, str(APP))
    try:
        from lib.imageio import window_to_uint8 as app_window
    finally:
        sys.path.remove(str(APP))
    assert app_window is window_to_uint8
    rng = np.random.default_rng(0)
    v = rng.normal(0.4, 0.1, (16, 12, 5)).astype(np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    out = window_to_uint8(v)
    assert out.dtype == np.uint8 and (out[v <= lo] == 0).all() and (out[v >= hi] == 255).all()
    ints = rng.integers(0, 200, (8, 8, 3))
    np.testing.assert_array_equal(window_to_uint8(ints), ints.astype(np.uint8))
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    np.testing.assert_array_equal(window_to_uint8(hu, (-160, 240)), [[0, 0, 128, 255, 255]])


def test_bad_volume_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_volumes"):
        generate_demo_dataset(tmp_path, n_images=(1, 0, 0), n_volumes=(1, 2))
    with pytest.raises(ValueError, match="n_volumes"):
        generate_demo_dataset(tmp_path, n_images=(1, 0, 0), n_volumes=(1, -1, 0))
