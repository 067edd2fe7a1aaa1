"""OneR: one transformer, one projection head, one space for images and text.

A single-file reference of the method in ../shared/METHOD.md (Jang et al., AAAI 2023).
Read top to bottom: config, attention, block, encoder, heads, losses, the OneR step.

    F(x) = normalize(head(LN(transformer([CLS, x]))[CLS]))

x is image patches, caption tokens, or both concatenated; the same weights see all
three. Plain image-text contrast (ITC) in one tower collapses on the modality gap, so
OneR adds contrast against the *mixed* key normalize(kI + kT):
    XMC  normalize(zI + zT)        vs kM      (cross-modal mixup)
    CIC  normalize(zI|T + zT|I)    vs kM      (contextual invariance, cross-only pass)
    CMC  zIT = F([I; T])           vs kM      (contextual mixup, the joint pass)
plus masked language / image modelling on the masked views. Keys come from an EMA key
encoder (MoCo v3 lineage) or, with momentum 0, from the student under no_grad.
"""
import copy
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

CONTRASTIVE = ("itc", "xmc", "cic", "cmc")
MASKED = ("mlm", "mim")


# ----------------------------------------------------------------------------- config
@dataclass
class OneRConfig:
    # encoder (METHOD.md §2); defaults are B/16
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 256          # E, the shared space
    vocab_size: int = 50257       # derived from the tokenizer by the trainer
    max_text_len: int = 32        # L, fixed so shapes never change
    head_type: str = "linear"     # [choice] projection head: "linear" | "mlp" | "mocov3"
    two_heads: bool = False       # ablation "ITC (two heads)": image and text heads
    mlm_slot_frac: float = 0.25   # MLM logits are computed in ceil(frac*L) slots per row
    # loss terms: weight 0 switches a term off (its head/scale is not even built)
    itc: float = 1.0
    xmc: float = 0.0
    cic: float = 0.0
    cmc: float = 1.0
    mlm: float = 1.0
    mim: float = 1.0
    # [choice] key momentum; 0 (best on val, README) = keys are the student's no-grad outputs
    momentum: float = 0.0
    # [choice] queries from extra "clean" student passes (best on val), or from the "masked" ones
    query_view: str = "clean"
    # [choice] temperature: "per_term" learnable scale per term, "shared", or "fixed"
    temperature: str = "per_term"
    temp_init: float = 0.07       # learnable scales start at 1/temp_init
    temp_fixed: float = 0.2       # tau for temperature="fixed" (MoCo v3)
    scale_max: float = 100.0      # learnable scales are clamped to <= this

    @property
    def grid(self):  # patches per side
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid ** 2

    @property
    def mlm_slots(self):  # data.py never masks more tokens than this per row
        return max(1, math.ceil(self.mlm_slot_frac * self.max_text_len))

    @property
    def active(self):  # active loss terms, in a fixed order
        return [t for t in CONTRASTIVE + MASKED if getattr(self, t) > 0]

    @staticmethod
    def from_name(name, **overrides):
        sizes = {  # width, depth, heads, patch, image, embed
            "mu": dict(width=64, depth=2, heads=2, patch_size=8, image_size=32,
                       embed_dim=32, vocab_size=512, max_text_len=16),
            "S/16": dict(width=384, depth=12, heads=6, patch_size=16, image_size=224),
            "B/16": dict(width=768, depth=12, heads=12, patch_size=16, image_size=224),
        }
        if name not in sizes:
            raise ValueError(f"unknown size {name!r}; choose one of {sorted(sizes)}")
        unknown = set(overrides) - {f.name for f in fields(OneRConfig)}
        if unknown:
            raise ValueError(f"unknown OneRConfig field(s): {sorted(unknown)}")
        return replace(OneRConfig(), **{**sizes[name], **overrides}).validate()

    def validate(self):
        choices = dict(head_type=("linear", "mlp", "mocov3"), query_view=("masked", "clean"),
                       temperature=("per_term", "shared", "fixed"))
        for key, ok in choices.items():
            if getattr(self, key) not in ok:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {ok}")
        if self.image_size % self.patch_size or self.width % self.heads:
            raise ValueError("image_size must divide by patch_size and width by heads")
        if not any(getattr(self, t) > 0 for t in CONTRASTIVE):
            raise ValueError("at least one contrastive term (itc/xmc/cic/cmc) must be on")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum}: expected 0 <= m < 1")
        for t in CONTRASTIVE + MASKED:
            if getattr(self, t) < 0:
                raise ValueError(f"{t}={getattr(self, t)}: a loss weight is >= 0 (0 = off)")
        if self.temp_init <= 0 or self.temp_fixed <= 0:
            raise ValueError("temp_init and temp_fixed must be > 0")
        if self.two_heads and not (self.itc or self.xmc or self.cic):
            raise ValueError("two_heads needs itc, xmc or cic: only text queries train the text head")
        return self

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # fused: one matmul instead of three
        self.proj = nn.Linear(width, width)

    def forward(self, x, mask=None):  # x (B, N, D); mask broadcastable to (B, H, N, N)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # mask=None on image-only passes lets SDPA pick its fastest (flash) kernel
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):  # pre-LayerNorm transformer block
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask)
        fc1, gelu, fc2 = self.mlp
        h = fc1(self.ln2(x))  # (B, N, 4D)
        # no autograd (keys, eval): GELU in place, no 2nd (B, N, 4D) buffer: 6-14 % of CPU inference
        return x + fc2(gelu(h) if torch.is_grad_enabled() else torch.ops.aten.gelu_(h))


