"""ShardDataset claims (webdataset/img2dataset tar shards, written here with tarfile):
brace patterns expand; with 2 ranks x 2 dataloader workers every sample is seen exactly
once per epoch, in every epoch, and each rank gets the same number of full batches;
uneven shards never starve a rank (shards cycle, an epoch is a fixed step count); bad
samples inside a shard are skipped and counted; resuming mid-epoch from state_at(step)
without a shuffle buffer yields exactly the unseen samples; the batch has the same keys
as PairDataset's.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_shards.py
"""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data


def _add(tf, name, blob):
    ti = tarfile.TarInfo(name)
    ti.size = len(blob)
    tf.addfile(ti, io.BytesIO(blob))


def write_shards(root, sizes, bad=()):
    """shard k holds sizes[k] samples with numeric keys; keys in `bad` get a broken image."""
    paths, key = [], 0
    for k, n in enumerate(sizes):
        p = root / f"{k:05d}.tar"
        with tarfile.open(p, "w") as tf:
            for _ in range(n):
                b = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), key % 256, np.uint8)).save(b, format="PNG")
                img = b"<html>oops</html>" if key in bad else b.getvalue()
                ext = "jpg" if key % 3 == 0 else "png"  # extension need not match the bytes
                _add(tf, f"{key:06d}.{ext}", img)
                _add(tf, f"{key:06d}.txt", f"a gray square number {key}".encode())
                _add(tf, f"{key:06d}.json", json.dumps({"key": key}).encode())
                key += 1
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer("gpt2")


def make(root, tok, rank, world, lb, spe, n_shards, buffer=16, **kw):
    masker = data.Masker(4, 0.5, "random", 0.15, tok.vocab_size, tok.word_starts(), 4)
    return data.ShardDataset(str(root / ("{00000..%05d}.tar" % (n_shards - 1))), tok, 10,
                             data.ImageTransform(8, True, crop=False), masker, seed=3, local_batch=lb,
                             epoch_samples=spe, rank=rank, world_size=world, shuffle_buffer=buffer, **kw)


def test_brace_expansion():
    assert data.expand_braces("d/{00008..00011}.tar") == ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]
    assert data.expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert data.expand_braces("x.tar::y/{0..1}.tar") == ["x.tar", "y/0.tar", "y/1.tar"]


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(tmp_path, tok):
    write_shards(tmp_path, [10] * 8)  # 80 samples
    lb, world, epochs = 5, 2, 2
    spe = 80 // (lb * world)  # 8 steps per epoch per rank
    per_rank = []
    for rank in range(world):
        ds = make(tmp_path, tok, rank, world, lb, 80, 8)
        it = iter(data.make_loader(ds, None, lb, workers=2))
        batches = [next(it) for _ in range(spe * epochs)]
        assert all(b["images"].shape == (lb, 3, 8, 8) and int(b["bad"]) == 0 for b in batches)
        per_rank.append([b["index"].tolist() for b in batches])
    for e in range(epochs):
        seen = [i for r in range(world) for b in per_rank[r][e * spe:(e + 1) * spe] for i in b]
        assert sorted(seen) == list(range(80)), f"epoch {e}"
    # a different shard order in the next epoch
    assert per_rank[0][:spe] != per_rank[0][spe:]


def test_uneven_shards_and_bad_samples(tmp_path, tok):
    write_shards(tmp_path, [7, 13, 2], bad={3, 15})
    for rank in range(2):
        ds = make(tmp_path, tok, rank, 2, 4, 22, 3, buffer=4)
        it = iter(data.make_loader(ds, None, 4, workers=0))
        batches = [next(it) for _ in range(3 * ds.steps_per_epoch + 2)]  # cycles its shards
        assert all(b["images"].shape[0] == 4 for b in batches)
        bad = sum(int(b["bad"]) for b in batches)
        assert bad == ds.bad_count
        assert not {3, 15} & {i for b in batches for i in b["index"].tolist()}
    with pytest.raises(ValueError, match="shards"):
        next(iter(make(tmp_path, tok, 0, 4, 2, 40, 3)))  # 3 shards for 4 readers


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_exact_without_buffer(tmp_path, tok, workers):
    write_shards(tmp_path, [6] * 4)
    lb, spe_samples = 3, 24
    full, resumed = [], []
    for rank in range(2):
        ds = make(tmp_path, tok, rank, 2, lb, spe_samples, 4, buffer=0)
        it = iter(data.make_loader(ds, None, lb, workers=workers))
        full.append([next(it) for _ in range(2 * ds.steps_per_epoch)])
        stop = 3  # of 4 steps per epoch
        ds2 = make(tmp_path, tok, rank, 2, lb, spe_samples, 4, buffer=0)
        ds2.load_state_dict(ds.state_at(stop))
        it2 = iter(data.make_loader(ds2, None, lb, workers=workers))
        resumed.append(full[rank][:stop] + [next(it2) for _ in range(2 * ds.steps_per_epoch - stop)])
    for a, b in zip(sum(full, []), sum(resumed, [])):  # same samples, same masks, same pixels
        assert all(torch.equal(a[k], b[k]) for k in a)
    epoch0 = sorted(i for r in range(2) for b in full[r][:4] for i in b["index"].tolist())
    assert epoch0 == list(range(24))


def test_resume_through_a_resumable_sampler(tmp_path, tok):
    """The trainer's path: ResumableSampler(len(ds), global_batch, start_step=step) handed
    to make_loader sets the stream's start step; local_batch comes from make_loader."""
    write_shards(tmp_path, [6] * 4)
    ds = make(tmp_path, tok, 1, 2, None, 24, 4, buffer=0)
    full = iter(data.make_loader(ds, data.ResumableSampler(len(ds), 6, 1, 2), 3))
    full = [next(full)["index"].tolist() for _ in range(6)]
    ds2 = make(tmp_path, tok, 1, 2, None, 24, 4, buffer=0)
    it = iter(data.make_loader(ds2, data.ResumableSampler(len(ds2), 6, 1, 2, start_step=3), 3))
    assert [next(it)["index"].tolist() for _ in range(3)] == full[3:]


def test_batch_keys_match_pair_dataset(tmp_path, tok):
    write_shards(tmp_path, [4, 4])
    b = next(iter(data.make_loader(make(tmp_path, tok, 0, 1, 4, 8, 2), None, 4)))
    assert set(b) == {"images", "text_ids", "text_mask", "index", "bad"} | {
        f"{k}_{v}" for k in ("image_mask", "text_input", "text_masked", "text_labels") for v in ("uni", "joint")}
    assert b["text_ids"].dtype == torch.long and b["text_mask"].dtype == torch.bool
