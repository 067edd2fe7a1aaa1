"""PairDataset / load_image / collate claims: every bad-data case (truncated PNG/JPEG,
zero-byte file, HTML saved as .jpg, missing file, decompression bomb, empty or
whitespace caption) is skipped, replaced by a sample chosen deterministically from
(seed, epoch, failed index, attempt), counted in the batch's "bad" entry and in
dataset.bad_count, and every batch keeps its size; grayscale / palette / RGBA / LA /
CMYK / 16-bit images become correct RGB (transparency composited on white); samples
are a pure function of (seed, epoch, index) (identical across loaders and worker
counts); list captions expand to pairs, one_caption_per_image gives one pair per image;
the batch has exactly DESIGN.md's keys, dtypes and shapes; missing files are named.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_pairs.py
"""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data

S = 16


def _png(arr, mode=None, **kw):
    b = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(b, **kw)
    return b.getvalue()


def _rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (S, S, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer("gpt2")


@pytest.fixture
def bad_set(tmp_path):
    """12 good image-caption pairs and 8 bad ones."""
    img = tmp_path / "img"
    img.mkdir()
    entries = []
    for i in range(12):
        (img / f"good{i}.png").write_bytes(_png(_rgb(i), format="PNG"))
        entries.append({"image": f"img/good{i}.png", "caption": f"a photo of thing number {i}"})
    good_jpg = _png(_rgb(99), format="JPEG")
    bad = {
        "truncated.png": _png(_rgb(1), format="PNG")[:60],
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "zero.jpg": b"",
        "html.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "bomb.png": _png(Image.new("1", (10000, 10000)), format="PNG"),
    }
    for name, blob in bad.items():
        (img / name).write_bytes(blob)
        entries.append({"image": f"img/{name}", "caption": "a broken picture"})
    entries.append({"image": "img/missing.jpg", "caption": "a missing file"})
    entries.append({"image": "img/good0.png", "caption": ""})
    entries.append({"image": "img/good1.png", "caption": "  \n "})
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    return tmp_path, len(entries)


def _dataset(root, tok, masker=True, **kw):
    m = data.Masker(16, 0.4, "random", 0.15, tok.vocab_size, tok.word_starts(), 6) if masker else None
    return data.PairDataset(root / "ann.json", root, tok, 12, data.ImageTransform(S, True, crop=True, flip=True),
                            m, seed=5, **kw)


def test_each_bad_case_is_a_bad_sample(bad_set):
    root, _ = bad_set
    for name in ["truncated.png", "truncated.jpg", "zero.jpg", "html.jpg", "bomb.png", "missing.jpg"]:
        with pytest.raises(data.BadSample):
            data.load_image(root / "img" / name)
    assert data.load_image(root / "img" / "good3.png").size == (S, S)


@pytest.mark.parametrize("in_memory", [False, True])
def test_bad_samples_skipped_replaced_counted(bad_set, tok, in_memory):
    root, n = bad_set
    ds = _dataset(root, tok, in_memory=in_memory)
    assert len(ds) == n and len(ds.images) == n - 2  # good0/good1 gain an extra (empty) caption
    bad_idx = {i for i in range(len(ds)) if ds.pairs[i][0] >= 12 or ds.captions[ds.pairs[i][0]][ds.pairs[i][1]].strip() == ""}
    assert len(bad_idx) == 8
    sampler = data.ResumableSampler(len(ds), 6, seed=1)
    loader = data.make_loader(ds, sampler, 6)
    it = iter(loader)
    total_bad, seen = 0, []
    for _ in range(3 * sampler.steps_per_epoch):  # three epochs
        b = next(it)
        assert b["images"].shape == (6, 3, S, S) and b["text_ids"].shape == (6, 12)
        total_bad += int(b["bad"])
        seen += b["index"].tolist()
        assert not set(b["index"].tolist()) & bad_idx  # replacements are good samples
        assert b["text_mask"].any(1).all()
    visited = [i for _, i in itertools_take(data.ResumableSampler(len(ds), 6, seed=1), 6 * 3 * sampler.steps_per_epoch)]
    expected_bad = sum(i in bad_idx for i in visited)
    assert expected_bad > 0 and total_bad >= expected_bad  # a replacement may itself be bad
    assert ds.bad_count == total_bad
    # deterministic: the replacement depends only on (seed, epoch, failed index, attempt)
    i = sorted(bad_idx)[0]
    a, b2 = ds[(2, i)], _dataset(root, tok, in_memory=not in_memory)[(2, i)]
    assert a["index"] == b2["index"] and a["bad"] == b2["bad"] >= 1
    assert all(torch.equal(a[k], b2[k]) for k in a if isinstance(a[k], torch.Tensor))


def itertools_take(sampler, n):
    import itertools
    return list(itertools.islice(iter(sampler), n))


def test_gives_up_with_a_clear_error(tmp_path, tok):
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "nope.jpg", "caption": "x"}] * 3))
    ds = data.PairDataset(tmp_path / "ann.json", tmp_path, tok, 8, data.ImageTransform(S, False), None, 0)
    with pytest.raises(RuntimeError, match="consecutive bad samples"):
        ds[(0, 0)]


