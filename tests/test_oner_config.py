"""OneRConfig and the named sizes: validation, shapes and parameter counts.

Proves:
- bad [choice] values raise ValueError naming the key; no contrastive term, a bad
  momentum, indivisible sizes and an unknown size name raise ValueError;
- the named sizes have the widths of METHOD.md §2, and their parameter counts equal an
  analytic count written in the test (B/16 encoder blocks = 85,054,464, a ViT-B/16's);
  the key encoder is a frozen copy of exactly the tower (encoder + projection heads);
- encode_image/text/pair return (B, E) and encode_patches (B, P, E) for every size
  (S/16 and B/16 on the meta device, so nothing is allocated), unit vectors for "mu";
- the encoder has no modality-type embeddings or modality-specific tokens.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_oner_config.py
"""
import dataclasses

import pytest
import torch

from batchgen import make_batch
from oner import OneR, OneRConfig


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("key,bad", [("head_type", "conv"), ("query_view", "noisy"),
                                     ("temperature", "learned")])
def test_bad_choice_raises_naming_the_key(key, bad):
    with pytest.raises(ValueError, match=key):  # from_name validates
        OneRConfig.from_name("mu", **{key: bad})
    cfg = dataclasses.replace(OneRConfig.from_name("mu"), **{key: bad})
    with pytest.raises(ValueError, match=key):
        cfg.validate()
    with pytest.raises(ValueError, match=key):
        OneR(cfg)


def test_no_contrastive_term_raises():
    with pytest.raises(ValueError, match="contrastive"):
        OneR(OneRConfig.from_name("mu", itc=0.0, xmc=0.0, cic=0.0, cmc=0.0))
    OneR(OneRConfig.from_name("mu", itc=0.0, xmc=0.0, cic=1.0, cmc=0.0))  # one is enough


@pytest.mark.parametrize("m", [-0.1, 1.0, 1.5])
def test_bad_momentum_raises(m):
    with pytest.raises(ValueError, match="momentum"):
        OneR(OneRConfig.from_name("mu", momentum=m))


@pytest.mark.parametrize("kw", [dict(image_size=30), dict(heads=3)])
def test_indivisible_sizes_raise(kw):
    with pytest.raises(ValueError, match="divide"):
        OneR(OneRConfig.from_name("mu", **kw))


def test_unknown_size_raises():
    with pytest.raises(ValueError, match="L/14"):
        OneRConfig.from_name("L/14")


def test_overrides_apply_and_config_roundtrips():
    cfg = OneRConfig.from_name("mu", xmc=0.5, momentum=0.0, embed_dim=16)
    assert (cfg.width, cfg.xmc, cfg.momentum, cfg.embed_dim) == (64, 0.5, 0.0, 16)
    assert OneRConfig(**cfg.to_dict()) == cfg
    assert cfg.active == ["itc", "xmc", "cmc", "mlm", "mim"]


# ----------------------------------------------------------------------------- sizes
SIZES = {"mu": (64, 2, 2, 8, 32), "S/16": (384, 12, 6, 16, 224), "B/16": (768, 12, 12, 16, 224)}


def block_params(D, hidden):
    qkv = D * 3 * D + 3 * D
    proj = D * D + D
    mlp = D * hidden + hidden + hidden * D + D
    lns = 2 * 2 * D
    return qkv + proj + mlp + lns


def expected_params(c):
    """Trainable parameters of OneR(c), counted from the spec (METHOD.md §2)."""
    D, P, hidden = c.width, c.num_patches, int(c.width * c.mlp_ratio)
    encoder = ((3 * c.patch_size ** 2) * D + D      # patch embedding
               + P * D                              # 2-D position table
               + c.vocab_size * D                   # token embedding
               + c.max_text_len * D                 # 1-D position table
               + D + D                              # [CLS], [MASK]
               + c.depth * block_params(D, hidden)
               + 2 * D)                             # final LayerNorm
    head = D * c.embed_dim + c.embed_dim            # linear projection head
    mlm = D * D + D + 2 * D + c.vocab_size          # dense, LN, bias (decoder tied)
    mim = D * 3 * c.patch_size ** 2 + 3 * c.patch_size ** 2
    scales = 2                                      # per-term: itc, cmc
    return encoder + head, encoder + head + mlm + mim + scales


