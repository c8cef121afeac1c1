"""MedCLIPSeg's cheaper samplers (``bundles/medclipseg/scripts/sampler.py``, issue 15 item 4) on a tiny random net.

``adaptive`` must be a prefix of the exact N-pass run, stop early only when the passes agree and never exceed
``max_samples``; ``control_variate`` must be unbiased (its mean over many seeds converges to the exact expected
probability); both are reproducible with a seed and reachable through ``StochasticTextInferer(sampler=...)``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bundle_cli import BundleCLI
from vlseg.bundles import bundle_context
from vlseg.inferers import StochasticTextInferer

BUNDLE = BundleCLI("medclipseg").root
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def mcs():
    with bundle_context(BUNDLE):
        import scripts.network
        import scripts.sampler

        yield SimpleNamespace(network=scripts.network, sampler=scripts.sampler)


@pytest.fixture(scope="module")
def inputs():
    from vlseg.text import build_tokenizer

    ids, mask = build_tokenizer("open_clip:ViT-B-16", 16)(["a small polyp", "a large cyst"])
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), ids, mask


def tiny_net(mcs, value_var_bias: float | None = None, gate: float | None = None, up: float = 1.0):
    """Tiny MedCLIPSeg; ``value_var_bias`` sets the raw-variance half of every adapter's ``v_proj`` bias (value noise
    variance ~ softplus(bias)), ``gate`` every adapter's gate logit, ``up`` scales the adapters' up projections."""
    torch.manual_seed(0)
    net = mcs.network.MedCLIPSeg(clip_cfg=TINY_CLIP, adapter_layers=[1], adapter_dim=16, train_encoders=True).eval()
    with torch.no_grad():
        for cross in (m for m in net.modules() if hasattr(m, "v_proj") and hasattr(m, "gate")):
            if value_var_bias is not None:
                cross.v_proj.bias[cross.dim:] = value_var_bias
            if gate is not None:
                cross.gate.fill_(gate)
        for adapter in net.pvl_adapters:
            adapter.proj_vis_up.weight.mul_(up)
            adapter.proj_txt_up.weight.mul_(up)
    return net


def test_adaptive_is_a_prefix_of_the_exact_run_and_stops_early(mcs, inputs):
    net = tiny_net(mcs)
    exact = net.sample_probabilities(*inputs, num_samples=12, seed=3)
    probs, info = mcs.sampler.sample_adaptive(net, *inputs, num_samples=12, seed=3, tolerance=10.0,
                                              mean_tolerance=10.0, min_samples=3)
    assert info["passes"] == 3 and info["stopped_early"] and probs.shape == (3, 2, 1, 32, 32)
    assert torch.allclose(probs, exact[:3], atol=1e-5, rtol=0)
    net.max_sample_batch = 4  # 2 passes of the batch of 2 per forward: same maps
    probs, info = mcs.sampler.sample_adaptive(net, *inputs, num_samples=12, seed=3, tolerance=1e-9,
                                              mean_tolerance=1e-9, min_samples=5, max_samples=9)
    assert info["passes"] == 9 and torch.allclose(probs, exact[:9], atol=1e-5, rtol=0)


def test_adaptive_stops_early_only_when_passes_agree(mcs, inputs):
    # gate -> -inf: every adapter returns its query, the noise cannot reach the output, all passes agree
    quiet = tiny_net(mcs, gate=-100.0)
    probs, info = mcs.sampler.sample_adaptive(quiet, *inputs, num_samples=20, seed=1, tolerance=1e-6,
                                              mean_tolerance=1e-7, min_samples=4)
    assert info["passes"] == 4 and float(probs.std(dim=0).max()) == 0.0
    noisy = tiny_net(mcs, value_var_bias=3.0)
    probs, info = mcs.sampler.sample_adaptive(noisy, *inputs, num_samples=20, seed=1, tolerance=1e-6,
                                              mean_tolerance=1e-7, min_samples=4)
    assert info["passes"] == 20 and not info["stopped_early"]
    assert torch.allclose(probs, noisy.sample_probabilities(*inputs, num_samples=20, seed=1), atol=1e-5, rtol=0)


def test_adaptive_respects_max_samples_and_bad_options(mcs, inputs):
    net = tiny_net(mcs, value_var_bias=3.0)
    probs, info = mcs.sampler.sample_adaptive(net, *inputs, num_samples=20, seed=2, tolerance=1e-6,
                                              mean_tolerance=1e-7, min_samples=2, max_samples=7, step=2)
    # far from the tolerance after 2 passes: jumps straight to max_samples instead of creeping 2 at a time
    assert info["passes"] == 7 and probs.shape[0] == 7 and [t["passes"] for t in info["trace"]] == [2, 7]
    probs, info = mcs.sampler.sample_adaptive(net, *inputs, num_samples=20, seed=2, tolerance=1e3,
                                              mean_tolerance=1e-7, min_samples=2, max_samples=7, step=2)
    assert mcs.sampler.passes_needed(probs[:2], 20, 1e3, 1e3, 3.0) == 1  # nothing left to gain
    assert mcs.sampler.passes_needed(probs[:2], 20, 1e-9, 1e-9, 3.0) == 20  # only the full run is that close
    with pytest.raises(ValueError, match="max_samples"):
        mcs.sampler.sample_adaptive(net, *inputs, num_samples=5, max_samples=8)
    with pytest.raises(ValueError, match="sampling must be one of"):
        mcs.sampler.MapSampler("fast")
    with pytest.raises(ValueError, match="takes"):
        mcs.sampler.MapSampler("control_variate", tolerance=0.1)


def test_reference_matched_noise_rows(mcs):
    seeds = mcs.sampler.pass_seeds(6, 4)
    ref = torch.zeros(4 * 2, 5, 3)  # 4 rows (2 real + the two D rows) of a batch of 2
    rows = mcs.sampler.ReferenceMatchedNoise(seeds, 2).randn_like(ref).reshape(4, 2, 5, 3)
    each = mcs.sampler.SampleNoise(seeds).randn_like(torch.zeros(6 * 2, 5, 3)).reshape(6, 2, 5, 3)
    assert torch.equal(rows[:2], each[:2])
    delta = each.double().mean(0) - each[:2].double().mean(0)
    assert torch.allclose(rows[2].double(), delta, atol=1e-6) and torch.equal(rows[3], -rows[2])


def test_control_variate_moves_towards_the_reference_and_is_unbiased(mcs, inputs):
    net = tiny_net(mcs, value_var_bias=6.0, gate=5.0, up=10.0)  # loud value noise: clearly stochastic passes
    exact = net.sample_probabilities(*inputs, num_samples=30, seed=5)
    assert float(exact.std(dim=0).max()) > 0.05
    cv, info = mcs.sampler.sample_control_variate(net, *inputs, num_samples=30, seed=5, cv_samples=2)
    assert info["passes"] == 4 and cv.shape == (2, 2, 1, 32, 32)
    err_cv = (cv.mean(0) - exact.mean(0)).abs().mean()
    err_plain = (exact[:2].mean(0) - exact.mean(0)).abs().mean()
    assert err_cv < 0.5 * err_plain
    # unbiased: the mean over many seeds of the corrected 2-pass means converges to the expected probability
    truth = net.sample_probabilities(*inputs, num_samples=600, seed=10_000)
    est = torch.stack([mcs.sampler.sample_control_variate(net, *inputs, num_samples=10, seed=s, cv_samples=2)[0].mean(0)
                       for s in range(60)])
    se = torch.sqrt(est.var(dim=0) / est.shape[0] + truth.var(dim=0) / truth.shape[0])
    z = (est.mean(0) - truth.mean(0)).abs() / se.clamp_min(1e-6)
    assert float(z.max()) < 5.0, float(z.max())
    # while the noise-free pass (a biased estimate of the mean) is detected by the same test
    # same weights, value variance ~1e-6: the pass at the value means
    quiet = tiny_net(mcs, value_var_bias=-30.0, gate=5.0, up=10.0)
    det = quiet.sample_probabilities(*inputs, num_samples=1, seed=0)[0]
    assert float(((det - truth.mean(0)).abs() / se.clamp_min(1e-6)).max()) > 5.0


def test_cheaper_samplers_through_the_inferer_reproducible(mcs, inputs):
    net = tiny_net(mcs, value_var_bias=1.0)
    img, ids, mask = inputs
    default = StochasticTextInferer(num_samples=8, seed=0, decompose=True)(img, net, ids, mask)
    exact = StochasticTextInferer(num_samples=8, seed=0, decompose=True, sampler=mcs.sampler.MapSampler())
    assert torch.equal(default, exact(img, net, ids, mask))  # the exact option is the default path
    for sampling, options in (("adaptive", {"tolerance": 1e-6, "mean_tolerance": 1e-7, "max_samples": 5}),
                              ("control_variate", {"cv_samples": 2})):
        sampler = mcs.sampler.MapSampler(sampling, **options)
        inf = StochasticTextInferer(num_samples=8, seed=0, decompose=True, sampler=sampler)
        a, b = inf(img, net, ids, mask), inf(img, net, ids, mask)
        assert a.shape == (2, 4, 32, 32) and torch.equal(a, b)
        other = StochasticTextInferer(num_samples=8, seed=1, decompose=True, sampler=sampler)(img, net, ids, mask)
        assert (other - a).abs().max() > 1e-4
        assert sampler.last_info["passes"] == (5 if sampling == "adaptive" else 4)
    with pytest.raises(TypeError, match="callable"):
        StochasticTextInferer(num_samples=2, sampler="adaptive")
