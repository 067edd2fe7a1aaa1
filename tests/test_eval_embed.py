"""eval.py's embedding helpers and figures work against the public model/data API.

Proves: embed_images batches real PNG files through model.encode_image, skips and counts
an unreadable (corrupt or missing) file without failing; embed_texts and
evaluate_retrieval give perfect scores for a model that is perfect by construction, and
drop an unreadable image together with its captions; the helpers restore the model's
train/eval mode; they run on the real `oner.OneR` "mu" model; the PNG figures are written
at their documented sizes. A small fake `data` module stands in for data.py (installed
in sys.modules per test), so these tests do not depend on data.py's internals; two tests
use the real data.py when it is importable (skipped otherwise).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval_embed.py -x
"""
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
WORDS = list(COLOURS)


class ColourModel(torch.nn.Module):
    """Perfect by construction: an image embeds as its mean colour, a caption as the
    colour named by its first token, both as unit RGB vectors."""
    cfg = types.SimpleNamespace(image_size=8, patch_size=4, max_text_len=5)

    def __init__(self):
        super().__init__()
        self.calls = []

    def encode_image(self, images):                       # (B, 3, H, W) -> (B, 3)
        assert not self.training and not torch.is_grad_enabled()
        self.calls.append(images.shape[0])
        return F.normalize(images.mean((2, 3)), dim=-1)

    def encode_text(self, ids, mask):                     # (B, L) -> (B, 3)
        assert ids.dtype == torch.long and mask.dtype == torch.bool
        table = torch.tensor([COLOURS[w] for w in WORDS], dtype=torch.float32)
        return F.normalize(table[ids[:, 0]], dim=-1)


def tokenizer(texts, length):
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    ids[:, 0] = torch.tensor([WORDS.index(t.split()[0]) for t in texts])
    return ids, torch.ones(len(texts), length, dtype=torch.bool)


def fake_data_module():
    """The slice of data.py's public API that eval.py uses."""
    data = types.ModuleType("data")

    class BadSample(Exception):
        pass

    def load_image(path):
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as err:
            raise BadSample(f"unreadable image {path}: {err}") from err

    class ImageTransform:
        def __init__(self, image_size, train=False):
            self.size = image_size

        def __call__(self, pil, boxes):
            x = torch.from_numpy(np.asarray(pil.resize((self.size, self.size)), dtype=np.float32))
            return x.permute(2, 0, 1) / 255.0                   # (3, S, S)

    def load_retrieval_split(json_path, image_root):
        entries = json.load(open(json_path))
        paths, captions, t2i = [], [], []
        for i, e in enumerate(entries):
            paths.append(f"{image_root}/{e['image']}")
            caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
            captions += caps
            t2i += [i] * len(caps)
        return paths, captions, torch.tensor(t2i)

    data.BadSample, data.load_image, data.ImageTransform = BadSample, load_image, ImageTransform
    data.load_retrieval_split = load_retrieval_split
    return data


@pytest.fixture
def fake_data(monkeypatch):
    data = fake_data_module()
    monkeypatch.setitem(sys.modules, "data", data)
    return data


@pytest.fixture
def split(tmp_path):
    """Five solid-colour PNGs (one corrupt, one missing) and an ALBEF-style JSON with
    1, 3 or 2 captions per image."""
    (tmp_path / "img").mkdir()
    entries = [("a.png", "red", ["red", "red car", "red sky"]),
               ("b.png", "green", ["green"]),
               ("bad.png", None, ["blue thing", "blue"]),      # corrupt bytes
               ("c.png", "blue", ["blue sea", "blue"]),
               ("gone.png", None, ["white"]),                   # listed, not on disk
               ("d.png", "white", ["white wall"])]
    for name, colour, _ in entries:
        if colour:
            Image.new("RGB", (12, 10), COLOURS[colour]).save(tmp_path / "img" / name)
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ann = [{"image": name, "caption": caps} for name, _, caps in entries]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    return tmp_path


def test_embed_images_skips_unreadable_files(fake_data, split, capsys):
    model = ColourModel().train()
    paths = [str(split / "img" / n) for n in ("a.png", "bad.png", "b.png", "gone.png", "c.png", "d.png")]
    emb, ok = ev.embed_images(model, paths, fake_data.ImageTransform(8), batch_size=2, progress=True)
    assert ok.tolist() == [True, False, True, False, True, True]
    assert emb.shape == (6, 3) and torch.equal(emb[~ok], torch.zeros(2, 3))
    assert torch.allclose(emb[ok], F.normalize(torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]), dim=-1))
    assert model.calls == [2, 2] and model.training            # batches of 2; mode restored
    err = capsys.readouterr().err
    assert "bad.png" in err and "gone.png" in err and "2 skipped" in err and "6/6" in err


def test_embed_images_with_an_explicit_loader_and_nothing_readable(tmp_path, fake_data):
    (tmp_path / "x.png").write_bytes(b"junk")
    load = lambda p: Image.open(p).convert("RGB")                # raises PIL's OSError
    emb, ok = ev.embed_images(ColourModel(), [str(tmp_path / "x.png")], fake_data.ImageTransform(8),
                              progress=False, load_image=load)
    assert not ok.any() and emb.shape == (1, 0)


