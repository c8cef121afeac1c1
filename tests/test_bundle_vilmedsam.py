"""Tests of the Simple-ViLMedSAM bundle (``bundles/vilmedsam``), on the ``tiny`` variant and the tiny demo set.

Subprocesses run the real command lines (``python -m monai.bundle run`` for training, ``torchrun`` for the
multi-process config); evaluation, inference and ``verify_net_in_out`` run in-process to keep the file fast.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bundle_cli import SCHEMA, BundleCLI
from vlseg.bundles import bundle_context

CLI = BundleCLI("vilmedsam", timeout=240)
BUNDLE, CONFIGS = CLI.root, CLI.configs


@pytest.fixture(scope="module")
def scripts_mod():
    """The bundle's ``scripts`` package (other bundles have their own ``scripts``: isolate it)."""
    with bundle_context(BUNDLE):
        import scripts
        import scripts.data
        import scripts.engine
        import scripts.handlers
        import scripts.losses

        yield scripts


TINY = dict(
    sam_variant="vit_b", sam_image_size=64,
    sam_overrides=dict(embed_dim=32, depth=1, num_heads=2, patch_size=8, window_size=0, global_attn_indexes=[], out_chans=32),
    clip_cfg=dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, layers=2, width=32, head_width=16),
                  text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)),
    m2ib_layer=0, m2ib_steps=2, m2ib_samples=1, decoder_heads=2, decoder_mlp_dim=64,
)


def _tokens(texts, length=16):
    from vlseg.text import build_tokenizer

    return build_tokenizer("open_clip:ViT-B-16", length)(texts)


# --------------------------------------------------------------------------- bundle commands


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """Train the tiny variant with the real CLI; returns (checkpoint dir, output dir)."""
    return CLI.train_tiny(tmp_path_factory.mktemp("vilmedsam_train"), demo, output="runs")


def test_train_cli_writes_checkpoints_and_reports(trained):
    ckpt, out = trained
    assert (ckpt / "model.pt").is_file()
    assert (ckpt / "full_state_final.pt").is_file()
    full = torch.load(ckpt / "full_state_final.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(full)
    assert (out / "learning_curve.png").stat().st_size > 1000
    report = json.loads((out / "metrics.json").read_text())
    assert report["epochs_completed"] == 1 and report["iterations"] > 0
    assert math.isfinite(report["history"]["train_loss"][0])
    assert report["parameters"]["mode"]["sam_encoder_trainable"] is True  # tiny: no weights -> "auto" trains them
    # tiny: the CLIP alignment stage ran its 3 iterations, then froze the CLIP for the main training
    stage = report["parameters"]["mode"]["clip_alignment_stage"]
    assert stage["iterations"] == 3 and report["parameters"]["mode"]["clip_trainable"] is False
    assert set(report["loss_terms"]) == {"dice", "bce"}


def test_evaluate_in_process(trained, demo, tmp_path, scripts_mod):
    from monai.bundle import run

    ckpt, _ = trained
    out = tmp_path / "eval"
    with bundle_context(BUNDLE):
        run(config_file=[str(CONFIGS / n) for n in ("train.json", "evaluate.json", "tiny.json")],
            meta_file=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE), datalist=str(demo),
            ckpt_dir=str(ckpt), output_dir=str(out))
    rep = json.loads((out / "eval_metrics.json").read_text())
    assert set(rep["metrics"]) >= {"test_mean_dice", "test_mean_iou", "test_nsd_2px"}
    assert 0.0 <= rep["metrics"]["test_mean_dice"] <= 1.0
    assert rep["prompt_key"] == "p1" and rep["text_blind_ceiling"]["max"] > 0
    rows = (out / "test_mean_dice_raw.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == rep["n_items"] > 0


def test_inference_in_process_datalist_and_single_image(trained, demo, tmp_path, scripts_mod):
    from monai.bundle import run
    from PIL import Image

    ckpt, _ = trained
    # a single image of another size and aspect (outputs must come back at the ORIGINAL size)
    src = np.asarray(Image.open(next((demo.parent / "images" / "test").glob("*.png"))))
    odd = tmp_path / "odd.png"
    Image.fromarray(src).resize((70, 50)).save(odd)  # W=70, H=50
    out1 = tmp_path / "single"
    with bundle_context(BUNDLE):
        run(config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "tiny.json")],
            meta_file=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE), ckpt_dir=str(ckpt),
            output_dir=str(out1), image=str(odd), text="polyp", num_samples=3)
    mask = np.asarray(Image.open(out1 / "odd_mask.png"))
    unc = np.load(out1 / "odd_uncertainty.npy")
    pred = np.load(out1 / "odd_pred.npy")
    assert mask.shape == unc.shape == pred.shape == (50, 70)
    assert set(np.unique(mask)) <= {0, 255}
    assert 0.0 <= pred.min() and pred.max() <= 1.0 and 0.0 <= unc.min() and unc.max() <= 1.0
    assert np.array_equal(mask == 255, pred > 0.5)
    assert (out1 / "odd_overlay.png").is_file() and (out1 / "odd_uncertainty.png").is_file()

    out2 = tmp_path / "datalist"
    with bundle_context(BUNDLE):
        run(config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "tiny.json")],
            meta_file=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE), ckpt_dir=str(ckpt),
            output_dir=str(out2), datalist=str(demo), num_samples=2)
    n_test = len(json.loads(demo.read_text())["test"])
    assert len(list(out2.glob("*_mask.png"))) == n_test  # one file per (image, prompt): no overwrites
    assert len(list(out2.glob("*_uncertainty.npy"))) == n_test