def fp32(x):  # at least float32: logits and norms never in bf16, float64 stays float64
    return x.to(torch.promote_types(x.dtype, torch.float32))


def patchify(images, p):  # (B, 3, H, W) -> (B, P, p*p*3), patches in row-major order
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


class Encoder(nn.Module):
    """The one tower. Modality-specific parts are only the input embedders; no type
    embeddings, no special tokens beyond one [CLS] and one [MASK] vector shared by all."""

    def __init__(self, cfg):
        super().__init__()
        D, self.p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, D)
        self.pos_image = nn.Parameter(torch.randn(cfg.grid, cfg.grid, D) * 0.02)  # 2-D table
        self.tok_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_text = nn.Parameter(torch.randn(cfg.max_text_len, D) * 0.02)
        self.cls = nn.Parameter(torch.randn(D) * 0.02)        # no position embedding, ever
        # one [MASK] for both modalities; built only when MLM or MIM can use it
        masking = cfg.mlm > 0 or cfg.mim > 0
        self.mask_token = nn.Parameter(torch.randn(D) * 0.02) if masking else None
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(D)
        self.grad_ckpt = False  # activation checkpointing: recompute blocks in backward
        nn.init.normal_(self.tok_embed.weight, std=0.02)

    def embed_image(self, images, mask=None):  # -> (B, P, D); mask (B, P) True = [MASK]
        x = self.patch_embed(patchify(images, self.p))
        if mask is not None and self.mask_token is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        return x + self.pos_image.flatten(0, 1)  # positions are added to [MASK] too

    def embed_text(self, ids, masked=None):  # -> (B, L, D); masked (B, L) True = [MASK]
        x = self.tok_embed(ids)
        if masked is not None and self.mask_token is not None:
            x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
        return x + self.pos_text[: ids.shape[1]]

    def forward(self, image=None, text=None, text_mask=None, cross=False):
        """image (B, P, D) and/or text (B, L, D) embeddings -> (B, N, D) after ln_f.
        Sequences: [CLS, patches], [CLS, tokens], [CLS, patches, tokens], or with
        cross=True the CIC pass [CLS_a, patches, CLS_b, tokens] where each group
        attends only to the other one."""
        parts = [x for x in (image, text) if x is not None]
        B = parts[0].shape[0]
        cls = self.cls.to(parts[0].dtype).expand(B, 1, -1)
        mask = None
        if text is not None:
            if not torch.compiler.is_compiling():  # SDPA would silently return zeros
                torch._assert_async(text_mask.any(1).all(), "a text row has no valid token")
            ones = text_mask.new_ones(B, 1 + (image.shape[1] if image is not None else 0))
            keys = torch.cat([ones, text_mask], 1)  # (B, N) True = may be attended to
            mask = keys[:, None, None, :]             # (B, 1, 1, N) key padding
        if cross:
            x = torch.cat([cls, image, cls, text], 1)
            n_img = 1 + image.shape[1]
            group = torch.arange(x.shape[1], device=x.device) >= n_img  # False=image group
            other = group[:, None] != group[None, :]                      # (N, N) cross only
            keys = torch.cat([text_mask.new_ones(B, n_img + 1), text_mask], 1)
            mask = other[None, None] & keys[:, None, None, :]             # (B, 1, N, N)
        else:
            x = torch.cat([cls] + parts, 1)
        for block in self.blocks:
            if self.grad_ckpt and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_f(x)


