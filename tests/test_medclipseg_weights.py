"""MedCLIPSeg bundle: pretrained files in their upstream formats load strictly, or the run stops and says why.

The upstream architectures are built with random weights (open_clip, transformers) and saved in the formats and
names their publishers use: open_clip state dicts (``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``)
of ``ViT-B-16`` and ``ViT-B-16-quickgelu``; a UniMedCLIP checkpoint (open_clip ViT image tower + Hugging Face BERT
text tower under ``text_encoder.``, DDP ``module.`` prefix, nested under ``state_dict``); a BiomedBERT Hugging Face
folder (``BertForMaskedLM``, ``bert.*`` + ``cls.*``); and a state dict in the MedCLIPSeg authors' own layout
(``{"model": CustomCLIP.state_dict()}``). Real-size layouts are compared on the meta device; real tensors are loaded
at narrow sizes so the file stays fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bundle_cli import BundleCLI
from vlseg.bundles import bundle_context
from vlseg.text.vocab import TokenizerMismatchError
from vlseg.weights import PretrainedWeightsError, compare_state

CLI = BundleCLI("medclipseg")
BUNDLE, CONFIGS = CLI.root, CLI.configs
FETCH = "python -m monai.bundle download_large_files --bundle_path bundles/medclipseg"

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
NARROW = {"embed_dim": 24, "vision_cfg": VISION, "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2}}
TOL = 1e-5  # lock-step embeddings vs open_clip's encode_image / encode_text (float32, same operations)


@pytest.fixture(scope="module")
def mcs():
    with bundle_context(BUNDLE):
        import scripts.backbone
        import scripts.convert_upstream
        import scripts.network
        import scripts.upstream

        yield SimpleNamespace(network=scripts.network, backbone=scripts.backbone, upstream=scripts.upstream,
                              cli=scripts.convert_upstream)


parser_for = CLI.parser  # ConfigParser over configs/<names>, bundle_root set, overrides applied


def cause(exc_type, fn):
    """The ``exc_type`` error raised by ``fn`` (MONAI's config parser wraps it in RuntimeError: walk the chain)."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    while err is not None and not isinstance(err, exc_type):
        err = err.__cause__ or err.__context__
    assert err is not None, f"no {exc_type.__name__} in the chain of {info.value!r}"
    return err


def bert_folder(path: Path, vocab_size: int = 40, hidden: int = 24, layers: int = 2) -> Path:
    """A tiny Hugging Face BERT folder in the BiomedBERT layout (``BertForMaskedLM``: ``bert.*`` + ``cls.*``)."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32)
    torch.manual_seed(3)
    BertForMaskedLM(cfg).save_pretrained(str(path))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lesion", "in", "image", "a", "small", "polyp"]
    vocab = words + [f"w{i}" for i in range(vocab_size - len(words))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return path


def hf_clip_cfg(folder, pretrained: bool = False) -> dict:
    return {"embed_dim": 24, "vision_cfg": VISION,
            "text_cfg": {"hf_model_name": str(folder), "hf_model_pretrained": pretrained, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16}}


def assert_lockstep_equals_open_clip(net, ids, mask):
    """With no adapters the lock-step towers are open_clip's own towers (``net.clip`` IS the open_clip model)."""
    net.eval()
    img = torch.randn(2, 3, *net.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_img, ours_txt = net.encode_towers(img, ids, mask)
        ref_img, ref_txt = net.clip.encode_image(img), net.clip.encode_text(ids)
    assert (ours_img - ref_img).abs().max() < TOL
    assert (ours_txt - ref_txt).abs().max() < TOL


# ------------------------------------------------------------------------------------------------ open_clip


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-16-quickgelu"])
def test_open_clip_vit_b16_real_size_layout_meta(mcs, name):
    """The paper-size towers have exactly the names and shapes of open_clip's own ``ViT-B-16`` model files."""
    import open_clip

    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, load_weights=False, device="meta")
        net = mcs.network.MedCLIPSeg(clip_model_name=name, tokenizer=f"open_clip:{name}")
    report = compare_state(net.clip.state_dict(), mcs.backbone.clip_key_map(ref.state_dict()))
    assert report.exact and report.matched > 150, report.describe()


@pytest.mark.parametrize("fmt", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_open_clip_file_loads_strictly_through_config(mcs, tmp_path, fmt):
    import open_clip

    torch.manual_seed(1)
    ref = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, load_weights=False, **NARROW)
    path = tmp_path / fmt
    if fmt.endswith(".safetensors"):
        from safetensors.torch import save_model

        save_model(ref, str(path))
    else:
        torch.save(ref.state_dict(), path)
    with bundle_context(BUNDLE):
        net = parser_for("train.json", clip_cfg=NARROW, clip_pretrained=str(path), adapter_layers=[], context_length=16,
                         train_encoders=True).get_parsed_content("network_def")
    assert net.encoders_pretrained and not net.encoders_trainable  # loaded weights stay frozen
    for k, v in ref.state_dict().items():
        assert torch.equal(net.clip.state_dict()[k], v), k
    from vlseg.text import build_tokenizer

    ids, mask = build_tokenizer("open_clip:ViT-B-16", 16)(["a small polyp", "dark round lesion on the left"])
    assert_lockstep_equals_open_clip(net, ids, mask)


def test_open_clip_file_that_does_not_fit_is_an_error(mcs, tmp_path):
    import open_clip

    ref = open_clip.create_model("ViT-B-16", pretrained=None, load_weights=False, **NARROW)
    state = ref.state_dict()
    state.pop("visual.ln_post.weight")
    state["visual.extra"] = torch.zeros(1)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError) as err:
        mcs.network.MedCLIPSeg(clip_cfg=NARROW, clip_pretrained=str(path), require_pretrained=True, adapter_layers=[])
    msg = str(err.value)
    assert "clip_pretrained" in msg and "visual.ln_post.weight" in msg and "visual.extra" in msg and FETCH in msg
    # require_pretrained false: one warning and NOTHING loaded (never half pretrained)
    net = mcs.network.MedCLIPSeg(clip_cfg=NARROW, clip_pretrained=str(path), adapter_layers=[])
    assert not net.encoders_pretrained
    assert not torch.equal(net.clip.visual.conv1.weight, state["visual.conv1.weight"])