def test_mode_conversions():
    gray = np.full((S, S), 77, np.uint8)
    assert (np.asarray(data.load_image(_png(gray, format="PNG"))) == 77).all()
    pal = Image.fromarray(_rgb(3)).convert("P", palette=Image.ADAPTIVE, colors=8)
    out = data.load_image(_png(pal, format="PNG"))
    assert out.mode == "RGB" and (np.asarray(out) == np.asarray(pal.convert("RGB"))).all()
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[: S // 2, :, 3] = 255  # top half opaque red, bottom transparent
    a = np.asarray(data.load_image(_png(rgba, format="PNG")))
    assert (a[: S // 2] == [200, 0, 0]).all() and (a[S // 2:] == 255).all()
    la = Image.fromarray(np.stack([gray, np.zeros_like(gray)], -1), "LA")
    assert (np.asarray(data.load_image(_png(la, format="PNG"))) == 255).all()
    pal_t = Image.new("P", (S, S), 0)
    pal_t.putpalette([10, 20, 30] * 256)
    pal_t.info["transparency"] = 0
    assert (np.asarray(data.load_image(_png(pal_t, format="PNG", transparency=0))) == 255).all()
    cmyk = Image.new("CMYK", (S, S), (0, 255, 255, 0))
    assert data.load_image(_png(cmyk, format="JPEG")).mode == "RGB"
    i16 = Image.fromarray(np.full((S, S), 60000, np.uint16))
    assert data.load_image(_png(i16, format="PNG")).mode == "RGB"


def test_transform_eval_and_train():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    ev = data.ImageTransform(32, False)
    x = ev(img, None)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, ev(img, None))
    white = data.ImageTransform(8, False)(Image.new("RGB", (8, 8), (255, 255, 255)), None)
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD))
    tr = data.ImageTransform(32, True, flip=True)
    a = tr(img, np.random.default_rng(1))
    assert torch.equal(a, tr(img, np.random.default_rng(1))) and not torch.equal(a, x)
    nocrop = data.ImageTransform(32, True, crop=False, flip=False)
    assert torch.equal(nocrop(img, np.random.default_rng(1)), x)
    with pytest.raises(ValueError):
        tr(img, None)


def test_pairs_one_caption_and_batch_table(tmp_path, tok):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(_rgb(i), format="PNG"))
    ann = [{"image": f"{i}.png", "caption": [f"caption {i} {j}" for j in range(3 + i)]} for i in range(4)]
    (tmp_path / "a.json").write_text(json.dumps(ann))
    masker = data.Masker(16, 0.4, "block", 0.15, tok.vocab_size, tok.word_starts(), 4)
    ds = data.PairDataset(tmp_path / "a.json", tmp_path, tok, 10, data.ImageTransform(16, False), masker, 0)
    assert len(ds) == 3 + 4 + 5 + 6
    one = data.PairDataset(tmp_path / "a.json", tmp_path, tok, 10, data.ImageTransform(16, False), masker, 0,
                           one_caption_per_image=True, in_memory=True)
    assert len(one) == 4
    picks = {tok.decode(one[(e, 3)]["text_ids"][one[(e, 3)]["text_mask"]]) for e in range(40)}
    assert picks == {f"caption 3 {j}" for j in range(6)}  # varies with the epoch
    b = data.collate([one[(0, i)] for i in range(4)])
    B, P, L = 4, 16, 10
    want = {"images": (torch.float32, (B, 3, 16, 16)), "text_ids": (torch.long, (B, L)),
            "text_mask": (torch.bool, (B, L)), "index": (torch.long, (B,)), "bad": (torch.long, ())}
    for v in ("uni", "joint"):
        want.update({f"image_mask_{v}": (torch.bool, (B, P)), f"text_input_{v}": (torch.long, (B, L)),
                     f"text_masked_{v}": (torch.bool, (B, L)), f"text_labels_{v}": (torch.long, (B, L))})
    assert set(b) == set(want)
    for k, (dt, shape) in want.items():
        assert b[k].dtype == dt and tuple(b[k].shape) == shape, k
    assert (b["image_mask_uni"].sum(1) == round(0.4 * 16)).all()
    assert b["index"].tolist() == [0, 1, 2, 3]


def test_same_samples_with_workers(tmp_path, tok):
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(_png(_rgb(i), format="PNG"))
    (tmp_path / "a.json").write_text(json.dumps([{"image": f"{i}.png", "caption": f"a cat {i}"} for i in range(8)]))
    masker = data.Masker(16, 0.4, "random", 0.5, tok.vocab_size, tok.word_starts(), 4)
    ds = data.PairDataset(tmp_path / "a.json", tmp_path, tok, 8, data.ImageTransform(16, True), masker, 0)
    outs = []
    for w in (0, 2):
        it = iter(data.make_loader(ds, data.ResumableSampler(8, 4, seed=2), 4, workers=w))
        outs.append([next(it) for _ in range(5)])
    for a, b in zip(*outs):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_annotation_names_path_and_layout(tmp_path, tok):
    for fn in (lambda: data.load_retrieval_split(tmp_path / "nope.json", tmp_path),
               lambda: data.PairDataset(tmp_path / "nope.json", tmp_path, tok, 8, data.ImageTransform(8, False), None, 0)):
        with pytest.raises(FileNotFoundError) as e:
            fn()
        assert "nope.json" in str(e.value) and '"caption"' in str(e.value)
    (tmp_path / "ok.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="image_root"):
        data.load_retrieval_split(tmp_path / "ok.json", tmp_path / "no_images")
