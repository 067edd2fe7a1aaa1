"""The pure loss functions of oner.py (METHOD.md §5) equal independent re-derivations.

Proves, with hypothesis over random shapes, scales and inputs:
- nce equals an explicit float64 log-sum-exp loop; is invariant to permuting queries and
  their keys together (and to permuting non-target keys); is >= 0; equals log(N) when all
  keys are equal; tends to 0 for q = k as the scale grows (bounded by the margin); and
  `offset` selects key offset+i, so per-rank losses against a gathered bank average to
  the global-batch loss.
- itc_loss is symmetric in the two modalities and is the mean of the two directions;
  xmc/cic/cmc are nce of the re-normalised sum (the poster's "/2") against kM.
- mlm_loss is the mean cross-entropy over labelled positions only, and with the global
  count per rank its DDP average equals the global mean; mlm_slots gathers exactly the
  labelled positions.
- mim_loss is MSE against per-patch normalised pixels over masked patches only
  (invariant to unmasked predictions, per-patch offsets and positive per-patch scaling),
  and patchify cuts patches in row-major order.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_losses.py
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from oner import (cic_loss, cmc_loss, itc_loss, mim_loss, mix, mlm_loss, mlm_slots, nce,
                  patchify, xmc_loss)

FAST = settings(max_examples=60, deadline=None)
seeds = st.integers(0, 2**31 - 1)
scales = st.floats(0.1, 100.0)


def randn(seed, *shape, unit=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return F.normalize(x, dim=-1) if unit else x


def ref_nce(q, k, scale, offset=0):
    """-log softmax(scale q_i.k_j)_j at j = offset+i, averaged; float64, written as a loop."""
    q, k = q.double().tolist(), k.double().tolist()
    total = 0.0
    for i, qi in enumerate(q):
        s = [scale * sum(a * b for a, b in zip(qi, kj)) for kj in k]
        m = max(s)
        lse = m + math.log(sum(math.exp(x - m) for x in s))
        total += lse - s[offset + i]
    return total / len(q)


def close(a, b, rtol=1e-4, atol=1e-4):
    return abs(float(a) - float(b)) <= atol + rtol * abs(float(b))


def unit_normalize(x):  # (a / |a|) in float64, written without F.normalize
    x = x.double()
    return x / (x * x).sum(-1, keepdim=True).sqrt()


# ----------------------------------------------------------------------------- nce
@FAST
@given(seed=seeds, B=st.integers(1, 6), extra=st.integers(0, 6), E=st.integers(1, 8),
       scale=scales, unit=st.booleans(), data=st.data())
def test_nce_matches_float64_logsumexp(seed, B, extra, E, scale, unit, data):
    N = B + extra
    offset = data.draw(st.integers(0, N - B))
    q, k = randn(seed, B, E, unit=unit), randn(seed + 1, N, E, unit=unit)
    assert close(nce(q, k, scale, offset), ref_nce(q, k, scale, offset))


@FAST
@given(seed=seeds, B=st.integers(1, 6), extra=st.integers(0, 4), E=st.integers(1, 8),
       scale=scales)
def test_nce_invariant_to_joint_permutation(seed, B, extra, E, scale):
    q, k = randn(seed, B, E, unit=True), randn(seed + 1, B + extra, E, unit=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g)
    rest = B + torch.randperm(extra, generator=g)  # non-target keys may be shuffled freely
    k_perm = torch.cat([k[perm], k[rest]])
    assert close(nce(q[perm], k_perm, scale), nce(q, k, scale), rtol=1e-5, atol=1e-5)


@FAST
@given(seed=seeds, B=st.integers(1, 6), extra=st.integers(0, 6), E=st.integers(1, 8),
       scale=st.floats(0.0, 100.0), unit=st.booleans())
def test_nce_nonnegative(seed, B, extra, E, scale, unit):
    q, k = randn(seed, B, E, unit=unit), randn(seed + 1, B + extra, E, unit=unit)
    assert float(nce(q, k, scale)) >= -1e-6


@FAST
@given(seed=seeds, B=st.integers(1, 6), extra=st.integers(0, 6), E=st.integers(1, 8),
       scale=scales, data=st.data())
def test_nce_equals_log_n_when_all_keys_equal(seed, B, extra, E, scale, data):
    N = B + extra
    offset = data.draw(st.integers(0, N - B))
    q = randn(seed, B, E, unit=True)
    k = randn(seed + 1, 1, E, unit=True).expand(N, E)
    assert close(nce(q, k, scale, offset), math.log(N), rtol=1e-5, atol=1e-5)


@FAST
@given(seed=seeds, B=st.integers(2, 6), extra_dim=st.integers(0, 4))
def test_nce_tends_to_zero_for_orthonormal_q_equal_k(seed, B, extra_dim):
    # rows of a random orthogonal matrix: closed form log(1 + (B-1) e^-s), decreasing to 0
    Q, _ = torch.linalg.qr(randn(seed, B + extra_dim, B + extra_dim).double())
    q = Q[:B].float()
    losses = [float(nce(q, q, s)) for s in (1.0, 5.0, 10.0, 20.0, 50.0)]
    for s, got in zip((1.0, 5.0, 10.0, 20.0, 50.0), losses):
        assert close(got, math.log1p((B - 1) * math.exp(-s)), rtol=1e-4, atol=1e-6)
    assert all(a > b for a, b in zip(losses, losses[1:4]))
    assert losses[-1] < 1e-6


@FAST
@given(seed=seeds, B=st.integers(2, 6), E=st.integers(2, 8))
def test_nce_tends_to_zero_for_distinct_unit_vectors(seed, B, E):
    q = randn(seed, B, E, unit=True)
    cos = (q @ q.t()).fill_diagonal_(-1)
    gap = 1 - float(cos.max())  # q_i.q_i - max_j q_i.q_j > 0 for distinct unit vectors
    if gap < 1e-2:
        return
    prev = float("inf")
    for s in (1.0, 10.0, 100.0, 1000.0):
        got = float(nce(q, q, s))
        # loss = mean_i log(1 + sum_j exp(s (c_ij - 1))) <= (B-1) exp(-s gap)
        assert got <= (B - 1) * math.exp(-s * gap) + 1e-5
        assert got <= prev + 1e-6
        prev = got


@FAST
@given(seed=seeds, B=st.integers(1, 4), world=st.integers(1, 4), E=st.integers(1, 8),
       scale=scales, data=st.data())
def test_nce_offset_selects_rank_block_of_gathered_keys(seed, B, world, E, scale, data):
    r = data.draw(st.integers(0, world - 1))
    qs = randn(seed, world, B, E, unit=True)
    bank = randn(seed + 1, world * B, E, unit=True)  # keys gathered over ranks
    got = nce(qs[r], bank, scale, offset=r * B)
    assert close(got, ref_nce(qs[r], bank, scale, r * B))
    # the same target after rolling rank r's block to the front, with offset 0
    rolled = torch.cat([bank[r * B:], bank[:r * B]])
    assert close(got, nce(qs[r], rolled, scale, offset=0), rtol=1e-5, atol=1e-5)
    # DDP averages the per-rank means: equals the loss over the global batch
    mean_ranks = sum(float(nce(qs[i], bank, scale, offset=i * B)) for i in range(world)) / world
    assert close(mean_ranks, nce(qs.flatten(0, 1), bank, scale), rtol=1e-5, atol=1e-5)


def test_nce_wrong_offset_differs():  # guards the offset test against a vacuous pass
    q, k = randn(0, 3, 4, unit=True), randn(1, 6, 4, unit=True)
    assert not close(nce(q, k, 10.0, 3), nce(q, k, 10.0, 0))


# ----------------------------------------------------------------------------- poster rows
@FAST
@given(seed=seeds, B=st.integers(1, 6), E=st.integers(1, 8), scale=scales)
def test_itc_symmetric_and_mean_of_directions(seed, B, E, scale):
    zI, zT, kI, kT = (randn(seed + i, B, E, unit=True) for i in range(4))
    a = itc_loss(zI, zT, kI, kT, scale)
    assert close(a, itc_loss(zT, zI, kT, kI, scale), rtol=1e-6, atol=1e-6)
    assert close(a, (ref_nce(zI, kT, scale) + ref_nce(zT, kI, scale)) / 2)


@FAST
@given(seed=seeds, B=st.integers(1, 6), E=st.integers(1, 8), scale=scales, world=st.integers(1, 3),
       data=st.data())
def test_mixed_terms_are_nce_of_renormalised_mean(seed, B, E, scale, world, data):
    r = data.draw(st.integers(0, world - 1))
    a, b, c = (randn(seed + i, B, E, unit=True) for i in range(3))
    kI, kT = randn(seed + 3, world * B, E, unit=True), randn(seed + 4, world * B, E, unit=True)
    # opposite unit vectors have no mean direction; keep away from that degenerate case
    assume(float((a + b).norm(dim=-1).min()) > 0.1 and float((kI + kT).norm(dim=-1).min()) > 0.1)
    kM = unit_normalize((kI.double() + kT.double()) / 2).float()  # the poster's /2, then norm
    mixed = unit_normalize((a.double() + b.double()) / 2)
    assert torch.allclose(mix(a, b).double(), mixed, atol=1e-6)
    assert torch.allclose(mix(kI, kT), kM, atol=1e-6)
    ref = ref_nce(mixed, kM, scale, r * B)
    assert close(xmc_loss(a, b, kM, scale, r * B), ref)
    assert close(cic_loss(a, b, kM, scale, r * B), ref)
    assert close(cmc_loss(c, kM, scale, r * B), ref_nce(c, kM, scale, r * B))


# ----------------------------------------------------------------------------- MLM
def ref_ce(logits, labels):  # mean over labelled rows of -log softmax, float64 loop
    tot, n = 0.0, 0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        if y == -100:
            continue
        m = max(row)
        tot += m + math.log(sum(math.exp(x - m) for x in row)) - row[y]
        n += 1
    return tot / max(n, 1)


def mlm_case(seed, M, V, frac):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(M, V, generator=g) * 3
    labels = torch.randint(0, V, (M,), generator=g)
    labels[torch.rand(M, generator=g) >= frac] = -100
    return logits, labels


@FAST
@given(seed=seeds, M=st.integers(1, 12), V=st.integers(2, 20), frac=st.floats(0.0, 1.0))
def test_mlm_loss_is_mean_ce_over_labelled_only(seed, M, V, frac):
    logits, labels = mlm_case(seed, M, V, frac)
    got = mlm_loss(logits, labels)
    assert close(got, ref_ce(logits, labels), rtol=1e-5, atol=1e-5)
    # logits of empty slots (label -100) do not matter
    noisy = torch.where((labels == -100)[:, None], torch.randn_like(logits) * 10, logits)
    assert close(mlm_loss(noisy, labels), got, rtol=1e-6, atol=1e-6)
    # every labelled position does matter
    if (labels != -100).any():
        i = int((labels != -100).nonzero()[0])
        bumped = logits.clone()
        bumped[i, labels[i]] += 5.0
        assert float(mlm_loss(bumped, labels)) < float(got)


@FAST
@given(seed=seeds, world=st.integers(1, 4), per=st.integers(1, 6), V=st.integers(2, 10),
       frac=st.floats(0.0, 1.0))
def test_mlm_global_count_makes_ddp_average_the_global_mean(seed, world, per, V, frac):
    logits, labels = mlm_case(seed, world * per, V, frac)
    count = (labels != -100).sum()
    ranks = [mlm_loss(logits[i * per:(i + 1) * per], labels[i * per:(i + 1) * per], count, world)
             for i in range(world)]
    assert close(sum(float(x) for x in ranks) / world, mlm_loss(logits, labels), 1e-5, 1e-5)


@FAST
@given(seed=seeds, B=st.integers(1, 4), L=st.integers(1, 12), k=st.integers(1, 12))
def test_mlm_slots_gather_exactly_the_labelled_positions(seed, B, L, k):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((B, L), -100)
    want = []
    for i in range(B):
        n = int(torch.randint(0, min(k, L) + 1, (1,), generator=g))
        pos = torch.randperm(L, generator=g)[:n].sort().values
        labels[i, pos] = torch.randint(0, 50, (n,), generator=g)
        want.append(pos.tolist())
    idx = mlm_slots(labels, k)
    assert idx.shape == (B, min(k, L))
    got = labels.gather(1, idx)
    for i in range(B):
        n = len(want[i])
        assert idx[i, :n].tolist() == want[i]          # labelled positions first, in order
        assert (got[i, n:] == -100).all()              # the remaining slots are empty
        assert len(set(idx[i].tolist())) == idx.shape[1]  # no position twice


# ----------------------------------------------------------------------------- MIM
def ref_mim(pred, patches, mask):
    t = patches.double()
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    err = ((pred.double() - (t - mu) / (var + 1e-6).sqrt()) ** 2).mean(-1)
    return float((err * mask).sum() / mask.sum().clamp(min=1))


def mim_case(seed, B, P, d, ratio):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, P, d, generator=g)
    patches = torch.randn(B, P, d, generator=g) * 2 + 1
    mask = torch.rand(B, P, generator=g) < ratio
    return pred, patches, mask


mim_shapes = dict(seed=seeds, B=st.integers(1, 3), P=st.integers(1, 6), d=st.integers(2, 12),
                  ratio=st.floats(0.0, 1.0))


@FAST
@given(**mim_shapes)
def test_mim_loss_matches_reference(seed, B, P, d, ratio):
    pred, patches, mask = mim_case(seed, B, P, d, ratio)
    assert close(mim_loss(pred, patches, mask), ref_mim(pred, patches, mask), 1e-5, 1e-5)


@FAST
@given(**mim_shapes)
def test_mim_counts_only_masked_patches(seed, B, P, d, ratio):
    pred, patches, mask = mim_case(seed, B, P, d, ratio)
    noisy = torch.where(mask[..., None], pred, torch.randn_like(pred) * 10)
    assert close(mim_loss(noisy, patches, mask), mim_loss(pred, patches, mask), 1e-6, 1e-6)
    if mask.any():  # a masked prediction does matter
        moved = torch.where(mask[..., None], pred + 1.0, pred)
        assert not close(mim_loss(moved, patches, mask), mim_loss(pred, patches, mask))


@FAST
@given(**mim_shapes, data=st.data())
def test_mim_targets_normalised_per_patch(seed, B, P, d, ratio, data):
    pred, patches, mask = mim_case(seed, B, P, d, ratio)
    shift = torch.tensor(data.draw(st.lists(st.floats(-50, 50), min_size=B * P, max_size=B * P)))
    factor = torch.tensor(data.draw(st.lists(st.floats(0.5, 20), min_size=B * P, max_size=B * P)))
    # the 1e-6 in the normaliser makes the invariance exact only up to eps/var: keep
    # patches away from constant ones (a constant patch has no structure to predict)
    assume(float(patches.var(-1, unbiased=False).min()) > 0.1)
    moved = patches * factor.view(B, P, 1) + shift.view(B, P, 1)  # each patch its own c, a
    assert close(mim_loss(pred, moved, mask), mim_loss(pred, patches, mask), 1e-4, 1e-4)


@FAST
@given(seed=seeds, world=st.integers(1, 4), per=st.integers(1, 3), P=st.integers(1, 5),
       ratio=st.floats(0.0, 1.0))
def test_mim_global_count_makes_ddp_average_the_global_mean(seed, world, per, P, ratio):
    pred, patches, mask = mim_case(seed, world * per, P, 6, ratio)
    count = mask.sum()
    ranks = [mim_loss(pred[i * per:(i + 1) * per], patches[i * per:(i + 1) * per],
                      mask[i * per:(i + 1) * per], count, world) for i in range(world)]
    assert close(sum(float(x) for x in ranks) / world, mim_loss(pred, patches, mask), 1e-5, 1e-5)


@FAST
@given(seed=seeds, B=st.integers(1, 2), grid=st.integers(1, 4), p=st.integers(1, 4))
def test_patchify_row_major_patches(seed, B, grid, p):
    images = randn(seed, B, 3, grid * p, grid * p)
    x = patchify(images, p)
    assert x.shape == (B, grid * grid, p * p * 3)
    for r in range(grid):
        for c in range(grid):
            crop = images[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # (B, 3, p, p)
            assert torch.equal(x[:, r * grid + c], crop.permute(0, 2, 3, 1).reshape(B, -1))


@pytest.mark.parametrize("fn", [nce, itc_loss])
def test_contrastive_logits_in_fp32_under_bf16_inputs(fn):
    q = randn(0, 4, 8, unit=True)
    args = (q, q, q, q) if fn is itc_loss else (q, q)
    ref = fn(*args, 50.0)
    low = fn(*(a.bfloat16() for a in args), 50.0)
    assert low.dtype == torch.float32 and ref.dtype == torch.float32
    assert close(low, ref, rtol=0.1, atol=0.05)