def build_meta(name, **kw):
    with torch.device("meta"):
        return OneR(OneRConfig.from_name(name, **kw))


@pytest.mark.parametrize("name", list(SIZES))
def test_named_size_shapes_and_parameter_counts(name):
    model = build_meta(name, momentum=0.99)
    c = model.cfg
    assert (c.width, c.depth, c.heads, c.patch_size, c.image_size) == SIZES[name]
    assert c.mlp_ratio == 4.0
    enc = model.student.encoder
    assert len(enc.blocks) == c.depth and enc.pos_image.shape == (c.grid, c.grid, c.width)
    blocks = sum(p.numel() for p in enc.blocks.parameters())
    assert blocks == c.depth * block_params(c.width, 4 * c.width)
    tower, total = expected_params(c)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable == total
    assert sum(p.numel() for p in model.student.parameters()) == tower
    assert sum(p.numel() for p in frozen) == tower  # the key encoder copies the tower only
    assert all(p.requires_grad is False for p in model.key.parameters())


def test_b16_encoder_blocks_match_vit_b16():
    model = build_meta("B/16")
    blocks = sum(p.numel() for p in model.student.encoder.blocks.parameters())
    D, hidden = 768, 3072
    per_block = 4 * D * D + 4 * D + 2 * D * hidden + hidden + D + 2 * 2 * D
    assert blocks == 12 * per_block == 85_054_464


@pytest.mark.parametrize("name", ["S/16", "B/16"])
def test_named_size_encode_shapes_on_meta(name):
    model = build_meta(name)
    c = model.cfg
    with torch.device("meta"):
        images = torch.empty(2, 3, c.image_size, c.image_size)
        ids = torch.zeros(2, c.max_text_len, dtype=torch.long)
        tm = torch.ones(2, c.max_text_len, dtype=torch.bool)
        assert model.encode_image(images).shape == (2, c.embed_dim)
        assert model.encode_text(ids, tm).shape == (2, c.embed_dim)
        assert model.encode_pair(images, ids, tm).shape == (2, c.embed_dim)
        assert model.encode_patches(images).shape == (2, c.num_patches, c.embed_dim)


@pytest.mark.parametrize("kw", [{}, dict(momentum=0.0), dict(two_heads=True), dict(head_type="mlp"),
                                dict(head_type="mocov3")])
def test_mu_encodings_are_unit_vectors(kw):
    torch.manual_seed(0)
    model = OneR(OneRConfig.from_name("mu", **kw))
    c, b = model.cfg, make_batch(model.cfg, B=3, seed=1)
    with torch.no_grad():
        outs = [model.encode_image(b["images"]), model.encode_text(b["text_ids"], b["text_mask"]),
                model.encode_pair(b["images"], b["text_ids"], b["text_mask"])]
        patches = model.encode_patches(b["images"])
    for z in outs:
        assert z.shape == (3, c.embed_dim) and torch.isfinite(z).all()
        assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert patches.shape == (3, c.num_patches, c.embed_dim)
    assert torch.allclose(patches.norm(dim=-1), torch.ones(3, c.num_patches), atol=1e-5)


def test_encoder_has_no_modality_type_embeddings():
    enc = OneR(OneRConfig.from_name("mu")).student.encoder
    top = {n.split(".")[0] for n, _ in enc.named_parameters()}
    assert top == {"patch_embed", "pos_image", "tok_embed", "pos_text", "cls", "mask_token",
                   "blocks", "ln_f"}
    assert enc.cls.shape == enc.mask_token.shape == (64,)  # one vector each, shared
