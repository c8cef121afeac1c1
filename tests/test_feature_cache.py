"""Tests of the shared feature caches (``vlseg/nets/feature_cache.py``) and their use in UA-VLS and Simple-ViLMedSAM
(tiny networks): hits give identical outputs, a changed image misses, weights changes invalidate, the byte bound
evicts, 0 MiB stores nothing, and Monte-Carlo dropout passes still vary (and equal the uncached passes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vlseg.bundles import bundle_context
from vlseg.inferers import StochasticTextInferer, mc_dropout
from vlseg.nets.feature_cache import TensorLRU, cached_rows, is_deterministic, tensor_digest, weights_version
from vlseg.text import build_tokenizer

UAVLS_TINY = dict(image_encoder_kwargs={"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}, text_encoder="cxr-bert",
                  text_encoder_overrides={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                          "intermediate_size": 64}, subpixel_channels=4)
VILMEDSAM_TINY = dict(
    sam_variant="vit_b", sam_image_size=64,
    sam_overrides=dict(embed_dim=32, depth=1, num_heads=2, patch_size=8, window_size=0, global_attn_indexes=[],
                       out_chans=32),
    clip_cfg=dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, layers=2, width=32, head_width=16),
                  text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)),
    m2ib_layer=0, m2ib_steps=2, m2ib_samples=1, decoder_heads=2, decoder_mlp_dim=64,
)


@pytest.fixture(scope="module")
def uavls():
    with bundle_context("bundles/uavls"):
        import scripts.network

        yield scripts.network


@pytest.fixture(scope="module")
def vilmedsam():
    with bundle_context("bundles/vilmedsam"):
        import scripts.network

        yield scripts.network


def _uavls(mod, mb=8.0):
    torch.manual_seed(0)
    return mod.UAVLS(**UAVLS_TINY, feature_cache_mb=mb).eval()


def _ua_tokens(texts):
    return build_tokenizer("cxr-bert", 24)(texts)


# --------------------------------------------------------------------------- the shared pieces


def test_lru_is_bounded_in_bytes_and_entries_and_copies_start_empty():
    c = TensorLRU(max_mb=3 * 4096 / 2**20)  # room for exactly three 4 KiB tensors
    for i in range(5):
        c.put(i, torch.zeros(1024))
    assert list(c._data) == [2, 3, 4] and c.nbytes == 3 * 4096 and c.stats["evictions"] == 2
    assert c.get(2) is not None and c.get(0) is None  # 2 becomes the most recent
    c.put(5, torch.zeros(1024))
    assert 3 not in c and 2 in c
    c.put("big", torch.zeros(4 * 1024))  # larger than the whole bound: not stored, nothing evicted
    assert "big" not in c and len(c) == 3
    e = TensorLRU(max_mb=1.0, max_entries=2)
    for i in range(3):
        e.put(i, torch.zeros(1))
    assert list(e._data) == [1, 2]
    off = TensorLRU(max_mb=0)
    off.put(0, torch.zeros(1))
    assert not off.enabled and len(off) == 0
    dup = copy.deepcopy(c)  # MONAI Label deep-copies the network it serves
    assert len(dup) == 0 and dup.max_bytes == c.max_bytes


def test_digest_and_version_change_with_content_and_weights():
    x = torch.arange(6.0).view(2, 3)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x + 1e-6)
    assert tensor_digest(x) != tensor_digest(x.view(3, 2)) != tensor_digest(x.double())
    lin = nn.Linear(2, 2)
    v0 = weights_version(lin)
    lin(torch.ones(1, 2)).sum().backward()
    torch.optim.SGD(lin.parameters(), lr=0.1).step()
    v1 = weights_version(lin)
    assert v1 != v0
    lin.load_state_dict(copy.deepcopy(lin.state_dict()))
    assert weights_version(lin) != v1
    v2 = weights_version(lin)
    lin.double()
    assert weights_version(lin) != v2


def test_determinism_rule():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0), nn.Dropout(0.5)).eval()
    with torch.no_grad():
        assert is_deterministic(net)
        net[1].train()  # probability 0: still the identity
        assert is_deterministic(net)
        with mc_dropout(net):
            assert not is_deterministic(net)
        net.train()
        assert not is_deterministic(net)
    net.eval()
    assert not is_deterministic(net)  # autograd on: outputs must carry gradients, never served from a cache


def test_cached_rows_serves_hits_and_computes_only_missing_rows():
    calls = []
    lin = nn.Linear(3, 2).eval()

    def fn(x):
        calls.append(x.shape[0])
        return [lin(x), lin(x) * 2]

    c = TensorLRU(1.0)
    x = torch.randn(2, 3)
    with torch.no_grad():
        a = cached_rows(c, "k", fn, x, lin)
        b = cached_rows(c, "k", fn, x, lin)
        y = torch.cat([x[:1], torch.randn(1, 3)])
        m = cached_rows(c, "k", fn, y, lin)
    assert calls == [2, 1]  # the second call was all hits, the third computed only its new row
    with torch.no_grad():
        z = torch.randn(1, 3)
        rep = cached_rows(c, "k", fn, torch.cat([z, x[:1], z, z]), lin)  # a repeated new row is computed once
    assert calls[-1] == 1 and torch.equal(rep[0][2], rep[0][0]) and torch.equal(rep[0][1], a[0][0])
    assert isinstance(b, list) and all(torch.equal(p, q) for p, q in zip(a, b))
    torch.testing.assert_close(m[0], lin(y).detach())
    with torch.no_grad():
        cached_rows(TensorLRU(0), "k", fn, x, lin)
    assert calls[-1] == 2


# --------------------------------------------------------------------------- UA-VLS


def test_uavls_second_prompt_hits_the_image_cache_with_identical_outputs(uavls):
    net, ref = _uavls(uavls), _uavls(uavls, mb=0)
    ids, mask = _ua_tokens(["small polyp", "dark cyst"])
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = net(img, ids[:1], mask[:1])
        assert len(net.feature_cache) == 1 and net.feature_cache.stats["hits"] == 0
        again = net(img, ids[:1], mask[:1])
        other = net(img, ids[1:], mask[1:])
        assert net.feature_cache.stats["hits"] == 2
        assert torch.equal(first, again) and torch.equal(other, ref(img, ids[1:], mask[1:]))
        net(img + 0.01, ids[:1], mask[:1])  # a changed image misses
    assert net.feature_cache.stats["misses"] == 2 and len(net.feature_cache) == 2
    assert len(ref.feature_cache) == 0  # 0 MiB: off


def test_uavls_cache_invalidated_by_load_state_dict_optimizer_step_and_train(uavls):
    net = _uavls(uavls)
    ids, mask = _ua_tokens(["polyp"])
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = net(img, ids, mask)
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    assert len(net.feature_cache) == 0
    with torch.no_grad():
        loaded = net(img, ids, mask)
        assert not torch.allclose(before, loaded)
        fresh = _uavls(uavls, 0)
        fresh.load_state_dict(state)
        assert torch.equal(loaded, fresh(img, ids, mask))
    # an optimizer step changes the weights in place: the stale entry is never served
    opt = torch.optim.SGD(net.image_encoder.parameters(), lr=0.5)
    net.image_encoder.train()
    net.image_encoder(img)[3].sum().backward()
    opt.step()
    net.image_encoder.eval()
    hits = net.feature_cache.stats["hits"]
    with torch.no_grad():
        stepped = net(img, ids, mask)
        net.feature_cache.clear()
        fresh = net(img, ids, mask)
    assert net.feature_cache.stats["hits"] == hits and torch.equal(stepped, fresh)
    net.train()
    assert len(net.feature_cache) == 0
    net(img, ids, mask)  # training mode with autograd: computed, not cached
    assert len(net.feature_cache) == 0


def test_uavls_mc_dropout_passes_vary_and_equal_the_uncached_passes(uavls):
    net, ref = _uavls(uavls), _uavls(uavls, mb=0)
    ids, mask = _ua_tokens(["polyp", "cyst"])
    img = torch.randn(2, 3, 64, 64)
    inf = StochasticTextInferer(num_samples=4, seed=3, decompose=True)
    with torch.no_grad():
        out, out_ref = inf(img, net, ids, mask), inf(img, ref, ids, mask)
    assert net.feature_cache.stats["hits"] == 2 * 3  # passes 2..4 reuse the encoder
    assert torch.equal(out, out_ref)
    assert out[:, 3].max() > 0  # the decoder's dropout still varies between passes


# --------------------------------------------------------------------------- Simple-ViLMedSAM


def _vm(mod, mb=8.0, **kw):
    torch.manual_seed(0)
    return mod.SimpleViLMedSAM(**VILMEDSAM_TINY, feature_cache_mb=mb, dropout=0.3, **kw).eval()


def test_vilmedsam_second_prompt_skips_sam_and_clip_image_side(vilmedsam):
    net, ref = _vm(vilmedsam), _vm(vilmedsam, mb=0)
    ids, _ = build_tokenizer("open_clip:ViT-B-16", 16)(["polyp", "cyst"])
    img = torch.rand(1, 3, 64, 64) * 255

    def sample(n, i):
        torch.manual_seed(1)  # the decoder's MC dropout draws from the global RNG
        return n.sample_probabilities(img, ids[i:i + 1], num_samples=3)

    p1 = sample(net, 0)
    kinds = sorted(str(k[0]) for k in net.feature_cache._data)
    assert kinds == ["('clip_tokens', 0)", "clip_text", "sam"]
    p2 = sample(net, 1)  # SAM and CLIP tokens hit; the new prompt's text misses
    assert net.feature_cache.stats["hits"] == 2 and len(net.feature_cache) == 4
    assert torch.equal(p2, sample(ref, 1)) and torch.equal(p1, sample(ref, 0))
    assert (p2.std(dim=0) > 0).any()  # MC dropout in the decoder still varies
    assert net.prompter._cache.max_bytes > 0 and len(net.prompter._cache) == 2
    served = copy.deepcopy(net)  # what MONAI Label serves: a deep copy, with its own empty caches and hooks
    assert len(served.feature_cache) == 0 and served.prompter.feature_cache is served.feature_cache
    served.sample_probabilities(img, ids[:1])
    assert len(served.feature_cache) == 3 and len(net.feature_cache) == 4
    served.load_state_dict(served.state_dict())
    assert len(served.feature_cache) == 0 and len(net.feature_cache) == 4
    net.load_state_dict(net.state_dict())
    assert len(net.feature_cache) == 0
    net.train()
    out = net(img, ids[:1])["logits"]
    assert out.requires_grad and len(net.feature_cache) == 0


def test_caches_off_computes_everything_and_restores_the_caches(vilmedsam, tmp_path):
    from vlseg.nets.feature_cache import caches_off, module_caches

    net = _vm(vilmedsam)
    net.prompter.cache_dir = tmp_path / "m2ib"
    ids, _ = build_tokenizer("open_clip:ViT-B-16", 16)(["polyp"])
    img = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        ref = net(img, ids)
        names = sorted(c.name for c in module_caches(net))
        assert names == ["m2ib maps", "vilmedsam features"]  # the network's and the prompter's, each once
        with caches_off(net) as caches:
            assert len(caches) == 2 and all(not c.enabled and len(c) == 0 for c in caches)
            assert net.prompter.cache_dir is None
            before = {c.name: dict(c.stats) for c in caches}
            out = [net(img, ids) for _ in range(2)]
            assert all(len(c) == 0 and c.stats["hits"] == before[c.name]["hits"] for c in caches)  # nothing served
        assert all(torch.equal(o, ref) for o in out)
        assert net.prompter.cache_dir == tmp_path / "m2ib" and all(c.enabled for c in module_caches(net))
        net(img, ids)
        # caching again: the SAM embedding, and the M2IB map read back from the folder the first call wrote
        assert len(net.feature_cache) == 1 and len(net.prompter._cache) == 1
        assert len(list((tmp_path / "m2ib").glob("*.pt"))) == 1
