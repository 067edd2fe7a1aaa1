"""data.py: everything between files on disk and OneR's batch dict.

Tokenizer (tiktoken), image loading and transforms (Pillow + numpy, no torchvision),
the built-in synthetic dataset, datasets for ALBEF/BLIP JSON, tar shards and image
folders, whole-word / patch masking, collate and a resumable sampler. Nothing here
knows the model: the batch is exactly DESIGN.md's table.

Supported data formats (one-line examples)
-------------------------------------------
* ALBEF/BLIP JSON + image root (COCO, Flickr30K, VG, SBU, CC3M as the 4M corpus ships):
    train: [{"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "a cat on a mat"}, ...]
    eval:  [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["a dog", "a brown dog", ...]}, ...]
  `PairDataset(json, image_root, ...)` for training (a list of captions expands to one
  pair per caption, or one randomly picked caption per image per epoch with
  one_caption_per_image=True); `load_retrieval_split(json, image_root)` for evaluation
  (captions stay grouped per image; any number of captions per image).
* Tar shards, img2dataset/webdataset layout: "shards/{00000..00099}.tar", each holding
    00000001.jpg (or .jpeg/.png/.webp) + 00000001.txt (+ optional 00000001.json)
  `ShardDataset("shards/{00000..00099}.tar", ...)`: shards are split over ranks and
  dataloader workers, shuffled through a buffer, and an epoch is a fixed number of
  steps (shards are cycled), so uneven shards cannot hang DDP. Resume restarts every
  worker at its position in the epoch's shard stream (whole shards are skipped by
  their headers, the rest of a shard by reading without decoding). It is exact when
  shuffle_buffer <= 1; with a buffer, up to `shuffle_buffer` samples per worker around
  the resume point may repeat or be missed (shard-granularity resume, as webdataset).
* Image folder (zero-shot classification, linear probe): root/<class>/<image>, e.g.
    imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG
  classes are the sorted subfolder names; an optional class-name file maps them to
  words (.txt: one name per line in sorted-folder order; .json: {"n01440764": "tench"}
  or a list).
* Tokenizer: "gpt2" (the shipped assets/gpt2.tiktoken.gz, offline), any tiktoken
  encoding name ("cl100k_base", needs tiktoken's cache or the network), or a path to a
  .tiktoken ranks file (e.g. the built-in set's data/synth/bpe.tiktoken).
* Built-in set: `python data.py synth data/synth [--images 10000] [--seed 0]` writes
    data/synth/{train,val,test,test_comp}.json, images/*.png, bpe.tiktoken,
    attributes.json, boxes.json, edits.json, synth.json (manifest)
  in the same COCO-Karpathy layout as above (see make_synth for the content).

The built-in set (make_synth)
-----------------------------
32x32 RGB PNGs (--image_size), 1-3 non-overlapping objects on a plain, noisy or
gradient gray background: 5 shapes (circle, square, triangle, diamond, cross) x 8
colours (red, orange, yellow, green, cyan, blue, purple, white) x 2 sizes (8 / 13 px),
distinct shapes and colours within a scene, every pair of objects clearly in one
relation (dominant axis offset >= 1.5x the other). 5 different captions per image
state every object (size, colour, shape; synonyms big/large, tiny/small) and its
region (1 object: "a single tiny red cross in the middle") or relations (2 objects:
"the large red triangle is to the left of the tiny orange circle"; 3 objects: two
relations along a path). Captions have 7-24 tokens of the shipped BPE (403 ids with
the defaults: it stops once every caption word is one token).
Splits (n = --images): train n images x 5 pairs, val n/20, test n/10 (in-distribution),
test_comp n/10 (each image holds at least one held-out pair). Held-out (colour, shape)
pairs, never in train/val/test: red square, orange diamond, yellow circle, green
triangle, cyan cross, blue square, purple diamond, white circle (each colour and shape
still appears in training with other partners). Within each evaluation split no
caption is true of any other image of the split (facts checked while generating).
Side files: attributes.json (40 "colour shape" classes + shape/colour/size/count labels
of the main object, the largest one, for every image of every split, with prompt
templates; count == 0 images give a clean zero-shot task), boxes.json ({split: [{image,
objects: [{name "red circle", phrase "large red circle", box [x0, y0, x1, y1) px}]}]}),
edits.json ({gallery: test images + rendered edit targets, triplets: [{source, text
"the same scene with the circle blue", target, target_index, target_caption}]}).
Training recipe (builtin_pipeline): no crop, no flip, one caption per image per epoch
(no duplicate-description false negatives), images decoded once (in_memory).

Measured here (2 shared cores, load 4-6 from other jobs)
---------------------------------------------------------
* `python data.py synth DIR` (10,000 train + 2,500 eval images + ~890 edit targets):
  9-13 s of generation (~7 s CPU), 14-21 s wall under load.
* `python data.py bench` (built-in train split, batch 64, 4x4 patches, masks on, images
  in memory): 3,300-4,300 images/s with 0 workers, 2,100-3,000 with 1, 2,200-4,200 with
  2; decoding PNGs from disk every time (--no_memory): 2,200 / 1,500 / 3,200. Worker
  processes do not pay off for 32 px images on 2 cores; use workers=0 or 1 for the demo.

Bad data never stops training: unreadable/truncated/zero-byte images, HTML saved as
.jpg, missing files, decompression bombs (> MAX_IMAGE_PIXELS) and empty captions are
skipped, replaced by a sample chosen deterministically from (seed, epoch, failed index,
attempt), counted in the batch's "bad" entry and in `dataset.bad_count`.
"""
from __future__ import annotations

import argparse
import base64
import collections
import gzip
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

log = logging.getLogger("oner.data")

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken.gz"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's split pattern, as tiktoken_ext.openai_public.r50k_pat_str
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# =====================================================================================
# Tokenizer
# =====================================================================================


def _ranks_text(ranks: dict[bytes, int]) -> str:
    """Canonical .tiktoken text (base64 token, space, rank; sorted by rank)."""
    return "".join(base64.b64encode(t).decode() + f" {r}\n"
                   for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def _parse_ranks(text: str, where: str) -> dict[bytes, int]:
    ranks = {}
    for line in text.splitlines():
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{where}: bad line {line[:60]!r} in a .tiktoken ranks file "
                             "(expected 'base64token rank')") from e
    return ranks


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class TokenizerUnavailable(RuntimeError):
    pass


def _unavailable(spec: str, reason: str) -> TokenizerUnavailable:
    return TokenizerUnavailable(
        f"tokenizer {spec!r} cannot be loaded offline: {reason}. Two fixes: (1) on a machine "
        f"with internet run `TIKTOKEN_CACHE_DIR=/some/shared/dir python -c \"import tiktoken; "
        f"tiktoken.get_encoding('{spec}')\"` and export the same TIKTOKEN_CACHE_DIR here "
        f"(pre-populated cache); or (2) pass the path of a .tiktoken ranks file instead of a "
        f"name (e.g. --tokenizer /path/to/{spec}.tiktoken; 'gpt2' is shipped offline as "
        f"{GPT2_RANKS}).")


