"""Shared fixtures: a tiny demo data set generated once per test session, and the shared-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present (only the CI and development machines have it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A tiny demo data set (few images, 64x64) for bundle and app tests; returns the datalist.json path."""
    from vlseg.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("tiny_demo")
    generate_demo_dataset(root, seed=0, n_images=(6, 2, 2), image_size=64, n_volumes=1, volume_shape=(48, 48, 8))
    return root / "datalist.json"


@pytest.fixture(scope="session")
def demo(request, tmp_path_factory) -> Path:
    """The shared ``tiny_demo`` set; if its 3D volume generation fails (a vlseg.data.demo issue with 4-slice volumes,
    reported), the same 2D set without volumes (the bundles only use the 2D items)."""
    try:
        return request.getfixturevalue("tiny_demo")
    except ValueError:
        from vlseg.data.demo import generate_demo_dataset

        root = tmp_path_factory.mktemp("tiny_demo_2d")
        generate_demo_dataset(root, seed=0, n_images=(6, 2, 2), image_size=64, n_volumes=0)
        return root / "datalist.json"