def test_paper_config_without_weights_fails_fast_small_builds(mcs, tmp_path):
    absent = tmp_path / "models" / "clip_backbone.pt"
    for files in (["train.json"], ["inference.json"], ["train.json", "evaluate.json"]):
        with bundle_context(BUNDLE):
            parser = parser_for(*files, clip_pretrained=str(absent))
            msg = str(cause(PretrainedWeightsError, lambda: parser.get_parsed_content("network_def")))
        assert "`clip_pretrained`" in msg and str(absent) in msg and FETCH in msg and "require_pretrained" in msg
    with bundle_context(BUNDLE):
        small = parser_for("train.json", "small.json").get_parsed_content("network_def")
    assert small.text_pretrained and not small.encoders_pretrained and small.vision_trainable


# ------------------------------------------------------------------------------------------------ UniMedCLIP / BERT


def unimedclip_checkpoint(tmp_path: Path, folder: Path) -> tuple[Path, dict]:
    """UniMedCLIP's training-script format: {"state_dict": {"module." + CLIP names}}, the BERT tower under
    ``text_encoder.transformer`` (no pooler) with its MLP projection ``text_encoder.proj.{0,2}``, plus the
    ``position_ids`` buffer older transformers versions saved."""
    import open_clip
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    visual = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, load_weights=False, **NARROW).visual
    bert = BertModel(BertConfig.from_pretrained(str(folder)), add_pooling_layer=False)
    d, e = bert.config.hidden_size, NARROW["embed_dim"]
    proj = nn.Sequential(nn.Linear(d, (d + e) // 2, bias=False), nn.GELU(), nn.Linear((d + e) // 2, e, bias=False))
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state.update({f"text_encoder.transformer.{k}": v for k, v in bert.state_dict().items()})
    state.update({f"text_encoder.proj.{k}": v for k, v in proj.state_dict().items()})
    state["text_encoder.transformer.embeddings.position_ids"] = torch.arange(32)[None]
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "unimed_clip_vit_b16.pt"
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path, state


def test_unimedclip_checkpoint_loads_strictly_and_lockstep(mcs, tmp_path):
    folder = bert_folder(tmp_path / "biomedbert")
    path, state = unimedclip_checkpoint(tmp_path, folder)
    net = mcs.network.MedCLIPSeg(clip_cfg=hf_clip_cfg(folder), clip_pretrained=str(path), require_pretrained=True,
                                 adapter_layers=[], tokenizer=f"hf:{folder}")
    assert net.text_kind == "hf" and net.encoders_pretrained
    own = net.clip.state_dict()
    assert torch.equal(own["text.proj.2.weight"], state["text_encoder.proj.2.weight"])
    assert torch.equal(own["text.transformer.encoder.layer.1.output.dense.weight"],
                       state["text_encoder.transformer.encoder.layer.1.output.dense.weight"])
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0]])
    assert_lockstep_equals_open_clip(net, ids, (ids != 0).long())