class Tokenizer:
    """tiktoken encoding + fixed-length padding + word starts + a rebuildable identity."""

    def __init__(self, name: str, mergeable_ranks: dict[bytes, int], pat_str: str,
                 special_tokens: dict[str, int], ranks_text: str | None = None,
                 named: bool = False):
        import tiktoken
        self.name = name
        self._named = named  # True: rebuilt from the name (ranks not stored in identity)
        self._ranks_text = ranks_text if ranks_text is not None else _ranks_text(mergeable_ranks)
        self.sha256 = _sha(self._ranks_text)
        self.enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                     special_tokens=dict(special_tokens))
        self.vocab_size = self.enc.n_vocab
        self._word_starts = None

    @classmethod
    def _from_encoding(cls, enc, spec: str) -> "Tokenizer":
        return cls(spec, enc._mergeable_ranks, enc._pat_str, enc._special_tokens, named=True)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)  # special-token strings are plain text here

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.enc.decode([int(i) for i in ids])

    def word_starts(self) -> np.ndarray:
        """bool (vocab_size,): the token's bytes begin with a space (BPE word start)."""
        if self._word_starts is None:
            ws = np.zeros(self.vocab_size, dtype=bool)
            for i in range(self.vocab_size):
                try:
                    ws[i] = self.enc.decode_single_token_bytes(i)[:1] == b" "
                except KeyError:  # gaps in some vocabularies
                    pass
            self._word_starts = ws
        return self._word_starts

    def identity(self) -> dict:
        return {"name": self.name, "sha256": self.sha256,
                "ranks": None if self._named else self._ranks_text,
                "pat_str": self.enc._pat_str, "special_tokens": dict(self.enc._special_tokens)}

    @classmethod
    def from_identity(cls, d: dict) -> "Tokenizer":
        if d.get("ranks") is None:
            tok = load_tokenizer(d["name"])
        else:
            tok = cls(d["name"], _parse_ranks(d["ranks"], "identity"), d["pat_str"],
                      d["special_tokens"], ranks_text=d["ranks"])
        if tok.sha256 != d["sha256"] or tok.enc._pat_str != d["pat_str"]:
            raise ValueError(f"tokenizer {d['name']!r}: rebuilt ranks hash {tok.sha256} (or split "
                             f"pattern) differs from the recorded {d['sha256']}; the checkpoint was "
                             "trained with a different tokenizer")
        return tok

    def pad(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        """One caption -> (ids int64 (length,) padded with 0, mask bool (length,))."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty caption {text!r}")
        ids = self.encode(text)[:length]
        out = np.zeros(length, dtype=np.int64)
        out[:len(ids)] = ids
        mask = np.zeros(length, dtype=bool)
        mask[:len(ids)] = True
        return out, mask

    def __call__(self, texts: list[str], length: int):
        if isinstance(texts, str):
            texts = [texts]
        pairs = [self.pad(t, length) for t in texts]
        ids = torch.from_numpy(np.stack([p[0] for p in pairs])) if pairs else torch.zeros(0, length, dtype=torch.long)
        mask = torch.from_numpy(np.stack([p[1] for p in pairs])) if pairs else torch.zeros(0, length, dtype=torch.bool)
        return ids, mask

    def __repr__(self):
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}…)"


def _load_ranks_file(path: Path) -> tuple[dict[bytes, int], str]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    text = raw.decode()
    return _parse_ranks(text, str(path)), text


def _load_named_offline(name: str):
    """tiktoken.get_encoding(name) with the network replaced by a fast failure unless
    downloads are allowed (ONER_OFFLINE unset) — then with a timeout, never a hang."""
    import tiktoken
    import tiktoken.load as tl
    orig = tl.read_file
    offline = os.environ.get("ONER_OFFLINE", "") not in ("", "0")

    def read_file(blobpath: str) -> bytes:
        if "://" not in blobpath:
            return orig(blobpath)
        if offline:
            raise TokenizerUnavailable(f"{blobpath} is not in the tiktoken cache and ONER_OFFLINE is set")
        import requests
        r = requests.get(blobpath, timeout=(5, 60))
        r.raise_for_status()
        return r.content

    tl.read_file = read_file
    try:
        return tiktoken.get_encoding(name)
    except TokenizerUnavailable as e:
        raise _unavailable(name, str(e)) from None
    except Exception as e:  # noqa: BLE001  (network errors of any kind)
        raise _unavailable(name, f"{type(e).__name__}: {e}") from None
    finally:
        tl.read_file = orig


def load_tokenizer(spec: str) -> Tokenizer:
    """"gpt2" (shipped ranks, offline), a tiktoken encoding name, or a .tiktoken file path."""
    spec = str(spec)
    if spec in ("gpt2", "r50k_base"):
        ranks, text = _load_ranks_file(GPT2_RANKS)
        if _sha(text) != GPT2_SHA256:
            raise ValueError(f"{GPT2_RANKS} is corrupted: sha256 {_sha(text)} != {GPT2_SHA256}")
        tok = Tokenizer(spec, ranks, GPT2_PAT, {"<|endoftext|>": 50256}, ranks_text=text)
        tok._named = True  # rebuilt from the shipped asset by name; hash verified
        return tok
    path = Path(spec).expanduser()
    if path.is_file():
        ranks, text = _load_ranks_file(path)
        stem = path.name.split(".")[0]
        return Tokenizer(stem, ranks, GPT2_PAT, {}, ranks_text=text)
    import tiktoken
    if "/" in spec or spec.endswith((".tiktoken", ".gz")):
        raise _unavailable(spec, f"no ranks file at {path}")
    if spec not in tiktoken.list_encoding_names():
        raise _unavailable(spec, "it is neither a ranks file path nor a tiktoken encoding "
                           f"name (known: {', '.join(tiktoken.list_encoding_names())})")
    return Tokenizer._from_encoding(_load_named_offline(spec), spec)


def train_bpe(texts: list[str], vocab_size: int, path) -> Tokenizer:
    """Small byte-level BPE with GPT-2's split pattern. Same merges, in the same order, as
    tiktoken._educational.bpe_train("\\n".join(texts), vocab_size, GPT2_PAT), but pairs
    are counted once per unique word times its frequency (words kept in first-occurrence
    order, so ties break identically). Stops early when no pair is left. Saves `path`."""
    import regex
    if vocab_size < 256:
        raise ValueError("vocab_size must be at least 256 (all bytes)")
    pat = regex.compile(GPT2_PAT)
    counts: dict[str, int] = {}
    for t in texts:
        for w in pat.findall(t):
            counts[w] = counts.get(w, 0) + 1
    words = [[bytes([b]) for b in w.encode()] for w in counts]
    freq = list(counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        stats: collections.Counter = collections.Counter()
        for piece, f in zip(words, freq):
            for pair in zip(piece[:-1], piece[1:]):
                stats[pair] += f
        if not stats:
            break
        best = max(stats, key=lambda x: stats[x])
        tok = best[0] + best[1]
        ranks[tok] = len(ranks)
        new_words = []
        for w in words:
            nw, i = [], 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    nw.append(tok)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            if i == len(w) - 1:
                nw.append(w[i])
            new_words.append(nw)
        words = new_words
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _ranks_text(ranks)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return Tokenizer(path.name.split(".")[0], ranks, GPT2_PAT, {}, ranks_text=text)


# =====================================================================================
# Images: loading and transforms
# =====================================================================================

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default bomb limit; larger images are bad samples
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadSample(Exception):
    """A sample that cannot be used (unreadable image, missing file, empty caption...)."""


def load_image(path_or_bytes) -> Image.Image:
    """Decode to RGB. Grayscale/palette/CMYK converted, transparency composited on white.
    Missing, zero-byte, truncated, non-image (e.g. HTML saved as .jpg) and images larger
    than MAX_IMAGE_PIXELS raise BadSample."""
    where = "<bytes>" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    try:
        if isinstance(path_or_bytes, (bytes, bytearray)):
            data = bytes(path_or_bytes)
        else:
            with open(path_or_bytes, "rb") as f:
                data = f.read()
    except OSError as e:
        raise BadSample(f"{where}: cannot read ({e.__class__.__name__}: {e})") from None
    if not data:
        raise BadSample(f"{where}: zero-byte file")
    try:
        with warnings.catch_warnings():  # our own guard below reports it as a bad sample
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise BadSample(f"{where}: {w}x{h} exceeds MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} "
                            "(decompression-bomb guard)")
        img.load()
    except BadSample:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(f"{where}: cannot decode ({e.__class__.__name__}: {e})") from None
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: scale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a / max(a.max(), 1) * 255, 0, 255).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


class ImageTransform:
    """PIL image -> (3, S, S) float CLIP-normalised tensor.
    eval (train=False) or train with crop=False: resize shorter side to S, centre crop.
    train with crop=True: random resized crop (area scale crop_scale, aspect 3/4..4/3),
    then optional horizontal flip. All randomness from the given numpy Generator."""

    def __init__(self, image_size: int, train: bool = False, crop_scale=(0.5, 1.0), flip: bool = False,
                 crop: bool = True):
        self.size, self.train, self.scale, self.flip, self.crop = image_size, train, tuple(crop_scale), flip, crop
        self._mean = np.array(CLIP_MEAN, dtype=np.float32) * 255
        self._inv_std = 1.0 / (np.array(CLIP_STD, dtype=np.float32) * 255)

    @property
    def deterministic(self) -> bool:
        return not (self.train and (self.crop or self.flip))

    def _resize_center(self, img: Image.Image) -> Image.Image:
        S = self.size
        w, h = img.size
        if (w, h) == (S, S):
            return img
        s = S / min(w, h)
        nw, nh = max(S, round(w * s)), max(S, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        l, t = (nw - S) // 2, (nh - S) // 2
        return img.crop((l, t, l + S, t + S))

    def _random_resized_crop(self, img: Image.Image, rng) -> Image.Image:
        w, h = img.size
        area = w * h
        for _ in range(10):
            a = area * rng.uniform(*self.scale)
            r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return img.resize((self.size, self.size), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        return self._resize_center(img)

    def __call__(self, img, rng: np.random.Generator | None = None) -> torch.Tensor:
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        if self.train and self.crop:
            if rng is None:
                raise ValueError("a training transform with crop needs an rng")
            img = self._random_resized_crop(img, rng)
        else:
            img = self._resize_center(img)
        a = np.asarray(img, dtype=np.float32)
        if self.train and self.flip:
            if rng is None:
                raise ValueError("a training transform with flip needs an rng")
            if rng.random() < 0.5:
                a = a[:, ::-1]
        a = (a - self._mean) * self._inv_std
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# =====================================================================================
# Masking
# =====================================================================================


class Masker:
    """Two independent masked views ("uni", "joint") of an image's patches and a caption.
    Image: exactly round(image_ratio * P) patches (uniform or BEiT-style blocks).
    Text: whole-word masking, >= round(text_prob * n_valid) tokens (at least one word when
    text_prob > 0), never more than max_predictions; 80 % [MASK] / 10 % random id / 10 % kept."""

    def __init__(self, num_patches: int, image_ratio: float = 0.4, image_mode: str = "random",
                 text_prob: float = 0.15, vocab_size: int | None = None,
                 word_starts: np.ndarray | None = None, max_predictions: int | None = None):
        if image_mode not in ("random", "block"):
            raise ValueError(f"image_mode must be 'random' or 'block', got {image_mode!r}")
        if text_prob > 0 and vocab_size is None:
            raise ValueError("Masker needs vocab_size for the 10 % random-token replacement")
        self.P, self.ratio, self.mode, self.text_prob = num_patches, image_ratio, image_mode, text_prob
        self.n_img = int(round(image_ratio * num_patches))
        self.vocab_size = vocab_size
        self.word_starts = None if word_starts is None else np.asarray(word_starts, dtype=bool)
        self.max_predictions = max_predictions
        self.grid = int(round(math.sqrt(num_patches)))
        if image_mode == "block" and self.grid ** 2 != num_patches:
            raise ValueError(f"block masking needs a square patch grid, got {num_patches} patches")

    def image_mask(self, rng) -> np.ndarray:
        m = np.zeros(self.P, dtype=bool)
        n = self.n_img
        if n <= 0:
            return m
        if self.mode == "random":
            m[rng.permutation(self.P)[:n]] = True
            return m
        # BEiT block-wise: rectangles of >= 4 patches (aspect 0.3..3.3) until the count is
        # reached without overshooting; the last few patches are topped up at random.
        g = self.grid
        grid = m.reshape(g, g)
        count, min_area = 0, min(4, n)
        for _ in range(100):
            left = n - count
            if left < min_area:
                break
            area = rng.uniform(min_area, left)
            ar = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if not (0 < h <= g and 0 < w <= g):
                continue
            t, l = int(rng.integers(0, g - h + 1)), int(rng.integers(0, g - w + 1))
            new = h * w - int(grid[t:t + h, l:l + w].sum())
            if 0 < new <= left:
                grid[t:t + h, l:l + w] = True
                count += new
        if count < n:
            free = np.flatnonzero(~m)
            m[rng.choice(free, n - count, replace=False)] = True
        return m

    def text_view(self, rng, ids: np.ndarray, valid: np.ndarray):
        L = len(ids)
        inp = ids.astype(np.int64, copy=True)
        masked = np.zeros(L, dtype=bool)
        labels = np.full(L, -100, dtype=np.int64)
        pos = np.flatnonzero(valid)
        if self.text_prob <= 0 or len(pos) == 0:
            return inp, masked, labels
        starts = np.ones(len(pos), dtype=bool) if self.word_starts is None else self.word_starts[ids[pos]]
        starts[0] = True
        bounds = np.flatnonzero(starts).tolist() + [len(pos)]
        words = [pos[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        target = max(1, int(round(self.text_prob * len(pos))))
        cap = L if self.max_predictions is None else self.max_predictions
        chosen, total = [], 0
        for wi in rng.permutation(len(words)):
            if total >= target:
                break
            if total + len(words[wi]) <= cap:
                chosen.append(words[wi])
                total += len(words[wi])
        if not chosen:
            return inp, masked, labels
        sel = np.sort(np.concatenate(chosen))
        labels[sel] = ids[sel]
        u = rng.random(len(sel))
        masked[sel[u < 0.8]] = True
        rnd = sel[(u >= 0.8) & (u < 0.9)]
        inp[rnd] = rng.integers(0, self.vocab_size, len(rnd))
        return inp, masked, labels

    def __call__(self, rng, text_ids: np.ndarray, text_mask: np.ndarray) -> dict:
        out = {}
        text_ids, text_mask = np.asarray(text_ids), np.asarray(text_mask, dtype=bool)
        for v in ("uni", "joint"):
            out[f"image_mask_{v}"] = self.image_mask(rng)
            inp, masked, labels = self.text_view(rng, text_ids, text_mask)
            out[f"text_input_{v}"], out[f"text_masked_{v}"], out[f"text_labels_{v}"] = inp, masked, labels
        return out


# =====================================================================================
# Datasets
# =====================================================================================

MAX_CONSECUTIVE_BAD = 50
_LOG_BAD_LIMIT = 20


def _read_json(json_path, what: str, layout: str):
    p = Path(json_path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: annotation file {p} not found. Expected layout: {layout}")
    with open(p) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of entries. Expected layout: {layout}")
    return data


def _group_by_image(entries) -> tuple[list[str], list[list[str]]]:
    """Entries of one image (a list caption, or several pair entries) -> one image with its
    captions, in first-occurrence order. A missing/empty caption stays as "" (a bad sample)."""
    where: dict[str, int] = {}
    images, captions = [], []
    for e in entries:
        name = str(e.get("image", ""))
        caps = e.get("caption", "")
        caps = [caps] if isinstance(caps, str) else list(caps) or [""]
        if name not in where:
            where[name] = len(images)
            images.append(name)
            captions.append([])
        captions[where[name]].extend(caps)
    return images, captions


_PAIR_LAYOUT = ('a JSON list [{"image": "<path relative to image_root>", "caption": "<text>" or '
                '["<text>", ...]}, ...] (ALBEF/BLIP COCO-Karpathy format), images under image_root')


class PairDataset(torch.utils.data.Dataset):
    """ALBEF/BLIP JSON list of {"image", "caption": str | [str]} + image root.
    Indexed by (epoch, index) (see ResumableSampler); all randomness from
    np.random.default_rng([seed, epoch, index])."""

    def __init__(self, json_path, image_root, tokenizer: Tokenizer, text_len: int,
                 transform: ImageTransform, masker: Masker | None, seed: int,
                 in_memory: bool = False, one_caption_per_image: bool = False):
        entries = _read_json(json_path, "PairDataset", _PAIR_LAYOUT)
        self.json_path, self.image_root = str(json_path), Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"PairDataset: image_root {self.image_root} is not a directory. "
                                    f"Expected layout: {_PAIR_LAYOUT}")
        self.images, self.captions = _group_by_image(entries)
        self.one_caption = one_caption_per_image
        if one_caption_per_image:
            self.pairs = None
        else:  # flat (image, caption) index
            self.pairs = np.array([(i, j) for i, c in enumerate(self.captions) for j in range(len(c))],
                                  dtype=np.int64).reshape(-1, 2)
        self.tokenizer, self.text_len, self.transform, self.masker, self.seed = (
            tokenizer, text_len, transform, masker, seed)
        self.bad_count = 0
        self._cache = None
        if in_memory:
            self._cache = [self._decode(i) for i in range(len(self.images))]

    def __len__(self):
        return len(self.images) if self.one_caption else len(self.pairs)

    def _decode(self, i: int):
        try:
            return np.asarray(load_image(self.image_root / self.images[i]))
        except BadSample as e:
            return e

    def _image(self, i: int) -> Image.Image:
        if self._cache is not None:
            c = self._cache[i]
            if isinstance(c, BadSample):
                raise c
            return Image.fromarray(c)
        return load_image(self.image_root / self.images[i])

    def _sample(self, index: int, rng) -> dict:
        if self.one_caption:
            img_i = index
            caps = self.captions[index]
            cap = caps[int(rng.integers(len(caps)))] if len(caps) > 1 else caps[0]
        else:
            img_i, j = self.pairs[index]
            cap = self.captions[img_i][j]
        try:
            ids, mask = self.tokenizer.pad(cap, self.text_len)
        except ValueError as e:
            raise BadSample(f"{self.images[img_i]}: {e}") from None
        image = self.transform(self._image(int(img_i)), rng)
        out = {"image": image, "text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask),
               "index": int(index)}
        if self.masker is not None:
            out.update({k: torch.from_numpy(v) for k, v in self.masker(rng, ids, mask).items()})
        return out

    def __getitem__(self, key) -> dict:
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        epoch, index = int(epoch), int(index)
        n = len(self)
        rng = np.random.default_rng([self.seed, epoch, index])
        cur, errors = index, []
        for attempt in range(1, MAX_CONSECUTIVE_BAD + 1):
            try:
                out = self._sample(cur, rng)
                out["bad"] = attempt - 1
                return out
            except BadSample as e:
                self.bad_count += 1
                errors.append(str(e))
                if self.bad_count <= _LOG_BAD_LIMIT:
                    log.warning("bad sample %d skipped (%s)%s", cur, e,
                                " [further bad samples are only counted]" if self.bad_count == _LOG_BAD_LIMIT else "")
                # replacement: a function of (seed, epoch, failed index, attempt) only
                rng = np.random.default_rng([self.seed, epoch, index, attempt])
                cur = int(rng.integers(n))
        raise RuntimeError(f"{self.json_path}: {MAX_CONSECUTIVE_BAD} consecutive bad samples starting at "
                           f"index {index} (epoch {epoch}); is image_root {self.image_root} right? "
                           f"Last errors: {errors[-3:]}")


def load_retrieval_split(json_path, image_root) -> tuple[list[str], list[str], torch.Tensor]:
    """Evaluation split -> (image paths, captions flattened in image order, text_to_image).
    Any number of captions per image."""
    entries = _read_json(json_path, "retrieval split", _PAIR_LAYOUT)
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"retrieval split: image_root {root} is not a directory. "
                                f"Expected layout: {_PAIR_LAYOUT}")
    names, caps_per_image = _group_by_image(entries)
    images, captions, t2i = [], [], []
    for i, (name, caps) in enumerate(zip(names, caps_per_image)):
        images.append(str(root / name))
        captions.extend(caps)
        t2i.extend([i] * len(caps))
    return images, captions, torch.tensor(t2i, dtype=torch.long)


_IMG_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> -> (image tensor, label). Classes = sorted subfolder names;
    class_names (human-readable, for zero-shot prompts) from an optional file: .txt one
    name per line in sorted-folder order, or .json {folder: name} / [names]."""

    def __init__(self, root, transform: ImageTransform, class_names_file=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset: {self.root} is not a directory. Expected "
                                    "layout: root/<class name>/<image>.jpg, one subfolder per class")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"ImageFolderDataset: no class subfolders in {self.root}")
        self.samples = [(str(p), ci) for ci, c in enumerate(self.classes)
                        for p in sorted((self.root / c).rglob("*")) if p.suffix.lower() in _IMG_EXT]
        self.class_names = list(self.classes)
        if class_names_file is not None:
            p = Path(class_names_file)
            if p.suffix == ".json":
                d = json.loads(p.read_text())
                self.class_names = [d[c] for c in self.classes] if isinstance(d, dict) else list(d)
            else:
                self.class_names = [l.strip() for l in p.read_text().splitlines() if l.strip()]
            if len(self.class_names) != len(self.classes):
                raise ValueError(f"{p}: {len(self.class_names)} names for {len(self.classes)} class folders")
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(load_image(path), None), label


