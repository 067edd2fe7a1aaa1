"""eval.py's smaller helpers for the evaluation commands, on hand-built inputs.

Proves: retrieval_chance gives the hand-computed expectation on a tiny split and matches
the mean of retrieval_metrics over random score matrices; topk_gallery ranks best first
with equal scores in gallery order; embed_pairs skips an unreadable image (zero row,
ok=False) and restores the model's mode; read_templates rejects lines without "{}".

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval_helpers.py
"""
import types

import pytest
import torch
from PIL import Image

import eval as ev


def test_retrieval_chance_by_hand():
    # 4 images with 3 / 1 / 2 / 0 captions, T = 6. TR@K per image: 1 - C(T-g, K) / C(T, K).
    c = ev.retrieval_chance(torch.tensor([0, 0, 0, 1, 2, 2]), 4)
    assert c["tr1"] == pytest.approx(100 * (3 / 6 + 1 / 6 + 2 / 6) / 3)
    assert c["tr5"] == pytest.approx(100 * (1 + (1 - 1 / 6) + 1) / 3)     # C(5,5)/C(6,5) = 1/6
    assert c["tr10"] == pytest.approx(100.0)                              # K >= T
    assert (c["ir1"], c["ir5"], c["ir10"]) == pytest.approx((25.0, 100.0, 100.0))
    assert c["mean"] == pytest.approx(sum(c[k] for k in ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10")) / 6)


def test_retrieval_chance_matches_simulation():
    g = torch.Generator().manual_seed(0)
    t2i = torch.repeat_interleave(torch.arange(30), torch.randint(1, 7, (30,), generator=g))
    sims = [ev.retrieval_metrics(torch.rand(30, len(t2i), generator=g), t2i) for _ in range(400)]
    chance = ev.retrieval_chance(t2i, 30)
    for k in ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean"):
        assert sum(s[k] for s in sims) / len(sims) == pytest.approx(chance[k], abs=1.5), k


def test_topk_gallery_best_first_ties_in_gallery_order():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gal = torch.tensor([[0.5, 0.0], [1.0, 0.0], [0.5, 0.0], [0.0, 2.0]])
    assert ev.topk_gallery(q, gal, 3).tolist() == [[1, 0, 2], [3, 0, 1]]
    assert ev.topk_gallery(q, gal, 10).shape == (2, 4)


class PairModel(torch.nn.Module):
    cfg = types.SimpleNamespace(max_text_len=4, image_size=8)

    def encode_pair(self, images, ids, mask):
        assert not self.training and not torch.is_grad_enabled()
        return torch.nn.functional.normalize(torch.cat([images.mean((2, 3)), ids[:, :1].float()], 1), dim=1)


def test_embed_pairs_skips_unreadable(tmp_path):
    import data
    good = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    m = PairModel().train()
    def tok(texts, n):
        return torch.tensor([[len(t)] * n for t in texts]), torch.ones(len(texts), n, dtype=torch.bool)
    emb, ok = ev.embed_pairs(m, tok, [str(good), str(bad), str(tmp_path / "missing.png"), str(good)],
                             ["x", "yy", "zzz", "wwww"], data.ImageTransform(8, train=False), batch_size=3,
                             progress=False)
    assert ok.tolist() == [True, False, False, True] and m.training
    assert emb.shape == (4, 4) and (emb[1:3] == 0).all() and not torch.allclose(emb[0], emb[3])


def test_read_templates(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a photo of a {}.\n\nart of the {}.\n")
    assert ev.read_templates(p) == ["a photo of a {}.", "art of the {}."]
    p.write_text("a photo of a {}.\nno slot here\n")
    with pytest.raises(ValueError, match="no slot here"):
        ev.read_templates(p)