def test_verify_metadata():
    CLI.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
             "--filepath", str(SCHEMA)], timeout=120)


def test_verify_net_in_out(scripts_mod):
    from monai.bundle import verify_net_in_out

    ids, mask = _tokens(["polyp"])
    with bundle_context(BUNDLE):
        verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                          config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "tiny.json")], device="cpu",
                          bundle_root=str(BUNDLE),
                          extra_forward_args={"text_ids": ids.tolist(), "text_mask": mask.tolist()})


def test_multi_gpu_config_torchrun_two_processes_gloo(demo, tmp_path):
    cmd = CLI.bundle_run("train.json", "multi_gpu_train.json", "tiny.json", nproc=2, logging_file=False,
                         datalist=demo, ckpt_dir=tmp_path / "models", output_dir=tmp_path / "runs")
    proc = CLI.run(cmd, timeout=300)
    assert (tmp_path / "models" / "model.pt").is_file()
    report = json.loads((tmp_path / "runs" / "metrics.json").read_text())
    assert report["epochs_completed"] == 1
    assert "gloo" not in proc.stderr.lower() or "error" not in proc.stderr.lower()


# --------------------------------------------------------------------------- network: what trains


def test_only_lora_and_decoder_train_in_paper_mode(scripts_mod):
    from monai.bundle import ConfigParser
    from vlseg.nets.common import trainable_parameters

    net = scripts_mod.SimpleViLMedSAM(**TINY, train_encoders=False)
    lora = {id(p) for p in net.lora_parameters()}
    dec = {id(p) for p in net.decoder.parameters()}
    train_ids = {id(p) for p in trainable_parameters(net)}
    assert train_ids == lora | dec
    assert all(not p.requires_grad for p in net.clip.parameters())
    groups = net.param_groups(2e-4, 1e-4)
    assert [g["name"] for g in groups] == ["lora", "decoder"] and [g["lr"] for g in groups] == [2e-4, 1e-4]
    # the config's optimizer holds exactly those parameters
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "tiny.json")])
    parser["bundle_root"] = str(BUNDLE)
    parser["train_encoders"] = False
    with bundle_context(BUNDLE):
        opt = parser.get_parsed_content("optimizer")
        cfg_net = parser.get_parsed_content("network_def")
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    expect = {id(p) for p in cfg_net.lora_parameters()} | {id(p) for p in cfg_net.decoder.parameters()}
    assert opt_ids == expect
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-4)
    # frozen parts get no gradient, LoRA B and the decoder do
    net.train()
    ids, mask = _tokens(["polyp", "cyst"])
    out = net(torch.rand(2, 3, 64, 64) * 255, ids, mask)
    out["logits"].mean().backward()
    for name, p in net.named_parameters():
        if id(p) in train_ids:
            continue
        assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "lora_b" in n)
    assert all(p.grad is not None for p in net.decoder.parameters() if p.requires_grad)


def test_train_encoders_auto_unfreezes_only_missing_weights(scripts_mod, tmp_path):
    net = scripts_mod.SimpleViLMedSAM(**TINY, train_encoders="auto")
    assert net.mode_info["sam_encoder_trainable"] and net.mode_info["clip_trainable"]
    assert [g["name"] for g in net.param_groups()] == ["lora", "decoder", "encoders"]
    # with SAM weights present, "auto" keeps SAM frozen (LoRA only) but still trains the weightless CLIP
    weights = tmp_path / "sam.pth"
    torch.save({f"image_encoder.{k.replace('.qkv.qkv.', '.qkv.')}": v for k, v in net.sam_encoder.state_dict().items()
                if ".lora_" not in k}, weights)
    net2 = scripts_mod.SimpleViLMedSAM(**TINY, train_encoders="auto", sam_checkpoint=str(weights))
    assert net2.mode_info["sam_weights_loaded"] and not net2.mode_info["sam_encoder_trainable"]
    assert all(not p.requires_grad for n, p in net2.sam_encoder.named_parameters() if ".lora_" not in n)
    sd1, sd2 = net.sam_encoder.state_dict(), net2.sam_encoder.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1 if ".lora_" not in k)