def test_embed_texts_batches_and_matches_model(fake_data):
    caps = ["red", "blue sky", "green", "white", "red"]
    emb = ev.embed_texts(ColourModel(), tokenizer, caps, batch_size=2, progress=False)
    assert emb.shape == (5, 3) and torch.allclose(emb[0], emb[4]) and torch.allclose(emb[1], torch.tensor([0., 0, 1]))


def test_evaluate_retrieval_drops_unreadable_images_with_their_captions(fake_data, split):
    m = ev.evaluate_retrieval(ColourModel(), tokenizer, str(split / "test.json"), str(split / "img"),
                              batch_size=3, progress=False)
    assert (m["n_images"], m["n_texts"], m["skipped"], m["skipped_captions"]) == (4, 7, 2, 3)
    assert all(m[k] == 100.0 for k in ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean"))
    s = ev.embed_retrieval_split(ColourModel(), tokenizer, str(split / "test.json"), str(split / "img"),
                                 progress=False)
    assert s["text_to_image"].tolist() == [0, 0, 0, 1, 2, 2, 3]
    assert s["captions"][-1] == "white wall" and s["image_paths"][-1].endswith("d.png")


def test_evaluate_retrieval_with_no_readable_image_names_the_layout(fake_data, split):
    with pytest.raises(RuntimeError, match="image_root"):
        ev.evaluate_retrieval(ColourModel(), tokenizer, str(split / "test.json"), str(split / "nowhere"),
                              progress=False)


def test_helpers_run_on_the_real_oner_model(tmp_path, fake_data):
    oner = pytest.importorskip("oner")
    torch.manual_seed(0)
    model = oner.OneR(oner.OneRConfig.from_name("mu"))
    cfg = model.cfg
    for i, c in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 30), COLOURS[c]).save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(3)] + [str(tmp_path / "missing.png")]
    img, ok = ev.embed_images(model, paths, fake_data.ImageTransform(cfg.image_size), batch_size=2, progress=False)
    tok = lambda texts, L: (torch.randint(0, cfg.vocab_size, (len(texts), L)), torch.ones(len(texts), L, dtype=torch.bool))
    txt = ev.embed_texts(model, tok, ["a", "b", "c"], progress=False)
    assert ok.tolist() == [True] * 3 + [False]
    assert torch.allclose(img[ok].norm(dim=1), torch.ones(3), atol=1e-5) and txt.shape == (3, img.shape[1])
    m = ev.retrieval_metrics_from_embeddings(img[ok], txt, torch.arange(3))
    assert 0.0 <= m["mean"] <= 100.0
    w = ev.zeroshot_classifier(model, tok, ["x", "y"], ev.SLIP_TEMPLATES[:2], device="cpu")
    assert w.shape == (2, img.shape[1])
    g = cfg.image_size // cfg.patch_size
    with torch.inference_mode():
        patches = model.eval().encode_patches(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    assert patches.shape[1] == g * g
    hm = ev.patch_heatmap(patches[0], txt[0], (g, g), (cfg.image_size, cfg.image_size))
    assert hm.shape == (cfg.image_size, cfg.image_size)


def test_embed_images_with_the_real_data_module(tmp_path):
    data = pytest.importorskip("data")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    emb, ok = ev.embed_images(ColourModel(), [str(tmp_path / "ok.png"), str(tmp_path / "bad.png")],
                              data.ImageTransform(8, train=False), progress=False)
    assert ok.tolist() == [True, False] and emb.shape[0] == 2


def test_evaluate_retrieval_with_the_real_data_module(split):
    pytest.importorskip("data")
    m = ev.evaluate_retrieval(ColourModel(), tokenizer, str(split / "test.json"), str(split / "img"),
                              progress=False)
    assert (m["n_images"], m["n_texts"], m["skipped"], m["skipped_captions"]) == (4, 7, 2, 3)


# ------------------------------------------------------------------------- figures

def test_heatmap_png_size(tmp_path):
    image = Image.new("RGB", (40, 32), (200, 180, 20))
    hms = [torch.rand(5, 4), torch.zeros(32, 40)]            # any size; a flat map is fine
    ev.draw_heatmaps_png(image, ["red", "sky"], hms, tmp_path / "h.png")
    s = 5                                                      # ceil(160 / 32)
    with Image.open(tmp_path / "h.png") as im:
        assert im.size == (3 * 40 * s, 32 * s + 22) and im.mode == "RGB"


def test_retrieval_grid_png_size(tmp_path):
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "g.png")
    gal = [str(tmp_path / "g.png")] * 4 + [str(tmp_path / "missing.png")]   # missing -> grey
    ev.draw_retrieval_grid_png(["a long caption " * 6, Image.new("RGB", (9, 9))], [gal, gal[:3]],
                               [[True, False, False, False, False], [False, False, True]],
                               tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (2 * 96 + 5 * 102 + 6, 2 * 102 + 6)
        assert im.getpixel((2 * 96 + 6 + 1, 6 + 1)) == (0, 170, 0)     # GT frame is green


def test_embedding_pca_png_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = [torch.randn(20, 8, generator=g) for _ in range(3)]
    xy = ev.pca_2d(torch.cat(emb))
    panels = [("ITC", xy[:20], xy[20:40], xy[40:]), ("OneR", xy[:20], xy[20:40], None)]
    ev.draw_embedding_pca_png(panels, tmp_path / "pca.png")
    with Image.open(tmp_path / "pca.png") as im:
        assert im.size == (2 * 320, 320 + 24 + 22)
