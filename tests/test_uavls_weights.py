"""UA-VLS pre-trained weights, offline: the upstream files load STRICTLY, a paper config without them stops at once.

The upstream architectures are built with random weights and saved in the upstream file formats and names:

* timm ConvNeXt-Tiny (full size, 28 M parameters) as timm's hub file ``model.safetensors`` (``large_files.yml``);
* transformers ``ConvNextForImageClassification`` (the public code's ``facebook/convnext-tiny-224`` layout), narrow;
* transformers ``BertForMaskedLM`` in the CXR-BERT layout (``bert.*`` + ``cls.*`` + ``cls_projection_head.*``,
  what ``microsoft/BiomedVLP-CXR-BERT-specialized``'s ``pytorch_model.bin`` holds), narrow, as ``pytorch_model.bin``.

Also: the tokenizer follows the text encoder and a mismatch is an error at build time; ``large_files.yml`` names
exactly the files the configs read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from bundle_cli import BundleCLI
from vlseg.bundles import bundle_context

CLI = BundleCLI("uavls")
BUNDLE, CONFIGS = CLI.root, CLI.configs
FETCH = "python -m monai.bundle download_large_files --bundle_path bundles/uavls"
NARROW = {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}
TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def sm():
    with bundle_context(BUNDLE):
        import scripts.network

        yield scripts


def _parse(files, key, bundle_root, **overrides):
    from monai.bundle import ConfigParser

    with bundle_context(BUNDLE):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        parser["bundle_root"] = str(bundle_root)
        for k, v in overrides.items():
            parser[k] = v
        return parser.get_parsed_content(key)


def _chain(err: BaseException) -> str:
    """Messages of an exception and its causes (monai wraps instantiation errors in a RuntimeError)."""
    parts = []
    while err is not None:
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def _timm_to_features(name: str) -> str:
    """timm classification names -> FeatureListNet names (``stem.0`` -> ``stem_0``, ``stages.1`` -> ``stages_1``)."""
    head, _, rest = name.partition(".")
    idx, _, rest = rest.partition(".")
    return f"{head}_{idx}.{rest}"


def _cxr_bert_file(folder):
    """A narrow transformers BertForMaskedLM saved in the CXR-BERT layout; returns its ``bert.*`` tensors."""
    from transformers import BertConfig, BertForMaskedLM

    shipped = json.loads((BUNDLE.parents[1] / "vlseg/text/assets/cxr_bert/config.json").read_text())
    cfg = BertConfig(vocab_size=shipped["vocab_size"], max_position_embeddings=shipped["max_position_embeddings"],
                     type_vocab_size=shipped["type_vocab_size"], **TINY_BERT)
    torch.manual_seed(0)
    state = dict(BertForMaskedLM(cfg).state_dict())
    h = cfg.hidden_size
    state.update({  # CXRBertModel's projection head and the position ids older transformers saved
        "cls_projection_head.dense_to_hidden.weight": torch.randn(h, h), "cls_projection_head.dense_to_hidden.bias":
        torch.randn(h), "cls_projection_head.LayerNorm.weight": torch.ones(h), "cls_projection_head.LayerNorm.bias":
        torch.zeros(h), "cls_projection_head.dense_to_output.weight": torch.randn(128, h),
        "cls_projection_head.dense_to_output.bias": torch.randn(128),
        "bert.embeddings.position_ids": torch.arange(cfg.max_position_embeddings)[None]})
    assert any(k.startswith("cls.predictions.") for k in state) and not any(k.startswith("bert.pooler") for k in state)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    return {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.") and not k.endswith("position_ids")}


def _timm_file(path, **kwargs):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = timm.create_model("convnext_tiny", pretrained=False, **kwargs).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


def test_timm_convnext_tiny_safetensors_loads_strictly(sm, tmp_path):
    """The real-size timm hub file (``convnext_tiny.fb_in1k/model.safetensors``) -> every tensor, nothing else."""
    state = _timm_file(tmp_path / "model.safetensors")
    assert sum(v.numel() for v in state.values()) > 28_000_000  # the real ConvNeXt-Tiny incl. its ImageNet head
    enc = sm.network.ImageEncoder("convnext_tiny", str(tmp_path / "model.safetensors"), require=True)
    assert enc.pretrained
    got = enc.body.state_dict()
    expected = {_timm_to_features(k): v for k, v in state.items() if not k.startswith("head.")}
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_hf_convnext_layout_of_the_public_code_loads_and_gives_its_features(sm, tmp_path):
    """``facebook/convnext-tiny-224`` (transformers layout, what the public code loads), narrow: strict load, and
    the four stage outputs equal the transformers model's ``hidden_states[1:]`` (the public code's features)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(2)
    hf = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=NARROW["dims"], depths=NARROW["depths"],
                                                       num_labels=1000)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    enc = sm.network.ImageEncoder("convnext_tiny", str(tmp_path / "hf"), require=True, **NARROW).eval()
    assert enc.pretrained
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = enc(x)
        theirs = hf.convnext(x, output_hidden_states=True).hidden_states[1:]
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_missing_weights_warn_once_and_local_convnext_weights_load(sm, tmp_path, caplog):
    import logging

    import timm

    kw = {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}
    with caplog.at_level(logging.WARNING, logger="vlseg"):
        enc = sm.network.ImageEncoder("convnext_tiny", str(tmp_path / "missing.safetensors"), **kw)
    warnings = [r for r in caplog.records if "missing.safetensors" in r.getMessage()]
    assert len(warnings) == 1 and not enc.pretrained
    msg = warnings[0].getMessage()
    assert "`image_weights`" in msg and "download_large_files --bundle_path bundles/uavls" in msg
    full = timm.create_model("convnext_tiny", pretrained=False, **kw)
    torch.save(full.state_dict(), tmp_path / "convnext.pth")  # a timm checkpoint as a pickle, loaded strictly
    enc = sm.network.ImageEncoder("convnext_tiny", str(tmp_path / "convnext.pth"), require=True, **kw)
    assert enc.pretrained
    torch.testing.assert_close(enc.body.stem_0.weight, full.stem[0].weight)
    torch.testing.assert_close(enc.body.stages_3.blocks[0].conv_dw.weight, full.stages[3].blocks[0].conv_dw.weight)


