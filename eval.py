"""OneR evaluation: the metrics of METHOD.md §6 and the modality-gap measures of issue 7.

Read top to bottom: retrieval metrics, multimodal R@K, zero-shot classification, linear
probe, localisation (pointing game, patch heat maps), modality gap, embedding helpers that
run a model over a split, and Pillow figures.

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


def embed_images(model, image_paths, transform, batch_size=64, device="cpu", progress=True, load_image=None):
    """Run model.encode_image over image files. Returns (emb (N, E) float on CPU, ok (N,)
    bool); rows of unreadable images are zero and ok=False (the count is printed, the first
    few paths too) - an unreadable image is never fatal. load_image defaults to
    data.load_image; data.BadSample and OSError (missing file, PIL decode error) mean
    "unreadable". transform(pil, None) -> (3, S, S), e.g. data.ImageTransform(S)."""
    if load_image is None:
        import data
        load_image, unreadable = data.load_image, (data.BadSample, OSError)
    else:
        bad_sample = getattr(sys.modules.get("data"), "BadSample", None)    # if data.py is loaded
        unreadable = (OSError,) + ((bad_sample,) if bad_sample else ())
    n = len(image_paths)
    ok = torch.zeros(n, dtype=torch.bool)
    rows, embs, pending, idx, skipped = [], [], [], [], 0
    report = _Progress("embed_images", n, progress)

    def flush():
        if pending:
            embs.append(model.encode_image(torch.stack(pending).to(device)).float().cpu())
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
                    print(f"embed_images: skipping unreadable image {path}: {err}", file=sys.stderr)
            if len(pending) == batch_size:
                flush()
            report(i + 1, f" ({skipped} skipped)")
        flush()
    report(n, f" ({skipped} skipped)", final=True)
    if not embs:
        return torch.zeros(n, 0), ok
    out = torch.zeros(n, embs[0].shape[1])
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


def embed_retrieval_split(model, tokenizer, json_path, image_root, batch_size=64, device="cpu", progress=True):
    """Embed an ALBEF/BLIP retrieval split. Unreadable images are dropped together with
    their captions (so they neither score nor distract), and counted. Returns a dict:
    image_emb (I, E), text_emb (T, E), text_to_image (T,) indexing the kept images,
    image_paths, captions (kept), skipped (images), skipped_captions, seconds."""
    import data
    t0 = time.time()
    paths, captions, t2i = data.load_retrieval_split(json_path, image_root)
    transform = data.ImageTransform(model.cfg.image_size, train=False)
    image_emb, ok = embed_images(model, paths, transform, batch_size, device, progress)
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
