"""The OneR model: passes, masks, keys, gradients, term switches and temperatures.

Proves, on the tiny "mu" size with batches from tests/batchgen.py (DESIGN.md's table):
- passes (METHOD.md §4): every loss function receives the queries of a pass recomputed
  here by hand, and the keys of clean inputs through the key encoder (the student under
  no_grad when m = 0); XMC/CIC/CMC get kM = normalize(kI + kT); zI does not depend on
  any text; keys carry no gradient, so the student's gradient equals the one of a loss
  built by hand with detached keys;
- masks: the image-only pass builds no attention mask; text passes mask padding columns
  only; the cross-only pass lets image rows see only text columns and vice versa (mask
  structure at any depth, and behaviour at depth 1); padding changes no embedding;
  an all-padding text row raises;
- MLM runs its head only on cfg.mlm_slots slots per row, equals the mean CE over labelled
  positions computed on every position, and ignores empty slots; MIM equals its
  definition over masked patches and ignores unmasked predictions;
- EMA: update_key_encoder(m) moves every key parameter by exactly (1 - m) of the gap;
  with m > 0 encode_* use the key encoder;
- switches: a term with weight 0 has no head/scale, no output entry and no share of
  "loss"; "loss" is exactly sum(weight * term); each temperature mode builds the
  documented parameters, initialised at 1/temp_init and clamped at scale_max;
- every supported config gives a finite loss and a gradient for every trainable
  parameter (DDP without find_unused_parameters).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_oner_model.py
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import oner
from batchgen import make_batch
from oner import OneR, OneRConfig, itc_loss, mlm_slots, patchify

MODEL = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)
LOSSES = ("itc_loss", "xmc_loss", "cic_loss", "cmc_loss", "mlm_loss", "mim_loss")


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return OneR(OneRConfig.from_name("mu", **kw))


def perturb_student(model, seed=123, std=0.05):
    """Make student and key encoder differ (they are equal right after construction)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def spy(monkeypatch):
    """Record the arguments forward passes to each loss function."""
    calls = {}
    for name in LOSSES:
        def wrapper(*a, _orig=getattr(oner, name), _name=name, **k):
            calls[_name] = a
            return _orig(*a, **k)
        monkeypatch.setattr(oner, name, wrapper)
    return calls


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Record (sequence length, attn_mask) of every attention call."""
    seen, orig = [], F.scaled_dot_product_attention

    def wrapper(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[2], attn_mask))
        return orig(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(oner.F, "scaled_dot_product_attention", wrapper)
    return seen


# hand-written passes of METHOD.md §4 through a tower T (student or key encoder)
def cls_image(T, images, mask=None):
    e = T.encoder
    return T.project(e(image=e.embed_image(images, mask))[:, 0], "image")


def cls_text(T, ids, tmask, masked=None):
    e = T.encoder
    return T.project(e(text=e.embed_text(ids, masked), text_mask=tmask)[:, 0], "text")


def cls_joint(T, images, ids, tmask, imask=None, masked=None):
    e = T.encoder
    h = e(image=e.embed_image(images, imask), text=e.embed_text(ids, masked), text_mask=tmask)
    return T.project(h[:, 0], "image")


def cls_cross(T, images, ids, tmask, imask=None, masked=None):
    e = T.encoder
    P = (images.shape[-1] // e.p) ** 2
    h = e(image=e.embed_image(images, imask), text=e.embed_text(ids, masked), text_mask=tmask,
          cross=True)
    return T.project(h[:, 0], "image"), T.project(h[:, 1 + P], "text")


def close(a, b, atol=1e-5, rtol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- passes
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("query_view", ["masked", "clean"])
def test_losses_receive_the_specified_queries_and_keys(spy, momentum, query_view):
    model = build(momentum=momentum, query_view=query_view, xmc=1.0, cic=1.0)
    if momentum:
        perturb_student(model)  # so the key encoder is distinguishable from the student
    b = make_batch(model.cfg, B=4, seed=3)
    model(b)
    S, K = model.student, (model.key if momentum else model.student)
    im, ids, tm = b["images"], b["text_ids"], b["text_mask"]
    with torch.no_grad():
        kI, kT = cls_image(K, im), cls_text(K, ids, tm)
        if query_view == "masked":
            zI = cls_image(S, im, b["image_mask_uni"])
            zT = cls_text(S, b["text_input_uni"], tm, b["text_masked_uni"])
            zIT = cls_joint(S, im, b["text_input_joint"], tm, b["image_mask_joint"],
                            b["text_masked_joint"])
            zX = cls_cross(S, im, b["text_input_joint"], tm, b["image_mask_joint"],
                           b["text_masked_joint"])
        else:
            zI, zT, zIT, zX = (cls_image(S, im), cls_text(S, ids, tm), cls_joint(S, im, ids, tm),
                               cls_cross(S, im, ids, tm))
    kM = F.normalize(kI + kT, dim=-1)
    a = spy["itc_loss"]
    assert close(a[0], zI) and close(a[1], zT) and close(a[2], kI) and close(a[3], kT)
    assert close(a[2], model.encode_image(im)) and close(a[3], model.encode_text(ids, tm))
    a = spy["xmc_loss"]
    assert close(a[0], zI) and close(a[1], zT) and close(a[2], kM)
    a = spy["cic_loss"]
    assert close(a[0], zX[0]) and close(a[1], zX[1]) and close(a[2], kM)
    a = spy["cmc_loss"]
    assert close(a[0], zIT) and close(a[1], kM)
    if momentum:  # keys are not the student's
        assert not close(spy["itc_loss"][2], cls_image(S, im).detach(), atol=1e-3)
    # queries carry the graph, keys none
    assert all(q.requires_grad for q in spy["itc_loss"][:2] + spy["cmc_loss"][:1])
    keys = [*spy["itc_loss"][2:4], spy["xmc_loss"][2], spy["cic_loss"][2], spy["cmc_loss"][1]]
    assert not any(k.requires_grad for k in keys)


@MODEL
@given(seed=seeds)
def test_image_query_does_not_depend_on_text(seed):
    model = build(momentum=0.0)
    b = make_batch(model.cfg, B=3, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b2 = dict(b)
    L, V = model.cfg.max_text_len, model.cfg.vocab_size
    for key in ("text_ids", "text_input_uni", "text_input_joint"):
        b2[key] = torch.randint(0, V, (3, L), generator=g)
    b2["text_mask"] = torch.arange(L)[None] < torch.randint(1, L + 1, (3, 1), generator=g)
    got, orig = [], oner.itc_loss  # (hypothesis and function-scoped fixtures do not mix)
    try:
        oner.itc_loss = lambda *a, **k: got.append(a) or orig(*a, **k)
        model(b), model(b2)
    finally:
        oner.itc_loss = orig
    assert torch.equal(got[0][0], got[1][0])         # zI: the image-only pass sees no text
    assert torch.equal(got[0][2], got[1][2])         # kI likewise
    assert not torch.allclose(got[0][1], got[1][1])  # zT does change (the test can fail)


def test_gradient_reaches_student_only_through_queries():
    """m = 0: the keys are the student itself, so a key path with a graph would add to the
    gradient. The model's gradient must equal that of ITC rebuilt by hand with keys
    computed under no_grad."""
    model = build(momentum=0.0, cmc=0.0, mlm=0.0, mim=0.0, query_view="masked")
    b = make_batch(model.cfg, B=4, seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    g_model = torch.autograd.grad(model(b)["loss"], params, allow_unused=True)
    S, tm = model.student, b["text_mask"]
    zI = cls_image(S, b["images"], b["image_mask_uni"])
    zT = cls_text(S, b["text_input_uni"], tm, b["text_masked_uni"])
    with torch.no_grad():
        kI, kT = cls_image(S, b["images"]), cls_text(S, b["text_ids"], tm)
    loss = itc_loss(zI, zT, kI, kT, model.log_scale["itc"].exp())
    g_hand = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    for p, a, h in zip(params, g_model, g_hand):
        assert (a is None) == (h is None)
        if a is not None:
            assert close(a, h, atol=1e-6, rtol=1e-4)
    # and the key path would have made a difference: keys with a graph give another gradient
    kI, kT = cls_image(S, b["images"]), cls_text(S, b["text_ids"], tm)
    g_graph = torch.autograd.grad(itc_loss(zI, zT, kI, kT, model.log_scale["itc"].exp()),
                                  params[:1])
    assert not close(g_graph[0], g_hand[0], atol=1e-7, rtol=1e-3)


def test_key_encoder_receives_no_gradient_and_is_not_trainable():
    model = build(momentum=0.99)
    before = [p.clone() for p in model.key.parameters()]
    model(make_batch(model.cfg, B=4))["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.key.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.key.parameters()))


# ----------------------------------------------------------------------------- EMA
@MODEL
@given(m=st.floats(0.0, 1.0), seed=seeds)
def test_ema_step_moves_key_by_one_minus_m_of_the_gap(m, seed):
    model = build(momentum=0.5)
    perturb_student(model, seed=seed, std=0.5)
    k0 = {n: p.clone() for n, p in model.key.named_parameters()}
    s0 = {n: p.clone() for n, p in model.student.named_parameters()}
    assert k0.keys() == s0.keys()
    model.update_key_encoder(m)
    for n, p in model.key.named_parameters():
        assert torch.allclose(p, k0[n] + (1 - m) * (s0[n] - k0[n]), rtol=1e-6, atol=1e-7), n
        assert not p.requires_grad
    for n, p in model.student.named_parameters():
        assert torch.equal(p, s0[n])  # the student is not touched


def test_encode_uses_key_encoder_when_momentum_positive():
    model = build(momentum=0.9)
    b = make_batch(model.cfg, B=3, seed=2)
    args = [(b["images"],), (b["text_ids"], b["text_mask"]),
            (b["images"], b["text_ids"], b["text_mask"]), (b["images"],)]
    fns = [model.encode_image, model.encode_text, model.encode_pair, model.encode_patches]
    with torch.no_grad():
        before = [f(*a) for f, a in zip(fns, args)]
        perturb_student(model)
        assert all(torch.equal(f(*a), x) for f, a, x in zip(fns, args, before))
        model.update_key_encoder(0.0)  # key <- student: now the embeddings move
        assert all(not torch.allclose(f(*a), x, atol=1e-4) for f, a, x in zip(fns, args, before))
        assert close(model.encode_image(b["images"]), cls_image(model.student, b["images"]))


def test_momentum_zero_keeps_no_copy_and_encodes_with_student():
    model = build(momentum=0.0)
    assert model.key is None
    assert all(p.requires_grad for p in model.parameters())
    model.update_key_encoder(0.5)  # a no-op, not an error
    b = make_batch(model.cfg, B=3)
    with torch.no_grad():
        assert close(model.encode_image(b["images"]), cls_image(model.student, b["images"]))
        assert close(model.encode_text(b["text_ids"], b["text_mask"]),
                     cls_text(model.student, b["text_ids"], b["text_mask"]))


# ----------------------------------------------------------------------------- masks
def test_attention_masks_of_each_pass(sdpa_masks):
    model = build(momentum=0.0, cic=1.0, max_text_len=12)  # L != P: passes differ in length
    c = model.cfg
    B, P, L = 3, c.num_patches, c.max_text_len
    b = make_batch(c, B=B, seed=4, lengths=[1, 7, L])
    model(b)
    tm = b["text_mask"]
    by_len = {}
    for n, mask in sdpa_masks:
        by_len.setdefault(n, []).append(mask)
    # image-only passes: no mask at all, so SDPA may choose its fastest kernel
    assert by_len[1 + P] and all(m is None for m in by_len[1 + P])
    # text-only and joint passes: key padding only, every row sees every valid column
    for n, lead in ((1 + L, 1), (1 + P + L, 1 + P)):
        want = torch.cat([torch.ones(B, lead, dtype=torch.bool), tm], 1)
        for m in by_len[n]:
            assert m.dtype == torch.bool
            assert torch.equal(m.expand(B, 1, n, n), want[:, None, None, :].expand(B, 1, n, n))
    # cross-only pass [CLS_a, patches, CLS_b, tokens]
    n = 2 + P + L
    want = torch.zeros(B, 1, n, n, dtype=torch.bool)
    img, txt = range(0, 1 + P), range(1 + P, n)
    for i in range(B):
        for r in img:
            want[i, 0, r, 1 + P] = True                     # CLS_b
            for j in range(L):
                want[i, 0, r, 2 + P + j] = bool(tm[i, j])   # valid tokens only
        for r in txt:
            want[i, 0, r, :1 + P] = True                    # CLS_a and all patches
    assert by_len[n] and len(by_len[n]) == c.depth
    for m in by_len[n]:
        assert torch.equal(m.expand(B, 1, n, n), want)


def test_cross_only_pass_behaviour_at_depth_one():
    model = build(depth=1, momentum=0.0, cic=1.0)
    c, E = model.cfg, model.student.encoder
    P, L = c.num_patches, c.max_text_len
    b = make_batch(c, B=1, seed=6, lengths=[5])
    with torch.no_grad():
        xi, xt = E.embed_image(b["images"]), E.embed_text(b["text_ids"])
        run = lambda i, t: E(image=i, text=t, text_mask=b["text_mask"], cross=True)[0]  # noqa
        base = run(xi, xt)
        img, txt, valid = list(range(1 + P)), [1 + P] + [2 + P + j for j in range(5)], 2 + P + 5

        def changed(out):
            return {r for r in range(valid) if not torch.allclose(out[r], base[r], atol=1e-6)}
        d = torch.randn(c.width)  # not a constant shift: LayerNorm would erase that
        xi2 = xi.clone(); xi2[0, 3] += d                     # one patch (row 4)
        ch = changed(run(xi2, xt))
        assert ch - {4} == set(txt)                          # only the text group sees it
        xt2 = xt.clone(); xt2[0, 2] += d                     # one valid token (row P+4)
        ch = changed(run(xi, xt2))
        assert ch - {2 + P + 2} == set(img)                  # only the image group sees it
        xt3 = xt.clone(); xt3[0, 9] += d                     # a padding token
        assert changed(run(xi, xt3)) == set()                # nobody sees it
        assert base.shape[0] == 2 + P + L  # [CLS_a, patches, CLS_b, tokens]


@MODEL
@given(seed=seeds, n=st.integers(1, 8), short_pad=st.integers(0, 4), long_pad=st.integers(5, 16))
def test_embeddings_do_not_depend_on_padding(seed, n, short_pad, long_pad):
    model = build(momentum=0.0, max_text_len=24)
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size
    cap = torch.randint(0, V, (1, n), generator=g)
    images = torch.randn(1, 3, 32, 32, generator=g)
    embs = []
    for pad in (short_pad, long_pad):
        ids = torch.cat([cap, torch.randint(0, V, (1, pad), generator=g)], 1)  # junk pad ids
        tm = torch.arange(n + pad)[None] < n
        with torch.no_grad():
            embs.append((model.encode_text(ids, tm), model.encode_pair(images, ids, tm)))
    assert close(embs[0][0], embs[1][0], atol=1e-5)
    assert close(embs[0][1], embs[1][1], atol=1e-5)


def test_pair_embedding_depends_on_both_inputs():
    model = build(momentum=0.0)
    b = make_batch(model.cfg, B=2, seed=8, lengths=[4, 9])
    im, ids, tm = b["images"], b["text_ids"], b["text_mask"]
    with torch.no_grad():
        base = model.encode_pair(im, ids, tm)
        ids2 = ids.clone(); ids2[:, 0] = (ids2[:, 0] + 1) % model.cfg.vocab_size
        other_text = model.encode_pair(im, ids2, tm)
        other_image = model.encode_pair(im + torch.randn_like(im), ids, tm)
    assert (base - other_text).norm(dim=-1).min() > 1e-4
    assert (base - other_image).norm(dim=-1).min() > 1e-4


@pytest.mark.parametrize("where", ["encode_text", "encode_pair", "forward"])
def test_all_padding_text_row_raises(where):
    model = build(momentum=0.0)
    b = make_batch(model.cfg, B=3, seed=1)
    b["text_mask"][1] = False
    for v in ("uni", "joint"):
        b[f"text_labels_{v}"][1] = -100
        b[f"text_masked_{v}"][1] = False
    with pytest.raises(RuntimeError, match="no valid token"):
        if where == "encode_text":
            model.encode_text(b["text_ids"], b["text_mask"])
        elif where == "encode_pair":
            model.encode_pair(b["images"], b["text_ids"], b["text_mask"])
        else:
            model(b)


def test_cls_and_mask_vectors_enter_without_type_embeddings():
    model = build(momentum=0.0, cic=1.0)
    E, c = model.student.encoder, model.cfg
    P, L = c.num_patches, c.max_text_len
    b = make_batch(c, B=2, seed=2)
    imask, tmasked = b["image_mask_uni"], b["text_masked_uni"]
    with torch.no_grad():  # [MASK] replaces the input, its position is still added
        x = E.embed_image(b["images"], imask)
        pos = E.pos_image.flatten(0, 1).expand(2, -1, -1)
        plain = E.patch_embed(patchify(b["images"], c.patch_size)) + pos
        assert torch.equal(x[imask], (E.mask_token + pos)[imask])
        assert torch.equal(x[~imask], plain[~imask])
        t = E.embed_text(b["text_input_uni"], tmasked)
        tpos = E.pos_text.expand(2, -1, -1)
        assert torch.equal(t[tmasked], (E.mask_token + tpos)[tmasked])
        assert torch.equal(t[~tmasked], (E.tok_embed(b["text_input_uni"]) + tpos)[~tmasked])
    seen = []
    hook = E.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(b)
    hook.remove()
    assert {x.shape[1] for x in seen} == {1 + P, 1 + L, 1 + P + L, 2 + P + L}
    for x in seen:  # [CLS] is the bare learned vector (no position) in every pass
        assert torch.equal(x[:, 0], E.cls.expand(2, -1))
        if x.shape[1] == 2 + P + L:
            assert torch.equal(x[:, 1 + P], E.cls.expand(2, -1))  # CLS_b: the same vector


# ----------------------------------------------------------------------------- MLM / MIM
def test_mlm_head_runs_only_on_slots():
    model = build(momentum=0.0)
    c = model.cfg
    B, L, D = 4, c.max_text_len, c.width
    shapes = []
    model.mlm_head.dense.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    model(make_batch(c, B=B, seed=0))
    assert c.mlm_slots < L
    assert sum(math.prod(s[:-1]) for s in shapes) == B * c.mlm_slots * 2  # unimodal + joint
    assert all(s[-1] == D and L not in s[:-1] for s in shapes)


def hand_masked_losses(model, b):
    """MLM over *every* text position and MIM over every patch, then the definitions."""
    S, c = model.student, model.cfg
    E, P, tm = S.encoder, c.num_patches, b["text_mask"]
    hI = E(image=E.embed_image(b["images"], b["image_mask_uni"]))
    hT = E(text=E.embed_text(b["text_input_uni"], b["text_masked_uni"]), text_mask=tm)
    hIT = E(image=E.embed_image(b["images"], b["image_mask_joint"]),
            text=E.embed_text(b["text_input_joint"], b["text_masked_joint"]), text_mask=tm)
    logits = torch.cat([model.mlm_head(hT[:, 1:]), model.mlm_head(hIT[:, 1 + P:])], 1)
    labels = torch.cat([b["text_labels_uni"], b["text_labels_joint"]], 1)
    sel = labels != -100
    mlm = F.cross_entropy(logits[sel], labels[sel])
    pred = torch.cat([model.mim_head(hI[:, 1:]), model.mim_head(hIT[:, 1:1 + P])], 1)
    t = patchify(b["images"], c.patch_size).repeat(1, 2, 1).double()
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    mask = torch.cat([b["image_mask_uni"], b["image_mask_joint"]], 1)
    mim = ((pred.double() - t) ** 2).mean(-1)[mask].mean()
    return mlm, mim


@MODEL
@given(seed=seeds, ratio=st.sampled_from([0.25, 0.4, 0.75]), text_prob=st.floats(0.05, 0.6))
def test_masked_modelling_losses_match_definitions(seed, ratio, text_prob):
    model = build(momentum=0.0)
    b = make_batch(model.cfg, B=3, seed=seed, ratio=ratio, text_prob=text_prob)
    with torch.no_grad():
        out = model(b)
        mlm, mim = hand_masked_losses(model, b)
    if (torch.cat([b["text_labels_uni"], b["text_labels_joint"]]) != -100).any():
        assert close(out["mlm"], mlm.float(), atol=1e-5)
    assert close(out["mim"].double(), mim, atol=1e-5)


@pytest.fixture
def noisy_heads():
    """Forward hooks that add noise to MLM logits of empty slots and MIM predictions of
    unmasked patches (or, with target='used', to the ones that count)."""
    def attach(model, b, target):
        c, calls = model.cfg, {"mlm": 0, "mim": 0}
        views = ("uni", "joint")

        def mlm_hook(m, a, out):
            v = views[calls["mlm"]]; calls["mlm"] += 1
            labels = b[f"text_labels_{v}"]
            empty = labels.gather(1, mlm_slots(labels, c.mlm_slots)) == -100   # (B, k)
            sel = empty if target == "unused" else ~empty
            return out + sel[..., None] * 7.0 * torch.randn_like(out)

        def mim_hook(m, a, out):
            v = views[calls["mim"]]; calls["mim"] += 1
            sel = ~b[f"image_mask_{v}"] if target == "unused" else b[f"image_mask_{v}"]
            return out + sel[..., None] * 7.0 * torch.randn_like(out)
        return [model.mlm_head.register_forward_hook(mlm_hook),
                model.mim_head.register_forward_hook(mim_hook)]
    return attach


@pytest.mark.parametrize("target", ["unused", "used"])
def test_masked_losses_ignore_empty_slots_and_unmasked_patches(noisy_heads, target):
    model = build(momentum=0.0)
    b = make_batch(model.cfg, B=4, seed=11)
    with torch.no_grad():
        base = model(b)
        hooks = noisy_heads(model, b, target)
        torch.manual_seed(0)
        out = model(b)
    for h in hooks:
        h.remove()
    for t in ("mlm", "mim"):
        if target == "unused":
            assert torch.equal(out[t], base[t]), t
        else:  # the same noise where it counts must move the loss
            assert not torch.allclose(out[t], base[t], atol=1e-3), t


# ----------------------------------------------------------------------------- switches
TERM_PARAMS = {"itc": {"log_scale.itc"}, "xmc": {"log_scale.xmc"}, "cic": {"log_scale.cic"},
               "cmc": {"log_scale.cmc"}, "mlm": "mlm_head.", "mim": "mim_head."}
ALL_ON = dict(itc=1.0, xmc=1.0, cic=1.0, cmc=1.0, mlm=1.0, mim=1.0)


@pytest.mark.parametrize("term", list(TERM_PARAMS))
def test_term_off_removes_parameters_output_and_loss_share(term):
    full = build(momentum=0.0, **ALL_ON)
    part = build(momentum=0.0, **{**ALL_ON, term: 0.0})
    gone = set(full.state_dict()) - set(part.state_dict())
    want = TERM_PARAMS[term]
    if isinstance(want, str):
        assert gone and all(k.startswith(want) for k in gone)
        assert not hasattr(part, want[:-1])
    else:
        assert gone == want and term not in part.log_scale
    assert set(part.state_dict()) <= set(full.state_dict())
    missing, unexpected = part.load_state_dict(full.state_dict(), strict=False)
    assert not missing and set(unexpected) == gone
    b = make_batch(full.cfg, B=4, seed=7)
    with torch.no_grad():
        of, op = full(b), part(b)
    assert term not in op and f"scale_{term}" not in op
    assert close(op["loss"], of["loss"] - of[term], atol=1e-5)
    for t in ALL_ON:
        if t != term:
            assert close(op[t], of[t], atol=1e-6)


@MODEL
@given(w=st.lists(st.floats(0.05, 5.0), min_size=6, max_size=6))
def test_loss_is_weighted_sum_and_weights_only_scale(w):
    weights = dict(zip(ALL_ON, w))
    ref = build(momentum=0.0, **ALL_ON)
    model = build(momentum=0.0, **weights)  # same seed, same terms: identical weights
    b = make_batch(model.cfg, B=3, seed=9)
    with torch.no_grad():
        out, base = model(b), ref(b)
    total = sum(weights[t] * out[t] for t in ALL_ON)
    assert torch.allclose(out["loss"], total, rtol=1e-6, atol=0)
    for t in ALL_ON:
        assert torch.equal(out[t], base[t])


def test_per_term_temperature(spy):
    model = build(momentum=0.0, xmc=1.0, temp_init=0.05, scale_max=30.0)
    assert set(model.log_scale) == {"itc", "xmc", "cmc"}
    for p in model.log_scale.values():
        assert torch.allclose(p.exp(), torch.tensor(20.0))
    with torch.no_grad():
        model.log_scale["xmc"].fill_(math.log(1e4))  # above the clamp
    b = make_batch(model.cfg, B=3)
    out = model(b)
    assert out["scale_xmc"] == 30.0 and torch.allclose(out["scale_itc"], torch.tensor(20.0))
    assert float(spy["xmc_loss"][3].detach()) == 30.0
    assert float(spy["itc_loss"][4].detach()) == pytest.approx(20.0)
    out["loss"].backward()
    assert float(model.log_scale["xmc"].grad) == 0.0   # clamped: no push further up
    assert float(model.log_scale["itc"].grad) != 0.0


def test_shared_temperature(spy):
    model = build(momentum=0.0, xmc=1.0, cic=1.0, temperature="shared")
    assert list(model.log_scale) == ["shared"]
    assert sum("scale" in n for n, _ in model.named_parameters()) == 1
    with torch.no_grad():
        model.log_scale["shared"].fill_(math.log(7.0))
    out = model(make_batch(model.cfg, B=3))
    scales = [spy["itc_loss"][4], spy["xmc_loss"][3], spy["cic_loss"][3], spy["cmc_loss"][2]]
    assert all(float(s.detach()) == pytest.approx(7.0, rel=1e-6) for s in scales)
    out["loss"].backward()
    assert model.log_scale["shared"].grad is not None


def test_fixed_temperature(spy):
    model = build(momentum=0.0, temperature="fixed", temp_fixed=0.25)
    assert not hasattr(model, "log_scale")
    assert not any("scale" in n for n, _ in model.named_parameters())
    out = model(make_batch(model.cfg, B=3))
    assert float(spy["itc_loss"][4]) == 4.0 and float(spy["cmc_loss"][2]) == 4.0
    assert float(out["scale_itc"]) == 4.0


# ----------------------------------------------------------------------------- all configs
CONFIGS = {
    "default": {},
    "xmc_cic": dict(xmc=1.0, cic=1.0),
    "all_terms": ALL_ON,
    "clean_queries": dict(query_view="clean", xmc=1.0, cic=1.0),
    "two_heads_itc": dict(two_heads=True, cmc=0.0, mlm=0.0, mim=0.0),
    "two_heads_default": dict(two_heads=True),
    "momentum0": dict(momentum=0.0, xmc=1.0, cic=1.0),
    "fixed_temp": dict(temperature="fixed"),
    "shared_temp": dict(temperature="shared", xmc=1.0),
    "mlp_head": dict(head_type="mlp"),
    "mocov3_head": dict(head_type="mocov3", xmc=1.0, cic=1.0),
    "mocov3_m0_clean": dict(head_type="mocov3", momentum=0.0, query_view="clean"),
    "masking_off": dict(mlm=0.0, mim=0.0, _mask=False),
    "cic_only": dict(itc=0.0, cmc=0.0, cic=1.0),
    "cmc_only_clean": dict(itc=0.0, query_view="clean"),
    "clean_queries_masking_off": dict(query_view="clean", mlm=0.0, mim=0.0, _mask=False),
    "masked_view_masking_off": dict(mlm=0.0, mim=0.0, _mask=False),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_config_finite_loss_and_no_unused_parameter(kw):
    kw = dict(kw)
    mask = kw.pop("_mask", True)
    model = build(**kw)
    out = model(make_batch(model.cfg, B=4, seed=1, mask=mask))
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    assert set(model.cfg.active) <= set(out)
    for t in model.cfg.active:
        assert torch.isfinite(out[t])
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_two_heads_without_a_text_query_is_refused():
    """Under two_heads only text queries (itc/xmc/cic) train the text head; without one it
    would be an unused parameter under DDP, so the config is refused up front."""
    with pytest.raises(ValueError, match="two_heads needs itc, xmc or cic"):
        OneRConfig.from_name("mu", two_heads=True, itc=0.0)


def test_no_mask_token_without_masked_modelling():
    """With MLM and MIM off the [MASK] vector is not built (it could never be trained)."""
    assert build(mlm=0.0, mim=0.0).student.encoder.mask_token is None
    assert build(mlm=0.0).student.encoder.mask_token is not None


def test_mocov3_head_predictor_on_queries_only():
    """head_type=mocov3: MoCo v3's 3-layer BatchNorm MLP head in student and key encoder, a
    predictor on the query side only; with m = 0 and clean queries the keys are therefore
    not the queries (no reuse), and evaluation (BatchNorm running stats) does not depend on
    the rest of the batch."""
    model = build(head_type="mocov3", momentum=0.0, query_view="clean", cmc=0.0, mlm=0.0, mim=0.0)
    head = model.student.heads["shared"]
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d",
                                                "ReLU", "Linear", "BatchNorm1d"]
    assert not head[-1].affine and model.predictor is not None
    b = make_batch(model.cfg, B=6, seed=2, mask=False)
    E = model.student.encoder
    with torch.no_grad():
        h = E(image=E.embed_image(b["images"]))[:, 0]
        q = model.student.project(h, "image", model.predictor)
        k = model.student.project(h, "image")
    assert not torch.allclose(q, k, atol=1e-3)
    model.eval()
    with torch.no_grad():
        full = model.encode_image(b["images"])
        one = model.encode_image(b["images"][:1])
        patches = model.encode_patches(b["images"][:2])
    assert torch.allclose(full[:1], one, atol=1e-5)
    assert patches.shape == (2, model.cfg.num_patches, model.cfg.embed_dim)
    with_key = build(head_type="mocov3", momentum=0.99)
    assert with_key.key is not None and not hasattr(with_key.key, "predictor")


def test_inference_in_place_gelu_gives_the_same_numbers():
    """Without autograd the block's GELU runs in place (a speed change only): embeddings
    and the no-grad key passes equal the autograd path bitwise, and a no-grad forward
    leaves its input untouched."""
    model = build()
    b = make_batch(model.cfg, B=3, seed=4)
    x = torch.randn(3, 1 + model.cfg.num_patches, model.cfg.width)
    x0 = x.clone()
    with torch.no_grad():
        fast_img, fast_blk = model.encode_image(b["images"]), model.student.encoder.blocks[0](x)
    assert torch.equal(x, x0)
    with torch.enable_grad():
        slow_img, slow_blk = model.encode_image(b["images"]), model.student.encoder.blocks[0](x)
    assert torch.equal(fast_img, slow_img.detach()) and torch.equal(fast_blk, slow_blk.detach())
