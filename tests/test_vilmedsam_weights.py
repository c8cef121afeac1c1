"""Simple-ViLMedSAM: the upstream pretrained files load strictly through the bundle's configs, offline.

Upstream architectures are built with random weights (segment_anything's ``sam_model_registry``, open_clip's
``ViT-B-16-quickgelu`` and BiomedCLIP's ``CustomTextCLIP`` from its Hub config with a LOCAL BERT config): the large
ones on the meta device (names and shapes via :func:`vlseg.weights.compare_state`), a tiny SAM / CLIP pair for real,
saved in the upstream formats and loaded through ``configs/train.json`` + ``configs/tiny.json``. Checkpoints then hold
only what training produced (LoRA + decoder) and round-trip.
"""

from __future__ import annotations

import json

import pytest
import torch

from bundle_cli import BundleCLI
from vlseg.bundles import bundle_context

CLI = BundleCLI("vilmedsam", timeout=240)
BUNDLE, CONFIGS = CLI.root, CLI.configs
TINY_SAM = dict(embed_dim=32, depth=1, num_heads=2, patch_size=8, window_size=0, global_attn_indexes=[], out_chans=32)
#: BiomedCLIP's open_clip_config.json (model_cfg) as published on the Hugging Face Hub
BIOMEDCLIP_HUB_CFG = {
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                 "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                 "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
}


@pytest.fixture(scope="module")
def scripts_mod():
    with bundle_context(BUNDLE):
        import scripts
        import scripts.clip
        import scripts.sam_encoder

        yield scripts


_parser = CLI.parser  # ConfigParser over configs/<names>, bundle_root set, overrides applied


# --------------------------------------------------------------------------- SAM


@pytest.mark.parametrize("variant", ["vit_b", "vit_h"])
def test_official_sam_layout_fits_the_paper_network_exactly(scripts_mod, variant):
    """``sam_model_registry[variant]`` (the layout of ``sam_vit_*.pth``) against the paper config's network."""
    from segment_anything import sam_model_registry
    from vlseg.weights import compare_state

    sam = scripts_mod.sam_encoder
    with torch.device("meta"):
        upstream = sam_model_registry[variant]().state_dict()
        with bundle_context(BUNDLE):
            net = _parser("train.json", require_pretrained=False, sam_variant=variant, sam_checkpoint=None,
                          clip_pretrained=None).get_parsed_content("network_def")
    expected = net.sam_encoder.state_dict()
    report = compare_state(expected, sam.sam_key_map(expected)(upstream), optional=sam.LORA_OPTIONAL,
                           ignore=sam.SAM_IGNORE)
    assert report.exact, report.describe()
    n_lora = sum(".lora_" in k for k in expected)
    assert report.matched == len(expected) - n_lora == sum(k.startswith("image_encoder.") for k in upstream)
    assert n_lora == 4 * len(net.sam_encoder.blocks)
    # only the prompt encoder / mask decoder are ignored, by name; nothing else of the file is dropped
    assert {k.split(".")[0] for k in upstream if not k.startswith("image_encoder.")} == {"prompt_encoder",
                                                                                       "mask_decoder"}
    # another variant's file does not fit (shapes), so it could never load silently
    other = "vit_h" if variant == "vit_b" else "vit_b"
    with torch.device("meta"):
        wrong = sam_model_registry[other]().state_dict()
    assert not compare_state(expected, sam.sam_key_map(expected)(wrong), optional=sam.LORA_OPTIONAL,
                             ignore=sam.SAM_IGNORE).exact