# ---------------------------------------------------------------- tar shards ------

def expand_braces(pattern: str) -> list[str]:
    """"data/{00000..00003}.tar" -> data/00000.tar ... data/00003.tar (zero padding kept);
    also {a,b} alternatives and several groups; '::' separates several patterns."""
    out = []
    for pat in pattern.split("::"):
        m = re.search(r"\{([^{}]*)\}", pat)
        if not m:
            out.append(pat)
            continue
        body, pre, post = m.group(1), pat[:m.start()], pat[m.end():]
        r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if r:
            a, b = r.group(1), r.group(2)
            width = len(a) if a.startswith("0") else 0
            alts = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
        else:
            alts = body.split(",")
        for alt in alts:
            out.extend(expand_braces(pre + alt + post))
    return out


def _tar_samples(path: str):
    """Yield (key, {ext: bytes}) from a webdataset tar, grouping consecutive members by key
    (basename up to the first dot)."""
    key, cur = None, {}
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            d, base = os.path.split(m.name)
            if "." not in base:
                continue
            k, ext = base.split(".", 1)
            k = os.path.join(d, k)
            if k != key and key is not None:
                yield key, cur
                cur = {}
            key = k
            cur[ext.lower()] = tf.extractfile(m).read()
    if key is not None:
        yield key, cur


