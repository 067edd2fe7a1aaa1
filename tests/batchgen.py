"""A batch that follows DESIGN.md's table, built without data.py, for oner.py's tests.
Masks have exactly round(r*P) patches per row and whole-token text masks with the
80/10/10 split, drawn from a seeded generator."""
import torch


def make_batch(cfg, B=4, seed=0, ratio=0.4, text_prob=0.3, lengths=None, mask=True):
    g = torch.Generator().manual_seed(seed)
    L, P, V = cfg.max_text_len, cfg.num_patches, cfg.vocab_size
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(0, V, (B, L), generator=g)
    if lengths is None:
        lengths = torch.randint(1, L + 1, (B,), generator=g).tolist()
    tmask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    b = {"images": images, "text_ids": ids, "text_mask": tmask, "index": torch.arange(B)}
    k = round(ratio * P) if mask else 0
    for v in ("uni", "joint"):
        im = torch.zeros(B, P, dtype=torch.bool)
        for i in range(B):
            im[i, torch.randperm(P, generator=g)[:k]] = True
        chosen = (torch.rand(B, L, generator=g) < (text_prob if mask else 0)) & tmask
        # never more than the model's MLM slots per row
        over = chosen.cumsum(1) > cfg.mlm_slots
        chosen &= ~over
        u = torch.rand(B, L, generator=g)
        masked = chosen & (u < 0.8)
        rand = chosen & (u >= 0.8) & (u < 0.9)
        inp = torch.where(rand, torch.randint(0, V, (B, L), generator=g), ids)
        b[f"image_mask_{v}"] = im
        b[f"text_input_{v}"] = inp
        b[f"text_masked_{v}"] = masked
        b[f"text_labels_{v}"] = torch.where(chosen, ids, torch.full_like(ids, -100))
    return b