def test_lora_initialisation_and_rank(scripts_mod):
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    enc = scripts_mod.build_sam_image_encoder("vit_b", 64, TINY["sam_overrides"])
    assert isinstance(enc, ImageEncoderViT)
    x = torch.randn(1, 3, 64, 64)
    ref = enc(x)
    params = scripts_mod.apply_lora(enc, rank=4)
    assert torch.allclose(enc(x), ref, atol=1e-6)  # B = 0: same function at initialisation
    dim = 32
    assert sum(p.numel() for p in params) == 2 * (dim * 4 + 4 * dim)  # 1 block x (q, v) x (A + B)
    lora = enc.blocks[0].attn.qkv
    assert torch.count_nonzero(lora.lora_b_q.weight) == 0 and torch.count_nonzero(lora.lora_a_q.weight) > 0
    bound = 1.0 / math.sqrt(dim)  # kaiming_uniform(a=sqrt(5)) bound for fan_in = dim
    assert lora.lora_a_v.weight.abs().max() <= bound + 1e-6
    # a non-zero B changes only the q and v thirds of the fused projection
    with torch.no_grad():
        lora.lora_b_q.weight.fill_(0.1)
        lora.lora_b_v.weight.fill_(0.1)
    t = torch.randn(5, dim)
    diff = lora(t) - lora.qkv(t)
    assert diff[:, :dim].abs().sum() > 0 and diff[:, dim:2 * dim].abs().sum() == 0 and diff[:, 2 * dim:].abs().sum() > 0


def test_sam_presets_match_segment_anything_registry(scripts_mod):
    import segment_anything

    src = (Path(segment_anything.__file__).parent / "build_sam.py").read_text()
    for name, p in scripts_mod.sam_encoder.SAM_PRESETS.items():
        fn = {"vit_b": "build_sam_vit_b", "vit_l": "build_sam_vit_l", "vit_h": "build_sam_vit_h"}[name]
        body = src.split(f"def {fn}(")[1].split("def ")[0]
        assert f"encoder_embed_dim={p['embed_dim']}" in body and f"encoder_depth={p['depth']}" in body
        assert f"encoder_num_heads={p['num_heads']}" in body
        assert f"encoder_global_attn_indexes={list(p['global_attn_indexes'])}" in body


def test_sam_weights_resize_position_embeddings(scripts_mod, tmp_path):
    big = scripts_mod.build_sam_image_encoder("vit_b", 128, dict(TINY["sam_overrides"], use_rel_pos=True))
    f = tmp_path / "sam_big.pth"
    torch.save({f"image_encoder.{k}": v for k, v in big.state_dict().items()}, f)
    small = scripts_mod.build_sam_image_encoder("vit_b", 64, dict(TINY["sam_overrides"], use_rel_pos=True))
    scripts_mod.apply_lora(small, 4)
    assert scripts_mod.load_sam_weights(small, str(f), "vit_b", require=True)
    assert small.pos_embed.shape[1:3] == (8, 8)
    assert torch.allclose(small.patch_embed.proj.weight, big.patch_embed.proj.weight)
    assert torch.allclose(small.blocks[0].attn.qkv.qkv.weight, big.blocks[0].attn.qkv.weight)
    # a missing file: random weights and False without require_pretrained; the named error with it
    from vlseg.weights import PretrainedWeightsError

    assert scripts_mod.load_sam_weights(small, str(tmp_path / "missing.pth"), "vit_b", require=False) is False
    with pytest.raises(PretrainedWeightsError, match="sam_checkpoint"):
        scripts_mod.load_sam_weights(small, str(tmp_path / "missing.pth"), "vit_b", require=True)


# --------------------------------------------------------------------------- M2IB and the refinement


def _aligned_case(region_cells):
    """Tokens on a 4x4 grid (+ CLS): the cells in ``region_cells`` carry the text direction ``u``; every other
    token (and CLS) carries orthogonal directions. ``embed`` = mean over tokens: keeping exactly the region
    maximises cos(text, embed) -- by construction the region matches the text better than elsewhere."""
    c = 8
    u = torch.zeros(c)
    u[0] = 1.0
    tokens = torch.zeros(1, 17, c)
    g = torch.Generator().manual_seed(0)
    for i in range(17):
        v = torch.randn(c, generator=g)
        v[0] = 0.0
        tokens[0, i] = 3.0 * v / v.norm()
    for cell in region_cells:
        tokens[0, 1 + cell] = 3.0 * u
    return tokens, u[None], lambda z: z.mean(dim=1)


