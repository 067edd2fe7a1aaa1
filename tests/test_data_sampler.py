"""ResumableSampler claims: each step's global batch is split into equal, disjoint
per-rank local batches; an epoch visits each sample at most once (partial batch
dropped); and for random interruption steps and world sizes 1-4, resuming from
state_at(step) (also after a state_dict round trip) yields exactly the samples not yet
seen: the stream before + after equals the uninterrupted stream, so no duplicates and
no misses. Also the DataLoader built by make_loader keeps that order.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_sampler.py
"""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import data


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def steps(world, N, G, seed, n_steps, start_step=0, state=None):
    """-> list over steps of the global batch [(epoch, index), ...] in rank order."""
    lb = G // world
    per_rank = []
    for r in range(world):
        s = data.ResumableSampler(N, G, rank=r, world_size=world, seed=seed, start_step=start_step)
        if state is not None:
            s.load_state_dict(state)
        per_rank.append(take(s, n_steps * lb))
    return [sum((per_rank[r][k * lb:(k + 1) * lb] for r in range(world)), []) for k in range(n_steps)]


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 4), lb=st.integers(1, 6), extra=st.integers(0, 40), seed=st.integers(0, 1000),
       data_=st.data())
def test_resume_yields_exactly_the_unseen_samples(world, lb, extra, seed, data_):
    G = world * lb
    N = G + extra
    spe = N // G
    total = 3 * spe
    stop = data_.draw(st.integers(0, total))
    full = steps(world, N, G, seed, total)
    state = data.ResumableSampler(N, G, world_size=world, seed=seed).state_at(stop)
    assert state == {"epoch": stop // spe, "position": (stop % spe) * G}
    before = steps(world, N, G, seed, stop)
    after = steps(world, N, G, seed, total - stop, state=dict(state))
    after2 = steps(world, N, G, seed, total - stop, start_step=stop)
    assert before + after == full and after2 == after
    for e in range(3):  # per epoch: no duplicates, exactly steps_per_epoch * G samples
        seen = [x for b in before + after for x in b if x[0] == e]
        assert len(seen) == len(set(seen)) == spe * G
        assert all(0 <= i < N for _, i in seen)
    for b in full:  # equal per-rank slices of one global batch, all from one epoch
        assert len(b) == G and len({x[0] for x in b}) == 1


def test_state_dict_and_errors():
    s = data.ResumableSampler(100, 8, rank=1, world_size=2, seed=3, start_step=15)
    assert s.steps_per_epoch == 12 and s.state_dict() == {"epoch": 1, "position": 24}
    s2 = data.ResumableSampler(100, 8, rank=1, world_size=2, seed=3)
    s2.load_state_dict(s.state_dict())
    assert take(s, 20) == take(s2, 20)
    with pytest.raises(ValueError, match="divisible"):
        data.ResumableSampler(100, 10, world_size=3)
    with pytest.raises(ValueError):
        s.load_state_dict({"epoch": 0, "position": 5})
    with pytest.raises(ValueError):
        data.ResumableSampler(5, 8)


class _Echo(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, key):
        e, i = key
        return {"image": torch.zeros(3, 2, 2), "text_ids": torch.zeros(3, dtype=torch.long),
                "text_mask": torch.ones(3, dtype=torch.bool), "index": i, "bad": 0}


def test_loader_follows_sampler():
    s = data.ResumableSampler(50, 8, rank=0, world_size=2, seed=1)
    it = iter(data.make_loader(_Echo(), s, 4, workers=0))
    got = [next(it)["index"].tolist() for _ in range(8)]
    want = [i for _, i in take(data.ResumableSampler(50, 8, rank=0, world_size=2, seed=1), 32)]
    assert sum(got, []) == want