def test_biomedbert_folder_loads_into_text_tower(mcs, tmp_path):
    """``hf_model_pretrained: true``: the folder's own BertForMaskedLM weights (``bert.*``; ``cls.*`` unused)."""
    from transformers import BertForMaskedLM

    folder = bert_folder(tmp_path / "biomedbert")
    ref = BertForMaskedLM.from_pretrained(str(folder), local_files_only=True)
    net = mcs.network.MedCLIPSeg(clip_cfg=hf_clip_cfg(folder, pretrained=True), adapter_layers=[1], adapter_dim=8)
    assert net.text_pretrained and not net.encoders_pretrained
    assert torch.equal(net.clip.text.transformer.encoder.layer[0].attention.self.query.weight,
                       ref.bert.encoder.layer[0].attention.self.query.weight)
    # a folder whose weights do not fit the tower (another width) stops a run that requires pretrained weights
    other = bert_folder(tmp_path / "other", hidden=16)
    with pytest.raises(PretrainedWeightsError, match=r"hf_model_name.*with another shape"):
        mcs.backbone.load_hf_text_weights(net.clip.text.transformer, str(other), None, True)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_follows_text_tower(mcs, tmp_path):
    folder = bert_folder(tmp_path / "biomedbert")
    with pytest.raises(TokenizerMismatchError, match="vocabulary"):
        mcs.network.MedCLIPSeg(clip_cfg=hf_clip_cfg(folder), adapter_layers=[], tokenizer="cxr-bert")
    with pytest.raises(TokenizerMismatchError, match="open_clip"):
        mcs.network.MedCLIPSeg(clip_cfg=NARROW, adapter_layers=[], tokenizer="minilm")
    mcs.network.MedCLIPSeg(clip_cfg=NARROW, adapter_layers=[], tokenizer="open_clip:ViT-B-16")  # same BPE family


def test_unimedclip_config_without_biomedbert_vocab_is_an_error(mcs, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "unimed_clip_vit_b16.pt").write_bytes(b"weights present")
    with bundle_context(BUNDLE):
        parser = parser_for("train.json", "unimedclip.json", bundle_root=str(tmp_path))
        msg = str(cause(PretrainedWeightsError, lambda: parser.get_parsed_content("tokenizer")))
        assert str(tmp_path / "models" / "biomedbert" / "vocab.txt") in msg and FETCH in msg
        parser = parser_for("train.json", "unimedclip.json", bundle_root=str(tmp_path), require_pretrained=False)
        assert parser.get_parsed_content("tokenizer") == "cxr-bert"  # random tower only, with a warning
        bert_folder(tmp_path / "models" / "biomedbert")
        parser = parser_for("train.json", "unimedclip.json", bundle_root=str(tmp_path))
        assert parser.get_parsed_content("tokenizer") == f"hf:{tmp_path / 'models' / 'biomedbert'}"