def test_m2ib_map_concentrates_on_text_aligned_region(scripts_mod):
    region = [5, 6, 9, 10]  # the 2x2 centre of the 4x4 grid
    tokens, text, embed = _aligned_case(region)
    gens = [torch.Generator().manual_seed(1)]
    cap = scripts_mod.m2ib_capacity(tokens, embed, text, beta=2.0, steps=10, lr=1.0, n_samples=1, generators=gens)
    assert cap.shape == tokens.shape and torch.isfinite(cap).all()
    sal = scripts_mod.saliency_from_capacity(cap, (4, 4), num_prefix=1)
    assert sal.shape == (1, 1, 4, 4) and float(sal.min()) == 0.0 and float(sal.max()) == pytest.approx(1.0)
    flat = sal.flatten()
    inside = flat[region]
    outside = flat[[i for i in range(16) if i not in region]]
    assert inside.min() > outside.max()  # every region cell beats every other cell
    assert inside.mean() - outside.mean() > 0.5
    # the same construction with the region moved: the map follows the text-aligned tokens
    tokens2, text2, _ = _aligned_case([0, 1])
    sal2 = scripts_mod.saliency_from_capacity(
        scripts_mod.m2ib_capacity(tokens2, embed, text2, generators=[torch.Generator().manual_seed(1)]), (4, 4)).flatten()
    assert set(torch.topk(sal2, 2).indices.tolist()) == {0, 1}


def test_m2ib_capacity_formula_and_alpha_init(scripts_mod):
    from scripts.m2ib import capacity

    lam = torch.tensor([0.2, 0.5, 0.9])
    x = torch.tensor([1.0, -2.0, 0.5])
    mu, var = lam * x, (1 - lam) ** 2
    expected = 0.5 * (mu**2 + var - 1 - torch.log(var))  # KL(N(mu, var) || N(0, 1))
    assert torch.allclose(capacity(lam, x), expected)
    var2 = 2.0 * (1 - lam) ** 2  # noise_var 2: sigma^2 (1 - lambda)^2 in the KL, as in the noise
    assert torch.allclose(capacity(lam, x, 2.0 ** 0.5), 0.5 * (mu**2 + var2 - 1 - torch.log(var2)))
    # 0 steps: lambda = sigmoid(5) everywhere
    for map_from in ("last_forward", "final"):
        cap0 = scripts_mod.m2ib_capacity(torch.ones(1, 2, 3), lambda z: z.mean(1), torch.ones(1, 3), steps=0,
                                         map_from=map_from)
        assert torch.allclose(cap0, capacity(torch.sigmoid(torch.tensor(5.0)).expand(1, 2, 3), torch.ones(1, 2, 3)))