def _tar_count(path: str) -> int:
    keys = set()
    with tarfile.open(path, "r:*") as tf:
        for m in tf.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and "." in base:
                keys.add(os.path.join(os.path.dirname(m.name), base.split(".", 1)[0]))
    return len(keys)


class ShardDataset(torch.utils.data.IterableDataset):
    """img2dataset/webdataset tar shards -> an endless stream of PairDataset-like samples.

    Epoch e: the shard list is permuted with (seed, e) and dealt round-robin to
    world_size * num_workers slots; global step t of the epoch is served by rank `rank`,
    virtual worker t % num_workers. Each slot reads its shards (cycling them if they run
    short) through a shuffle buffer and yields exactly local_batch samples per step it
    serves, so every rank sees the same number of steps per epoch:
    steps_per_epoch = epoch_samples // (local_batch * world_size). local_batch is set by
    make_loader; the start step by load_state_dict(state_at(step)), start_step, or the
    ResumableSampler(len(ds), global_batch, start_step=step) handed to make_loader."""

    IMAGE_EXT = ("jpg", "jpeg", "png", "webp")

    def __init__(self, urls, tokenizer: Tokenizer, text_len: int, transform: ImageTransform,
                 masker: Masker | None, seed: int, epoch_samples: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, local_batch: int | None = None, start_step: int = 0):
        self.shards = expand_braces(urls) if isinstance(urls, str) else [str(u) for u in urls]
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"ShardDataset: {len(missing)} shard(s) missing, e.g. {missing[0]}. "
                                    "Expected tar files with key.jpg|png|webp + key.txt (+ key.json) "
                                    "per sample (img2dataset/webdataset layout)")
        self.tokenizer, self.text_len, self.transform, self.masker, self.seed = (
            tokenizer, text_len, transform, masker, seed)
        self.epoch_samples, self.rank, self.world_size = epoch_samples, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.local_batch = local_batch  # make_loader sets it when None
        self.start_step = start_step
        self.bad_count = 0
        self._counts: dict[str, int] = {}

    def __len__(self):  # samples per epoch (all ranks), like len(PairDataset)
        return self.epoch_samples

    @property
    def steps_per_epoch(self) -> int:
        if self.local_batch is None:
            raise ValueError("ShardDataset: local_batch unknown; pass it or build the loader with make_loader")
        spe = self.epoch_samples // (self.local_batch * self.world_size)
        if spe < 1:
            raise ValueError(f"epoch_samples={self.epoch_samples} < local_batch*world_size")
        return spe

    # resume: the trainer passes the step it resumes from (state_at(step) -> load_state_dict,
    # or a ResumableSampler(len(ds), global_batch, start_step=step) given to make_loader)
    def state_at(self, step: int) -> dict:
        return {"epoch": step // self.steps_per_epoch, "step": step % self.steps_per_epoch}

    def state_dict(self) -> dict:
        return self.state_at(self.start_step)

    def load_state_dict(self, d: dict):
        self.start_step = int(d["epoch"]) * self.steps_per_epoch + int(d["step"])

    def _slot_shards(self, epoch: int, slot: int, n_slots: int) -> list[str]:
        if len(self.shards) < n_slots:
            raise ValueError(f"ShardDataset: {len(self.shards)} shards for {n_slots} readers "
                             "(world_size x workers); use more shards or fewer workers")
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm[slot::n_slots]]

    def _pass(self, shards: list[str], skip: list):
        """One pass over `shards`, first dropping skip[0] samples (whole shards by their
        header count, then members without decoding)."""
        for sh in shards:
            if skip[0] > 0:
                if sh not in self._counts:
                    self._counts[sh] = _tar_count(sh)
                if self._counts[sh] <= skip[0]:
                    skip[0] -= self._counts[sh]
                    continue
            for key, parts in _tar_samples(sh):
                if skip[0] > 0:
                    skip[0] -= 1
                    continue
                yield sh, key, parts

    def _stream(self, shards: list[str], epoch: int, slot: int, skip: int):
        """Endless stream for one slot and epoch: pass 0 over its shards, then further
        passes in new orders if the epoch asks for more samples. Each pass goes through
        its own shuffle buffer, drained at the end of the pass, so a pass yields each of
        its samples exactly once."""
        skip_left = [skip]
        for cycle in itertools.count():
            order = shards if cycle == 0 else [
                shards[i] for i in np.random.default_rng([self.seed, epoch, slot, cycle]).permutation(len(shards))]
            if cycle > 0 and not any(self._counts.setdefault(sh, _tar_count(sh)) for sh in shards):
                raise RuntimeError(f"ShardDataset: shards {shards[:3]}... hold no samples")
            raw = self._pass(order, skip_left)
            if self.shuffle_buffer <= 1:
                yield from raw
                continue
            rng = np.random.default_rng([self.seed, epoch, slot, cycle, 1 << 30])
            buf = []
            for item in raw:
                if len(buf) < self.shuffle_buffer:
                    buf.append(item)
                    continue
                i = int(rng.integers(len(buf)))
                buf[i], item = item, buf[i]
                yield item
            for i in rng.permutation(len(buf)):
                yield buf[i]

    def _decode(self, sh, key, parts, epoch: int) -> dict:
        img_ext = next((e for e in self.IMAGE_EXT if e in parts), None)
        if img_ext is None:
            raise BadSample(f"{sh}:{key}: no image (.jpg/.png/.webp) in sample")
        if "txt" not in parts:
            raise BadSample(f"{sh}:{key}: no .txt caption in sample")
        cap = parts["txt"].decode("utf-8", errors="replace")
        try:
            ids, mask = self.tokenizer.pad(cap, self.text_len)
        except ValueError as e:
            raise BadSample(f"{sh}:{key}: {e}") from None
        base = os.path.basename(key)
        index = int(base) if base.isdigit() else zlib.crc32(f"{sh}:{key}".encode())
        rng = np.random.default_rng([self.seed, epoch, index])  # per sample: resume-safe
        image = self.transform(load_image(parts[img_ext]), rng)
        out = {"image": image, "text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask),
               "index": index}
        if self.masker is not None:
            out.update({k: torch.from_numpy(v) for k, v in self.masker(rng, ids, mask).items()})
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        K, w = (1, 0) if info is None else (info.num_workers, info.id)
        S, lb, s0 = self.steps_per_epoch, self.local_batch, self.start_step
        v = (w + s0) % K  # virtual worker: global step t is served by virtual worker t % K
        slot, n_slots = self.rank * K + v, self.world_size * K
        t = s0 + w  # first global step this physical worker serves
        while True:
            epoch = t // S
            first = epoch * S + (v - epoch * S) % K  # first step of this epoch that slot serves
            done = len(range(first, t, K))  # steps of this epoch it served before (resume)
            stream = self._stream(self._slot_shards(epoch, slot, n_slots), epoch, slot, done * lb)
            while t < (epoch + 1) * S:
                for _ in range(lb):
                    bad = 0
                    for attempt in range(MAX_CONSECUTIVE_BAD + 1):
                        sh, key, parts = next(stream)
                        try:
                            out = self._decode(sh, key, parts, epoch)
                            break
                        except BadSample as e:
                            bad += 1
                            self.bad_count += 1
                            if self.bad_count <= _LOG_BAD_LIMIT:
                                log.warning("bad sample skipped (%s)", e)
                    else:
                        raise RuntimeError(f"ShardDataset: {MAX_CONSECUTIVE_BAD} consecutive bad samples "
                                           f"in {sh}")
                    out["bad"] = bad
                    yield out
                t += K


