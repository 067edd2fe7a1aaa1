"""Built-in dataset claims, checked on a small generated set (300 train images):
same seed -> byte-identical files (another seed -> different); the COCO-Karpathy JSON
layout of ALBEF/BLIP; held-out (colour, shape) combinations never occur in
train/val/test and every test_comp image contains one; every evaluation caption is
true of its own image and of no other image of its split (parsed here with an
independent little parser and checked against boxes.json geometry); boxes lie on their
objects; edit targets are real rendered edits; ensure_synth is idempotent and the
tokenizer it ships fits the captions.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_synth.py
"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data

N = 300


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return data.make_synth(tmp_path_factory.mktemp("s") / "synth", n_images=N, seed=0)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synth.json"}


def test_same_seed_same_bytes(synth, tmp_path):
    again = data.make_synth(tmp_path / "again", n_images=N, seed=0)
    a, b = _digest(Path(synth["root"])), _digest(Path(again["root"]))
    assert a == b and len(a) > N
    other = data.make_synth(tmp_path / "other", n_images=N, seed=1)
    assert _digest(Path(other["root"])) != a


def test_json_layout(synth):
    root = Path(synth["root"])
    assert set(synth) == {"root", "train", "val", "test", "test_comp", "image_root", "tokenizer",
                          "attributes", "boxes", "edits"}
    train = json.loads(Path(synth["train"]).read_text())
    assert isinstance(train, list) and len(train) == 5 * N
    for e in train:
        assert set(e) == {"image", "caption"} and isinstance(e["caption"], str)
        assert e["image"].startswith("images/") and e["image"].endswith(".png")
    assert len({e["image"] for e in train}) == N
    for split in ("val", "test", "test_comp"):
        rows = json.loads(Path(synth[split]).read_text())
        assert len(rows) == {"val": N // 20 if N // 20 >= 10 else 10}.get(split, max(20, N // 10))
        for e in rows:
            assert set(e) == {"image", "caption"} and len(e["caption"]) == 5
            assert len(set(e["caption"])) == 5  # five different paraphrases
            img = Image.open(root / e["image"])
            assert img.size == (32, 32) and img.mode == "RGB"
    images, caps, t2i = data.load_retrieval_split(synth["test"], synth["image_root"])
    assert len(caps) == 5 * len(images) and t2i.tolist() == [i // 5 for i in range(len(caps))]


# ----------------------------------------------------------- independent parser ------
SIZE = {"small": "small", "tiny": "small", "large": "large", "big": "large"}
COLOURS = "red|orange|yellow|green|cyan|blue|purple|white"
SHAPES = "circle|square|triangle|diamond|cross"
MENTION = re.compile(rf"\b(a|the) (?:single )?(?:(small|tiny|large|big) )?(?:({COLOURS}) )?({SHAPES})\b")
RELS = [("left", "left"), ("right", "right"), ("above", "above"), ("over", "above"),
        ("below", "below"), ("under", "below")]


def parse(caption: str):
    """-> (objects {shape: (size, colour)}, relations [(shape, rel, shape)], region or None)."""
    ms = list(MENTION.finditer(caption))
    objs = {m.group(4): (SIZE[m.group(2)], m.group(3)) for m in ms if m.group(2)}
    rels = []
    for a, b in zip(ms, ms[1:]):
        gap = caption[a.end():b.start()]
        rels += [(a.group(4), r, b.group(4)) for w, r in RELS if re.search(rf"\b{w}\b", gap)]
    region = None
    if len(objs) == 1:
        col = 0 if re.search(r"\bleft\b", caption) else 2 if re.search(r"\bright\b", caption) else 1
        row = 0 if re.search(r"\btop\b", caption) else 2 if re.search(r"\bbottom\b", caption) else 1
        region = (col, row)
    return objs, rels, region


def centre(o):
    x0, y0, x1, y1 = o["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def true_of(parsed, objects, size=32) -> bool:
    objs, rels, region = parsed
    by_desc = {(o["size"], o["colour"], o["shape"]): o for o in objects}
    found = {}
    for shape, (sz, col) in objs.items():
        if (sz, col, shape) not in by_desc:
            return False
        found[shape] = by_desc[(sz, col, shape)]
    for a, r, b in rels:
        (ax, ay), (bx, by) = centre(found[a]), centre(found[b])
        if abs(bx - ax) > abs(by - ay):
            actual = "left" if ax < bx else "right"
        else:
            actual = "above" if ay < by else "below"
        if actual != r:
            return False
    if region is not None:
        (cx, cy), = [centre(o) for o in found.values()]
        if (min(2, int(cx * 3 // size)), min(2, int(cy * 3 // size))) != region:
            return False
    return True


@pytest.mark.parametrize("split", ["val", "test", "test_comp"])
def test_captions_true_of_their_image_and_of_no_other(synth, split):
    rows = json.loads(Path(synth[split]).read_text())
    boxes = {b["image"]: b["objects"] for b in json.loads(Path(synth["boxes"]).read_text())[split]}
    scenes = [boxes[r["image"]] for r in rows]
    for i, r in enumerate(rows):
        for cap in r["caption"]:
            p = parse(cap)
            # the caption names every object of its image
            assert set(p[0]) == {o["shape"] for o in scenes[i]}, cap
            assert (len(p[1]) >= 1) == (len(scenes[i]) > 1), cap
            assert true_of(p, scenes[i]), f"caption not true of its image: {cap}"
            others = [j for j, s in enumerate(scenes) if j != i and true_of(p, s)]
            assert not others, f"{cap!r} also fits {[rows[j]['image'] for j in others]}"


def _objects_of_train(synth):
    out = []
    for e in json.loads(Path(synth["train"]).read_text()):
        objs, _, _ = parse(e["caption"])
        out.append({(c, s) for s, (_, c) in objs.items()})
    return out


def test_compositional_combos_absent_from_train(synth):
    held = {tuple(h.split()) for h in json.loads(Path(synth["attributes"]).read_text())["held_out"]}
    assert held == set(data.HELD_OUT) and len(held) == 8
    train = _objects_of_train(synth)
    assert all(objs and not (objs & held) for objs in train)
    seen_train = set().union(*train)
    boxes = json.loads(Path(synth["boxes"]).read_text())
    for split in ("val", "test"):
        for b in boxes[split]:
            assert not {(o["colour"], o["shape"]) for o in b["objects"]} & held
    for b in boxes["test_comp"]:
        assert {(o["colour"], o["shape"]) for o in b["objects"]} & held
    # every colour and every shape is still seen in training (with other partners)
    assert {c for c, _ in seen_train} == set(data.COLOUR_NAMES)
    assert {s for _, s in seen_train} == set(data.SHAPES)


def _object_like(a: np.ndarray) -> np.ndarray:
    a = a.astype(int)
    return (a.max(-1) - a.min(-1) > 60) | (a.min(-1) > 150)


@pytest.mark.parametrize("split", ["val", "test", "test_comp"])
def test_boxes_lie_on_their_objects(synth, split):
    root = Path(synth["root"])
    for b in json.loads(Path(synth["boxes"]).read_text())[split]:
        a = np.asarray(Image.open(root / b["image"]))
        obj = _object_like(a)
        outside = np.ones(obj.shape, bool)
        for o in b["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            inside = obj[y0:y1, x0:x1]
            assert inside.mean() >= 0.3, (b["image"], o)
            ys, xs = np.nonzero(inside)  # the box is tight around the object (1 px tolerance)
            assert ys.min() <= 1 and xs.min() <= 1 and ys.max() >= y1 - y0 - 2 and xs.max() >= x1 - x0 - 2
            mean = a[y0:y1, x0:x1][inside].mean(0)
            nearest = min(data.COLOURS, key=lambda c: np.abs(np.array(data.COLOURS[c]) - mean).sum())
            assert nearest == o["colour"]
            outside[y0:y1, x0:x1] = False
        assert not obj[outside].any(), b["image"]  # background everywhere else


def test_attributes_and_edits(synth):
    root = Path(synth["root"])
    attrs = json.loads(Path(synth["attributes"]).read_text())
    assert len(attrs["classes"]["object"]) == 40 and attrs["templates"]
    for split, n in (("train", N), ("test", max(20, N // 10))):
        rows = attrs["images"][split]
        assert len(rows) == n
        for r in rows:
            name = attrs["classes"]["object"][r["object"]]
            assert name == f"{attrs['classes']['colour'][r['colour']]} {attrs['classes']['shape'][r['shape']]}"
    edits = json.loads(Path(synth["edits"]).read_text())
    test_images = [r["image"] for r in json.loads(Path(synth["test"]).read_text())]
    assert edits["gallery"][:len(test_images)] == test_images and edits["triplets"]
    for t in edits["triplets"]:
        assert edits["gallery"][t["target_index"]] == t["target"] and t["source"] in test_images
        src, tgt = (np.asarray(Image.open(root / t[k])).astype(int) for k in ("source", "target"))
        diff = np.abs(src - tgt).sum(-1) > 0
        assert 0 < diff.sum() < 0.5 * diff.size  # one object changed, background kept
        assert t["edit"]["object"] in t["text"] and str(list(t["edit"].values())[1]) in t["text"]


def test_ensure_synth_idempotent_and_tokenizer_fits(synth, tmp_path):
    root = Path(synth["root"])
    mtime = (root / "synth.json").stat().st_mtime_ns
    assert data.ensure_synth(root, n_images=N, seed=0) == synth
    assert (root / "synth.json").stat().st_mtime_ns == mtime  # not regenerated
    with pytest.raises(FileExistsError):
        data.ensure_synth(root, n_images=N + 1, seed=0)
    # incomplete (a file deleted) -> regenerated
    p = data.ensure_synth(tmp_path / "e", n_images=60, seed=3)
    Path(p["boxes"]).unlink()
    p2 = data.ensure_synth(tmp_path / "e", n_images=60, seed=3)
    assert Path(p2["boxes"]).is_file()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        data.ensure_synth(tmp_path / "foreign", n_images=60)
    tok = data.load_tokenizer(synth["tokenizer"])
    man = json.loads((root / "synth.json").read_text())
    assert 256 < tok.vocab_size == man["vocab_size"] < 2000 and man["max_caption_tokens"] <= 32
    for e in json.loads(Path(synth["test"]).read_text()):
        for c in e["caption"]:
            assert tok.decode(tok.encode(c)) == c