def test_m2ib_matches_public_code_noise_samples_and_map_timing(scripts_mod):
    """Public code: eps ~ N(0, (1 - lambda)^2) (sigma 1), ONE noise sample per Adam step, and the map is the
    capacity of the LAST forward pass (before the last update). Re-run here step by step with the same noise."""
    from scripts.m2ib import capacity

    tokens, text, embed = _aligned_case([5, 6])
    b, n, c = tokens.shape
    draws = []

    def recording_embed(z):
        draws.append(z.shape[0])
        return embed(z)

    out = scripts_mod.m2ib_capacity(tokens, recording_embed, text, steps=3, generators=[torch.Generator().manual_seed(3)])
    assert draws == [1, 1, 1]  # one sample per step
    # reference loop (upstream order: forward -> capacity buffer -> loss -> step), same generator stream
    g = torch.Generator().manual_seed(3)
    alpha = torch.full((b, n, c), 5.0, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=1.0)
    t = torch.nn.functional.normalize(text, dim=-1)
    for _ in range(3):
        lam = torch.sigmoid(alpha)
        cap = capacity(lam, tokens)
        z = lam * tokens + (1 - lam) * torch.randn(1, n, c, generator=g)[0]
        loss = 2.0 * cap.mean() - torch.nn.functional.cosine_similarity(embed(z), t, dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(out, cap.detach(), atol=1e-5)  # last forward pass, not the updated mask
    final = scripts_mod.m2ib_capacity(tokens, embed, text, steps=3, generators=[torch.Generator().manual_seed(3)],
                                      map_from="final")
    assert torch.allclose(final, capacity(torch.sigmoid(alpha), tokens).detach(), atol=1e-5)
    assert not torch.allclose(final, out)
    with pytest.raises(ValueError, match="map_from"):
        scripts_mod.m2ib_capacity(tokens, embed, text, map_from="best")


def test_m2ib_prompter_cache_and_determinism(scripts_mod, tmp_path):
    from scripts.clip import CLIPTowers, build_clip
    from scripts.m2ib import M2IBPrompter

    torch.manual_seed(0)
    model, loaded = build_clip(cfg=TINY["clip_cfg"])
    assert loaded is False
    towers = CLIPTowers(model)
    assert towers.grid == (4, 4) and towers.image_size == (32, 32)
    pr = M2IBPrompter(towers, layer=0, steps=2, n_samples=1, cache_dir=str(tmp_path / "cache"))
    pix = towers.preprocess(torch.rand(2, 3, 64, 64) * 255)
    ids, _ = _tokens(["polyp", "cyst"])
    m1 = pr.grid_saliency(pix, ids)
    assert m1.shape == (2, 1, 4, 4) and pr.stats == {"hits": 0, "misses": 2}
    m2 = pr.grid_saliency(pix, ids)
    assert pr.stats["hits"] == 2 and torch.equal(m1, m2)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    # a fresh prompter (new process) reads the on-disk cache; the same image alone gives the same map
    pr2 = M2IBPrompter(towers, layer=0, steps=2, n_samples=1, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(pr2.grid_saliency(pix[:1], ids[:1]), m1[:1]) and pr2.stats["hits"] == 1
    # a different prompt, other M2IB settings or changed CLIP weights are different keys
    pr.grid_saliency(pix[:1], _tokens(["lesion"])[0])
    assert pr.stats["misses"] == 3
    pr3 = M2IBPrompter(towers, layer=0, steps=2, n_samples=1, map_from="final", cache_dir=str(tmp_path / "cache"))
    pr3.grid_saliency(pix[:1], ids[:1])
    assert pr3.stats["misses"] == 1
    with torch.no_grad():
        next(towers.parameters()).add_(0.01)
    pr.grid_saliency(pix[:1], ids[:1])
    assert pr.stats["misses"] == 4
    # noise is seeded per item: recomputation without the cache reproduces the map
    assert torch.equal(pr.grid_saliency(pix, ids, use_cache=False), pr.grid_saliency(pix, ids, use_cache=False))


def test_affinity_refinement_spreads_within_similar_features(scripts_mod):
    from scripts.decoder import affinity_refine

    feats = torch.zeros(1, 4, 4, 4)
    feats[0, 0, :, :2] = 1.0  # left half: one feature direction
    feats[0, 1, :, 2:] = 1.0  # right half: an orthogonal one
    init = torch.zeros(1, 1, 4, 4)
    init[0, 0, 0, 0] = 1.0  # one activated pixel on the left
    out = affinity_refine(feats, init)
    left, right = out[0, 0, :, :2], out[0, 0, :, 2:]
    assert torch.allclose(left, torch.full_like(left, 1 / 8), atol=1e-6)  # uniform over the 8 similar pixels
    assert torch.count_nonzero(right) == 0  # dissimilar pixels masked out (S < threshold)
    # identical features everywhere: every S_ij < 0 after the shift; the kept diagonal avoids NaN
    same = affinity_refine(torch.ones(1, 4, 3, 3), init[:, :, :3, :3])
    assert torch.isfinite(same).all() and torch.allclose(same, init[:, :, :3, :3])


def test_decoder_shapes_modes_and_mc_dropout(scripts_mod):
    from vlseg.inferers import mc_dropout

    for mode in ("paper", "code"):
        dec = scripts_mod.BidirectionalInteractionDecoder(dim=32, num_heads=2, mlp_dim=64, grid=(8, 8), dropout=0.5,
                                                          mode=mode).eval()
        feats, maps = torch.randn(2, 32, 8, 8), torch.rand(2, 2, 8, 8)
        out = dec(feats, maps)
        assert out.shape == (2, 1, 32, 32)
        assert torch.equal(out, dec(feats, maps))  # eval: deterministic
        with mc_dropout(dec):
            assert not torch.equal(dec(feats, maps), dec(feats, maps))  # MC dropout: stochastic
    full = scripts_mod.BidirectionalInteractionDecoder()  # paper widths: 256, 8 heads, 2048 MLP, 64x64
    assert full.map_encoder.proj[0].out_channels == 64 and full.map_encoder.proj[3].out_channels == 128
    assert full.cross_attn1.internal_dim == 128 and full.cross_attn1.num_heads == 8


def test_network_sampler_and_uncertainty(scripts_mod):
    from vlseg.inferers import StochasticTextInferer

    torch.manual_seed(0)
    net = scripts_mod.SimpleViLMedSAM(**TINY, dropout=0.3).eval()
    img = torch.rand(1, 3, 48, 80) * 255
    ids, mask = _tokens(["polyp"])
    out = StochasticTextInferer(num_samples=4, seed=0)(img, net, ids, mask)
    assert out.shape == (1, 2, 48, 80)
    assert 0 <= out.min() and out.max() <= 1
    assert float(out[:, 1].std()) > 0  # MC dropout: the uncertainty map varies
    out2 = StochasticTextInferer(num_samples=4, seed=0)(img, net, ids, mask)
    assert torch.equal(out, out2)  # same seed, same maps
    assert net.training is False
    with pytest.raises(ValueError):
        net(img, None)


def test_alignment_loss_trains_clip_and_ignores_empty_masks(scripts_mod):
    torch.manual_seed(0)
    net = scripts_mod.SimpleViLMedSAM(**TINY, train_encoders=True, align=True).train()
    ids, mask = _tokens(["polyp", "cyst", "polyp"])
    img = torch.rand(3, 3, 64, 64) * 255
    lab = torch.zeros(3, 1, 64, 64)
    lab[0, :, :16, :16] = 1
    lab[1, :, 32:, 32:] = 1
    out = net(img, ids, mask, align_target=lab)  # item 2 has an empty mask: ignored
    assert set(out) == {"logits", "align_loss"} and torch.isfinite(out["align_loss"])
    # a few AdamW steps on the CLIP parameters alone lower the alignment loss of this batch
    from scripts.alignment import alignment_loss

    opt = torch.optim.AdamW([p for p in net.clip.parameters() if p.requires_grad], lr=1e-2)
    pix = net.clip.preprocess(img)
    ids_ctx = net._text_ids(ids, "cpu")
    losses = []
    for _ in range(6):
        loss = alignment_loss(net, net.clip.tokens_at(pix, 0), net.clip.encode_text(ids_ctx), lab)
        opt.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.clip.parameters())
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert 0.0 <= net.last_alignment_accuracy <= 1.0
    empty = alignment_loss(net, net.clip.tokens_at(pix, 0), net.clip.encode_text(ids_ctx), torch.zeros_like(lab))
    assert float(empty) == 0.0


def test_alignment_stage_on_resume_only_freezes_the_clip(scripts_mod):
    """Resuming: the aligned CLIP comes from the checkpoint, so the stage must not spend its budget aligning again."""
    torch.manual_seed(0)
    net = scripts_mod.SimpleViLMedSAM(**TINY, train_encoders=True, align=True).train()
    ids, mask = _tokens(["polyp", "cyst"])
    lab = torch.zeros(2, 1, 64, 64)
    lab[:, :, :16, :16] = 1
    batches = [{"image": torch.rand(2, 3, 64, 64) * 255, "text_ids": ids, "label": lab}]
    before = {k: v.clone() for k, v in net.clip.state_dict().items()}
    info = scripts_mod.handlers.CLIPAlignmentStage(net, batches, max_iterations=3, resume="full_state_1.pt").run()
    assert "skipped" in info and net.mode_info["clip_alignment_stage"] == info
    assert all(torch.equal(before[k], v) for k, v in net.clip.state_dict().items())  # no optimisation step
    assert not any(p.requires_grad for p in net.clip.parameters()) and net.mode_info["clip_trainable"] is False
    net2 = scripts_mod.SimpleViLMedSAM(**TINY, train_encoders=True, align=True).train()
    info2 = scripts_mod.handlers.CLIPAlignmentStage(net2, batches, max_iterations=3).run()  # a fresh run aligns
    assert info2["iterations"] == 3 and not any(p.requires_grad for p in net2.clip.parameters())


# --------------------------------------------------------------------------- loss terms


def test_loss_terms_match_hand_computed_values_and_gradients(scripts_mod):
    from scripts.losses import ViLMedSAMLoss, bce_loss

    z = torch.tensor([[[[0.0, 2.0], [-1.0, 1.0]]]], requires_grad=True)
    y = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    p = torch.sigmoid(z.detach())
    # Eq. (11): mean binary cross-entropy
    bce_hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    b = bce_loss(z, y)
    assert float(b) == pytest.approx(float(bce_hand), rel=1e-6)
    (gz,) = torch.autograd.grad(b, z)
    assert torch.allclose(gz, (p - y) / 4, atol=1e-7)  # d/dz BCE = (sigmoid(z) - y) / N
    # Eq. (12): 1 - 2 sum(p y) / (sum p^2 + sum y^2), MONAI smooth 1e-5
    num, den = (p * y).sum(), (p**2).sum() + (y**2).sum()
    dice_hand = 1 - (2 * num + 1e-5) / (den + 1e-5)
    d = ViLMedSAMLoss().dice(z, y)
    assert float(d) == pytest.approx(float(dice_hand), rel=1e-6)
    (gd,) = torch.autograd.grad(d, z)
    grad_p = -(2 * y * (den + 1e-5) - (2 * num + 1e-5) * 2 * p) / (den + 1e-5) ** 2
    assert torch.allclose(gd, grad_p * p * (1 - p), atol=1e-6)
    # Eq. (10): weights 1 and 1 (+ the alignment term only when given and weighted)
    loss = ViLMedSAMLoss(1.0, 1.0, align_weight=0.5)
    total = loss({"logits": z, "align_loss": torch.tensor(2.0)}, y)
    assert float(total) == pytest.approx(float(bce_hand + dice_hand + 1.0), rel=1e-6)
    assert set(loss.last_terms) == {"dice", "bce", "align"}
    assert float(ViLMedSAMLoss()(z, y)) == pytest.approx(float(bce_hand + dice_hand), rel=1e-6)
    assert float(ViLMedSAMLoss(align_weight=0.0)({"logits": z, "align_loss": torch.tensor(9.0)}, y)) == pytest.approx(
        float(bce_hand + dice_hand), rel=1e-6)


# --------------------------------------------------------------------------- training loop pieces


def test_gradient_accumulation_equals_large_batch(scripts_mod):
    from monai.engines import PrepareBatchExtraInput
    from monai.inferers import SimpleInferer

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 1)

    x, y = torch.randn(4, 3), torch.randn(4, 1)
    ref = make()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    opt.step()

    net = make()
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1)
    it = scripts_mod.engine.AccumulationIteration(accumulation_steps=4)
    state = SimpleNamespace(iteration=0, epoch_length=4, device="cpu", output=None)
    engine = SimpleNamespace(state=state, network=net, optimizer=opt2, loss_function=torch.nn.functional.mse_loss,
                             inferer=SimpleInferer(), prepare_batch=PrepareBatchExtraInput(extra_keys=[]),
                             non_blocking=False, to_kwargs={}, optim_set_to_none=True, fire_event=lambda e: None)
    before = [p.detach().clone() for p in net.parameters()]
    for i in range(4):
        state.iteration = i + 1
        it(engine, {"image": x[i:i + 1], "label": y[i:i + 1]})
        if i < 3:
            assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # no step mid-window
    assert it.optimizer_steps == 1
    for a, b in zip(ref.parameters(), net.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_warmup_cosine_schedule(scripts_mod):
    f = scripts_mod.engine.WarmupCosine(100, 0.05)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert f(5) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert f(52) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert scripts_mod.engine.lr_factor("zero", 10, 10, 0.05)(52) == pytest.approx(f(52))
    # few-shot setting of the public code: CosineAnnealingLR(T_max=epochs, eta_min=0.01 lr), stepped per epoch
    few = scripts_mod.engine.lr_factor("few", steps_per_epoch=10, epochs=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    for epoch in range(5):
        assert few(epoch * 10) == pytest.approx(ref.get_last_lr()[0]) == pytest.approx(few(epoch * 10 + 9))
        opt.step()
        ref.step()
    with pytest.raises(ValueError, match="lr_schedule"):
        scripts_mod.engine.lr_factor("linear", 10, 4)


def test_random_prompt_transform(scripts_mod):
    t = scripts_mod.data.RandomPromptd("text", ["p1", "p9"])
    t.set_random_state(0)
    item = {"text": "x", "prompts": {"p1": "polyp", "p9": "one large bright round polyp in the top of the image"}}
    seen = {t(item)["text"] for _ in range(30)}
    assert seen == set(item["prompts"].values())
    assert scripts_mod.data.RandomPromptd("text", ["p5"])({"text": " polyp  here "})["text"] == "polyp here"


# --------------------------------------------------------------------------- configs: weights, resize, M2IB in training


_parser = CLI.parser  # ConfigParser over configs/<names>, bundle_root set, overrides applied


def test_paper_config_without_weights_fails_fast_and_small_builds(scripts_mod, tmp_path):
    import time

    from vlseg.weights import PretrainedWeightsError

    for names in (("train.json",), ("inference.json",)):
        parser = _parser(*names, bundle_root=str(tmp_path))
        t0 = time.perf_counter()
        with bundle_context(BUNDLE), pytest.raises(Exception) as err:
            parser.get_parsed_content("network_def")
        cause = err.value
        while cause.__cause__ is not None:
            cause = cause.__cause__
        assert isinstance(cause, PretrainedWeightsError)
        msg = str(cause)
        assert "`sam_checkpoint`" in msg and "sam_vit_h_4b8939.pth" in msg
        assert "python -m monai.bundle download_large_files --bundle_path bundles/vilmedsam" in msg
        assert time.perf_counter() - t0 < 20  # before building the 637 M-parameter ViT-H encoder
    # with the SAM file present, the missing CLIP file is named next (fail fast, before building either encoder)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sam_vit_h_4b8939.pth").write_bytes(b"")
    with bundle_context(BUNDLE), pytest.raises(Exception) as err:
        _parser("train.json", bundle_root=str(tmp_path)).get_parsed_content("network_def")
    assert "`clip_pretrained`" in str(err.value.__cause__ or err.value) or "clip_pretrained" in repr(err.value)
    # the small variant (require_pretrained false) still builds, with one warning per encoder
    with bundle_context(BUNDLE):
        net = _parser("train.json", "small.json").get_parsed_content("network_def")
    assert net.mode_info["sam_weights_loaded"] is False and net.mode_info["sam_encoder_trainable"] is True


def test_longest_side_resize_pad_and_inversion_on_a_non_square_image(scripts_mod, tmp_path):
    from monai.transforms import Invertd
    from PIL import Image

    h, w = 40, 100  # landscape: the long side (width) becomes image_size, the height is padded at the end
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = 200  # left half bright
    Image.fromarray(arr).save(tmp_path / "wide.png")
    parser = _parser("inference.json", "tiny.json", text="polyp")
    with bundle_context(BUNDLE):
        pre = parser.get_parsed_content("preprocessing")
    d = pre({"image": str(tmp_path / "wide.png"), "text": "polyp"})
    img = d["image"]  # MONAI's PIL reader: spatial axes (W, H)
    assert tuple(img.shape) == (3, 64, 64)
    content = round(64 * h / w)  # 26 rows of the 64 carry the image, aspect kept
    assert float(img[:, :, content + 1:].abs().sum()) == 0.0  # padding after the image (public code: bottom / right)
    assert float(img[:, :20, :content - 1].mean()) > 150 and float(img[:, 44:, :content - 1].mean()) < 50
    # a prediction on the padded square goes back to the original size: crop the pad, resize back
    d["pred"] = img[:1] / 255.0
    out = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    back = np.asarray(out["pred"])[0]
    assert back.shape == (w, h)
    ref = np.asarray(arr[..., 0], np.float32).T / 255.0  # (W, H), same axes as the reader
    assert np.abs(back - ref)[5:-5].mean() < 0.05  # away from the left/right edge of the step: the same picture


def test_m2ib_map_is_computed_before_augmentation_and_cached_in_training(scripts_mod, demo, tmp_path):
    """Training computes the map on the UN-augmented image (cacheable), then flips / rotates it with the image."""
    from scripts.augment import M2IBAugmentBatch
    from monai.transforms import RandFlipd, RandRotate90d

    torch.manual_seed(0)
    net = scripts_mod.SimpleViLMedSAM(**TINY)
    img = torch.rand(2, 3, 64, 64) * 255
    ids, mask = _tokens(["polyp", "cyst"])
    lab = (torch.rand(2, 1, 64, 64) > 0.5).float()
    always = [RandFlipd(["image", "label", "m2ib"], prob=1.0, spatial_axis=1, allow_missing_keys=True),
              RandRotate90d(["image", "label", "m2ib"], prob=1.0, max_k=1, allow_missing_keys=True)]
    prep = M2IBAugmentBatch(net, always)
    x, y, args, kw = prep({"image": img, "label": lab, "text_ids": ids, "text_mask": mask}, device="cpu")
    aug = lambda t: torch.rot90(torch.flip(t, dims=(-1,)), 1, dims=(-2, -1))  # noqa: E731
    assert torch.allclose(x, aug(img)) and torch.equal(y, aug(lab))
    raw = net.m2ib_grid_map(img, ids)
    assert torch.allclose(kw["m2ib_map"], aug(raw))  # the map of the un-augmented image, moved like the image
    assert net.prompter.stats["hits"] >= 2  # the second call above was a cache hit
    # flips / rot90 of the grid map commute with the network's bilinear resize to the SAM grid
    from scripts.m2ib import resize_minmax

    assert torch.allclose(resize_minmax(aug(raw), (8, 8)), aug(resize_minmax(raw, (8, 8))), atol=1e-6)
    net.train()
    out = net(x, kw["text_ids"], kw["text_mask"], m2ib_map=kw["m2ib_map"])["logits"]
    assert out.shape == (2, 1, 64, 64)

    # the real training config: epoch 2 hits the cache for every item of epoch 1
    parser = _parser("train.json", "tiny.json", datalist=str(demo), ckpt_dir=str(tmp_path / "models"),
                     output_dir=str(tmp_path / "runs"), max_epochs=2, val_interval=100, train_prompt_keys=None,
                     train_encoders=False)
    with bundle_context(BUNDLE):
        trainer = parser.get_parsed_content("train#trainer")
        cfg_net = parser.get_parsed_content("network_def")
        n_items = len(parser.get_parsed_content("train#data"))
        loader = parser.get_parsed_content("train#dataloader")
        seen = 2 * len(loader) * loader.batch_size  # items the two epochs draw (drop_last)
        trainer.run()
    stats = cfg_net.prompter.stats
    assert stats["hits"] + stats["misses"] == seen
    assert 0 < stats["misses"] <= n_items  # every (image, prompt) computed at most once: epoch 2 hits the cache
    assert stats["hits"] >= seen - n_items