# =====================================================================================
# Collate, sampler, loader
# =====================================================================================

BATCH_KEYS = [("image", "images"), ("text_ids", "text_ids"), ("text_mask", "text_mask"),
              ("image_mask_uni", "image_mask_uni"), ("image_mask_joint", "image_mask_joint"),
              ("text_input_uni", "text_input_uni"), ("text_input_joint", "text_input_joint"),
              ("text_masked_uni", "text_masked_uni"), ("text_masked_joint", "text_masked_joint"),
              ("text_labels_uni", "text_labels_uni"), ("text_labels_joint", "text_labels_joint")]


def collate(samples: list[dict]) -> dict:
    """Samples -> DESIGN.md's batch dict (+ "bad": long scalar, bad samples skipped)."""
    batch = {}
    for src, dst in BATCH_KEYS:
        if src in samples[0]:
            batch[dst] = torch.stack([s[src] for s in samples])
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    batch["bad"] = torch.tensor(sum(int(s.get("bad", 0)) for s in samples), dtype=torch.long)
    return batch


class ResumableSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) stream for one rank. Epoch e is the permutation
    default_rng([seed, e]) of range(num_samples), cut into global batches of
    `global_batch` (the partial last one dropped); rank r takes the r-th of world_size
    equal contiguous slices of each. State = (epoch, position), position = global
    samples consumed in the epoch = (step % steps_per_epoch) * global_batch; the trainer
    gets it from the step it has taken (state_at(step)), never from the iterator, which
    prefetches."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global_batch={global_batch} is not divisible by world_size={world_size}")
        if num_samples < global_batch:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one global batch ({global_batch})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.N, self.G, self.rank, self.W, self.seed = num_samples, global_batch, rank, world_size, seed
        self.local = global_batch // world_size
        self._state = self.state_at(start_step)

    @property
    def steps_per_epoch(self) -> int:
        return self.N // self.G

    def state_at(self, step: int) -> dict:
        return {"epoch": step // self.steps_per_epoch, "position": (step % self.steps_per_epoch) * self.G}

    def state_dict(self) -> dict:
        """The state this sampler starts from on its next iteration."""
        return dict(self._state)

    def load_state_dict(self, d: dict):
        pos = int(d["position"])
        if pos % self.G or pos > self.steps_per_epoch * self.G:
            raise ValueError(f"sampler position {pos} is not a multiple of global_batch={self.G} "
                             f"within an epoch of {self.steps_per_epoch} steps (different batch size?)")
        self._state = {"epoch": int(d["epoch"]), "position": pos}

    def __iter__(self):
        epoch, pos = self._state["epoch"], self._state["position"]
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.N)
            for b in range(pos // self.G, self.steps_per_epoch):
                start = b * self.G + self.rank * self.local
                for i in perm[start:start + self.local]:
                    yield (epoch, int(i))
            epoch, pos = epoch + 1, 0


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(dataset, sampler, local_batch: int, workers: int = 0) -> torch.utils.data.DataLoader:
    kw = dict(batch_size=local_batch, num_workers=workers, collate_fn=collate, drop_last=True,
              pin_memory=torch.cuda.is_available())
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if isinstance(dataset, ShardDataset):
            dataset.local_batch = local_batch
            if isinstance(sampler, ResumableSampler):  # only its start state is used
                if sampler.G != local_batch * dataset.world_size:
                    raise ValueError("sampler global_batch != local_batch * world_size")
                st = sampler.state_dict()
                dataset.start_step = st["epoch"] * dataset.steps_per_epoch + st["position"] // sampler.G
            elif sampler is not None:
                raise ValueError("ShardDataset streams; pass no sampler (or a ResumableSampler for its start step)")
        elif sampler is not None:
            raise ValueError("an IterableDataset takes no sampler")
        return torch.utils.data.DataLoader(dataset, **kw)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, **kw)


def loader_benchmark(dataset, sampler, local_batch: int, workers_list=(0, 1, 2), batches: int = 20) -> list[dict]:
    """Images/s through decode + transform + mask + collate for each worker count
    (worker start-up and 2 warm-up batches excluded)."""
    res = []
    for w in workers_list:
        loader = make_loader(dataset, sampler, local_batch, w)
        it = iter(loader)
        t0 = time.perf_counter()
        for _ in range(2):
            next(it)
        t1 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t1
        res.append({"workers": w, "batches": batches, "local_batch": local_batch,
                    "seconds": round(dt, 3), "images_per_s": round(batches * local_batch / dt, 1),
                    "startup_s": round(t1 - t0, 3)})
        del it, loader
    return res


