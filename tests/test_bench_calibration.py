"""vlseg.bench.calibration against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from vlseg.bench.calibration import (
    CalibrationAccumulator,
    auroc,
    auroc_ranks,
    boundary_band,
    expected_calibration_error,
    region_means,
    reliability_bins,
)


def test_ece_top_label_hand_computed():
    p = np.array([0.9, 0.75, 0.3, 0.62])
    y = np.array([1, 0, 0, 1])
    # confidences .9 .75 .7 .62 fall in 4 different bins; correct = 1 0 1 1
    assert expected_calibration_error(p, y) == pytest.approx((0.1 + 0.75 + 0.3 + 0.38) / 4)
    # one bin: |mean confidence - accuracy| = |0.7425 - 0.75|
    assert expected_calibration_error(p, y, n_bins=1) == pytest.approx(0.0075)
    # two pixels in the same bin: mean confidence .92, accuracy .5
    assert expected_calibration_error([0.91, 0.07], [1, 1]) == pytest.approx(0.42)


def test_ece_positive_mode_and_bins():
    p = np.array([0.1, 0.2, 0.85, 0.95])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(p, y, n_bins=2, mode="positive") == pytest.approx((2 * 0.35 + 2 * 0.1) / 4)
    bins = reliability_bins(p, y, n_bins=2, mode="positive")
    np.testing.assert_allclose(bins["count"], [2, 2])
    np.testing.assert_allclose(bins["confidence"], [0.15, 0.9])
    np.testing.assert_allclose(bins["accuracy"], [0.5, 1.0])
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [1])


def test_ece_perfectly_calibrated_is_near_zero_and_accumulator_matches():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    y = rng.uniform(size=p.size) < p
    assert expected_calibration_error(p, y) < 0.01
    acc = CalibrationAccumulator()
    for chunk in np.array_split(np.arange(p.size), 7):
        acc.add(p[chunk], y[chunk])
    assert acc.ece() == pytest.approx(expected_calibration_error(p, y))
    # an over-confident model: says 0.99 but is right 70% of the time
    assert expected_calibration_error(np.full(1000, 0.99), np.arange(1000) % 10 < 7) == pytest.approx(0.29)


def test_auroc_hand_computed_ties_and_constructed_case():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc_ranks([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert auroc_ranks([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=5000), rng.uniform(size=5000) < 0.3
    s = s + t  # informative score
    assert auroc_ranks(s, t) == pytest.approx(auroc(s, t), abs=1e-12)
    # uncertainty exactly high where the prediction is wrong -> 1
    errors = np.zeros((32, 32), bool)
    errors[10:14, 5:20] = True
    unc = np.where(errors, 0.8, 0.1) + rng.uniform(0, 0.05, size=errors.shape)
    assert auroc(unc, errors) == 1.0
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_boundary_band_and_region_means():
    m = np.zeros((7, 7))
    m[1:6, 1:6] = 1
    band = boundary_band(m, width=1)
    assert band.sum() == 16 and not band[2:5, 2:5].any()
    assert boundary_band(m, width=2).sum() == 24  # only the centre pixel survives two erosions
    u = np.where(band, 0.9, 0.2)
    r = region_means(u, m, width=1)
    assert r["boundary"] == pytest.approx(0.9) and r["interior"] == pytest.approx(0.2)
    assert r["background"] == pytest.approx(0.2) and r["n_boundary"] == 16 and r["n_interior"] == 9
    assert r["n_background"] == 49 - 25
