"""OneR evaluation: the metrics of METHOD.md §6 and the modality-gap measures of issue 7.

    python eval.py --checkpoint runs/demo/best.pt                 # built-in test retrieval
    python eval.py --checkpoint runs/demo/best.pt --all           # every built-in evaluation
    python eval.py --checkpoint CKPT --coco DIR | --flickr DIR | --retrieval JSON --image_root DIR
    python eval.py --checkpoint CKPT --zeroshot DIR [--classnames FILE] [--templates FILE]
    python eval.py --checkpoint CKPT --linear_probe TRAIN_DIR VAL_DIR
    python eval.py --checkpoint CKPT --localize IMAGE "text" [--out_png PNG]
    python eval.py --checkpoint CKPT --multimodal     (--zeroshot/--linear_probe/--localize builtin too)
    common: --out results.json --grid examples.png --batch_size N --device cpu|cuda --image_size N

Read top to bottom: retrieval metrics, multimodal R@K, zero-shot classification, linear
probe, localisation (pointing game, patch heat maps), modality gap, checkpoint loading,
embedding helpers that run a model over a split, Pillow figures, the built-in set's
evaluations (evaluate_builtin), image-folder and single-image evaluations, and the CLI.

Every metric is a pure function of tensors, and every ranking metric counts ties
*against* the model: an item scored equal to the ground truth ranks above it, and a NaN
score never helps. So a collapsed model that scores everything alike gets 0, not 100.

`oner` and `data` are imported lazily inside the functions that need them, so the metrics
work (and are tested) on their own.
"""
import math
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# SLIP's seven ImageNet templates (METHOD.md §6), verbatim, grammar included.
SLIP_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


# ----------------------------------------------------------------------------- ranks

def _not_below(scores, ref):
    """True where `scores` is not strictly below `ref`: ties count against the model, and
    so does a NaN on either side (NaN < x is False)."""
    return ~(scores < ref)


def _recall(ranks, ks, prefix):
    # ranks: (n,) long, 0 = first place. hit@K iff rank < K. Percent.
    return {f"{prefix}{k}": (ranks < k).double().mean().item() * 100.0 for k in ks}


def _retrieval_from_blocks(block, n_images, text_to_image, chunk_size):
    """Core of both retrieval_metrics variants. `block(cols)` returns the (n_images, c)
    score columns of the texts `cols`; memory stays bounded by one such block.

    Pass 1 (per text column): image-retrieval rank of each caption, and each caption's
    ground-truth score, reduced to each image's best ground-truth score.
    Pass 2 (per text column): for each image, count non-ground-truth captions scoring
    >= its best ground-truth caption: that count is the text-retrieval rank."""
    t2i = text_to_image.long().cpu()
    n_texts = t2i.numel()
    if t2i.dim() != 1 or n_texts == 0:
        raise ValueError(f"text_to_image must be a non-empty 1-D tensor, got shape {tuple(t2i.shape)}")
    if t2i.min() < 0 or t2i.max() >= n_images:
        raise ValueError(f"text_to_image values must lie in [0, {n_images}), got "
                         f"[{int(t2i.min())}, {int(t2i.max())}]")
    rows = torch.arange(n_images)
    ir_rank = torch.empty(n_texts, dtype=torch.long)
    best_gt = torch.full((n_images,), -math.inf, dtype=torch.float64)
    nan_gt = torch.zeros(n_images, dtype=torch.bool)            # a NaN GT score never helps
    for start in range(0, n_texts, chunk_size):
        cols = torch.arange(start, min(start + chunk_size, n_texts))
        s, g = block(cols).double().cpu(), t2i[cols]          # (I, c), (c,)
        gt = s[g, torch.arange(len(cols))]                      # (c,) score of the GT image
        # every image not strictly below the GT counts, minus the GT itself (always counted)
        ir_rank[cols] = _not_below(s, gt[None, :]).sum(0) - 1
        best_gt.scatter_reduce_(0, g, torch.nan_to_num(gt, nan=-math.inf), "amax")
        nan_gt[g[gt.isnan()]] = True
    tr_rank = torch.zeros(n_images, dtype=torch.long)
    for start in range(0, n_texts, chunk_size):
        cols = torch.arange(start, min(start + chunk_size, n_texts))
        s = block(cols).double().cpu()                          # (I, c)
        not_gt = t2i[cols][None, :] != rows[:, None]            # (I, c)
        tr_rank += (_not_below(s, best_gt[:, None]) & not_gt).sum(1)
    tr_rank[nan_gt] = n_texts                                   # always a miss
    # An image without any caption has no text-retrieval query: leave it out of TR (it
    # still competes as a distractor in IR).
    has_caption = torch.bincount(t2i, minlength=n_images) > 0
    out = {**_recall(tr_rank[has_caption], (1, 5, 10), "tr"), **_recall(ir_rank, (1, 5, 10), "ir")}
    out["mean"] = sum(out.values()) / 6.0
    out["n_images"], out["n_texts"] = n_images, n_texts
    return out


def retrieval_metrics(scores, text_to_image, chunk_size=1024):
    """Zero-shot retrieval R@1/5/10 (percent) from a similarity matrix.

    scores: (n_images, n_texts); text_to_image: (n_texts,) long, the image of each caption
    (any number of captions per image). TR@K: share of images whose best ground-truth
    caption is beaten-or-tied by fewer than K other captions. IR@K: share of captions whose
    image is beaten-or-tied by fewer than K other images. Returns tr1, tr5, tr10, ir1, ir5,
    ir10, mean (of the six), n_images, n_texts. Images with no caption only act as IR
    distractors."""
    if scores.dim() != 2 or scores.shape[1] != text_to_image.numel():
        raise ValueError(f"scores must be (n_images, n_texts={text_to_image.numel()}), got {tuple(scores.shape)}")
    return _retrieval_from_blocks(lambda cols: scores[:, cols], scores.shape[0], text_to_image, chunk_size)


def retrieval_metrics_from_embeddings(image_emb, text_emb, text_to_image, chunk_size=1024):
    """retrieval_metrics(image_emb @ text_emb.T, ...) without materialising the matrix:
    scores are computed `chunk_size` captions at a time, (n_images, chunk) each."""
    text_emb = text_emb.to(image_emb.dtype)
    return _retrieval_from_blocks(lambda cols: image_emb @ text_emb[cols.to(text_emb.device)].T,
                                  image_emb.shape[0], text_to_image, chunk_size)


def recall_at_k(query_emb, gallery_emb, target_index, ks=(1, 5, 10), chunk_size=1024):
    """R@K (percent, keys "r1", "r5", ...) of queries (Q, E) against a gallery (G, E), e.g.
    (image, text) queries from encode_pair against encode_image gallery. target_index (Q,):
    the right gallery item. Ties and NaNs count against the model."""
    target = target_index.long().to(query_emb.device)
    gallery_emb = gallery_emb.to(query_emb.dtype)
    ranks = []
    for start in range(0, query_emb.shape[0], chunk_size):
        s = query_emb[start:start + chunk_size] @ gallery_emb.T       # (c, G)
        t = s.gather(1, target[start:start + chunk_size, None])      # (c, 1)
        ranks.append((_not_below(s, t).sum(1) - 1).cpu())
    return _recall(torch.cat(ranks), ks, "r")


# -------------------------------------------------------------------- classification

def _as_eval(model):
    """Context: model.eval() inside, previous train/eval mode restored after (train.py
    may call these helpers mid-run)."""
    @contextmanager
    def ctx():
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
    return ctx()


def zeroshot_classifier(model, tokenizer, classnames, templates=SLIP_TEMPLATES, text_len=None, device="cpu"):
    """(C, E) zero-shot weights: each class's prompts (templates filled with its name)
    embedded, averaged, re-normalised (METHOD.md §6). text_len defaults to the model's."""
    text_len = text_len or model.cfg.max_text_len
    weights = []
    with _as_eval(model), torch.inference_mode():
        for name in classnames:
            ids, mask = tokenizer([t.format(name) for t in templates], text_len)
            emb = model.encode_text(ids.to(device), mask.to(device)).float()   # (T, E)
            weights.append(F.normalize(emb.mean(0), dim=0).cpu())
    return torch.stack(weights)


def classification_accuracy(scores, labels):
    """{"top1", "top5"} percent from (N, C) logits or similarities and (N,) labels.
    A sample's rank is the number of other classes scoring >= its label's score (ties
    against the model, as in retrieval); top5 uses min(5, C)."""
    labels = labels.long().to(scores.device)
    true = scores.gather(1, labels[:, None])                  # (N, 1)
    rank = (_not_below(scores, true).sum(1) - 1).cpu()
    top5 = min(5, scores.shape[1])
    return {"top1": (rank < 1).double().mean().item() * 100.0,
            "top5": (rank < top5).double().mean().item() * 100.0}