# =====================================================================================
# Built-in dataset: procedurally generated scenes with 5 captions each
# =====================================================================================
# Scenes of 1-3 objects (5 shapes x 8 colours x 2 sizes), distinct shapes and colours
# within a scene, non-overlapping, every pair in an unambiguous relation (the dominant
# axis offset is >= 1.5x the other). Captions state every object (size, colour, shape)
# and either its region (1 object) or relations (2 objects: one; 3 objects: two forming a
# path). HELD_OUT (colour, shape) pairs never occur in train/val/test; every test_comp
# image contains at least one. Within each evaluation split no caption is true of another
# image of that split (checked on structured facts while generating).

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
COLOURS = {"red": (215, 40, 40), "orange": (240, 140, 20), "yellow": (235, 220, 40),
           "green": (40, 170, 60), "cyan": (40, 200, 210), "blue": (40, 80, 220),
           "purple": (150, 60, 200), "white": (235, 235, 235)}
COLOUR_NAMES = list(COLOURS)
SIZES = ["small", "large"]
SIZE_WORDS = {"small": ["small", "tiny"], "large": ["large", "big"]}
# one held-out shape per colour (each shape held out for 1-2 colours, seen with the others)
HELD_OUT = [(c, SHAPES[(2 * i + 1) % len(SHAPES)]) for i, c in enumerate(COLOUR_NAMES)]
REL_WORDS = {"left": ["to the left of", "left of"], "right": ["to the right of", "right of"],
             "above": ["above", "over"], "below": ["below", "under"]}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
REGION_WORDS = {  # (col, row) -> phrases; col/row 0..2 = left/center/right, top/middle/bottom
    (0, 0): ["in the top left corner", "at the top left"], (1, 0): ["at the top", "in the top middle"],
    (2, 0): ["in the top right corner", "at the top right"], (0, 1): ["on the left", "at the left side"],
    (1, 1): ["in the center", "in the middle"], (2, 1): ["on the right", "at the right side"],
    (0, 2): ["in the bottom left corner", "at the bottom left"], (1, 2): ["at the bottom", "in the bottom middle"],
    (2, 2): ["in the bottom right corner", "at the bottom right"]}
ONE_TEMPLATES = ["a {O} {R}", "{R} there is a {O}", "there is a {O} {R}", "a single {O} {R}",
                 "a picture of a {O} {R}", "a {O} {R} of the image"]
TWO_TEMPLATES = ["a {X} {r} a {Y}", "there is a {X} {r} a {Y}", "a {X} and a {Y} with the {xs} {r} the {ys}",
                 "the {X} is {r} the {Y}", "a picture of a {X} {r} a {Y}", "a {X} sits {r} a {Y}"]
THREE_TEMPLATES = ["a {X} {r1} a {Y} which is {r2} a {Z}", "a {X} {r1} a {Y} and a {Z} {r3} the {ys}",
                   "a {X} {r1} a {Y}, the {Z} is {r3} the {ys}"]  # all captions <= 24 tokens
PROMPT_TEMPLATES = ["a {}", "a photo of a {}", "there is a {}", "a picture of a {}", "a {} in the image"]
EDIT_COLOUR = ["the same scene with the {shape} {new}", "the same picture but the {shape} is {new}",
               "make the {shape} {new}"]
EDIT_SHAPE = ["the same scene with the {old} replaced by a {new}", "the same picture but the {old} is a {new}",
              "make the {old} a {new}"]
SYNTH_VERSION = 1
_SS = 4  # supersampling per pixel side for anti-aliased shapes
_coverage_cache: dict = {}


def _coverage(shape: str, d: int) -> np.ndarray:
    """(d, d) float coverage in [0, 1] of a shape filling a d x d box."""
    key = (shape, d)
    if key not in _coverage_cache:
        u = (np.arange(d * _SS) + 0.5) / (d * _SS) * 2 - 1
        x, y = np.meshgrid(u, u)  # y grows downwards
        if shape == "circle":
            m = x * x + y * y <= 1
        elif shape == "square":
            m = (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
        elif shape == "triangle":  # apex up
            m = np.abs(x) <= (y + 1) / 2
        elif shape == "diamond":
            m = np.abs(x) + np.abs(y) <= 1
        elif shape == "cross":
            m = ((np.abs(x) <= 0.34) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.34) & (np.abs(x) <= 0.95))
        else:
            raise ValueError(shape)
        _coverage_cache[key] = m.reshape(d, _SS, d, _SS).mean(axis=(1, 3))
    return _coverage_cache[key]


def _obj_px(size: str, S: int) -> int:
    return max(4, int(round((0.40 if size == "large" else 0.25) * S)))


def _center(o):
    x0, y0, x1, y1 = o["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _desc(o) -> tuple:
    return (o["size"], o["colour"], o["shape"])


def _relation(a, b) -> tuple:
    """Canonical fact for a pair: ("h", left, right) or ("v", top, bottom)."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    if abs(bx - ax) > abs(by - ay):
        return ("h", _desc(a), _desc(b)) if bx > ax else ("h", _desc(b), _desc(a))
    return ("v", _desc(a), _desc(b)) if by > ay else ("v", _desc(b), _desc(a))


def _rel_word(a, b) -> str:
    """Relation of a to b: left/right/above/below."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    if abs(bx - ax) > abs(by - ay):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def _region(o, S: int) -> tuple:
    cx, cy = _center(o)
    return min(2, int(cx * 3 // S)), min(2, int(cy * 3 // S))


def _place(rng, sizes, S: int, tries: int = 60):
    """Integer boxes for objects of the given pixel sizes: 1 px margin, >= 1 px gaps, every
    pair clearly in one relation; None if none of `tries` random placements works."""
    d = np.asarray(sizes)
    n = len(d)
    x0 = 1 + np.floor(rng.random((tries, n)) * (S - d - 1)).astype(int)  # (T, n)
    y0 = 1 + np.floor(rng.random((tries, n)) * (S - d - 1)).astype(int)
    x1, y1 = x0 + d, y0 + d
    ok = np.ones(tries, dtype=bool)
    for i, j in itertools.combinations(range(n), 2):
        sep = (x1[:, i] + 1 <= x0[:, j]) | (x1[:, j] + 1 <= x0[:, i]) | \
              (y1[:, i] + 1 <= y0[:, j]) | (y1[:, j] + 1 <= y0[:, i])
        dx = np.abs((x0[:, i] + x1[:, i]) - (x0[:, j] + x1[:, j])) / 2
        dy = np.abs((y0[:, i] + y1[:, i]) - (y0[:, j] + y1[:, j])) / 2
        ok &= sep & (np.maximum(dx, dy) >= 1.5 * np.minimum(dx, dy))
    if n == 1:  # single object: keep its centre off the region borders
        for c in ((x0[:, 0] + x1[:, 0]) / 2, (y0[:, 0] + y1[:, 0]) / 2):
            for t in (S / 3, 2 * S / 3):
                ok &= np.abs(c - t) >= 1.5
    k = np.flatnonzero(ok)
    if len(k) == 0:
        return None
    k = k[0]
    return [(int(x0[k, i]), int(y0[k, i]), int(x1[k, i]), int(y1[k, i])) for i in range(n)]


def _sample_scene(rng, S: int, comp: bool) -> dict:
    held = set(HELD_OUT)
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    while True:  # keep n fixed so that hard-to-place 3-object scenes are not under-sampled
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
        colours = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))[:n]]
        if comp:  # the first object is a held-out combination
            c, s = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
            shapes = [s] + [x for x in shapes if x != s][:n - 1]
            colours = [c] + [x for x in colours if x != c][:n - 1]
        combos = list(zip(colours, shapes))
        if not comp and any(cs in held for cs in combos):
            continue
        sizes = [SIZES[i] for i in rng.integers(0, 2, n)]
        boxes = _place(rng, [_obj_px(z, S) for z in sizes], S)
        if boxes is None:
            continue
        objs = [{"shape": s, "colour": c, "size": z, "box": list(b),
                 "jitter": [int(j) for j in rng.integers(-8, 9, 3)]}
                for (c, s), z, b in zip(combos, sizes, boxes)]
        bg = {"gray": int(rng.integers(35, 96)), "kind": ["plain", "noise", "gradient"][int(rng.integers(3))],
              "seed": int(rng.integers(2 ** 31)), "axis": int(rng.integers(2)), "sign": int(rng.choice([-1, 1]))}
        return {"objects": objs, "bg": bg}