# ----------------------------------------------------------------------------- heads
def mlp_bn(dims, last_bn):  # MoCo v3's MLP: (Linear, BatchNorm, ReLU)*, Linear[, BatchNorm]
    hidden = [m for a, b in zip(dims[:-2], dims[1:-1])
              for m in (nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True))]
    tail = [nn.BatchNorm1d(dims[-1], affine=False)] if last_bn else []
    return nn.Sequential(*hidden, nn.Linear(dims[-2], dims[-1], bias=False), *tail)


def projection_head(cfg):  # D -> E; [choice] linear (default), 2-layer MLP, or MoCo v3's
    if cfg.head_type == "mocov3":  # 3 layers with BatchNorm, hidden 4D (MoCo v3: 4096)
        return mlp_bn([cfg.width, 4 * cfg.width, 4 * cfg.width, cfg.embed_dim], last_bn=True)
    if cfg.head_type == "mlp":
        return nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(),
                             nn.Linear(cfg.width, cfg.embed_dim))
    return nn.Linear(cfg.width, cfg.embed_dim)


class Tower(nn.Module):
    """Encoder + projection head(s): everything the key encoder copies."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder = Encoder(cfg)
        names = ("image", "text") if cfg.two_heads else ("shared",)
        self.heads = nn.ModuleDict({n: projection_head(cfg) for n in names})

    def project(self, h, modality, predictor=None):  # h (..., D) -> unit vectors (..., E), >= fp32
        head = self.heads["shared" if "shared" in self.heads else modality]
        z = head(h.flatten(0, -2)).unflatten(0, h.shape[:-1])  # BatchNorm wants (N, C)
        return F.normalize(fp32(z if predictor is None else predictor(z)), dim=-1)


class MLMHead(nn.Module):  # BERT-style: dense, GELU, LayerNorm, decoder tied to tok_embed
    def __init__(self, cfg, tok_embed):
        super().__init__()
        self.dense, self.ln = nn.Linear(cfg.width, cfg.width), nn.LayerNorm(cfg.width)
        self.tok_embed = [tok_embed]  # a list so the tied weight is not registered twice
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h):  # (..., D) -> (..., V)
        return self.ln(F.gelu(self.dense(h))) @ self.tok_embed[0].weight.t() + self.bias


# ----------------------------------------------------------------------------- losses
def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x):
    """All ranks' keys, concatenated: (B, E) -> (world*B, E). Keys carry no gradient,
    so a plain all_gather is exact; a no-op in a single process."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def global_count(n):
    """(count summed over ranks, world size). Each rank's masked-modelling loss is
    sum_r * world / count_global, so that DDP's gradient *average* over ranks equals the
    mean over every masked position of the global batch (METHOD.md §5)."""
    if not is_distributed():
        return n, 1
    n = n.detach().clone()
    dist.all_reduce(n)
    return n, dist.get_world_size()


def mix(a, b):  # the poster's (F(a) + F(b)) / 2, re-normalised (same direction)
    return F.normalize(a + b, dim=-1)


def nce(q, k, scale, offset=0):
    """InfoNCE. q (B, E) local queries, k (N, E) keys of all ranks, positive of query i is
    key offset+i. Logits in fp32 even under autocast."""
    logits = scale * fp32(q) @ fp32(k).t()  # (B, N)
    target = offset + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, target)


def itc_loss(zI, zT, kI, kT, scale, offset=0):   # F(I) . F(T), both directions
    return (nce(zI, kT, scale, offset) + nce(zT, kI, scale, offset)) / 2


def xmc_loss(zI, zT, kM, scale, offset=0):       # (F(I)+F(T))/2 . (F(I)+F(T))/2
    return nce(mix(zI, zT), kM, scale, offset)


def cic_loss(zIgT, zTgI, kM, scale, offset=0):   # (F(IT)+F(TI))/2 . (F(I)+F(T))/2
    return nce(mix(zIgT, zTgI), kM, scale, offset)


def cmc_loss(zIT, kM, scale, offset=0):          # F(I,T) . (F(I)+F(T))/2
    return nce(zIT, kM, scale, offset)


def mlm_loss(logits, labels, count=None, world=1):
    """logits (M, V) at MLM slots, labels (M,) with -100 on empty slots. Sum over
    predicted positions / count (default: local count) * world."""
    nll = F.cross_entropy(fp32(logits), labels, ignore_index=-100, reduction="sum")
    count = (labels != -100).sum() if count is None else count
    return nll * world / count.clamp(min=1)


def mim_loss(pred, patches, mask, count=None, world=1):
    """pred, patches (B, P, p*p*3); mask (B, P) True = masked. Targets are per-patch
    normalised pixels (MAE's norm_pix), so the model predicts structure, not brightness."""
    t = fp32(patches)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    err = ((fp32(pred) - t) ** 2).mean(-1)  # (B, P)
    count = mask.sum() if count is None else count
    return (err * mask).sum() * world / count.clamp(min=1)