# ---------------------------------------------------------------------- linear probe

def _fit_logreg(x, y, n_classes, wd, max_iter=200):
    """Multinomial logistic regression, full-batch L-BFGS from zero (deterministic).
    x: (N, D) standardised; loss = mean CE + wd/2 * ||W||^2 (bias not decayed)."""
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()       # normal tensors even if called under inference_mode
        w = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
        b = torch.zeros(n_classes, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * (w * w).sum()
            loss.backward()
            return loss
        opt.step(closure)
    return w.detach(), b.detach()


def _standardiser(x):
    # Fit on training features only; constant features get unit scale rather than inf.
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    return lambda z: (z - mu) / sd


def _fit_probe(train_x, train_y, n_classes, wds, holdout, seed):
    """Choose wd on a seeded held-out part of train (best top-1, ties -> larger wd), then
    refit on all of train. Returns (logits_fn, wd, sweep [(wd, holdout top1), ...])."""
    n = train_x.shape[0]
    n_hold = min(max(1, round(holdout * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    hold, fit = perm[:n_hold], perm[n_hold:]
    std = _standardiser(train_x[fit])
    sweep = []
    for wd in wds:
        w, b = _fit_logreg(std(train_x[fit]), train_y[fit], n_classes, wd)
        sweep.append((wd, classification_accuracy(std(train_x[hold]) @ w + b, train_y[hold])["top1"]))
    best_wd = max(sweep, key=lambda p: (p[1], p[0]))[0]
    std = _standardiser(train_x)
    w, b = _fit_logreg(std(train_x), train_y, n_classes, best_wd)
    return (lambda z: std(z) @ w + b), best_wd, sweep


def linear_probe(train_x, train_y, val_x, val_y, wds=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                 holdout=0.1, seed=0, device="cpu"):
    """Linear probe on frozen features: logistic regression on standardised features,
    weight decay chosen on `holdout` of train, refit on all train. Returns {"top1", "top5"}
    on val (percent), the chosen "wd" and the "sweep" [[wd, holdout top1], ...]."""
    train_x, val_x = train_x.float().to(device), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    logits_fn, wd, sweep = _fit_probe(train_x, train_y, n_classes, wds, holdout, seed)
    return {**classification_accuracy(logits_fn(val_x), val_y), "wd": wd, "sweep": [list(p) for p in sweep]}


# ---------------------------------------------------------------------- localisation

def _box_masks(boxes, h, w):
    # (N, H, W) bool: pixel (y, x) inside [x0, x1) x [y0, y1) of its row's box.
    boxes = boxes.double()
    xs, ys = torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64)
    in_x = (xs >= boxes[:, 0:1]) & (xs < boxes[:, 2:3])      # (N, W)
    in_y = (ys >= boxes[:, 1:2]) & (ys < boxes[:, 3:4])      # (N, H)
    return in_y[:, :, None] & in_x[:, None, :]


def pointing_game(heatmaps, boxes):
    """Percent of heat maps (N, H, W) whose maximum falls inside their box (N, 4) =
    [x0, y0, x1, y1] in pixels, inclusive-exclusive. Ties against the model: a hit needs
    *every* pixel attaining the maximum inside the box (a flat map hits only a box covering
    the whole image); an all-NaN map misses."""
    hm = heatmaps.detach().double().cpu()
    n, h, w = hm.shape
    is_max = hm == hm.flatten(1).max(1).values[:, None, None]    # (N, H, W)
    inside = _box_masks(boxes.cpu(), h, w)
    hit = (~is_max | inside).flatten(1).all(1) & is_max.flatten(1).any(1)
    return hit.double().mean().item() * 100.0


def random_pointing_baseline(boxes, h, w):
    """Chance level of the pointing game: expected hit rate (percent) of a uniformly random
    pixel, i.e. the mean share of the image's pixels inside each box (clipped to it)."""
    b = boxes.double().cpu()
    nx = (torch.ceil(b[:, 2].clamp(max=w)) - torch.ceil(b[:, 0].clamp(min=0))).clamp(min=0)
    ny = (torch.ceil(b[:, 3].clamp(max=h)) - torch.ceil(b[:, 1].clamp(min=0))).clamp(min=0)
    return (nx * ny / (h * w)).mean().item() * 100.0


def patch_heatmap(patch_emb, text_emb, grid, out_size, temperature=0.07):
    """Word-patch localisation (METHOD.md §6): cosine of each patch token (P, E) with a
    text embedding (E,), softmax over the P patches at `temperature`, laid out on the
    (gh, gw) row-major grid and bilinearly upsampled to out_size (H, W). Returns (H, W),
    values summing to ~(H*W)/(gh*gw) times a probability map."""
    gh, gw = grid
    cos = F.normalize(patch_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1)   # (P,)
    prob = torch.softmax(cos / temperature, dim=0).reshape(1, 1, gh, gw)
    return F.interpolate(prob, size=tuple(out_size), mode="bilinear", align_corners=False)[0, 0]


# ---------------------------------------------------------------------- modality gap

def modality_gap(image_emb, text_emb, seed=0):
    """Issue 7's gap measures for N matched pairs (rows aligned), on the unit sphere
    (inputs are re-normalised; encode_* already returns unit vectors).

    centroid_distance: ||mean(image) - mean(text)||. matched_cos: mean cos(image_i, text_i).
    random_cos: mean cos(image_i, text_j) over all i != j. separability: percent accuracy of
    a linear probe telling image from text embeddings, trained on a seeded half of the pairs
    and tested on the other half (ties score 1/2, so identical modalities give exactly 50)."""
    img = F.normalize(image_emb.float(), dim=-1).cpu()
    txt = F.normalize(text_emb.float(), dim=-1).cpu()
    n = img.shape[0]
    if n < 4 or txt.shape != img.shape:
        raise ValueError(f"need >= 4 aligned pairs, got {tuple(img.shape)} and {tuple(txt.shape)}")
    c_img, c_txt = img.mean(0), txt.mean(0)
    matched = (img * txt).sum(1)                                 # (N,)
    # sum over all (i, j) of img_i . txt_j = N^2 c_img . c_txt; drop the diagonal.
    random_cos = (n * n * (c_img @ c_txt) - matched.sum()) / (n * (n - 1))
    # Split by pair, so an image and its caption are on the same side.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = perm[: n // 2], perm[n // 2:]
    xs = [torch.cat([img[h], txt[h]]) for h in halves]
    ys = [torch.cat([torch.zeros(len(h)), torch.ones(len(h))]).long() for h in halves]
    logits_fn, _, _ = _fit_probe(xs[0], ys[0], 2, (1e-4, 1e-3, 1e-2, 1e-1), 0.2, seed)
    margin = logits_fn(xs[1]) @ torch.tensor([-1.0, 1.0])       # > 0 means "text"
    correct = torch.where(margin == 0, 0.5, ((margin > 0).long() == ys[1]).double())
    return {"centroid_distance": (c_img - c_txt).norm().item(), "matched_cos": matched.mean().item(),
            "random_cos": random_cos.item(), "separability": correct.mean().item() * 100.0}


def pca_2d(x):
    """(N, E) -> (N, 2): projection of the centred data on its top two principal axes
    (torch.linalg.svd). Each axis's sign is fixed so its largest loading is positive,
    which makes the picture deterministic."""
    xc = x.float() - x.float().mean(0)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    axes = vh[:2]                                                # (<=2, E)
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    out = xc @ (axes * sign).T
    return F.pad(out, (0, 2 - out.shape[1]))                    # E == 1: pad a zero axis


# ----------------------------------------------------------------------------- checkpoints

def load_checkpoint(path, image_size=None):
    """Rebuild (model, tokenizer) exactly as trained. If image_size differs, the 2-D
    position table is bicubically interpolated (fine-tuning at higher resolution)."""
    import dataclasses
    import os

    import data
    from oner import OneR, OneRConfig
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found (train.py writes RUN_DIR/ckpt_*.pt and best.pt)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    mc = OneRConfig(**ck["model_config"])
    state = dict(ck["model"])  # interpolation below must not alter the returned ck
    if image_size and image_size != mc.image_size:
        mc = dataclasses.replace(mc, image_size=image_size)
        g = mc.grid
        for k in [k for k in state if k.endswith("pos_image")]:
            t = state[k].permute(2, 0, 1)[None]  # (1, D, g0, g0)
            state[k] = F.interpolate(t, size=(g, g), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    model = OneR(mc)
    model.load_state_dict(state, strict=True)
    return model, data.Tokenizer.from_identity(ck["tokenizer"]), ck


# ------------------------------------------------------------------ embedding helpers

class _Progress:
    """'what: done/total (extra), rate/s, ETA' on stderr, at most every `every` seconds."""

    def __init__(self, what, total, enabled=True, every=5.0):
        self.what, self.total, self.enabled, self.every = what, total, enabled, every
        self.t0 = self.last = time.time()

    def __call__(self, done, extra="", final=False):
        now = time.time()
        if not self.enabled or (not final and now - self.last < self.every):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        tail = f"done in {now - self.t0:.1f}s" if final else f"ETA {_fmt_seconds(eta)}"
        print(f"{self.what}: {done}/{self.total}{extra}, {rate:.1f}/s, {tail}", file=sys.stderr, flush=True)


def _fmt_seconds(s):
    if not math.isfinite(s):
        return "?"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def embed_images(model, image_paths, transform, batch_size=64, device="cpu", progress=True, load_image=None,
                 encode=None, what="embed_images"):
    """Run model.encode_image over image files. Returns (emb (N, E) float on CPU, ok (N,)
    bool); rows of unreadable images are zero and ok=False (the count is printed, the first
    few paths too) - an unreadable image is never fatal. load_image defaults to
    data.load_image; data.BadSample and OSError (missing file, PIL decode error) mean
    "unreadable". transform(pil, None) -> (3, S, S), e.g. data.ImageTransform(S).
    encode (default model.encode_image) maps an image batch to (B, ...) features, e.g.
    model.encode_patches for (N, P, E) patch features; `what` labels the progress lines."""
    if load_image is None:
        import data
        load_image, unreadable = data.load_image, (data.BadSample, OSError)
    else:
        bad_sample = getattr(sys.modules.get("data"), "BadSample", None)    # if data.py is loaded
        unreadable = (OSError,) + ((bad_sample,) if bad_sample else ())
    n = len(image_paths)
    ok = torch.zeros(n, dtype=torch.bool)
    rows, embs, pending, idx, skipped = [], [], [], [], 0
    report = _Progress(what, n, progress)
    encode = encode or model.encode_image

    def flush():
        if pending:
            embs.append(encode(torch.stack(pending).to(device)).float().cpu())
            rows.extend(idx)
            pending.clear(), idx.clear()

    with _as_eval(model), torch.inference_mode():
        for i, path in enumerate(image_paths):
            try:
                pending.append(transform(load_image(path), None))
                idx.append(i)
                ok[i] = True
            except unreadable as err:
                skipped += 1
                if skipped <= 5:
                    print(f"{what}: skipping unreadable image {path}: {err}", file=sys.stderr)
            if len(pending) == batch_size:
                flush()
            report(i + 1, f" ({skipped} skipped)")
        flush()
    report(n, f" ({skipped} skipped)", final=True)
    if not embs:
        return torch.zeros(n, 0), ok
    out = torch.zeros((n,) + tuple(embs[0].shape[1:]))
    out[torch.tensor(rows, dtype=torch.long)] = torch.cat(embs)
    return out, ok


def embed_texts(model, tokenizer, captions, text_len=None, batch_size=256, device="cpu", progress=True):
    """Run model.encode_text over captions; (T, E) float on CPU. text_len defaults to the
    model's max_text_len; tokenizer(texts, length) -> (ids (B, L), mask (B, L))."""
    text_len = text_len or model.cfg.max_text_len
    report, out = _Progress("embed_texts", len(captions), progress), []
    with _as_eval(model), torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            ids, mask = tokenizer(list(captions[start:start + batch_size]), text_len)
            out.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
            report(start + len(ids))
    report(len(captions), final=True)
    return torch.cat(out)


def embed_retrieval_split(model, tokenizer, json_path, image_root, batch_size=64, device="cpu", progress=True,
                          image_embedder=None):
    """Embed an ALBEF/BLIP retrieval split. Unreadable images are dropped together with
    their captions (so they neither score nor distract), and counted. Returns a dict:
    image_emb (I, E), text_emb (T, E), text_to_image (T,) indexing the kept images,
    image_paths, captions (kept), skipped (images), skipped_captions, seconds.
    image_embedder(paths) -> (emb, ok) replaces embed_images (e.g. an _ImageCache)."""
    import data
    t0 = time.time()
    paths, captions, t2i = data.load_retrieval_split(json_path, image_root)
    if image_embedder is None:
        transform = data.ImageTransform(model.cfg.image_size, train=False)
        image_emb, ok = embed_images(model, paths, transform, batch_size, device, progress)
    else:
        image_emb, ok = image_embedder(paths)
    if not ok.any():
        raise RuntimeError(f"none of the {len(paths)} images listed in {json_path} could be read under "
                           f"image_root={image_root}; expected image_root/<'image' field of each entry>")
    t2i = torch.as_tensor(t2i, dtype=torch.long)
    keep_text = ok[t2i]                                          # caption's image was readable
    new_index = torch.cumsum(ok.long(), 0) - 1                  # old image index -> kept index
    kept_captions = [c for c, k in zip(captions, keep_text.tolist()) if k]
    text_emb = embed_texts(model, tokenizer, kept_captions, model.cfg.max_text_len, 4 * batch_size, device, progress)
    return {"image_emb": image_emb[ok], "text_emb": text_emb, "text_to_image": new_index[t2i[keep_text]],
            "image_paths": [p for p, k in zip(paths, ok.tolist()) if k], "captions": kept_captions,
            "skipped": int((~ok).sum()), "skipped_captions": int((~keep_text).sum()),
            "seconds": time.time() - t0}


def evaluate_retrieval(model, tokenizer, json_path, image_root, batch_size=64, device="cpu",
                       chunk_size=1024, progress=True):
    """Zero-shot retrieval on one split: retrieval_metrics keys, plus "skipped" and
    "skipped_captions" (dropped with unreadable images) and "seconds" (wall time)."""
    split = embed_retrieval_split(model, tokenizer, json_path, image_root, batch_size, device, progress)
    metrics = retrieval_metrics_from_embeddings(split["image_emb"], split["text_emb"],
                                                split["text_to_image"], chunk_size)
    metrics.update(skipped=split["skipped"], skipped_captions=split["skipped_captions"], seconds=split["seconds"])
    return metrics


def retrieval_chance(text_to_image, n_images):
    """Expected retrieval_metrics (percent) of random scores: IR@K = K / n_images; TR@K =
    mean over captioned images of 1 - C(T - g, K) / C(T, K), g = that image's caption
    count, T = all captions (the chance that one of its g captions lands in a random top K)."""
    t2i = torch.as_tensor(text_to_image).long().cpu()
    T = t2i.numel()
    g = torch.bincount(t2i, minlength=n_images)
    g = g[g > 0].double()
    out = {}
    for k in (1, 5, 10):
        miss = torch.ones_like(g)
        for j in range(min(k, T)):
            miss = miss * ((T - g - j) / (T - j)).clamp(min=0)
        out[f"tr{k}"] = (1 - miss).mean().item() * 100.0 if k < T else 100.0
    for k in (1, 5, 10):
        out[f"ir{k}"] = min(k, n_images) / n_images * 100.0
    out["mean"] = sum(out.values()) / 6.0
    return out


def topk_gallery(query_emb, gallery_emb, k=5):
    """(Q, min(k, G)) indices of each query's best gallery items, best first, equal scores
    in gallery order (a stable sort). For figures; the metrics count ties against the model."""
    s = query_emb.float() @ gallery_emb.float().T
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]


def embed_pairs(model, tokenizer, image_paths, texts, transform, batch_size=64, device="cpu", progress=True,
                text_len=None, load_image=None):
    """Run model.encode_pair over (image file, text) queries. Returns (emb (N, E) float on
    CPU, ok (N,) bool); an unreadable image gives a zero row and ok=False (never fatal)."""
    import data
    load_image = load_image or data.load_image
    text_len = text_len or model.cfg.max_text_len
    n = len(image_paths)
    ok = torch.zeros(n, dtype=torch.bool)
    out, skipped, report = None, 0, _Progress("encode_pair", n, progress)
    with _as_eval(model), torch.inference_mode():
        for start in range(0, n, batch_size):
            imgs, rows = [], []
            for i in range(start, min(start + batch_size, n)):
                try:
                    imgs.append(transform(load_image(image_paths[i]), None))
                    rows.append(i)
                except (data.BadSample, OSError) as err:
                    skipped += 1
                    if skipped <= 5:
                        print(f"encode_pair: skipping unreadable image {image_paths[i]}: {err}", file=sys.stderr)
            if rows:
                ids, mask = tokenizer([texts[i] for i in rows], text_len)
                z = model.encode_pair(torch.stack(imgs).to(device), ids.to(device), mask.to(device)).float().cpu()
                if out is None:
                    out = torch.zeros(n, z.shape[1])
                out[rows] = z
                ok[rows] = True
            report(min(start + batch_size, n), f" ({skipped} skipped)")
    report(n, f" ({skipped} skipped)", final=True)
    return (out if out is not None else torch.zeros(n, 0)), ok


class _ImageCache:
    """embed_images memoised by path, so the built-in evaluations encode each image once
    (test images serve retrieval, zero-shot, the probe and the multimodal gallery)."""

    def __init__(self, model, batch_size=64, device="cpu", progress=True):
        import data
        self.model, self.batch_size, self.device, self.progress = model, batch_size, device, progress
        self.transform = data.ImageTransform(model.cfg.image_size, train=False)
        self.memo = {}

    def __call__(self, paths):
        todo = list(dict.fromkeys(p for p in paths if p not in self.memo))
        if todo:
            emb, ok = embed_images(self.model, todo, self.transform, self.batch_size, self.device, self.progress)
            for p, e, k in zip(todo, emb, ok.tolist()):
                self.memo[p] = (e, k)
        if not paths:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.bool)
        dim = max((e.numel() for e, _ in (self.memo[p] for p in paths)), default=0)
        emb = torch.stack([e if e.numel() == dim else torch.zeros(dim) for e, _ in (self.memo[p] for p in paths)])
        return emb, torch.tensor([self.memo[p][1] for p in paths], dtype=torch.bool)


def retrieval_run(model, tokenizer, json_path, image_root, batch_size=64, device="cpu", chunk_size=1024,
                  progress=True, image_embedder=None):
    """evaluate_retrieval that also returns the embedded split (for figures) and the
    chance level: (metrics + "chance" + "seconds" (all of it), split dict)."""
    t0 = time.time()
    split = embed_retrieval_split(model, tokenizer, json_path, image_root, batch_size, device, progress,
                                  image_embedder=image_embedder)
    metrics = retrieval_metrics_from_embeddings(split["image_emb"], split["text_emb"], split["text_to_image"],
                                                chunk_size)
    metrics.update(skipped=split["skipped"], skipped_captions=split["skipped_captions"],
                   chance=retrieval_chance(split["text_to_image"], split["image_emb"].shape[0]),
                   seconds=time.time() - t0)
    return metrics, split


# --------------------------------------------------------------------------- figures

def _font(size=14):
    try:
        return ImageFont.load_default(size=size)     # scalable font on Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _colormap(v):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, blue -> cyan -> yellow -> red."""
    stops = torch.tensor([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=torch.float32)
    pos = v.clamp(0, 1) * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().to(torch.uint8)


def _to_pil_rgb(t):
    return Image.frombytes("RGB", (t.shape[1], t.shape[0]), t.contiguous().numpy().tobytes())


def draw_heatmaps_png(image, words, heatmaps, path, min_side=160, label_h=22):
    """Localisation figure: the image, then one panel per word with its heat map (any
    (h, w); min-max normalised) overlaid at 50 %. Panels are the image scaled up by
    s = ceil(min_side / min(image.size)) (at least 1). Size: ((len(words) + 1) * s * W,
    s * H + label_h)."""
    s = max(1, math.ceil(min_side / min(image.size)))
    w, h = image.size[0] * s, image.size[1] * s
    base = image.convert("RGB").resize((w, h), Image.NEAREST)
    canvas = Image.new("RGB", ((len(words) + 1) * w, h + label_h), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for k, (label, hm) in enumerate([("image", None)] + list(zip(words, heatmaps))):
        panel = base
        if hm is not None:
            hm = F.interpolate(torch.as_tensor(hm).float()[None, None], size=(h, w), mode="bilinear",
                               align_corners=False)[0, 0]
            hm = (hm - hm.min()) / (hm.max() - hm.min()).clamp_min(1e-12)
            panel = Image.blend(base, _to_pil_rgb(_colormap(hm)), 0.5)
        canvas.paste(panel, (k * w, 0))
        draw.text((k * w + 4, h + 3), label, fill="black", font=font)
    canvas.save(path)


def _thumb(item, size):
    # item: PIL image or a path; unreadable -> grey placeholder (figures are never fatal).
    try:
        im = item if isinstance(item, Image.Image) else Image.open(item)
        return im.convert("RGB").resize((size, size))
    except (OSError, ValueError):
        return Image.new("RGB", (size, size), (128, 128, 128))


def _wrap(text, width):
    lines, line = [], ""
    for word in str(text).split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def draw_retrieval_grid_png(queries, topk_images, gt_flags, path, thumb=96, pad=6):
    """Retrieval examples: one row per query (a caption string, or an image/path drawn as
    a thumbnail), then its top-k gallery images left to right; ground-truth hits get a
    green frame, others red. Size: (2*thumb + k*(thumb + pad) + pad, rows*(thumb + pad) + pad)."""
    k = max(len(r) for r in topk_images)
    cell = thumb + pad
    canvas = Image.new("RGB", (2 * thumb + k * cell + pad, len(queries) * cell + pad), "white")
    draw, font = ImageDraw.Draw(canvas), _font(12)
    for r, (query, imgs, flags) in enumerate(zip(queries, topk_images, gt_flags)):
        y = pad + r * cell
        if isinstance(query, str):
            lines = _wrap(query, 2 * thumb // 7)[: thumb // 15]
            draw.multiline_text((pad, y), "\n".join(lines), fill="black", font=font, spacing=2)
        else:
            canvas.paste(_thumb(query, thumb), (pad, y))
        for c, (im, gt) in enumerate(zip(imgs, flags)):
            x = 2 * thumb + pad + c * cell
            canvas.paste(_thumb(im, thumb), (x, y))
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=(0, 170, 0) if gt else (200, 0, 0),
                           width=4 if gt else 1)
    canvas.save(path)


_MODALITY_COLOURS = {"image": (31, 119, 180), "text": (255, 127, 14), "pair": (44, 160, 44)}


def draw_embedding_pca_png(panels, path, size=320, title_h=24, legend_h=22):
    """One panel per (title, xy_image (N, 2), xy_text (N, 2), xy_pair (N, 2) or None):
    points coloured by modality, matched image_i - text_i joined by thin grey lines, each
    panel scaled to its own extent (same scale on both axes).
    Size: (len(panels) * size, size + title_h + legend_h)."""
    canvas = Image.new("RGB", (len(panels) * size, size + title_h + legend_h), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for p, (title, xy_img, xy_txt, xy_pair) in enumerate(panels):
        groups = {"image": xy_img, "text": xy_txt, "pair": xy_pair}
        groups = {k: torch.as_tensor(v).float() for k, v in groups.items() if v is not None}
        allxy = torch.cat(list(groups.values()))
        # one scale for both axes, so distances (the gap) are drawn honestly
        lo, hi = allxy.min(0).values, allxy.max(0).values
        mid, span = (lo + hi) / 2, (hi - lo).max().clamp_min(1e-9)
        m = 12                                                   # margin in pixels

        def px(xy):                                              # data -> pixel coords (y up)
            u = (xy - mid) / span + 0.5
            return [(p * size + m + a * (size - 2 * m), title_h + m + (1 - b) * (size - 2 * m))
                    for a, b in u.tolist()]
        pts = {k: px(v) for k, v in groups.items()}
        for a, b in zip(pts["image"], pts["text"]):
            draw.line([a, b], fill=(200, 200, 200), width=1)
        for name, coords in pts.items():
            for x, y in coords:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_MODALITY_COLOURS[name])
        draw.text((p * size + 6, 4), str(title), fill="black", font=font)
        draw.rectangle([p * size, title_h, (p + 1) * size - 1, title_h + size - 1], outline=(180, 180, 180))
    x = 6
    for name, colour in _MODALITY_COLOURS.items():
        y = size + title_h + 5
        draw.ellipse([x, y + 3, x + 8, y + 11], fill=colour)
        draw.text((x + 12, y), name, fill="black", font=font)
        x += 80
    canvas.save(path)


# -------------------------------------------------------------------- built-in set
# The built-in set (data.make_synth) carries its own evaluation files: test/test_comp
# retrieval splits, attributes.json (class labels + prompt templates), boxes.json (object
# boxes) and edits.json (source image + edit text -> target image). Each function below
# turns one of them into numbers with their chance level beside them.

ZEROSHOT_ATTRIBUTES = ("object", "shape", "colour")           # prompt-able class names
PROBE_ATTRIBUTES = ("object", "shape", "colour", "size", "count")


def _read_json_file(path):
    import json
    with open(path) as f:
        return json.load(f)


def open_builtin(root="data/builtin"):
    """Paths of the built-in set in `root` (data.ensure_synth's dict). An existing set is
    used with the parameters in its synth.json; an absent one is made with the defaults."""
    import os

    import data
    man = os.path.join(root, "synth.json")
    kw = {}
    if os.path.isfile(man):
        m = _read_json_file(man)
        kw = {k: m[k] for k in ("n_images", "seed", "image_size", "bpe_vocab") if k in m}
    return data.ensure_synth(root, **kw)


def _builtin_image_size(paths):
    import os
    return int(_read_json_file(os.path.join(paths["root"], "synth.json"))["image_size"])


def _join(root, rel):
    import os
    return os.path.join(root, rel)


def builtin_retrieval(model, tokenizer, paths, batch_size=64, device="cpu", progress=True, images=None):
    """Zero-shot retrieval on the built-in test and test_comp (held-out colour-shape
    pairs) splits: {split: retrieval_metrics keys + chance, skipped, seconds}."""
    return {name: retrieval_run(model, tokenizer, paths[name], paths["image_root"], batch_size, device,
                                progress=progress, image_embedder=images)[0]
            for name in ("test", "test_comp")}


def builtin_zeroshot(model, tokenizer, paths, batch_size=64, device="cpu", progress=True, images=None):
    """Zero-shot classification of the test images' main object with the set's own class
    names and prompt templates. Headline: "object" (colour + shape, 40 classes); also
    shape and colour alone, and "object" on single-object images. Top-1/top-5 (percent)
    with chance = k / classes."""
    t0 = time.time()
    images = images or _ImageCache(model, batch_size, device, progress)
    attrs = _read_json_file(paths["attributes"])
    rows = attrs["images"]["test"]
    emb, ok = images([_join(paths["image_root"], r["image"]) for r in rows])
    per = {}
    for a in ZEROSHOT_ATTRIBUTES:
        names = attrs["classes"][a]
        w = zeroshot_classifier(model, tokenizer, names, attrs["templates"], device=device)
        y = torch.tensor([r[a] for r in rows])
        subsets = {a: ok}
        if a == "object":
            subsets["object_single"] = ok & torch.tensor([r["count"] == 0 for r in rows])
        for key, m in subsets.items():
            if m.any():
                c = len(names)
                per[key] = {**classification_accuracy(emb[m] @ w.T, y[m]), "n_images": int(m.sum()),
                            "n_classes": c, "chance_top1": 100.0 / c, "chance_top5": 100.0 * min(5, c) / c}
    head = per["object"]
    return {"top1": head["top1"], "top5": head["top5"], "task": "object: colour + shape of the main object",
            **{k: head[k] for k in ("n_images", "n_classes", "chance_top1", "chance_top5")},
            "templates": list(attrs["templates"]), "attributes": per, "skipped": int((~ok).sum()),
            "seconds": time.time() - t0}


def _cached(cache_path, compute):
    """compute() -> dict of tensors, saved to cache_path (atomically) or loaded from it."""
    import os
    if cache_path and os.path.isfile(cache_path):
        try:
            return torch.load(cache_path, map_location="cpu", weights_only=True), True
        except Exception as err:                                   # a torn or stale file: recompute
            print(f"feature cache {cache_path} unreadable ({err}); recomputing", file=sys.stderr)
    out = compute()
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        tmp = f"{cache_path}.tmp-{os.getpid()}"
        torch.save(out, tmp)
        os.replace(tmp, cache_path)
    return out, False


def builtin_linear_probe(model, paths, batch_size=64, device="cpu", progress=True, probe_train=2000, seed=0,
                         images=None, cache_path=None):
    """Linear probe (linear_probe: logistic regression, wd chosen on 10 % of train) on
    frozen encode_image features: a seeded subsample of `probe_train` train images ->
    test images, labels from attributes.json. Headline: "object"; also shape, colour,
    size, count. Chance = the test share of the most frequent train class."""
    t0 = time.time()
    images = images or _ImageCache(model, batch_size, device, progress)
    attrs = _read_json_file(paths["attributes"])
    train_rows, test_rows = attrs["images"]["train"], attrs["images"]["test"]
    pick = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed))[:probe_train]
    train_rows = [train_rows[i] for i in sorted(pick.tolist())]

    def compute():
        xtr, oktr = images([_join(paths["image_root"], r["image"]) for r in train_rows])
        xte, okte = images([_join(paths["image_root"], r["image"]) for r in test_rows])
        return {"xtr": xtr, "oktr": oktr, "xte": xte, "okte": okte}
    f, hit = _cached(cache_path, compute)
    per = {}
    for a in PROBE_ATTRIBUTES:
        ytr = torch.tensor([r[a] for r in train_rows])[f["oktr"]]
        yte = torch.tensor([r[a] for r in test_rows])[f["okte"]]
        r = linear_probe(f["xtr"][f["oktr"]], ytr, f["xte"][f["okte"]], yte, device=device)
        majority = torch.bincount(ytr).argmax()
        per[a] = {**r, "chance_top1": (yte == majority).double().mean().item() * 100.0,
                  "n_classes": len(attrs["classes"][a])}
    head = per["object"]
    return {"top1": head["top1"], "top5": head["top5"], "wd": head["wd"], "chance_top1": head["chance_top1"],
            "task": "object: colour + shape of the main object", "n_train": int(f["oktr"].sum()),
            "n_test": int(f["okte"].sum()), "attributes": per,
            "skipped": int((~f["oktr"]).sum() + (~f["okte"]).sum()), "feature_cache": cache_path,
            "cache_hit": hit, "seconds": time.time() - t0}


def builtin_pointing(model, tokenizer, paths, batch_size=64, device="cpu", progress=True, seed=0, n_random=20,
                     temperature=0.07):
    """Pointing game over the test images' object boxes: for every object, the heat map
    of its name ("red circle", embedded alone) over the patch features (patch_heatmap)
    must peak inside its box. Chance: random heat maps (uniform random patch scores
    through the same upsampling, mean of `n_random` seeded draws) and a random pixel
    (random_pointing_baseline). Also the subset of images with 2-3 objects, where the
    word has to pick the right object."""
    import data
    t0 = time.time()
    S = _builtin_image_size(paths)
    entries = _read_json_file(paths["boxes"])["test"]
    transform = data.ImageTransform(model.cfg.image_size, train=False)
    patches, ok = embed_images(model, [_join(paths["image_root"], e["image"]) for e in entries], transform,
                               batch_size, device, progress, encode=model.encode_patches, what="encode_patches")
    names = sorted({o["name"] for e in entries for o in e["objects"]})
    temb = embed_texts(model, tokenizer, names, batch_size=4 * batch_size, device=device, progress=False)
    g = model.cfg.grid
    hms, boxes, multi = [], [], []
    for i, e in enumerate(entries):
        if not ok[i]:
            continue
        for o in e["objects"]:
            hms.append(patch_heatmap(patches[i], temb[names.index(o["name"])], (g, g), (S, S), temperature))
            boxes.append(o["box"])
            multi.append(len(e["objects"]) > 1)
    hms, boxes, multi = torch.stack(hms), torch.tensor(boxes, dtype=torch.float64), torch.tensor(multi)
    gen = torch.Generator().manual_seed(seed)

    def random_maps(n):
        r = torch.rand(n_random * n, 1, g, g, generator=gen)
        return F.interpolate(r, size=(S, S), mode="bilinear", align_corners=False)[:, 0].reshape(n_random, n, S, S)

    def score(m):
        rnd = random_maps(int(m.sum()))
        return {"accuracy": pointing_game(hms[m], boxes[m]), "n": int(m.sum()),
                "random_heatmaps": sum(pointing_game(r, boxes[m]) for r in rnd) / n_random,
                "random_pixel": random_pointing_baseline(boxes[m], S, S)}
    out = score(torch.ones(len(boxes), dtype=torch.bool))
    if multi.any():
        out["multi_object"] = score(multi)
    out.update(query="object name alone, e.g. 'red circle'", temperature=temperature,
               skipped=int((~ok).sum()), seconds=time.time() - t0)
    return out


def multimodal_retrieval(model, tokenizer, edits_path, image_root, batch_size=64, device="cpu", progress=True,
                         images=None):
    """Multimodal retrieval on edit triplets (edits.json layout: {"gallery": [image paths
    relative to image_root], "triplets": [{"source": path, "text": edit, "target_index":
    index into gallery}, ...]}). Query = encode_pair(source image, edit text), matched
    against encode_image of the gallery; R@1/5/10 (percent) beside the image-only
    (source image embedding), text-only (edit text) and image+text (normalised sum of the
    two) queries, and chance K / gallery size. Unreadable images are left out."""
    import data
    t0 = time.time()
    images = images or _ImageCache(model, batch_size, device, progress)
    edits = _read_json_file(edits_path)
    trip = edits["triplets"]
    gal, gok = images([_join(image_root, p) for p in edits["gallery"]])
    src = [_join(image_root, t["source"]) for t in trip]
    texts = [t["text"] for t in trip]
    transform = data.ImageTransform(model.cfg.image_size, train=False)
    pair, pok = embed_pairs(model, tokenizer, src, texts, transform, batch_size, device, progress)
    img, iok = images(src)
    txt = embed_texts(model, tokenizer, texts, batch_size=4 * batch_size, device=device, progress=False)
    target = torch.tensor([t["target_index"] for t in trip], dtype=torch.long)
    keep = pok & iok & gok[target]
    new_index = torch.cumsum(gok.long(), 0) - 1                 # gallery index among readable ones
    gal, tgt = gal[gok], new_index[target[keep]]
    queries = {"pair": pair, "image_only": img, "text_only": txt, "image_plus_text": F.normalize(img + txt, dim=-1)}
    out = {k: recall_at_k(q[keep], gal, tgt) for k, q in queries.items()}
    G = gal.shape[0]
    out["chance"] = {f"r{k}": 100.0 * min(k, G) / G for k in (1, 5, 10)}
    return {**out["pair"], **out, "n_queries": int(keep.sum()), "gallery_size": G,
            "skipped": int((~keep).sum()), "seconds": time.time() - t0}


def evaluate_builtin(model, tokenizer, builtin_paths, device="cpu", batch_size=64, probe_train=2000, progress=True,
                     seed=0):
    """Every built-in evaluation of one model (on `device` already): retrieval on test
    and test_comp, zero-shot classification, linear probe, pointing game, multimodal
    retrieval, each with its chance level and "seconds". builtin_paths: the dict of
    data.ensure_synth / open_builtin. Each test image is encoded once."""
    t0 = time.time()
    images = _ImageCache(model, batch_size, device, progress)
    p = builtin_paths
    out = {"retrieval": builtin_retrieval(model, tokenizer, p, batch_size, device, progress, images),
           "zeroshot": builtin_zeroshot(model, tokenizer, p, batch_size, device, progress, images),
           "linear_probe": builtin_linear_probe(model, p, batch_size, device, progress, probe_train, seed, images),
           "pointing": builtin_pointing(model, tokenizer, p, batch_size, device, progress, seed),
           "multimodal": multimodal_retrieval(model, tokenizer, p["edits"], p["image_root"], batch_size, device,
                                              progress, images)}
    out["seconds"] = time.time() - t0
    return out


# ------------------------------------------------------------ image folders, one image

def _file_key(*parts):
    import hashlib
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def folder_features(model, root, batch_size=64, device="cpu", progress=True, cache_dir=None, model_key="",
                    class_names_file=None):
    """encode_image features of an image folder (root/<class>/<image>, data.ImageFolderDataset).
    Returns ({"x", "y", "ok"}, class_names, cache path or None). Cached in cache_dir as
    features_<hash of model_key, root, file list, image size>.pt."""
    import os

    import data
    ds = data.ImageFolderDataset(root, data.ImageTransform(model.cfg.image_size, train=False), class_names_file)
    if not ds.samples:
        raise FileNotFoundError(f"no images in the class folders of {root}. Expected layout: "
                                f"{root}/<class>/<image>.jpg (ImageNet validation layout)")
    cache = None
    if cache_dir:
        key = _file_key(model_key, os.path.abspath(root), model.cfg.image_size, [p for p, _ in ds.samples])
        cache = os.path.join(cache_dir, f"features_{key}.pt")

    def compute():
        x, ok = embed_images(model, [p for p, _ in ds.samples], ds.transform, batch_size, device, progress)
        return {"x": x, "ok": ok, "y": torch.tensor([c for _, c in ds.samples], dtype=torch.long)}
    feats, _ = _cached(cache, compute)
    return feats, ds.class_names, cache


def read_templates(path):
    """One prompt template per line, each containing "{}" (blank lines ignored)."""
    lines = [l.strip() for l in open(path).read().splitlines() if l.strip()]
    bad = [l for l in lines if "{}" not in l]
    if not lines or bad:
        raise ValueError(f"{path}: expected one template per line, each containing '{{}}' "
                         f"(e.g. 'a photo of a {{}}.'); {'no templates' if not lines else f'bad: {bad[:3]}'}")
    return lines


def folder_zeroshot(model, tokenizer, root, templates=SLIP_TEMPLATES, class_names_file=None, batch_size=64,
                    device="cpu", progress=True, cache_dir=None, model_key=""):
    """Zero-shot classification of an image folder (class names: the file, else folder
    names with "_" -> " "): top-1/top-5 percent, chance k / classes."""
    t0 = time.time()
    f, names, cache = folder_features(model, root, batch_size, device, progress, cache_dir, model_key,
                                      class_names_file)
    if class_names_file is None:
        names = [n.replace("_", " ") for n in names]
    w = zeroshot_classifier(model, tokenizer, names, templates, device=device)
    c = len(names)
    return {**classification_accuracy(f["x"][f["ok"]] @ w.T, f["y"][f["ok"]]), "n_images": int(f["ok"].sum()),
            "n_classes": c, "chance_top1": 100.0 / c, "chance_top5": 100.0 * min(5, c) / c,
            "templates": list(templates), "skipped": int((~f["ok"]).sum()), "feature_cache": cache,
            "seconds": time.time() - t0}


def folder_linear_probe(model, train_root, val_root, batch_size=64, device="cpu", progress=True, cache_dir=None,
                        model_key=""):
    """Linear probe, train folder -> val folder (same class folders): top-1/top-5."""
    t0 = time.time()
    ftr, ctr, c1 = folder_features(model, train_root, batch_size, device, progress, cache_dir, model_key)
    fva, cva, c2 = folder_features(model, val_root, batch_size, device, progress, cache_dir, model_key)
    if ctr != cva:
        raise ValueError(f"class folders differ between {train_root} ({len(ctr)}) and {val_root} ({len(cva)})")
    r = linear_probe(ftr["x"][ftr["ok"]], ftr["y"][ftr["ok"]], fva["x"][fva["ok"]], fva["y"][fva["ok"]], device=device)
    majority = torch.bincount(ftr["y"][ftr["ok"]]).argmax()
    return {**r, "chance_top1": (fva["y"][fva["ok"]] == majority).double().mean().item() * 100.0,
            "n_train": int(ftr["ok"].sum()), "n_test": int(fva["ok"].sum()), "n_classes": len(ctr),
            "skipped": int((~ftr["ok"]).sum() + (~fva["ok"]).sum()), "feature_cache": [c1, c2],
            "seconds": time.time() - t0}


def _center_square(img, max_side=512):
    # the region the eval transform sees (shorter side, centred), for display
    w, h = img.size
    s = min(w, h)
    l, t = (w - s) // 2, (h - s) // 2
    sq = img.crop((l, t, l + s, t + s))
    return sq.resize((max_side, max_side), Image.BICUBIC) if s > max_side else sq


def localize(model, tokenizer, image, text, out_png, device="cpu", temperature=0.07):
    """Word-patch heat maps (METHOD.md §6) of each whitespace-separated word of `text`,
    each word embedded alone with encode_text, over `image` (a path or PIL image), drawn
    with draw_heatmaps_png (the centre square the model sees, then one panel per word).
    Returns {"words", "png", "png_size", "peaks": [(row, col) patch of each map's max]}."""
    import data
    pil = data.load_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    shown = _center_square(pil)
    x = data.ImageTransform(model.cfg.image_size, train=False)(pil, None)[None].to(device)
    words = text.split()
    if not words:
        raise ValueError("--localize needs a non-empty text")
    with _as_eval(model), torch.inference_mode():
        patches = model.encode_patches(x)[0].float().cpu()          # (P, E)
    temb = embed_texts(model, tokenizer, words, device=device, progress=False)
    g = model.cfg.grid
    hms = [patch_heatmap(patches, t, (g, g), (g, g), temperature) for t in temb]   # grid-resolution maps
    draw_heatmaps_png(shown, words, hms, out_png)
    peaks = [divmod(int(h.flatten().argmax()), g) for h in hms]
    return {"words": words, "png": out_png, "png_size": list(Image.open(out_png).size), "peaks": peaks}


def draw_builtin_localization(model, tokenizer, paths, out_png, device="cpu", temperature=0.07):
    """The first test image with the most objects, one panel per object name."""
    import data
    entries = _read_json_file(paths["boxes"])["test"]
    e = max(entries, key=lambda e: len(e["objects"]))
    img = data.load_image(_join(paths["image_root"], e["image"]))
    x = data.ImageTransform(model.cfg.image_size, train=False)(img, None)[None].to(device)
    names = [o["name"] for o in e["objects"]]
    with _as_eval(model), torch.inference_mode():
        patches = model.encode_patches(x)[0].float().cpu()
    temb = embed_texts(model, tokenizer, names, device=device, progress=False)
    g = model.cfg.grid
    draw_heatmaps_png(img, names, [patch_heatmap(patches, t, (g, g), (g, g), temperature) for t in temb], out_png)
    return out_png


def draw_retrieval_examples(split, path, n_queries=8, k=5, seed=0):
    """Grid of text -> image retrieval examples from an embedded split (retrieval_run's):
    `n_queries` seeded captions, each with its top-k images, the ground truth in green."""
    n = len(split["captions"])
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_queries].sort().values
    top = topk_gallery(split["text_emb"][pick], split["image_emb"], k)
    gt = split["text_to_image"][pick]
    draw_retrieval_grid_png([split["captions"][i] for i in pick.tolist()],
                            [[split["image_paths"][j] for j in row] for row in top.tolist()],
                            [[j == int(t) for j in row] for row, t in zip(top.tolist(), gt)], path)
    return path


# ----------------------------------------------------------------------------- CLI

POSTER = {  # METHOD.md §7, COCO 5K test
    "zero-shot": {"tr1": 62.9, "tr5": 86.3, "ir1": 47.0, "ir5": 74.7},
    "fine-tuned": {"tr1": 66.1, "tr5": 87.8, "ir1": 48.3, "ir5": 76.0},
}
POSTER_LABEL = "poster (4M pairs, B/16)"
_EXAMPLE = '[{"image": "%s", "caption": ["a caption", "another caption", ...]}, ...]'
LAYOUTS = {
    "coco": ("coco_karpathy_test.json", "val2014/COCO_val2014_000000391895.jpg"),
    "flickr": ("flickr30k_test.json", "flickr30k-images/1007129816.jpg"),
}


class EvalError(Exception):
    """A user error (missing file, bad layout): printed as one line, exit code 2."""


def _retrieval_specs(a):
    """[(name, json, image_root)] from --coco / --flickr / --retrieval, checked up front."""
    import os
    specs = []
    for name in ("coco", "flickr"):
        d = getattr(a, name)
        if not d:
            continue
        fname, example = LAYOUTS[name]
        js = os.path.join(d, fname)
        layout = (f"--{name} DIR expects DIR/{fname}, the ALBEF/BLIP annotation file (a JSON list "
                  f"{_EXAMPLE % example}), with the images under DIR (or under --image_root)")
        if not os.path.isfile(js):
            raise EvalError(f"annotation file {js} not found. Expected layout: {layout}")
        specs.append((name, js, a.image_root or d, layout))
    if a.retrieval:
        layout = (f"--retrieval JSON --image_root DIR: JSON is a list {_EXAMPLE % 'relative/path.jpg'} "
                  "(ALBEF/BLIP layout), each image at DIR/<image>")
        if not os.path.isfile(a.retrieval):
            raise EvalError(f"annotation file {a.retrieval} not found. Expected layout: {layout}")
        if not a.image_root:
            raise EvalError(f"--retrieval {a.retrieval} needs --image_root DIR. Expected layout: {layout}")
        specs.append((os.path.splitext(os.path.basename(a.retrieval))[0], a.retrieval, a.image_root, layout))
    for name, js, root, layout in specs:
        if not os.path.isdir(root):
            raise EvalError(f"image root {root} is not a directory (images of {js}). Expected layout: {layout}")
    return specs


def _parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="eval.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a OneR checkpoint (METHOD.md §6). With no data flag: zero-shot retrieval on "
                    "the built-in test splits; --all: every built-in evaluation.",
        epilog="examples:\n"
               "  python eval.py --checkpoint runs/demo/best.pt --all --out runs/demo/eval.json\n"
               "  python eval.py --checkpoint ckpt.pt --coco /data/coco --grid coco_grid.png\n"
               "  python eval.py --checkpoint ckpt.pt --zeroshot /data/imagenet/val --classnames names.txt\n"
               "  python eval.py --checkpoint ckpt.pt --linear_probe /data/cifar/train /data/cifar/val\n"
               "  python eval.py --checkpoint ckpt.pt --localize photo.jpg \"a dog on a red sofa\"")
    p.add_argument("--checkpoint", required=True, help="train.py checkpoint (RUN_DIR/ckpt_*.pt or best.pt)")
    g = p.add_argument_group("retrieval")
    g.add_argument("--coco", metavar="DIR", help="DIR/coco_karpathy_test.json + images under DIR")
    g.add_argument("--flickr", metavar="DIR", help="DIR/flickr30k_test.json + images under DIR")
    g.add_argument("--retrieval", metavar="JSON", help="any ALBEF/BLIP split (with --image_root)")
    g.add_argument("--image_root", metavar="DIR", help="image root (overrides DIR of --coco/--flickr)")
    g.add_argument("--grid", metavar="PNG", help="PNG grid of text -> top-5 image examples")
    g = p.add_argument_group("other evaluations ('builtin' = the built-in set)")
    g.add_argument("--zeroshot", metavar="DIR", help="image folder (root/<class>/<image>) or 'builtin'")
    g.add_argument("--classnames", metavar="FILE",
                   help="class names, one per line in sorted-folder order (.txt) or .json")
    g.add_argument("--templates", metavar="FILE", help="prompt templates, one per line with '{}' (default: SLIP's 7)")
    g.add_argument("--linear_probe", nargs="+", metavar="DIR", help="TRAIN_DIR VAL_DIR (image folders) or 'builtin'")
    g.add_argument("--probe_train", type=int, default=2000, help="built-in probe: train images used (default 2000)")
    g.add_argument("--localize", nargs="+", metavar="ARG", help="IMAGE \"text\" (a heat map per word), or 'builtin' "
                   "(pointing game over the object boxes)")
    g.add_argument("--out_png", metavar="PNG", help="localisation figure (default localize.png for IMAGE \"text\")")
    g.add_argument("--multimodal", nargs="?", const="builtin", metavar="EDITS_JSON",
                   help="(image, text) -> image retrieval; default the built-in edits.json "
                        "(another file in that layout needs --image_root)")
    g.add_argument("--all", action="store_true", help="every built-in evaluation (evaluate_builtin)")
    g.add_argument("--builtin", metavar="DIR", help="built-in set (default: the checkpoint's data_dir, "
                   "else data/builtin; made if absent)")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="JSON", help="write all results here")
    g.add_argument("--cache_dir", metavar="DIR", help="feature cache (default: --out's folder, else the checkpoint's)")
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    g.add_argument("--image_size", type=int, default=None,
                   help="evaluate at this resolution (position table interpolated)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _f(v, w=6):
    return f"{v:{w}.1f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"


def format_report(res):
    """The printed table: every section present in `res` (main()'s result dict)."""
    L = []
    keys = ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean")
    if res.get("retrieval"):
        heads = [k.upper().replace("TR", "TR@").replace("IR", "IR@") for k in keys]
        L.append("\n" + "zero-shot retrieval (%)".ljust(40) + "".join(f"{h:>7}" for h in heads)
                 + "  images captions skipped    time")
        for name, r in res["retrieval"].items():
            L.append(f"  {name:<37}" + "".join(" " + _f(r.get(k)) for k in keys)
                     + f"  {r['n_images']:>6} {r['n_texts']:>8} {r['skipped']:>7} {r['seconds']:6.1f}s")
            if r.get("chance"):
                L.append(f"    {'chance (random scores)':<35}" + "".join(" " + _f(r["chance"].get(k)) for k in keys))
            if name == "coco":
                for kind, p in POSTER.items():
                    L.append(f"    {POSTER_LABEL + ' ' + kind:<35}" + "".join(" " + _f(p.get(k)) for k in keys))
    for sec, title in (("zeroshot", "zero-shot classification (%)"), ("linear_probe", "linear probe (%)")):
        r = res.get(sec)
        if not r:
            continue
        L.append(f"\n{title:<40}  top1   top5 chance@1 chance@5  images classes    time")
        rows = r.get("attributes") or {r.get("dataset", "val"): r}
        for name, a in rows.items():
            n = a.get("n_images", a.get("n_test", r.get("n_test")))
            L.append(f"  {name:<37} {_f(a['top1'])} {_f(a['top5'])}   {_f(a.get('chance_top1'))}   "
                     f"{_f(a.get('chance_top5'))}  {n:>6} {a.get('n_classes', '?'):>7} {r['seconds']:6.1f}s")
        if sec == "linear_probe":
            L.append(f"    (chance@1 = share of the most frequent train class; train images {r.get('n_train')}, "
                     f"wd chosen {r.get('wd')})")
    r = res.get("pointing")
    if r:
        L.append(f"\n{'pointing game (%)':<40}  ours  random heat maps  random pixel  objects    time")
        for name, a in (("all objects", r), ("images with 2-3 objects", r.get("multi_object"))):
            if a:
                L.append(f"  {name:<37}{_f(a['accuracy'])}  {_f(a['random_heatmaps'], 15)}  {_f(a['random_pixel'], 12)}"
                         f"  {a['n']:>7} {r['seconds']:6.1f}s")
    r = res.get("localize")
    if r:
        w, h = r["png_size"]
        L.append(f"\nlocalisation: {len(r['words'])} word heat maps -> {r['png']} ({w}x{h})")
    r = res.get("multimodal")
    if r:
        L.append(f"\n{'multimodal retrieval (%)':<40}   R@1    R@5   R@10  queries gallery    time")
        for name, label in (("pair", "(image, text) query, encode_pair"), ("image_only", "image only"),
                            ("text_only", "text only"), ("image_plus_text", "image + text (sum)"),
                            ("chance", "chance")):
            L.append(f"  {label:<37} " + " ".join(_f(r[name].get(f"r{k}")) for k in (1, 5, 10))
                     + (f"  {r['n_queries']:>7} {r['gallery_size']:>7} {r['seconds']:6.1f}s" if name == "pair" else ""))
    return "\n".join(L)


def main(argv=None):
    """CLI entry point; returns the exit code (2 for a user error, printed as one line)."""
    import json
    a = _parser().parse_args(argv)
    try:
        return _main(a)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "could be read" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(a):
    import json
    import os
    t_all = time.time()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.linear_probe and not (len(a.linear_probe) == 2 or a.linear_probe == ["builtin"]):
        raise EvalError("--linear_probe takes TRAIN_DIR VAL_DIR (image folders) or 'builtin'")
    if a.localize and not (len(a.localize) == 2 or a.localize == ["builtin"]):
        raise EvalError("--localize takes IMAGE \"text\" or 'builtin'")
    if a.templates:
        templates = read_templates(a.templates)
    else:
        templates = SLIP_TEMPLATES
    specs = _retrieval_specs(a)
    if a.localize and a.localize != ["builtin"] and not os.path.isfile(a.localize[0]):
        raise EvalError(f"--localize: image {a.localize[0]} not found")
    for d in ([a.zeroshot] if a.zeroshot and a.zeroshot != "builtin" else []) + \
             (a.linear_probe if a.linear_probe and a.linear_probe != ["builtin"] else []):
        if not os.path.isdir(d):
            raise EvalError(f"image folder {d} is not a directory. Expected layout: {d}/<class>/<image>.jpg, "
                            "one subfolder per class (ImageNet validation layout)")

    model, tokenizer, ck = load_checkpoint(a.checkpoint, image_size=a.image_size)
    model.to(device).eval()
    tc = ck.get("train_config") or {}
    model_key = _file_key(os.path.abspath(a.checkpoint), os.path.getsize(a.checkpoint),
                          os.stat(a.checkpoint).st_mtime_ns, a.image_size)
    cache_dir = a.cache_dir or os.path.dirname(os.path.abspath(a.out or a.checkpoint))
    progress, bs = not a.quiet, a.batch_size
    cfg = model.cfg
    res = {"checkpoint": a.checkpoint, "step": ck.get("step"), "fine_tuned_from": tc.get("init_from") or None,
           "model": {k: getattr(cfg, k) for k in ("image_size", "patch_size", "width", "depth", "heads", "embed_dim")},
           "device": str(device), "batch_size": bs}
    print(f"OneR evaluation of {a.checkpoint} (step {ck.get('step')}; width {cfg.width}, depth {cfg.depth}, "
          f"patch {cfg.patch_size}, image {cfg.image_size}, embed {cfg.embed_dim}) on {device}, batch {bs}",
          flush=True)

    other = a.zeroshot or a.linear_probe or a.localize or a.multimodal
    need_builtin = a.all or (not specs and not other) or "builtin" in (
        [a.zeroshot, a.multimodal] + list(a.linear_probe or []) + list(a.localize or []))
    paths = None
    if need_builtin:
        root = a.builtin or (tc.get("data_dir") if tc.get("data") == "builtin" and tc.get("data_dir") else None) \
            or "data/builtin"
        paths = open_builtin(root)
        res["builtin"] = paths["root"]
    images = _ImageCache(model, bs, device, progress)
    if a.all:
        res.update(evaluate_builtin(model, tokenizer, paths, device, bs, a.probe_train, progress))
        res["builtin_seconds"] = res.pop("seconds")
        res["retrieval"] = {f"builtin {k}": v for k, v in res["retrieval"].items()}
    grids = []
    if not a.all and (specs or not other):
        res["retrieval"] = {}
        runs = specs or [(f"builtin {s}", paths[s], paths["image_root"], "") for s in ("test", "test_comp")]
        for name, js, root, _ in runs:
            m, split = retrieval_run(model, tokenizer, js, root, bs, device, progress=progress,
                                     image_embedder=images if name.startswith("builtin") else None)
            if name == "coco":
                m["poster"] = {POSTER_LABEL + " " + k: v for k, v in POSTER.items()}
            res["retrieval"][name] = m
            if a.grid:
                stem, ext = os.path.splitext(a.grid)
                path = a.grid if len(runs) == 1 or name == runs[0][0] else f"{stem}_{name.replace(' ', '_')}{ext}"
                grids.append(draw_retrieval_examples(split, path))
    elif a.all and a.grid:
        m, split = retrieval_run(model, tokenizer, paths["test"], paths["image_root"], bs, device,
                                 progress=progress, image_embedder=images)
        grids.append(draw_retrieval_examples(split, a.grid))
    if grids:
        res["grid"] = grids
    if a.zeroshot and not (a.all and a.zeroshot == "builtin"):
        if a.zeroshot == "builtin":
            res["zeroshot"] = builtin_zeroshot(model, tokenizer, paths, bs, device, progress, images)
        else:
            res["zeroshot"] = folder_zeroshot(model, tokenizer, a.zeroshot, templates, a.classnames, bs, device,
                                              progress, cache_dir, model_key)
            res["zeroshot"]["dataset"] = a.zeroshot
    if a.linear_probe and not (a.all and a.linear_probe == ["builtin"]):
        if a.linear_probe == ["builtin"]:
            cache = os.path.join(cache_dir, f"features_{_file_key(model_key, paths['root'], a.probe_train)}.pt")
            res["linear_probe"] = builtin_linear_probe(model, paths, bs, device, progress, a.probe_train,
                                                       images=images, cache_path=cache)
        else:
            res["linear_probe"] = folder_linear_probe(model, *a.linear_probe, bs, device, progress, cache_dir,
                                                      model_key)
            res["linear_probe"]["dataset"] = a.linear_probe[1]
    if a.localize:
        t0 = time.time()
        if a.localize == ["builtin"]:
            if not a.all:
                res["pointing"] = builtin_pointing(model, tokenizer, paths, bs, device, progress)
            if a.out_png:
                res["localize_png"] = draw_builtin_localization(model, tokenizer, paths, a.out_png, device)
        else:
            res["localize"] = localize(model, tokenizer, a.localize[0], a.localize[1], a.out_png or "localize.png",
                                       device)
            res["localize"]["seconds"] = time.time() - t0
    if a.multimodal and not (a.all and a.multimodal == "builtin"):
        if a.multimodal == "builtin":
            res["multimodal"] = multimodal_retrieval(model, tokenizer, paths["edits"], paths["image_root"], bs,
                                                     device, progress, images)
        else:
            if not os.path.isfile(a.multimodal) or not a.image_root:
                raise EvalError(f"--multimodal {a.multimodal}: expected an edits file {{\"gallery\": [image paths], "
                                "\"triplets\": [{\"source\": path, \"text\": ..., \"target_index\": i}]}} and "
                                "--image_root DIR holding the paths")
            res["multimodal"] = multimodal_retrieval(model, tokenizer, a.multimodal, a.image_root, bs, device,
                                                     progress, images)
    res["seconds"] = time.time() - t_all
    print(format_report(res))
    for g in grids:
        print(f"wrote retrieval examples {g}")
    if res.get("localize_png"):
        print(f"wrote {res['localize_png']}")
    print(f"\ntotal time {res['seconds']:.1f}s")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