def _render(scene: dict, S: int) -> np.ndarray:
    bg = scene["bg"]
    img = np.full((S, S, 3), float(bg["gray"]))
    if bg["kind"] == "noise":
        img += np.random.default_rng(bg["seed"]).normal(0, 4, (S, S, 1))
    elif bg["kind"] == "gradient":
        ramp = np.linspace(-10, 10, S) * bg["sign"]
        img += ramp[:, None, None] if bg["axis"] else ramp[None, :, None]
    for o in scene["objects"]:
        x0, y0, x1, y1 = o["box"]
        cov = _coverage(o["shape"], x1 - x0)[..., None]
        rgb = np.clip(np.array(COLOURS[o["colour"]]) + np.array(o["jitter"]), 0, 255)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - cov) + rgb * cov
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _captions(scene: dict, rng, S: int, k: int = 5) -> list[tuple[str, tuple]]:
    """k distinct captions with their facts (objects, relations, region)."""
    objs = scene["objects"]
    n = len(objs)
    out, seen = [], set()
    full = lambda o: f"{SIZE_WORDS[o['size']][int(rng.integers(2))]} {o['colour']} {o['shape']}"  # noqa: E731
    rel = lambda a, b: REL_WORDS[_rel_word(a, b)][int(rng.integers(2))]  # noqa: E731
    descs = frozenset(_desc(o) for o in objs)
    for _ in range(200):
        if n == 1:
            o = objs[0]
            reg = _region(o, S)
            t = ONE_TEMPLATES[int(rng.integers(len(ONE_TEMPLATES)))]
            text = t.format(O=full(o), R=REGION_WORDS[reg][int(rng.integers(2))])
            facts = (descs, frozenset(), (_desc(o), reg))
        elif n == 2:
            X, Y = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
            t = TWO_TEMPLATES[int(rng.integers(len(TWO_TEMPLATES)))]
            text = t.format(X=full(X), Y=full(Y), r=rel(X, Y), xs=X["shape"], ys=Y["shape"])
            facts = (descs, frozenset([_relation(X, Y)]), None)
        else:
            X, Y, Z = (objs[i] for i in rng.permutation(3))  # path X - Y - Z
            t = THREE_TEMPLATES[int(rng.integers(len(THREE_TEMPLATES)))]
            text = t.format(X=full(X), Y=full(Y), Z=full(Z), r1=rel(X, Y), r2=rel(Y, Z), r3=rel(Z, Y),
                            ys=Y["shape"])
            facts = (descs, frozenset([_relation(X, Y), _relation(Y, Z)]), None)
        if text not in seen:
            seen.add(text)
            out.append((text, facts))
            if len(out) == k:
                break
    return out


def _holds(facts: tuple, scene: dict, S: int) -> bool:
    """Is a caption's content true of a scene (the scene may hold more objects)?"""
    descs, rels, region = facts
    m = {_desc(o): o for o in scene["objects"]}
    if not all(d in m for d in descs):
        return False
    for axis, d1, d2 in rels:
        if _relation(m[d1], m[d2]) != (axis, d1, d2):
            return False
    return region is None or _region(m[region[0]], S) == region[1]


class _UniqueSplit:
    """Accepts a scene only if none of its captions is true of an accepted scene and none
    of the accepted captions is true of it."""

    def __init__(self, S: int):
        self.S, self.scenes = S, []
        self.by_desc: dict = collections.defaultdict(set)
        self.caps: dict = collections.defaultdict(list)

    def try_add(self, scene: dict, caps: list) -> bool:
        for _, facts in caps:
            cand = set.intersection(*(self.by_desc.get(d, set()) for d in facts[0]))
            if any(_holds(facts, self.scenes[j], self.S) for j in cand):
                return False
        descs = [_desc(o) for o in scene["objects"]]
        for r in range(1, len(descs) + 1):
            for sub in itertools.combinations(descs, r):
                if any(_holds(f, scene, self.S) for f in self.caps.get(frozenset(sub), [])):
                    return False
        j = len(self.scenes)
        self.scenes.append(scene)
        for d in descs:
            self.by_desc[d].add(j)
        for _, facts in caps:
            self.caps[facts[0]].append(facts)
        return True


def _main_object(scene: dict) -> dict:
    """Label rule: the largest object; ties -> the one nearest the top, then left."""
    return min(scene["objects"], key=lambda o: (-SIZES.index(o["size"]), _center(o)[1], _center(o)[0]))