def test_convnext_file_that_does_not_fit_stops_or_is_not_loaded(sm, tmp_path, caplog):
    import logging

    from vlseg.weights import PretrainedWeightsError

    _timm_file(tmp_path / "narrow.safetensors", **NARROW)
    wide = {"dims": [24, 48, 96, 192], "depths": [1, 1, 1, 1]}
    with pytest.raises(PretrainedWeightsError) as err:
        sm.network.ImageEncoder("convnext_tiny", str(tmp_path / "narrow.safetensors"), require=True, **wide)
    msg = str(err.value)
    assert "image_weights" in msg and FETCH in msg and "with another shape" in msg
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="vlseg"):
        enc = sm.network.ImageEncoder("convnext_tiny", str(tmp_path / "narrow.safetensors"), require=False, **wide)
    assert not enc.pretrained and sum("NOT loaded" in r.getMessage() for r in caplog.records) == 1


def test_cxr_bert_layout_and_timm_file_load_strictly_through_the_config(tmp_path):
    """``train.json`` + ``tiny.json`` with ``require_pretrained: true`` and both upstream files: every tensor of
    the BERT and the ConvNeXt lands in the network (the masked-LM and projection heads are the only extras)."""
    bert = _cxr_bert_file(tmp_path / "cxr_bert")
    convnext = _timm_file(tmp_path / "convnext.safetensors", **NARROW)
    net = _parse(["train.json", "tiny.json"], "network_def", tmp_path, require_pretrained=True,
                 image_weights=str(tmp_path / "convnext.safetensors"),
                 text_weights=str(tmp_path / "cxr_bert" / "pytorch_model.bin"))
    assert net.text_encoder.pretrained and net.image_encoder.pretrained
    model_state = net.text_encoder.encoder.model.state_dict()
    assert set(bert) == {k for k in model_state if not k.endswith("position_ids")}
    for k, v in bert.items():
        assert torch.equal(model_state[k], v), k
    img = net.image_encoder.body.state_dict()
    for k, v in convnext.items():
        if not k.startswith("head."):
            assert torch.equal(img[_timm_to_features(k)], v), k


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_paper_config_without_weights_fails_fast_naming_key_and_fetch_command(tmp_path, config):
    start = time.perf_counter()
    with pytest.raises(Exception) as err:
        _parse([config], "network_def", tmp_path)
    text = _chain(err.value)
    assert "PretrainedWeightsError" in text and "`image_weights`" in text and FETCH in text
    assert str(tmp_path / "models" / "convnext_tiny.safetensors") in text
    assert time.perf_counter() - start < 20  # stops before building the 150 M-parameter network
    # with the ConvNeXt file in place, the missing CXR-BERT file is named next
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "convnext_tiny.safetensors").write_bytes(b"")
    with pytest.raises(Exception) as err:
        _parse([config], "network_def", tmp_path)
    text = _chain(err.value)
    assert "`text_weights`" in text and FETCH in text and "cxr_bert/pytorch_model.bin" in text


def test_small_variant_builds_without_weights():
    net = _parse(["train.json", "small.json"], "network_def", BUNDLE)
    assert not net.image_encoder.pretrained and net.text_encoder.pretrained  # MiniLM ships with its package
    assert net.image_encoder.channels == [32, 64, 128, 256]


def test_tokenizer_follows_the_text_encoder_and_a_mismatch_is_an_error():
    from vlseg.text.vocab import TokenizerMismatchError

    assert _parse(["train.json"], "tokenizer", BUNDLE) == "cxr-bert"
    assert _parse(["train.json", "small.json"], "tokenizer", BUNDLE) == "minilm"
    assert _parse(["inference.json", "tiny.json"], "tokenizer", BUNDLE, text_encoder="minilm") == "minilm"
    # CXR-BERT ids into MiniLM: both vocabularies have 30,522 entries, so only the check can tell
    with pytest.raises(Exception) as err:
        _parse(["train.json", "small.json"], "network_def", BUNDLE, tokenizer="cxr-bert")
    text = _chain(err.value)
    assert TokenizerMismatchError.__name__ in text and "'minilm'" in text


def test_large_files_name_exactly_the_files_the_configs_read(tmp_path):
    import yaml

    entries = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    assert entries and all(e["url"].startswith("https://") for e in entries)
    paths = {e["path"] for e in entries}
    for config in ("train.json", "inference.json"):
        read = {str(Path(_parse([config], key, tmp_path)).relative_to(tmp_path))
                for key in ("image_weights", "text_weights")}
        assert read == paths, config