# ------------------------------------------------------------------------------------------------ authors' checkpoints


def authors_state(vision: nn.Module, bert: nn.Module, vis: int, txt: int, emb: int, c: int, n_adapters: int,
                  n_up: int, meta: bool = False) -> dict:
    """A ``CustomCLIP.state_dict()`` of the authors' code (trainers/medclipseg_unimedclip.py, layers.py,
    scale_block.py), names and shapes written out from that code's module tree, random values."""
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.randn(*shape, generator=g)

    d = txt
    state = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"text_model.transformer.{k}": v for k, v in bert.state_dict().items()})
    state["text_model.transformer.embeddings.position_ids"] = torch.arange(512 if meta else 32)[None]
    state["text_model.proj.0.weight"] = r((d + emb) // 2, d)
    state["text_model.proj.2.weight"] = r(emb, (d + emb) // 2)
    state["logit_scale"] = r(())
    for i in range(3):
        state[f"mask_head.{2 * i}.weight"], state[f"mask_head.{2 * i}.bias"] = r(emb, emb), r(emb)
    for i in range(n_up):
        p = f"upscale.{i}."
        state.update({p + "conv1.weight": r(emb, emb, 2, 2), p + "conv1.bias": r(emb), p + "conv2.weight": r(emb, 1, 3, 3),
                      p + "norm.weight": r(emb), p + "norm.bias": r(emb)})
    for a in range(n_adapters):
        p = f"pvl_adapters.{a}."
        state.update({p + "proj_vis_down.0.weight": r(c, vis), p + "proj_txt_down.weight": r(c, txt),
                      p + "proj_vis_up.weight": r(vis, c), p + "proj_txt_up.weight": r(txt, c)})
        for att in ("cross_attn_img_to_txt", "cross_attn_txt_to_img"):
            q = f"{p}two_way.{att}."
            state.update({q + "q_proj.weight": r(c, c), q + "q_proj.bias": r(c), q + "k_proj.weight": r(2 * c, c),
                          q + "k_proj.bias": r(2 * c), q + "v_proj.weight": r(2 * c, c), q + "v_proj.bias": r(2 * c),
                          q + "out_proj.weight": r(c, c), q + "out_proj.bias": r(c), q + "norm_k.weight": r(c),
                          q + "norm_k.bias": r(c), q + "norm_v.weight": r(c), q + "norm_v.bias": r(c),
                          q + "gate": r(())})
    return state


def test_authors_layout_real_size_meta(mcs):
    """The released files' layout at their real size (UniMedCLIP ViT-B/16 + BiomedBERT-base, adapters before
    blocks 1-10 of width 256, two up-scaling blocks) converts onto configs/unimedclip.json's network exactly."""
    import open_clip
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        vision = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, load_weights=False, device="meta").visual
        bert = BertModel(BertConfig.from_pretrained(str(BUNDLE / "assets" / "biomedbert_base")), add_pooling_layer=False)
    state = authors_state(vision, bert, 768, 768, 512, 256, 10, 2, meta=True)
    converted, report = mcs.upstream.convert_upstream_state(state)
    assert not report.unknown and list(report.dropped) == ["text_model.transformer.embeddings.position_ids"]
    with bundle_context(BUNDLE):
        expected = mcs.cli.expected_state([str(CONFIGS / "inference.json"), str(CONFIGS / "unimedclip.json")], {})
    check = compare_state(expected, converted)
    assert check.exact and check.matched == report.converted, check.describe()
    n = sum(v.numel() for k, v in expected.items() if k.startswith(("pvl_adapters", "mask_head", "upscale")))
    assert n == 18_677_268  # the public code's adapter + head parameter count for this layout


def test_authors_checkpoint_converts_and_loads_strictly(mcs, tmp_path):
    import open_clip
    from transformers import BertConfig, BertModel

    folder = bert_folder(tmp_path / "biomedbert")
    vision = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, load_weights=False, **NARROW).visual
    bert = BertModel(BertConfig.from_pretrained(str(folder)), add_pooling_layer=False)
    state = authors_state(vision, bert, 32, 24, 24, 8, 2, 2)
    path = tmp_path / "MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"
    torch.save({"epoch": 100, "model": state, "optimizer": {"state": {}, "param_groups": []}}, path)

    def build():
        return mcs.network.MedCLIPSeg(clip_cfg=hf_clip_cfg(folder), adapter_layers=[0, 1], adapter_dim=8,
                                      tokenizer=f"hf:{folder}")

    net = mcs.upstream.load_upstream_checkpoint(build(), str(path))
    own = net.state_dict()
    assert torch.equal(own["pvl_adapters.1.proj_vis_down.weight"], state["pvl_adapters.1.proj_vis_down.0.weight"])
    assert torch.equal(own["clip.visual.proj"], state["vision_model.proj"])
    assert torch.equal(own["pvl_adapters.0.two_way.cross_attn_txt_to_img.gate"],
                       state["pvl_adapters.0.two_way.cross_attn_txt_to_img.gate"])
    with bundle_context(BUNDLE):  # the same through the config key `upstream_checkpoint`
        parser = parser_for("inference.json", clip_cfg=hf_clip_cfg(folder), clip_pretrained=None, adapter_layers=[0, 1],
                            adapter_dim=8, require_pretrained=False, tokenizer=f"hf:{folder}", device="cpu",
                            upstream_checkpoint=str(path))
        via_config = parser.get_parsed_content("network")
    assert torch.equal(via_config.state_dict()["upscale.0.conv2.weight"], state["upscale.0.conv2.weight"])
    converted, report = mcs.upstream.convert_upstream_state(state)
    assert report.converted + len(report.dropped) == len(state) and not report.unknown
    assert converted.keys() == own.keys()
    # a file with a name the converter has no rule for, or one tensor short, is refused with the names
    bad = dict(state, **{"prompt_learner.ctx": torch.zeros(2)})
    bad.pop("upscale.1.norm.bias")
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(PretrainedWeightsError) as err:
        mcs.upstream.load_upstream_checkpoint(build(), str(tmp_path / "bad.pth"))
    assert "upstream_checkpoint" in str(err.value) and "prompt_learner.ctx" in str(err.value)
    assert "upscale.1.norm.bias" in str(err.value)
    # the command line writes {"model": ...}, which CheckpointLoader / load_state_dict(strict) take as is
    out = tmp_path / "converted.pt"
    sets = ["clip_cfg=" + json.dumps(hf_clip_cfg(folder)), "adapter_layers=[0, 1]", "adapter_dim=8"]
    with bundle_context(BUNDLE):
        assert mcs.cli.main([str(path), str(out), "--set", *sets]) == 0
        assert mcs.cli.main([str(tmp_path / "bad.pth"), str(tmp_path / "no.pt"), "--set", *sets]) == 1
    assert not (tmp_path / "no.pt").exists()
    fresh = build()
    fresh.load_state_dict(torch.load(out, map_location="cpu", weights_only=True)["model"], strict=True)
    assert torch.equal(fresh.state_dict()["mask_head.4.bias"], state["mask_head.4.bias"])


def test_no_process_wide_side_effects(mcs):
    import logging
    import os

    before = (os.environ.get("HF_HUB_OFFLINE"), list(logging.getLogger().filters))
    mcs.network.MedCLIPSeg(clip_cfg=NARROW, adapter_layers=[1], adapter_dim=8)
    assert (os.environ.get("HF_HUB_OFFLINE"), list(logging.getLogger().filters)) == before
    src = "".join(p.read_text() for p in (BUNDLE / "scripts").glob("*.py"))
    assert not re.search(r"os\.environ(\[|\.setdefault)", src) and "getLogger().addFilter" not in src