def _synth_sizes(n_images: int) -> dict:
    return {"train": n_images, "val": max(10, n_images // 20), "test": max(20, n_images // 10),
            "test_comp": max(20, n_images // 10)}


def _png_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _synth_paths(root: Path) -> dict:
    return {"root": str(root), "train": str(root / "train.json"), "val": str(root / "val.json"),
            "test": str(root / "test.json"), "test_comp": str(root / "test_comp.json"),
            "image_root": str(root), "tokenizer": str(root / "bpe.tiktoken"),
            "attributes": str(root / "attributes.json"), "boxes": str(root / "boxes.json"),
            "edits": str(root / "edits.json")}


def _build_synth(tmp: Path, n_images: int, seed: int, image_size: int, bpe_vocab: int) -> dict:
    S = image_size
    (tmp / "images").mkdir(parents=True)
    sizes = _synth_sizes(n_images)
    split_id = {"train": 0, "val": 1, "test": 2, "test_comp": 3}
    records: dict[str, list] = {}
    scenes_by_split: dict[str, list] = {}
    test_checker = None
    for split, n in sizes.items():
        rng = np.random.default_rng([seed, split_id[split]])
        checker = None if split == "train" else _UniqueSplit(S)
        recs, scenes = [], []
        attempts = 0
        while len(recs) < n:
            attempts += 1
            if attempts > 200 * n + 1000:
                raise RuntimeError(f"synth: could not find {n} unique {split} scenes at image_size={S}")
            scene = _sample_scene(rng, S, comp=(split == "test_comp"))
            caps = _captions(scene, rng, S)
            if len(caps) < 5 or (checker is not None and not checker.try_add(scene, caps)):
                continue
            rel = f"images/{split}_{len(recs):05d}.png"
            (tmp / rel).write_bytes(_png_bytes(_render(scene, S)))
            recs.append({"image": rel, "caption": [c for c, _ in caps]})
            scenes.append(scene)
        records[split], scenes_by_split[split] = recs, scenes
        if split == "test":
            test_checker = checker
    # COCO-Karpathy layout: train = one entry per pair, eval = grouped captions
    train_pairs = [{"image": r["image"], "caption": c} for r in records["train"] for c in r["caption"]]
    _dump(tmp / "train.json", train_pairs)
    for split in ("val", "test", "test_comp"):
        _dump(tmp / f"{split}.json", records[split])

    # edits: one attempted per test image; target rendered, unique within test + targets
    rng = np.random.default_rng([seed, 4])
    held = set(HELD_OUT)
    triplets, gallery = [], [r["image"] for r in records["test"]]
    for i, src in enumerate(scenes_by_split["test"]):
        for _attempt in range(6):  # a few tries: the target must stay unique in the gallery
            k = int(rng.integers(len(src["objects"])))
            o = src["objects"][k]
            used_c = {x["colour"] for x in src["objects"]}
            used_s = {x["shape"] for x in src["objects"]}
            if rng.random() < 0.6:
                choices = [c for c in COLOUR_NAMES if c not in used_c and (c, o["shape"]) not in held]
                new = choices[int(rng.integers(len(choices)))]
                text = EDIT_COLOUR[int(rng.integers(3))].format(shape=o["shape"], new=new)
                change = {"colour": new}
            else:
                choices = [s for s in SHAPES if s not in used_s and (o["colour"], s) not in held]
                if not choices:
                    continue
                new = choices[int(rng.integers(len(choices)))]
                text = EDIT_SHAPE[int(rng.integers(3))].format(old=o["shape"], new=new)
                change = {"shape": new}
            tgt = json.loads(json.dumps(src))
            tgt["objects"][k].update(change)
            caps = _captions(tgt, rng, S)
            if len(caps) < 5 or not test_checker.try_add(tgt, caps):
                continue
            rel = f"images/edit_{len(triplets):05d}.png"
            (tmp / rel).write_bytes(_png_bytes(_render(tgt, S)))
            gallery.append(rel)
            triplets.append({"source": records["test"][i]["image"], "text": text, "target": rel,
                             "target_index": len(gallery) - 1, "target_caption": [c for c, _ in caps],
                             "edit": {"object": o["shape"], **change}})
            break
    _dump(tmp / "edits.json", {"gallery": gallery, "triplets": triplets,
                               "note": "query = (source image, text); the answer is target, one of gallery "
                                       "(all test images + all edit targets); no caption of a gallery "
                                       "image is true of another gallery image"})

    # attribute labels (zero-shot classification / linear probe) and boxes
    objects = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]
    attrs = {"classes": {"object": objects, "shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES,
                         "count": ["one", "two", "three"]},
             "templates": PROMPT_TEMPLATES,
             "held_out": [f"{c} {s}" for c, s in HELD_OUT],
             "label_rule": "object/shape/colour/size describe the main object: the largest one, ties broken "
                           "by the topmost then leftmost; count = number of objects - 1 (index into "
                           "classes.count). Single-object images (count == 0) make a clean zero-shot task.",
             "images": {}}
    boxes = {"convention": "box = [x0, y0, x1, y1] in pixels, x1/y1 exclusive, image_size " f"{S}", }
    for split, scenes in scenes_by_split.items():
        rows = []
        for r, sc in zip(records[split], scenes):
            mo = _main_object(sc)
            rows.append({"image": r["image"], "object": objects.index(f"{mo['colour']} {mo['shape']}"),
                         "shape": SHAPES.index(mo["shape"]), "colour": COLOUR_NAMES.index(mo["colour"]),
                         "size": SIZES.index(mo["size"]), "count": len(sc["objects"]) - 1})
        attrs["images"][split] = rows
        if split != "train":
            boxes[split] = [{"image": r["image"],
                             "objects": [{"name": f"{o['colour']} {o['shape']}",
                                          "phrase": f"{o['size']} {o['colour']} {o['shape']}",
                                          "shape": o["shape"], "colour": o["colour"], "size": o["size"],
                                          "box": o["box"]} for o in sc["objects"]]}
                            for r, sc in zip(records[split], scenes)]
    _dump(tmp / "attributes.json", attrs)
    _dump(tmp / "boxes.json", boxes)

    tok = train_bpe([p["caption"] for p in train_pairs], bpe_vocab, tmp / "bpe.tiktoken")
    lens = [len(tok.encode(c)) for r in itertools.chain(*records.values()) for c in r["caption"]]
    return {"version": SYNTH_VERSION, "n_images": n_images, "seed": seed, "image_size": S,
            "bpe_vocab": bpe_vocab, "counts": {k: len(v) for k, v in records.items()},
            "train_pairs": len(train_pairs), "edits": len(triplets), "vocab_size": tok.vocab_size,
            "max_caption_tokens": max(lens), "held_out": [f"{c} {s}" for c, s in HELD_OUT]}


def _dump(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))
        f.write("\n")


def _synth_complete(root: Path, params: dict) -> bool | None:
    """True: a complete set with these params; False: ours but incomplete/other params
    (mismatch reported by the caller); None: no manifest."""
    man = root / "synth.json"
    if not man.is_file():
        return None
    try:
        m = json.loads(man.read_text())
    except ValueError:
        return False
    if any(m.get(k) != v for k, v in params.items()):
        return False
    return all(Path(p).exists() for p in _synth_paths(root).values())


def _generate(root: Path, n_images: int, seed: int, image_size: int, bpe_vocab: int,
              install) -> dict:
    """Build the set in a temporary sibling of root, write the manifest last (it marks the
    set complete), then install(tmp) moves it into place; the temporary dir never stays."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{time.time_ns()}"
    t0 = time.perf_counter()
    try:
        manifest = _build_synth(tmp, n_images, seed, image_size, bpe_vocab)
        manifest["generation_seconds"] = round(time.perf_counter() - t0, 2)
        _dump(tmp / "synth.json", manifest)
        install(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _synth_paths(root)


def _refuse_foreign(root: Path):
    if root.exists() and any(root.iterdir()) and not (root / "synth.json").exists():
        raise FileExistsError(f"{root} exists and is not a built-in dataset (no synth.json); "
                              "choose an empty or new directory")


def make_synth(out_dir, n_images: int = 10000, seed: int = 0, image_size: int = 32,
               bpe_vocab: int = 4096) -> dict:
    """Generate the built-in set into out_dir (built in a temp dir, then renamed; an
    existing built-in set there is replaced only once the new one is complete)."""
    root = Path(out_dir)
    _refuse_foreign(root)

    def install(tmp):
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(root, old)
        try:
            os.rename(tmp, root)
        except OSError:
            if old is not None:
                os.rename(old, root)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return _generate(root, n_images, seed, image_size, bpe_vocab, install)


def ensure_synth(out_dir, n_images: int = 10000, seed: int = 0, image_size: int = 32,
                 bpe_vocab: int = 4096) -> dict:
    """Return the paths of the built-in set in out_dir, generating it only if absent or
    incomplete. Safe when several processes (DDP ranks) call it at once."""
    root = Path(out_dir)
    params = {"version": SYNTH_VERSION, "n_images": n_images, "seed": seed, "image_size": image_size,
              "bpe_vocab": bpe_vocab}
    state = _synth_complete(root, params)
    if state:
        return _synth_paths(root)
    if state is False and (root / "synth.json").is_file():
        m = json.loads((root / "synth.json").read_text())
        differ = {k: (m.get(k), v) for k, v in params.items() if m.get(k) != v}
        if differ:
            raise FileExistsError(f"{root} holds a built-in set with other parameters {differ} "
                                  "(found, wanted); delete it or choose another directory")
    if state is None:
        _refuse_foreign(root)

    def install(tmp):
        if state is False or (root.exists() and not any(root.iterdir())):
            shutil.rmtree(root, ignore_errors=True)  # ours but incomplete, or an empty dir
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not _synth_complete(root, params):
                raise
    return _generate(root, n_images, seed, image_size, bpe_vocab, install)


# =====================================================================================
# CLI
# =====================================================================================


def builtin_pipeline(paths: dict, image_size: int = 32, patch_size: int = 4, text_len: int = 32,
                     seed: int = 0, image_ratio: float = 0.4, image_mode: str = "random",
                     text_prob: float = 0.15, max_predictions: int = 8, in_memory: bool = True):
    """(tokenizer, PairDataset) for the built-in set's train split with its recipe: no crop,
    no flip, one caption per image per epoch, images held in memory."""
    tok = load_tokenizer(paths["tokenizer"])
    masker = Masker((image_size // patch_size) ** 2, image_ratio, image_mode, text_prob, tok.vocab_size,
                    tok.word_starts(), max_predictions)
    ds = PairDataset(paths["train"], paths["image_root"], tok, text_len,
                     ImageTransform(image_size, train=True, crop=False, flip=False), masker, seed,
                     in_memory=in_memory, one_caption_per_image=True)
    return tok, ds


def main(argv=None):
    ap = argparse.ArgumentParser(description="OneR data tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="generate the built-in dataset")
    s.add_argument("out_dir")
    s.add_argument("--images", type=int, default=10000, help="training images (val/test scale with it)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image_size", type=int, default=32)
    b = sub.add_parser("bench", help="loader images/s (decode + transform + mask + collate)")
    b.add_argument("--data", default="data/synth", help="built-in set dir (generated if absent)")
    b.add_argument("--images", type=int, default=10000)
    b.add_argument("--json", default=None, help="benchmark an ALBEF/BLIP JSON instead (with --image_root)")
    b.add_argument("--image_root", default=None)
    b.add_argument("--tokenizer", default="gpt2", help="for --json")
    b.add_argument("--image_size", type=int, default=None, help="default: 32 built-in, 224 for --json")
    b.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--batches", type=int, default=30)
    b.add_argument("--no_memory", action="store_true", help="built-in set: decode from disk every time")
    a = ap.parse_args(argv)
    if a.cmd == "synth":
        t0 = time.perf_counter()
        paths = make_synth(a.out_dir, n_images=a.images, seed=a.seed, image_size=a.image_size)
        man = json.loads((Path(paths["root"]) / "synth.json").read_text())
        print(json.dumps(man, indent=1))
        print(f"wrote {paths['root']} in {time.perf_counter() - t0:.1f} s")
        return
    if a.json:
        S = a.image_size or 224
        tok = load_tokenizer(a.tokenizer)
        masker = Masker((S // 16) ** 2, 0.4, "random", 0.15, tok.vocab_size, tok.word_starts(), 8)
        ds = PairDataset(a.json, a.image_root or ".", tok, 32, ImageTransform(S, True, flip=True), masker, 0)
    else:
        paths = ensure_synth(a.data, n_images=a.images)
        t0 = time.perf_counter()
        _, ds = builtin_pipeline(paths, image_size=a.image_size or 32, in_memory=not a.no_memory)
        print(f"dataset ready in {time.perf_counter() - t0:.2f} s ({len(ds)} samples)")
    sampler = ResumableSampler(len(ds), a.batch, seed=0)
    torch.set_num_threads(1)
    for r in loader_benchmark(ds, sampler, a.batch, a.workers, a.batches):
        print(json.dumps(r))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
