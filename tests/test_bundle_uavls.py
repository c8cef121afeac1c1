"""Tests of the UA-VLS bundle (``bundles/uavls``) on the ``tiny`` variant and the tiny demo set.

Training and the two-process DDP config run as real command lines (``python -m monai.bundle run``, ``torchrun``);
evaluation, inference and ``verify_net_in_out`` run in-process (``monai.bundle.run``) to keep the file fast.
Unit tests cover the selective scan (against a naive recurrence, and against mamba_ssm where it can run), MoDAB,
every SEU loss term against hand-computed values and gradients, freezing and the optimizer contents.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_cli import SCHEMA, BundleCLI
from vlseg.bundles import bundle_context

CLI = BundleCLI("uavls")
BUNDLE, CONFIGS = CLI.root, CLI.configs


@pytest.fixture(scope="module")
def sm():
    """The bundle's ``scripts`` package, isolated from other bundles' ``scripts``."""
    with bundle_context(BUNDLE):
        import scripts.handlers
        import scripts.losses
        import scripts.modab
        import scripts.network
        import scripts.ssmix
        import scripts.workflow

        yield scripts


def _tiny_net(sm, **kw):
    args = dict(image_encoder_kwargs={"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}, text_encoder="cxr-bert",
                text_encoder_overrides={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                        "intermediate_size": 64}, subpixel_channels=4)
    args.update(kw)
    return sm.network.UAVLS(**args)


def _tokens(texts, spec="cxr-bert"):
    from vlseg.text import build_tokenizer

    return build_tokenizer(spec, 24)(texts)


# --------------------------------------------------------------------------- bundle commands


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    """Train the tiny variant with the real CLI (1 epoch); returns (checkpoint dir, output dir)."""
    return CLI.train_tiny(tmp_path_factory.mktemp("uavls_train"), tiny_demo, output="eval")


def test_train_cli_writes_checkpoints_curve_and_metrics(trained):
    ckpt, out = trained
    assert (ckpt / "model.pt").is_file()
    full = sorted(ckpt.glob("checkpoint_epoch=*.pt"))
    assert full, list(ckpt.iterdir())
    state = torch.load(full[-1], map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] > 0 and state["trainer"]["max_epochs"] == 1
    assert (out / "learning_curve.png").stat().st_size > 1000
    report = json.loads((out / "train_metrics.json").read_text())
    assert report["epochs_completed"] == 1 and report["iterations"] > 0
    assert math.isfinite(report["history"]["train_loss"][0])
    assert {"train_dice_loss", "train_spectral", "train_entropy", "val_mean_dice"} <= set(report["history"])
    assert 0.0 <= report["history"]["val_mean_dice"][0] <= 1.0


def test_evaluate_in_process_reports_per_image_metrics(trained, tiny_demo, tmp_path):
    from monai.bundle import run

    ckpt, _ = trained
    with bundle_context(BUNDLE):
        run(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), str(CONFIGS / "tiny.json")],
            meta_file=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE), datalist=str(tiny_demo),
            ckpt_dir=str(ckpt), output_dir=str(tmp_path), prompt_key="other_object")
    folder = tmp_path / "evaluate_test_other_object"
    report = json.loads((folder / "metrics.json").read_text())
    assert report["prompt_key"] == "other_object" and report["split"] == "test"
    assert {"val_mean_dice", "val_mean_iou", "val_nsd"} <= set(report["metrics"])
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    n_test = len(json.loads(tiny_demo.read_text())["test"])
    rows = (folder / "val_nsd_raw.csv").read_text().strip().splitlines()
    assert len(rows) == n_test + 1  # header + one row per sample


def test_inference_in_process_datalist_and_single_image(trained, tiny_demo, tmp_path):
    import nibabel as nib
    from monai.bundle import run
    from PIL import Image

    ckpt, _ = trained
    files = [str(CONFIGS / "inference.json"), str(CONFIGS / "tiny.json")]
    # single image of a size the network never sees (not square, not a multiple of 32), MC-dropout mode
    src = np.asarray(Image.open(next((tiny_demo.parent / "images" / "test").glob("*.png"))).convert("RGB"))
    odd = tmp_path / "odd.png"
    Image.fromarray(np.ascontiguousarray(src[:50, :61])).save(odd)
    out1 = tmp_path / "single"
    with bundle_context(BUNDLE):
        run(config_file=files, meta_file=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE),
            ckpt_dir=str(ckpt), output_dir=str(out1), image=str(odd), text="polyp", num_samples=3)
    mask = np.asarray(Image.open(out1 / "odd_mask.png"))
    assert mask.shape == (50, 61) and set(np.unique(mask)) <= {0, 255}
    unc_png = np.asarray(Image.open(out1 / "odd_uncertainty.png"))
    assert unc_png.shape == (50, 61)
    prob = np.asarray(nib.load(str(out1 / "odd_prob.nii.gz")).dataobj)
    unc = np.asarray(nib.load(str(out1 / "odd_uncertainty.nii.gz")).dataobj)
    assert prob.squeeze().T.shape == (50, 61) and unc.squeeze().T.shape == (50, 61)
    assert prob.min() >= 0.0 and prob.max() <= 1.0 and unc.min() >= 0.0 and unc.max() <= 1.0
    assert unc.dtype == np.float32 and len(np.unique(unc)) > 2  # float map, not quantised
    assert ((prob >= 0.5) == (mask.T[..., None] > 0).reshape(prob.shape)).all()
    assert (out1 / "odd_overlay.png").stat().st_size > 1000
    # datalist split, single deterministic pass: one set of files per sample (several samples share an image)
    out2 = tmp_path / "datalist"
    with bundle_context(BUNDLE):
        run(config_file=files, meta_file=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE),
            ckpt_dir=str(ckpt), output_dir=str(out2), datalist=str(tiny_demo), num_samples=1)
    n_test = len(json.loads(tiny_demo.read_text())["test"])
    assert len(list(out2.glob("*_mask.png"))) == n_test
    assert len(list(out2.glob("*_overlay.png"))) == n_test


def test_verify_metadata():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))  # raises on a schema error
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert len(fmt["inputs"]["image"]["spatial_shape"]) == 2 and fmt["inputs"]["image"]["num_channels"] == 3
    assert fmt["inputs"]["text"]["type"] == "string"
    assert fmt["outputs"]["pred"]["num_channels"] == 1 and fmt["outputs"]["uncertainty"]["value_range"] == [0, 1]


def test_verify_net_in_out(sm):
    from monai.bundle import verify_net_in_out

    ids, mask = _tokens(["polyp in the top left"])
    with bundle_context(BUNDLE):
        verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                          config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "tiny.json")], device="cpu",
                          n=2, bundle_root=str(BUNDLE),
                          extra_forward_args={"text_ids": ids.tolist(), "text_mask": mask.tolist()})


def test_multi_gpu_config_torchrun_two_processes_gloo(tiny_demo, tmp_path):
    cmd = CLI.bundle_run("train.json", "multi_gpu_train.json", "tiny.json", nproc=2, logging_file=False,
                         datalist=tiny_demo, ckpt_dir=tmp_path / "models", output_dir=tmp_path / "eval")
    proc = CLI.run(cmd, timeout=300)
    assert (tmp_path / "models" / "model.pt").is_file()
    report = json.loads((tmp_path / "eval" / "train_metrics.json").read_text())
    assert report["epochs_completed"] == 1
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in state)  # DDP wrapper not saved
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- freezing and the optimizer


def test_frozen_text_encoder_gets_no_gradient_and_is_not_in_the_optimizer(sm):
    from monai.bundle import ConfigParser

    with bundle_context(BUNDLE):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "tiny.json")])
        parser["bundle_root"] = str(BUNDLE)
        net = parser.get_parsed_content("network")
        opt = parser.get_parsed_content("optimizer")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    text_params = list(net.text_encoder.parameters())
    assert text_params and not any(p.requires_grad for p in text_params)
    assert not any(id(p) in in_opt for p in text_params)
    image_params = list(net.image_encoder.parameters())
    assert all(p.requires_grad and id(p) in in_opt for p in image_params)  # paper: the ConvNeXt trains
    assert len(in_opt) == sum(1 for p in net.parameters() if p.requires_grad)
    net.train()
    assert not net.text_encoder.encoder.training  # frozen encoder stays in eval mode
    ids, mask = _tokens(["small polyp", "dark cyst"])
    x = torch.randn(2, 3, 64, 64)
    net(x, ids, mask).sum().backward()
    assert all(p.grad is None for p in text_params)
    assert all(p.grad is not None for p in net.decoders.parameters() if p.requires_grad)
    assert net.image_encoder.body.stem_0.weight.grad is not None


def test_train_encoders_switch_only_unfreezes_an_encoder_without_weights(sm):
    net = _tiny_net(sm, train_text_encoder=True)  # random CXR-BERT: the switch applies
    assert all(p.requires_grad for p in net.text_encoder.parameters())
    ids, mask = _tokens(["polyp"])
    net(torch.randn(2, 3, 64, 64), ids, mask).sum().backward()
    assert any(p.grad is not None for p in net.text_encoder.parameters())
    minilm = sm.network.TextEncoder("minilm", trainable=True)  # real pretrained weights: stays frozen
    assert minilm.pretrained and not any(p.requires_grad for p in minilm.parameters())


def test_frozen_text_states_are_memoised_without_changing_them(sm):
    enc = sm.network.TextEncoder("cxr-bert", config_overrides={"num_hidden_layers": 1, "hidden_size": 32,
                                                                "num_attention_heads": 2, "intermediate_size": 64})
    ids, mask = _tokens(["small polyp", "dark cyst", "small polyp"])
    first = enc(ids, mask)
    assert len(enc._cache) == 2
    with torch.no_grad():
        direct = enc.encoder(ids, mask)
    torch.testing.assert_close(first, direct)
    torch.testing.assert_close(enc(ids[[1, 0]], mask[[1, 0]]), direct[[1, 0]])


def test_text_state_memo_is_cleared_when_weights_are_loaded(sm):
    enc = sm.network.TextEncoder("cxr-bert", config_overrides={"num_hidden_layers": 1, "hidden_size": 32,
                                                                "num_attention_heads": 2, "intermediate_size": 64})
    ids, mask = _tokens(["small polyp"])
    before = enc(ids, mask)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in enc.state_dict().items()}
    wrapper = torch.nn.ModuleDict({"text": enc})
    wrapper.load_state_dict({f"text.{k}": v for k, v in state.items()})  # through a parent, as CheckpointLoader
    assert len(enc._cache) == 0
    after = enc(ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(after, enc.encoder(ids, mask))
    assert not torch.allclose(before, after)


# --------------------------------------------------------------------------- SSMix (eq. 13-19)


def _naive_scan(u, delta, A, B, C, D, delta_bias):
    """Step-by-step recurrence with scalar loops (the reference the vectorised scan must reproduce)."""
    b_, d_, l_ = u.shape
    n_ = A.shape[1]
    y = [[[None] * l_ for _ in range(d_)] for _ in range(b_)]
    for b in range(b_):
        for d in range(d_):
            h = [torch.zeros(()) for _ in range(n_)]
            for t in range(l_):
                dt = torch.nn.functional.softplus(delta[b, d, t] + delta_bias[d])
                acc = D[d] * u[b, d, t]
                for n in range(n_):
                    h[n] = torch.exp(dt * A[d, n]) * h[n] + dt * B[b, n, t] * u[b, d, t]
                    acc = acc + C[b, n, t] * h[n]
                y[b][d][t] = acc
    return torch.stack([torch.stack([torch.stack(row) for row in yd]) for yd in y])


def _scan_inputs(seed=0, b=2, d=3, n=4, l=6):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, l, generator=g)
    delta = torch.randn(b, d, l, generator=g) * 0.5
    A = -torch.rand(d, n, generator=g) * 2 - 0.1
    B = torch.randn(b, n, l, generator=g)
    C = torch.randn(b, n, l, generator=g)
    D = torch.randn(d, generator=g)
    bias = torch.randn(d, generator=g) * 0.3
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]


def test_selective_scan_matches_naive_recurrence_values_and_gradients(sm):
    args = _scan_inputs()
    fast = sm.ssmix.selective_scan_torch(*args[:6], delta_bias=args[6], delta_softplus=True)
    slow = _naive_scan(*args)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), args)
    g_slow = torch.autograd.grad((slow * w).sum(), args)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # dispatch on CPU always takes the PyTorch scan
    torch.testing.assert_close(sm.ssmix.selective_scan(*args[:6], delta_bias=args[6]), fast)


def test_selective_scan_matches_mamba_ssm_kernel(sm):
    kernel = sm.ssmix.mamba_kernel()
    if kernel is None:
        pytest.skip("mamba_ssm is not installed (it is a GPU-only optional extra): only the naive-recurrence "
                    "comparison runs here")
    if not torch.cuda.is_available():
        pytest.skip("mamba_ssm is installed but no CUDA device is available for its kernel")
    args = [t.detach().cuda() for t in _scan_inputs(1, b=2, d=8, n=16, l=24)]
    ref = sm.ssmix.selective_scan_torch(*args[:6], delta_bias=args[6], delta_softplus=True)
    out = kernel(*args[:6], z=None, delta_bias=args[6], delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_ssmix_shapes_token_projection_and_gamma(sm):
    mix = sm.ssmix.SSMix(32, in_tokens=24, out_tokens=9)
    out = mix(torch.randn(2, 24, 32))
    assert out.shape == (2, 9, 32)
    assert mix.out_proj.weight.shape == (9, 24)  # eq. 19 acts on the TOKEN axis
    assert mix.in_proj.weight.shape == (32, 32) and mix.d_inner == 16  # gamma = 0.5 as the public code
    dt0 = torch.nn.functional.softplus(mix.dt_proj.bias)  # eq. 17 bias = softplus^-1 of dt in [1e-3, 0.1]
    assert float(dt0.min()) >= 1e-3 - 1e-6 and float(dt0.max()) <= 0.1 + 1e-6
    assert mix.out_proj.bias is None  # public code: no bias
    with pytest.raises(ValueError):
        sm.ssmix.SSMix(32, expand=1.0)
    with pytest.raises(ValueError):
        mix(torch.randn(2, 12, 32))


def test_ssmix_delta_bias_once_by_default_twice_as_the_public_code_on_request(sm):
    torch.manual_seed(0)
    once = sm.ssmix.SSMix(32, in_tokens=24, out_tokens=12)
    twice = sm.ssmix.SSMix(32, in_tokens=24, out_tokens=12, delta_bias_twice=True)
    twice.load_state_dict(once.state_dict())
    x = torch.randn(2, 24, 32)
    assert not torch.allclose(once(x), twice(x))
    doubled = sm.ssmix.SSMix(32, in_tokens=24, out_tokens=12)
    doubled.load_state_dict(once.state_dict())
    with torch.no_grad():
        doubled.dt_proj.bias.mul_(2.0)  # softplus(W dt + 2 b): what the public code computes
    torch.testing.assert_close(twice(x), doubled(x))


def test_selective_scan_path_is_logged_when_mamba_ssm_cannot_be_imported(sm, monkeypatch, caplog):
    import sys

    monkeypatch.setattr(sm.ssmix, "_MAMBA", None)
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import fails with ModuleNotFoundError
    with caplog.at_level(logging.INFO, logger="vlseg"):
        assert sm.ssmix.mamba_kernel() is None
    assert any("PyTorch implementation" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- MoDAB (eq. 3-12)


def test_modab_shapes_alpha_text_dependence_and_mc_dropout(sm):
    from vlseg.inferers import mc_dropout

    torch.manual_seed(0)
    block = sm.modab.MoDAB(32, text_dim=48, in_tokens=24, out_tokens=12).eval()
    x = torch.randn(2, 32, 4, 4)
    t1, t2 = torch.randn(2, 24, 48), torch.randn(2, 24, 48)
    out = block(x, t1)
    assert out.shape == x.shape
    assert not torch.allclose(out, block(x, t2))  # the text changes the fused features
    torch.testing.assert_close(out, block(x, t1))  # eval: deterministic
    with torch.no_grad():
        block.alpha.zero_()  # eq. 12 with alpha = 0: only the self-attention path (eq. 8) remains
        tokens = x.flatten(2).transpose(1, 2)
        sa = block.self_attn(tokens).transpose(1, 2).reshape_as(x)
        torch.testing.assert_close(block(x, t1), sa)
        torch.testing.assert_close(block(x, t1), block(x, t2))
        block.alpha.fill_(1.421)
    drops = [m for m in block.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 3 and all(m.p == 0.1 for m in drops)  # SA weights, SA projection, CA weights
    with mc_dropout(block):
        a, b = block(x, t1), block(x, t1)
    assert not torch.allclose(a, b)
    assert not block.training and not any(m.training for m in drops)
    # the cross-attention dropout acts only in Monte-Carlo sampling, never in training (public code: none)
    block.self_attn.attn_drop.p = block.self_attn.proj_drop.p = 0.0
    block.train()
    torch.testing.assert_close(block(x, t1), block(x, t1))
    block.eval()
    with mc_dropout(block):
        assert not torch.allclose(block(x, t1), block(x, t1))


def test_cross_attention_is_multihead_attention_with_its_initialisation(sm):
    torch.manual_seed(0)
    ca = sm.modab.TextCrossAttention(32, num_heads=4).eval()
    assert torch.count_nonzero(ca.in_proj.bias) == 0 and torch.count_nonzero(ca.out_proj.bias) == 0
    bound = math.sqrt(6.0 / (32 + 3 * 32))  # xavier_uniform_ on the joint [3C, C] in-projection
    assert 0.9 * bound < float(ca.in_proj.weight.abs().max()) <= bound
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(ca.in_proj.weight)
        mha.in_proj_bias.normal_()
        ca.in_proj.bias.copy_(mha.in_proj_bias)
        mha.out_proj.load_state_dict(ca.out_proj.state_dict())
        x, t = torch.randn(2, 16, 32), torch.randn(2, 9, 32)
        ref = mha(ca.pos(ca.norm_q(x)), ca.pos(t), t)[0]  # the public code's call (eq. 9-11)
        torch.testing.assert_close(ca(x, t), ref, rtol=1e-5, atol=1e-5)


def test_random_zoom_runs_before_z_scoring_as_the_public_code():
    from monai.bundle import ConfigParser

    with bundle_context(BUNDLE):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json")])
        parser["bundle_root"] = str(BUNDLE)
        names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
        val = [type(t).__name__ for t in parser.get_parsed_content("validate#preprocessing").transforms]
    assert names.index("Resized") < names.index("RandZoomd") < names.index("NormalizeIntensityd")
    assert "RandZoomd" not in val and "NormalizeIntensityd" in val


def test_network_forward_and_mc_dropout_leaves_text_encoder_deterministic(sm):
    from vlseg.inferers import StochasticTextInferer

    net = _tiny_net(sm).eval()
    ids, mask = _tokens(["small bright polyp", "dark cyst"])
    x = torch.randn(2, 3, 64, 64)
    out = net(x, ids, mask)
    assert out.shape == (2, 1, 64, 64)
    assert all(m.p == 0.0 for m in net.text_encoder.modules() if isinstance(m, torch.nn.Dropout))
    inf = StochasticTextInferer(num_samples=3, seed=0)
    with torch.no_grad():
        res = inf(x, net, ids, mask)
        torch.testing.assert_close(res, inf(x, net, ids, mask))  # seeded
        single = StochasticTextInferer(num_samples=1)(x, net, ids, mask)
    assert res.shape == (2, 2, 64, 64) and 0 <= float(res[:, 1].min()) and float(res[:, 1].max()) <= 1
    torch.testing.assert_close(single[:, :1], torch.sigmoid(out.detach()))
    assert not torch.allclose(res[:, :1], single[:, :1])  # MC dropout really samples
    with pytest.raises(ValueError):
        net(torch.randn(1, 3, 60, 60), ids[:1], mask[:1])


# --------------------------------------------------------------------------- SEU loss (eq. 26-29)


def test_dice_loss_hand_computed_value_and_gradient(sm):
    p = torch.tensor([[[[0.8, 0.2]]], [[[0.5, 0.5]]]], requires_grad=True)  # [2, 1, 1, 2]
    g = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    eps = 1e-6
    loss = sm.losses.dice_loss(p, g, eps)
    # image 1: 1 - (1.6 + e) / (2 + e); image 2: 1 - (2 + e) / (3 + e)
    expected = ((1 - (1.6 + eps) / (2 + eps)) + (1 - (2 + eps) / (3 + eps))) / 2
    assert abs(loss.item() - expected) < 1e-7
    loss.backward()
    # d/dp_i of -(2I + e)/(S + e) = -(2 g_i (S + e) - (2I + e)) / (S + e)^2, halved by the batch mean
    s1, i1 = 2.0 + eps, 1.6 + eps
    s2, i2 = 3.0 + eps, 2.0 + eps
    grad = torch.tensor([[[[-(2 * (s1) - i1) / s1**2, -(0 - i1) / s1**2]]],
                         [[[-(2 * s2 - i2) / s2**2, -(2 * s2 - i2) / s2**2]]]]) / 2
    torch.testing.assert_close(p.grad, grad)


def test_spectral_regularizer_hand_computed_value_and_gradient(sm):
    # 1 x 2 images: orthonormal FFT gives [(x0 + x1) / sqrt2, (x0 - x1) / sqrt2]
    p = torch.tensor([[[[0.9, 0.3]]]], requires_grad=True)
    g = torch.tensor([[[[1.0, 0.0]]]])
    r2 = math.sqrt(2)
    fp = [abs(0.9 + 0.3) / r2, abs(0.9 - 0.3) / r2]
    fg = [1 / r2, 1 / r2]
    expected = ((fp[0] - fg[0]) ** 2 + (fp[1] - fg[1]) ** 2) / 2
    loss = sm.losses.spectral_regularizer(p, g)
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    # d/dx0 = (fp0 - fg0)/r2 + (fp1 - fg1)/r2 ; d/dx1 = (fp0 - fg0)/r2 - (fp1 - fg1)/r2 (x0 > x1 > 0)
    gx0 = ((fp[0] - fg[0]) + (fp[1] - fg[1])) / r2
    gx1 = ((fp[0] - fg[0]) - (fp[1] - fg[1])) / r2
    torch.testing.assert_close(p.grad, torch.tensor([[[[gx0, gx1]]]]), rtol=1e-5, atol=1e-6)
    # identical maps: zero, and a 2-D map's DC term is the scaled sum
    q = torch.rand(1, 1, 4, 4)
    assert sm.losses.spectral_regularizer(q, q).item() < 1e-12


def test_entropy_regularizer_hand_computed_value_and_gradient(sm):
    delta = 1e-8
    p = torch.tensor([[[[0.5, 0.9]]]], requires_grad=True)  # B=1, H=1, W=2
    two = sm.losses.class_probabilities(p)
    loss = sm.losses.entropy_regularizer(two, delta)

    def h(x):
        return -(x * math.log(x + delta) + (1 - x) * math.log(1 - x + delta))

    assert abs(loss.item() - (h(0.5) + h(0.9)) / 2) < 1e-6
    loss.backward()

    def dh(x):
        return (-math.log(x + delta) - x / (x + delta) + math.log(1 - x + delta) + (1 - x) / (1 - x + delta))

    torch.testing.assert_close(p.grad, torch.tensor([[[[dh(0.5) / 2, dh(0.9) / 2]]]]), rtol=1e-5, atol=1e-6)
    # the public code's single-channel variant: -p log p
    one = sm.losses.entropy_regularizer(torch.tensor([[[[0.5, 0.9]]]]), delta)
    assert abs(one.item() - (-(0.5 * math.log(0.5)) - 0.9 * math.log(0.9)) / 2) < 1e-6
    # confident predictions have (near) zero entropy
    assert sm.losses.entropy_regularizer(sm.losses.class_probabilities(torch.ones(1, 1, 2, 2))).item() < 1e-6


def test_seu_loss_combines_terms_with_paper_weights(sm):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    loss_fn = sm.losses.SEULoss()
    assert (loss_fn.lambda_f, loss_fn.lambda_e) == (0.3, 0.1)
    loss = loss_fn(logits, target)
    p = torch.sigmoid(logits)
    expected = (sm.losses.dice_loss(p, target) + 0.3 * sm.losses.spectral_regularizer(p, target)
                + 0.1 * sm.losses.entropy_regularizer(sm.losses.class_probabilities(p)))
    torch.testing.assert_close(loss, expected)
    assert set(loss_fn.last_terms) == {"dice_loss", "spectral", "entropy"}
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # a perfect, confident prediction scores (almost) zero
    perfect = loss_fn(torch.where(target > 0, 30.0, -30.0), target)
    assert perfect.item() < 1e-4


# --------------------------------------------------------------------------- handlers and data


def test_early_stopping_waits_for_min_epochs(sm):
    from types import SimpleNamespace

    from ignite.engine import Engine

    stopped = []

    real_trainer = Engine(lambda e, b: None)
    real_trainer.terminate = lambda: stopped.append(real_trainer.state.epoch)
    handler = sm.handlers.MinEpochEarlyStopHandler(patience=2, min_epochs=5, trainer=real_trainer)
    evaluator = SimpleNamespace(state=SimpleNamespace(metrics={"val_mean_dice": 0.5}))
    for epoch in range(1, 9):
        real_trainer.state.epoch = epoch
        evaluator.state.metrics["val_mean_dice"] = 0.5 if epoch > 1 else 0.6  # never improves after epoch 1
        handler(evaluator)
    assert stopped and stopped[0] == 6  # counter starts at epoch 5, patience 2 -> stop after epoch 6


def test_load_split_fraction_keeps_images_together(sm, tiny_demo):
    items = sm.workflow.load_split(str(tiny_demo), "training")
    half = sm.workflow.load_split(str(tiny_demo), "training", fraction=0.5, seed=1)
    ids = {it["image_id"] for it in half}
    assert len(ids) == 3 and all(Path(it["image"]).is_absolute() for it in half)
    assert len(half) == sum(1 for it in items if it["image_id"] in ids)
    assert len({it["name"] for it in items}) == len(items)
