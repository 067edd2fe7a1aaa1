"""Masker claims (property-based with hypothesis): every image view masks exactly
round(ratio * P) patches in both modes; text masking picks whole words only, never
padding, reaches round(p * n_valid) tokens (at least one word) unless the
max_predictions cap forbids every remaining word, never exceeds the cap; labels hold
the original id exactly where MLM predicts; 80/10/10 split over many draws; the two
views are independent; ratio 0 / prob 0 mask nothing; everything is a function of the
rng seed.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_masking.py
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import data

V = 100
# ids < 40 begin a word (like BPE tokens with a leading space), others continue one
WORD_STARTS = np.arange(V) < 40


@settings(max_examples=60, deadline=None)
@given(grid=st.integers(1, 14), ratio=st.floats(0, 1), mode=st.sampled_from(["random", "block"]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_exact_patch_count(grid, ratio, mode, seed):
    P = grid * grid
    m = data.Masker(P, ratio, mode, text_prob=0.0)
    out = m(np.random.default_rng(seed), np.zeros(4, np.int64), np.ones(4, bool))
    for v in ("uni", "joint"):
        mask = out[f"image_mask_{v}"]
        assert mask.dtype == bool and mask.shape == (P,)
        assert mask.sum() == round(ratio * P)


def test_block_mode_makes_blocks():
    m = data.Masker(196, 0.4, "block", text_prob=0.0)
    rng = np.random.default_rng(0)
    # blocks: masked patches have many masked 4-neighbours, unlike uniform masking
    def neigh(mask):
        g = mask.reshape(14, 14).astype(int)
        n = np.zeros_like(g)
        n[1:] += g[:-1]; n[:-1] += g[1:]; n[:, 1:] += g[:, :-1]; n[:, :-1] += g[:, 1:]
        return (n * g).sum() / g.sum()
    block = np.mean([neigh(m.image_mask(rng)) for _ in range(50)])
    rand = np.mean([neigh(data.Masker(196, 0.4, "random", text_prob=0.0).image_mask(rng)) for _ in range(50)])
    assert block > rand + 0.8


def _caption(draw_ids, n_valid, L):
    ids = np.zeros(L, np.int64)
    ids[:n_valid] = draw_ids[:n_valid]
    valid = np.zeros(L, bool)
    valid[:n_valid] = True
    return ids, valid


@settings(max_examples=150, deadline=None)
@given(L=st.integers(1, 40), data_=st.data(), p=st.floats(0.01, 1.0),
       cap=st.one_of(st.none(), st.integers(1, 12)), seed=st.integers(0, 2 ** 32 - 1))
def test_whole_word_text_masking(L, data_, p, cap, seed):
    n_valid = data_.draw(st.integers(1, L))
    raw = np.array(data_.draw(st.lists(st.integers(0, V - 1), min_size=L, max_size=L)), np.int64)
    ids, valid = _caption(raw, n_valid, L)
    m = data.Masker(16, 0.0, text_prob=p, vocab_size=V, word_starts=WORD_STARTS, max_predictions=cap)
    out = m(np.random.default_rng(seed), ids, valid)
    # words: position 0 always starts one
    starts = WORD_STARTS[ids[:n_valid]].copy()
    starts[0] = True
    word_of = np.cumsum(starts) - 1
    n_words = word_of[-1] + 1
    sizes = np.bincount(word_of, minlength=n_words)
    target = max(1, round(p * n_valid))
    limit = L if cap is None else cap
    for v in ("uni", "joint"):
        inp, masked, labels = out[f"text_input_{v}"], out[f"text_masked_{v}"], out[f"text_labels_{v}"]
        assert inp.dtype == np.int64 and labels.dtype == np.int64 and masked.dtype == bool
        chosen = labels != -100
        assert not chosen[n_valid:].any() and not masked[n_valid:].any()  # padding never chosen
        assert (labels[chosen] == ids[chosen]).all()
        assert not (masked & ~chosen).any() and (inp[~chosen] == ids[~chosen]).all()
        # whole words: each word entirely in or out
        per_word = np.bincount(word_of, weights=chosen[:n_valid], minlength=n_words)
        assert set(np.flatnonzero(per_word)) == set(np.flatnonzero(per_word == sizes))
        total = int(chosen.sum())
        assert total <= limit
        if total < target:  # stopped early only because every other word breaks the cap
            left = sizes[per_word == 0]
            assert (total + left > limit).all()
        else:  # stopped as soon as the target was reached: dropping the last word falls below
            assert total - sizes[per_word > 0].max() < target
        assert (inp[chosen] >= 0).all() and (inp[chosen] < V).all()


def test_80_10_10_and_independent_views():
    m = data.Masker(16, 0.5, text_prob=0.5, vocab_size=V, word_starts=np.ones(V, bool))
    rng = np.random.default_rng(0)
    ids = np.arange(1, 33, dtype=np.int64)  # 32 one-token words
    valid = np.ones(32, bool)
    n = msk = rnd = same = 0
    differ = 0
    for _ in range(1500):
        out = m(rng, ids, valid)
        chosen = out["text_labels_uni"] != -100
        n += chosen.sum()
        msk += out["text_masked_uni"].sum()
        changed = chosen & ~out["text_masked_uni"] & (out["text_input_uni"] != ids)
        rnd += changed.sum()
        same += (chosen & ~out["text_masked_uni"] & (out["text_input_uni"] == ids)).sum()
        differ += (out["text_labels_uni"] != out["text_labels_joint"]).any() or \
            (out["image_mask_uni"] != out["image_mask_joint"]).any()
    assert abs(msk / n - 0.8) < 0.01
    assert abs(rnd / n - 0.1 * (1 - 1 / V)) < 0.01  # a random id may equal the original
    assert abs(same / n - 0.1 * (1 + 1 / V * 1) ) < 0.012
    assert differ == 1500


def test_no_masking_ablation():
    m = data.Masker(64, 0.0, text_prob=0.0, vocab_size=V)
    ids = np.arange(10, dtype=np.int64)
    out = m(np.random.default_rng(0), ids, np.ones(10, bool))
    for v in ("uni", "joint"):
        assert not out[f"image_mask_{v}"].any() and not out[f"text_masked_{v}"].any()
        assert (out[f"text_labels_{v}"] == -100).all() and (out[f"text_input_{v}"] == ids).all()


def test_deterministic_in_seed():
    m = data.Masker(49, 0.4, "block", 0.15, V, WORD_STARTS, 8)
    ids = np.random.default_rng(1).integers(0, V, 20)
    valid = np.arange(20) < 15
    a = m(np.random.default_rng(7), ids, valid)
    b = m(np.random.default_rng(7), ids, valid)
    assert all((a[k] == b[k]).all() for k in a)


def test_bad_configs():
    with pytest.raises(ValueError):
        data.Masker(10, 0.4, "block", text_prob=0)  # non-square grid
    with pytest.raises(ValueError):
        data.Masker(16, 0.4, text_prob=0.15)  # no vocab_size for random replacement