def mlm_slots(labels, k):
    """Fixed-shape gather of predicted positions: (B, L) labels -> (B, k) indices whose
    first entries are the positions with a label (stable order), so the full-vocabulary
    projection runs on k slots per row instead of L, with no data-dependent shapes."""
    return (labels != -100).to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :k]


# ----------------------------------------------------------------------------- OneR
class OneR(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.validate()
        self.student = Tower(cfg)
        # key encoder: an EMA copy without gradient (m > 0), else the student itself
        self.key = copy.deepcopy(self.student).requires_grad_(False) if cfg.momentum > 0 else None
        if cfg.mlm > 0:
            self.mlm_head = MLMHead(cfg, self.student.encoder.tok_embed)
        if cfg.mim > 0:
            self.mim_head = nn.Linear(cfg.width, 3 * cfg.patch_size ** 2)
        # MoCo v3: a predictor on the query side only. Its BatchNorms (and the head's) see one
        # pass (one modality) per batch in training, running stats pooled over passes in eval.
        self.predictor = (mlp_bn([cfg.embed_dim, 4 * cfg.width, cfg.embed_dim], last_bn=False)
                          if cfg.head_type == "mocov3" else None)
        terms = [t for t in CONTRASTIVE if getattr(cfg, t) > 0]
        init = math.log(1 / cfg.temp_init)  # scales live in log space: always positive
        if cfg.temperature == "per_term":
            self.log_scale = nn.ParameterDict({t: nn.Parameter(torch.tensor(init)) for t in terms})
        elif cfg.temperature == "shared":
            self.log_scale = nn.ParameterDict({"shared": nn.Parameter(torch.tensor(init))})
        else:
            self.register_buffer("fixed_scale", torch.tensor(1 / cfg.temp_fixed))

    def scale(self, term):
        if self.cfg.temperature == "fixed":
            return self.fixed_scale
        p = self.log_scale[term if self.cfg.temperature == "per_term" else "shared"]
        return p.exp().clamp(max=self.cfg.scale_max)

    # --- clean embeddings (evaluation): the key encoder when one is kept
    def _eval_tower(self):
        return self.key if self.key is not None else self.student

    def encode_image(self, images):  # (B, 3, H, W) -> (B, E)
        t = self._eval_tower()
        return t.project(t.encoder(image=t.encoder.embed_image(images))[:, 0], "image")

    def encode_text(self, text_ids, text_mask):  # (B, L), (B, L) -> (B, E)
        t = self._eval_tower()
        h = t.encoder(text=t.encoder.embed_text(text_ids), text_mask=text_mask)
        return t.project(h[:, 0], "text")

    def encode_pair(self, images, text_ids, text_mask):  # -> (B, E), F([I; T])
        t = self._eval_tower()
        e = t.encoder
        h = e(image=e.embed_image(images), text=e.embed_text(text_ids), text_mask=text_mask)
        return t.project(h[:, 0], "image")

    def encode_patches(self, images):  # (B, 3, H, W) -> (B, P, E), for localisation
        t = self._eval_tower()
        return t.project(t.encoder(image=t.encoder.embed_image(images))[:, 1:], "image")

    @torch.no_grad()
    def update_key_encoder(self, m):
        """key <- m * key + (1 - m) * student; m is passed in so train.py owns the schedule."""
        if self.key is not None:
            k, s = list(self.key.parameters()), list(self.student.parameters())
            torch._foreach_lerp_(k, [p.detach() for p in s], 1.0 - m)

    # --- the training step
    def forward(self, b):
        cfg, S = self.cfg, self.student
        E = S.encoder
        images, ids, tmask = b["images"], b["text_ids"], b["text_mask"]
        B, P = images.shape[0], cfg.num_patches
        on = lambda t: getattr(cfg, t) > 0  # noqa: E731
        masked_model = on("mlm") or on("mim")
        clean_q = cfg.query_view == "clean"
        out, mlm_parts, mim_parts = {}, [], []
        Q = lambda h, modality: S.project(h, modality, self.predictor)  # noqa: E731 query side

        def masked_losses(h, n_img, v):  # collect MLM/MIM predictions of one pass
            if on("mim") and n_img:
                mim_parts.append((self.mim_head(h[:, 1:1 + P]), b[f"image_mask_{v}"]))
            if on("mlm") and h.shape[1] > 1 + n_img:
                labels = b[f"text_labels_{v}"]
                idx = mlm_slots(labels, cfg.mlm_slots)                      # (B, k)
                ht = h[:, 1 + n_img:].gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
                mlm_parts.append((self.mlm_head(ht).flatten(0, 1), labels.gather(1, idx).flatten()))

        # student unimodal passes on view 1 (masked), feeding queries and/or MLM/MIM
        need_uni = on("itc") or on("xmc") or masked_model
        if need_uni and (masked_model or not clean_q):
            hI = E(image=E.embed_image(images, b["image_mask_uni"]))                # (B, 1+P, D)
            hT = E(text=E.embed_text(b["text_input_uni"], b["text_masked_uni"]), text_mask=tmask)
            masked_losses(hI, P, "uni")
            masked_losses(hT, 0, "uni")
            zI, zT = Q(hI[:, 0], "image"), Q(hT[:, 0], "text")
        if clean_q and (on("itc") or on("xmc")):  # queries from extra clean passes
            zI = Q(E(image=E.embed_image(images))[:, 0], "image")
            zT = Q(E(text=E.embed_text(ids), text_mask=tmask)[:, 0], "text")
        # student joint pass on view 2: [CLS, patches, tokens]
        if on("cmc") or masked_model:
            if masked_model or not clean_q:
                hIT = E(image=E.embed_image(images, b["image_mask_joint"]),
                        text=E.embed_text(b["text_input_joint"], b["text_masked_joint"]),
                        text_mask=tmask)                                           # (B, 1+P+L, D)
                masked_losses(hIT, P, "joint")
                zIT = Q(hIT[:, 0], "image")
            if clean_q:
                zIT = Q(E(image=E.embed_image(images), text=E.embed_text(ids),
                          text_mask=tmask)[:, 0], "image")
        # CIC: the cross-only pass [CLS_a, patches, CLS_b, tokens]
        if on("cic"):  # masked view: the joint view's inputs; clean view: clean inputs
            im, tx, tm = ((None, ids, None) if clean_q else
                          (b["image_mask_joint"], b["text_input_joint"], b["text_masked_joint"]))
            hX = E(image=E.embed_image(images, im), text=E.embed_text(tx, tm),
                   text_mask=tmask, cross=True)
            zIgT, zTgI = Q(hX[:, 0], "image"), Q(hX[:, 1 + P], "text")

        # keys: clean inputs through the key encoder, no gradient, gathered over ranks
        with torch.no_grad():
            if self.key is None and clean_q and self.predictor is None and (on("itc") or on("xmc")):
                kI, kT = zI.detach(), zT.detach()  # m = 0, clean queries: same computation
            else:
                K = self._eval_tower()
                kI = K.project(K.encoder(image=K.encoder.embed_image(images))[:, 0], "image")
                kT = K.project(K.encoder(text=K.encoder.embed_text(ids), text_mask=tmask)[:, 0], "text")
            kI, kT = gather(kI), gather(kT)
            kM = mix(kI, kT)
        offset = dist.get_rank() * B if is_distributed() else 0

        if on("itc"):
            out["itc"] = itc_loss(zI, zT, kI, kT, self.scale("itc"), offset)
        if on("xmc"):
            out["xmc"] = xmc_loss(zI, zT, kM, self.scale("xmc"), offset)
        if on("cic"):
            out["cic"] = cic_loss(zIgT, zTgI, kM, self.scale("cic"), offset)
        if on("cmc"):
            out["cmc"] = cmc_loss(zIT, kM, self.scale("cmc"), offset)
        if mlm_parts:
            logits, labels = (torch.cat(x) for x in zip(*mlm_parts))
            count, world = global_count((labels != -100).sum())
            out["mlm"] = mlm_loss(logits, labels, count, world)
        if mim_parts:
            pred = torch.cat([p for p, _ in mim_parts], 1)
            mask = torch.cat([m for _, m in mim_parts], 1)
            target = patchify(images, cfg.patch_size).repeat(1, len(mim_parts), 1)
            count, world = global_count(mask.sum())
            out["mim"] = mim_loss(pred, target, mask, count, world)

        out["loss"] = sum(getattr(cfg, t) * out[t] for t in cfg.active if t in out)
        # diagnostics (tensors, no host sync): scales and in-batch image->text accuracy
        with torch.no_grad():
            for t in CONTRASTIVE:
                if on(t):
                    out[f"scale_{t}"] = self.scale(t).detach()
            q = zI if (on("itc") or on("xmc")) else zIT if on("cmc") else mix(zIgT, zTgI)
            target = offset + torch.arange(B, device=q.device)
            out["acc_i2t"] = ((q @ kT.t()).argmax(1) == target).float().mean()
        return out