def _tiny_sam_file(path, seed=0):
    """A SAM checkpoint in the official layout (``Sam`` = image encoder + prompt encoder + mask decoder)."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    with bundle_context(BUNDLE):
        from scripts.sam_encoder import build_sam_image_encoder
    torch.manual_seed(seed)
    sam = Sam(image_encoder=build_sam_image_encoder("vit_b", 64, TINY_SAM),
              prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64),
                                           mask_in_chans=4),
              mask_decoder=MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=1, embedding_dim=32,
                                                                                           mlp_dim=64, num_heads=2),
                                       num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16))
    torch.save(sam.state_dict(), path)
    return sam


def _tiny_clip_file(path, seed=1):
    import open_clip

    cfg = json.loads((CONFIGS / "tiny.json").read_text())["clip_cfg"]
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vilmedsam_weights")
    sam = _tiny_sam_file(root / "sam_tiny.pth")
    clip = _tiny_clip_file(root / "open_clip_pytorch_model.bin")
    return root, sam, clip


def _tiny_net(files, **overrides):
    root = files[0]
    args = dict(sam_checkpoint=str(root / "sam_tiny.pth"), clip_pretrained=str(root / "open_clip_pytorch_model.bin"),
                require_pretrained=True, train_encoders=False, align_weight=0.0)
    args.update(overrides)
    with bundle_context(BUNDLE):
        return _parser("train.json", "tiny.json", **args).get_parsed_content("network_def")


def test_tiny_upstream_files_load_strictly_through_the_config(scripts_mod, tiny_files):
    root, sam, clip = tiny_files
    net = _tiny_net(tiny_files)
    assert net.mode_info["sam_weights_loaded"] and net.mode_info["clip_weights_loaded"]
    enc = net.sam_encoder
    assert torch.equal(enc.patch_embed.proj.weight, sam.image_encoder.patch_embed.proj.weight)
    assert torch.equal(enc.blocks[0].attn.qkv.qkv.weight, sam.image_encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(enc.neck[0].weight, sam.image_encoder.neck[0].weight)
    ref = clip.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.clip.model.state_dict().items())
    # a file that does not fit stops the build, naming the config key and the counts
    from vlseg.weights import PretrainedWeightsError

    with pytest.raises(Exception) as err:
        _tiny_net(tiny_files, sam_checkpoint=str(root / "open_clip_pytorch_model.bin"))
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, PretrainedWeightsError) and "`sam_checkpoint`" in str(cause)
    assert "missing" in str(cause) and "unexpected" in str(cause)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_hold_only_what_training_produced_and_round_trip(scripts_mod, tiny_files):
    from ignite.handlers import Checkpoint

    torch.manual_seed(0)
    net = _tiny_net(tiny_files).eval()
    with torch.no_grad():  # pretend training moved LoRA B and the decoder
        for p in net.lora_parameters() + list(net.decoder.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    state = net.state_dict()
    lora = {n for n, _ in net.named_parameters() if ".lora_" in n}
    assert set(state) == lora | {f"decoder.{k}" for k in net.decoder.state_dict()}
    assert not any(k.startswith("clip.") or (k.startswith("sam_encoder.") and ".lora_" not in k) for k in state)
    assert net.parameter_report()["checkpoint_tensors"] == len(state)
    # round trip through ignite's Checkpoint.load_objects (what MONAI's CheckpointLoader calls), strict
    other = _tiny_net(tiny_files).eval()
    Checkpoint.load_objects(to_load={"model": other}, checkpoint={"model": state})
    img = torch.rand(1, 3, 64, 64) * 255
    ids = torch.zeros(1, 16, dtype=torch.long)
    ids[0, :3] = torch.tensor([49406, 1000, 49407])
    assert torch.allclose(net(img, ids), other(img, ids))
    # an older full checkpoint (frozen tensors included) still loads
    full = {**state, **{f"sam_encoder.{k}": v for k, v in net.sam_encoder.state_dict().items()}}
    other.load_state_dict(dict(full, **{k: v for k, v in torch.nn.Module.state_dict(net).items()}))
    # without the pretrained files the same checkpoint cannot make the network: a clear error, not random parts
    bare = _tiny_net(tiny_files, require_pretrained=False, sam_checkpoint=None, clip_pretrained=None)
    with pytest.raises(RuntimeError, match="require_pretrained"):
        bare.load_state_dict(state)
    # a variant without pretrained files saves everything (its random frozen init is part of the model)
    assert any(k.startswith("clip.model.") for k in bare.state_dict())
    assert any(k.startswith("sam_encoder.patch_embed") for k in bare.state_dict())
    # train_encoders true: the loaded encoders train, so they are saved too
    joint = _tiny_net(tiny_files, train_encoders=True)
    assert any(k.startswith("sam_encoder.patch_embed") for k in joint.state_dict())


# --------------------------------------------------------------------------- CLIP


def test_openai_vit_b16_layout_builds_with_quickgelu(scripts_mod):
    """The default ``clip_model`` is open_clip's ``ViT-B-16-quickgelu``: OpenAI's tensor names and shapes, and the
    QuickGELU activation the OpenAI weights were trained with."""
    import open_clip
    from vlseg.weights import compare_state

    with torch.device("meta"), bundle_context(BUNDLE):
        net = _parser("train.json", require_pretrained=False, sam_variant="vit_b", sam_checkpoint=None,
                      clip_pretrained=None).get_parsed_content("network_def")
        plain = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    model = net.clip.model
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert not isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    state = model.state_dict()
    openai = {"visual.conv1.weight": (768, 3, 16, 16), "visual.class_embedding": (768,),
              "visual.positional_embedding": (197, 768), "visual.proj": (768, 512), "positional_embedding": (77, 512),
              "text_projection": (512, 512), "token_embedding.weight": (49408, 512), "logit_scale": (),
              "transformer.resblocks.11.attn.in_proj_weight": (1536, 512), "ln_final.weight": (512,)}
    assert {k: tuple(state[k].shape) for k in openai} == openai
    assert compare_state(state, plain.state_dict()).exact  # same tensors as plain ViT-B-16: only the function differs
    assert net.clip.grid == (14, 14) and net.clip.image_size == (224, 224)


def _biomedclip_files(root):
    cfg_file = root / "biomedclip" / "open_clip_config.json"
    cfg_file.parent.mkdir(parents=True)
    cfg_file.write_text(json.dumps({"model_cfg": BIOMEDCLIP_HUB_CFG, "preprocess_cfg": {}}))
    bert = root / "biomedbert"
    bert.mkdir()
    src = BUNDLE.parent / "medclipseg" / "assets" / "biomedbert_base" / "config.json"
    (bert / "config.json").write_text(src.read_text())  # BERT-base (BiomedBERT's shape), local
    from vlseg.text.vocab import encoder_vocab_file

    (bert / "vocab.txt").write_text(encoder_vocab_file("cxr-bert").read_text())  # any WordPiece vocab for the test
    return cfg_file, bert


def test_biomedclip_layout_builds_offline_from_local_configs(scripts_mod, tmp_path, monkeypatch):
    """The paper's CLIP: BiomedCLIP's Hub config with the BERT tower from a LOCAL config (no Hub access)."""
    from vlseg.text.vocab import TokenizerMismatchError
    from vlseg.weights import compare_state

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg_file, bert = _biomedclip_files(tmp_path)
    clip = scripts_mod.clip
    with torch.device("meta"):
        model, loaded = clip.build_clip(clip.BIOMEDCLIP, None, None, False, cfg_file, bert)
    assert loaded is False
    state = model.state_dict()
    layout = {"visual.trunk.patch_embed.proj.weight": (768, 3, 16, 16), "visual.trunk.pos_embed": (1, 197, 768),
              "visual.head.proj.weight": (512, 768), "text.transformer.embeddings.word_embeddings.weight": (30522, 768),
              "text.proj.0.weight": (640, 768), "text.proj.2.weight": (512, 640), "logit_scale": ()}
    assert {k: tuple(state[k].shape) for k in layout} == layout
    assert sum(k.startswith("visual.trunk.blocks.") for k in state) == 12 * 12
    assert sum(k.startswith("text.transformer.encoder.layer.") for k in state) == 12 * 16
    # a released file may carry BERT's position_ids buffer: ignored by name, everything else must match
    file_state = dict(state, **{"text.transformer.embeddings.position_ids": torch.zeros(1, 512, device="meta")})
    assert compare_state(state, file_state, ignore=clip.CLIP_IGNORE).exact
    towers = clip.CLIPTowers(model)
    assert towers.kind == "timm" and towers.grid == (14, 14) and towers.depth == 12
    # tokenizer follows the text tower
    clip.check_clip_tokenizer(model, f"hf:{bert}", bert)
    for wrong in ("open_clip:ViT-B-16", "cxr-bert"):
        with pytest.raises(TokenizerMismatchError):
            clip.check_clip_tokenizer(model, wrong, bert)


def test_clip_tokenizer_must_match_a_bpe_tower(scripts_mod, tmp_path):
    from vlseg.text.vocab import TokenizerMismatchError

    cfg = json.loads((CONFIGS / "tiny.json").read_text())["clip_cfg"]
    model, _ = scripts_mod.clip.build_clip(cfg=cfg)
    scripts_mod.clip.check_clip_tokenizer(model, "open_clip:ViT-B-16")
    for wrong in ("cxr-bert", "minilm", "open_clip:xlm-roberta-base-ViT-B-32"):
        with pytest.raises(TokenizerMismatchError, match="tokenizer"):
            scripts_mod.clip.check_clip_tokenizer(model, wrong)
    # wired in the configs: the network refuses a tokenizer of another family at build
    with bundle_context(BUNDLE), pytest.raises(Exception) as err:
        _parser("train.json", "tiny.json", tokenizer="cxr-bert").get_parsed_content("network_def")
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, TokenizerMismatchError)


def test_biomedclip_config_without_files_stops_at_network_build(scripts_mod, tmp_path):
    """``configs/biomedclip.json``: each missing file is named (config key + fetch command) when the run initialises,
    before the data pipeline builds the BiomedBERT tokenizer from the same missing folder."""
    from vlseg.weights import PretrainedWeightsError

    models = tmp_path / "models"
    (models / "biomedclip").mkdir(parents=True)
    (models / "sam_vit_h_4b8939.pth").write_bytes(b"")  # present (content never read: the checks come first)
    expected = [("open_clip_pytorch_model.bin", "`clip_pretrained`"), ("biomedclip/open_clip_config.json",
                                                                       "`clip_config`"),
                ("biomedbert/config.json", "`clip_text_config`")]
    for name, key in expected:
        with bundle_context(BUNDLE), pytest.raises(Exception) as err:
            _parser("train.json", "biomedclip.json", bundle_root=str(tmp_path),
                    datalist=str(tmp_path / "none.json")).get_parsed_content("initialize")
        cause = err.value
        while cause.__cause__ is not None:
            cause = cause.__cause__
        assert isinstance(cause, PretrainedWeightsError) and key in str(cause), str(cause)
        assert "download_large_files --bundle_path bundles/vilmedsam" in str(cause)
        target = models / ("biomedclip/" + name if name.endswith(".bin") else name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
