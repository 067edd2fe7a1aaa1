"""eval.py's pure metrics are right on hand-built inputs.

Proves: retrieval R@K (ties and NaNs against the model, variable captions per image,
chunked == unchunked == a brute-force reading of the definition, embeddings == matrix),
multimodal R@K, top-1/top-5, the linear probe (separable -> ~100, random labels ->
~chance, deterministic), the pointing game and its chance level, patch heat maps, the
modality-gap measures on embeddings with a known gap, and PCA.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval_metrics.py -x
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import eval as ev

KEYS = ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10")
FAST = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------- brute-force references

def ref_retrieval(scores, t2i):
    """The definition of METHOD.md §6, one query at a time, in plain Python."""
    s, t2i = scores.tolist(), t2i.tolist()
    n_img, n_txt = len(s), len(t2i)
    tr = []
    for i in range(n_img):
        gts = [t for t in range(n_txt) if t2i[t] == i]
        if not gts:
            continue
        best = max(s[i][t] for t in gts)
        tr.append(sum(1 for t in range(n_txt) if t2i[t] != i and not s[i][t] < best))
    ir = [sum(1 for j in range(n_img) if j != t2i[t] and not s[j][t] < s[t2i[t]][t]) for t in range(n_txt)]
    out = {}
    for k in (1, 5, 10):
        out[f"tr{k}"] = 100.0 * sum(r < k for r in tr) / len(tr)
        out[f"ir{k}"] = 100.0 * sum(r < k for r in ir) / len(ir)
    return out


def assert_metrics(got, want):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), (k, got[k], v)


@st.composite
def retrieval_case(draw, float_scores=False):
    """Random image count, captions per image in 0..7, integer scores in a small range
    (so ties are frequent) or floats, and a chunk size."""
    n_img = draw(st.integers(1, 13))
    counts = draw(st.lists(st.integers(0, 7), min_size=n_img, max_size=n_img))
    if sum(counts) == 0:
        counts[0] = 1
    t2i = torch.repeat_interleave(torch.arange(n_img), torch.tensor(counts))
    t2i = t2i[torch.randperm(len(t2i), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))]
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    if float_scores:
        scores = torch.randn(n_img, len(t2i), generator=g)
    else:
        scores = torch.randint(0, draw(st.integers(1, 4)), (n_img, len(t2i)), generator=g).float()
    return scores, t2i, draw(st.integers(1, 17))


# ------------------------------------------------------------------------ retrieval

def test_perfect_retrieval_scores_100_with_variable_caption_counts():
    t2i = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2])      # 1, 3 and 7 captions
    scores = (t2i[None, :] == torch.arange(3)[:, None]).float()
    m = ev.retrieval_metrics(scores, t2i)
    assert all(m[k] == 100.0 for k in KEYS) and m["mean"] == 100.0
    assert (m["n_images"], m["n_texts"]) == (3, 11)


@pytest.mark.parametrize("value", [0.0, 0.37, float("nan")])
def test_collapsed_or_nan_model_scores_exactly_zero(value):
    # more than 10 images and captions, so even R@10 has to rank something above ties
    t2i = torch.repeat_interleave(torch.arange(12), torch.tensor([1, 3, 7] * 4))
    m = ev.retrieval_metrics(torch.full((12, len(t2i)), value), t2i, chunk_size=5)
    assert all(m[k] == 0.0 for k in KEYS + ("mean",)), m


def test_hand_worked_case():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2.
    scores = torch.tensor([[9., 1., 8., 3., 2.],
                           [5., 6., 4., 7., 5.],
                           [2., 3., 9., 1., 5.]])
    t2i = torch.tensor([0, 0, 1, 2, 2])
    # TR ranks: image 0: best GT 9, nothing else >= 9 -> 0. Image 1: GT 4, beaten or tied
    # by 5, 6, 7, 5 -> 4. Image 2: best GT 5, beaten by 9 -> 1.
    # IR ranks: caption 0 -> 0; caption 1 (GT 1 vs 6, 3) -> 2; caption 2 (GT 4 vs 8, 9) -> 2;
    # caption 3 (GT 1 vs 3, 7) -> 2; caption 4 (GT 5 tied by image 1's 5) -> 1.
    want = {"tr1": 100 / 3, "tr5": 100.0, "tr10": 100.0, "ir1": 20.0, "ir5": 100.0, "ir10": 100.0}
    m = ev.retrieval_metrics(scores, t2i, chunk_size=2)
    assert_metrics(m, want)
    assert m["mean"] == pytest.approx((100 / 3 + 20 + 400) / 6)


def test_ties_with_the_ground_truth_count_against():
    # One caption per image. Query 0 (image 0 for TR, caption 0 for IR) has GT score 2,
    # tied by k competitors; every other query's GT scores 3 and wins outright.
    n = 12
    for k in (0, 1, 4, 5, 9, 10):
        scores = torch.diag(torch.tensor([2.0] + [3.0] * (n - 1)))
        scores[1:k + 1, 0] = 2.0                  # k images tie caption 0's GT
        scores[0, 1:k + 1] = 2.0                  # k captions tie image 0's GT
        m = ev.retrieval_metrics(scores, torch.arange(n), chunk_size=5)
        for K in (1, 5, 10):                      # query 0 has rank k: a hit iff k < K
            want = (n - 1 + (k < K)) / n * 100
            assert m[f"tr{K}"] == pytest.approx(want) and m[f"ir{K}"] == pytest.approx(want), (k, K)
    # Other ground-truth captions tying the best one do not count against it.
    m = ev.retrieval_metrics(torch.tensor([[1., 1, 1, 0], [0, 0, 0, 1]]), torch.tensor([0, 0, 0, 1]))
    assert m["tr1"] == 100.0


def test_variable_captions_one_three_seven_against_reference():
    t2i = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (3, 11), generator=g).float()
    assert_metrics(ev.retrieval_metrics(scores, t2i, chunk_size=4), ref_retrieval(scores, t2i))
    # TR uses the *best* GT caption: image 2 is a TR@1 hit if any of its 7 captions wins.
    scores = torch.zeros(3, 11)
    scores[2, 10] = 1.0
    m = ev.retrieval_metrics(scores, t2i)
    assert m["tr1"] == pytest.approx(100 / 3)


def test_image_without_captions_is_only_a_distractor():
    t2i = torch.tensor([0, 0, 2])          # image 1 has no caption
    scores = torch.tensor([[2., 2., 0.], [3., 0., 0.], [0., 0., 1.]])
    m = ev.retrieval_metrics(scores, t2i)
    assert m["tr1"] == 100.0               # over images 0 and 2 only
    assert m["ir1"] == pytest.approx(200 / 3)   # image 1 beats caption 0's GT


def test_bad_text_to_image_is_rejected():
    with pytest.raises(ValueError, match="text_to_image"):
        ev.retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="n_texts"):
        ev.retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))


@FAST
@given(retrieval_case())
def test_chunked_equals_unchunked_equals_definition(case):
    scores, t2i, chunk = case
    m = ev.retrieval_metrics(scores, t2i, chunk_size=chunk)
    assert m == ev.retrieval_metrics(scores, t2i, chunk_size=10_000)
    assert_metrics(m, ref_retrieval(scores, t2i))
    assert m["mean"] == pytest.approx(sum(m[k] for k in KEYS) / 6)


@FAST
@given(retrieval_case(float_scores=True), st.integers(1, 9), st.booleans())
def test_embeddings_version_equals_matrix_version(case, dim, integer_valued):
    _, t2i, chunk = case
    n_img = int(t2i.max()) + 1 + case[0].shape[0] % 3          # some caption-less images too
    g = torch.Generator().manual_seed(dim)
    img, txt = torch.randn(n_img, dim, generator=g), torch.randn(len(t2i), dim, generator=g)
    if integer_valued:                                          # exact ties in the scores
        img, txt = img.round(), txt.round()
    assert ev.retrieval_metrics_from_embeddings(img, txt, t2i, chunk) == \
        ev.retrieval_metrics(img @ txt.T, t2i, chunk)


# -------------------------------------------------------------------- recall_at_k

def test_recall_at_k_hand_cases():
    gallery = torch.eye(4)
    queries = torch.tensor([[1., 0, 0, 0],       # target 0 first -> rank 0
                            [1., 1, 0, 0],       # target 1 tied with 0 -> rank 1
                            [0., 0, 0, 0],       # all tied -> rank 3
                            [0., 0, 2, 1]])      # target 3 behind 2 -> rank 1
    m = ev.recall_at_k(queries, gallery, torch.tensor([0, 1, 2, 3]), ks=(1, 2, 4), chunk_size=3)
    assert m == {"r1": 25.0, "r2": 75.0, "r4": 100.0}
    assert ev.recall_at_k(torch.full((2, 4), float("nan")), gallery, torch.tensor([0, 1]), ks=(1, 3))["r3"] == 0.0


@FAST
@given(st.integers(1, 20), st.integers(1, 15), st.integers(1, 7), st.integers(0, 999))
def test_recall_at_k_matches_definition(n_q, n_g, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    q, gal = torch.randint(-1, 2, (n_q, 3), generator=g).float(), torch.randint(-1, 2, (n_g, 3), generator=g).float()
    tgt = torch.randint(0, n_g, (n_q,), generator=g)
    s = q @ gal.T
    ranks = [sum(1 for j in range(n_g) if j != tgt[i] and not s[i, j] < s[i, tgt[i]]) for i in range(n_q)]
    m = ev.recall_at_k(q, gal, tgt, ks=(1, 5, 10), chunk_size=chunk)
    for k in (1, 5, 10):
        assert m[f"r{k}"] == pytest.approx(100 * sum(r < k for r in ranks) / n_q)


# ------------------------------------------------------------------ classification

def test_classification_accuracy_hand_case():
    scores = torch.tensor([[5., 4, 3, 2, 1, 0, -1],      # label 0: rank 0
                           [5., 4, 3, 2, 1, 0, -1],      # label 5: rank 5 -> miss top5
                           [5., 4, 3, 2, 1, 0, -1],      # label 4: rank 4 -> top5 hit
                           [1., 1, 1, 1, 1, 1, 1]])      # collapsed: rank 6 -> miss
    m = ev.classification_accuracy(scores, torch.tensor([0, 5, 4, 3]))
    assert m == {"top1": 25.0, "top5": 50.0}
    # C < 5: top5 is clipped to C, so every non-NaN sample is a top-"5" hit.
    m = ev.classification_accuracy(torch.tensor([[0., 1, 2], [2., 1, 0]]), torch.tensor([0, 0]))
    assert m == {"top1": 50.0, "top5": 100.0}


def test_slip_templates_are_the_seven_of_method_md():
    assert len(ev.SLIP_TEMPLATES) == 7 and all(t.count("{}") == 1 for t in ev.SLIP_TEMPLATES)
    assert "a origami {}." in ev.SLIP_TEMPLATES


def test_zeroshot_classifier_averages_and_renormalises():
    class Text(torch.nn.Module):
        cfg = type("Cfg", (), {"max_text_len": 4})()

        def encode_text(self, ids, mask):                  # id of first token -> a fixed vector
            table = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
            return F.normalize(table[ids[:, 0]], dim=-1)

    vocab = {"cat": 0, "dog": 1, "a": 2}
    def tok(texts, L):
        ids = torch.tensor([[vocab[t.split()[0]]] * L for t in texts])
        return ids, torch.ones(len(texts), L, dtype=torch.bool)
    w = ev.zeroshot_classifier(Text(), tok, ["cat", "dog"], ["{} photo", "a {}"], device="cpu")
    # "cat photo" -> e0, "a cat" -> e2: mean (0.5, 0, 0.5), re-normalised.
    assert torch.allclose(w[0], torch.tensor([1., 0, 1]) / math.sqrt(2))
    assert torch.allclose(w.norm(dim=1), torch.ones(2))


# -------------------------------------------------------------------- linear probe

def _blobs(n, d, c, seed, sep):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(123)) * sep
    return centres[y] + torch.randn(n, d, generator=g), y


def test_linear_probe_separable_features_reach_100():
    tx, ty = _blobs(300, 16, 4, 0, sep=6.0)
    vx, vy = _blobs(200, 16, 4, 1, sep=6.0)
    m = ev.linear_probe(tx, ty, vx, vy)
    assert m["top1"] >= 99.0 and m["top5"] == 100.0
    assert m["wd"] in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1) and len(m["sweep"]) == 5
    assert ev.linear_probe(tx, ty, vx, vy) == m                  # deterministic


def test_linear_probe_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(300, 16, generator=g), torch.randn(400, 16, generator=g)
    ty, vy = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (400,), generator=g)
    m = ev.linear_probe(tx, ty, vx, vy)
    assert 12.0 <= m["top1"] <= 38.0                              # chance 25, 400 samples


def test_linear_probe_works_under_inference_mode():
    tx, ty = _blobs(60, 4, 2, 0, sep=6.0)
    with torch.inference_mode():
        m = ev.linear_probe(tx, ty, tx, ty, wds=(1e-3,))
    assert m["top1"] >= 95.0


# -------------------------------------------------------------------- localisation

def test_pointing_game_hand_cases():
    hm = torch.zeros(4, 6, 8)
    hm[0, 2, 3] = 1.0                       # peak inside box 0
    hm[1, 5, 7] = 1.0                       # peak outside box 1
    hm[2, 1, 1] = hm[2, 4, 6] = 1.0         # tied peaks, one outside -> miss
    hm[3] = float("nan")
    boxes = torch.tensor([[3, 2, 4, 3],     # exactly the pixel (x=3, y=2)
                          [0, 0, 7, 5],     # x1=7, y1=5 exclusive: (7, 5) is outside
                          [0, 0, 3, 3],
                          [0, 0, 8, 6]])
    assert ev.pointing_game(hm, boxes) == 25.0
    flat = torch.ones(2, 6, 8)
    assert ev.pointing_game(flat, torch.tensor([[0, 0, 8, 6], [0, 0, 7, 6]])) == 50.0


def test_random_pointing_baseline_hand_case():
    boxes = torch.tensor([[0., 0, 4, 3], [-5, -5, 20, 20]])      # 12/48, and clipped -> 1
    assert ev.random_pointing_baseline(boxes, 6, 8) == pytest.approx(100 * (0.25 + 1) / 2)


@FAST
@given(st.lists(st.tuples(*[st.floats(-3, 12, allow_nan=False)] * 4), min_size=1, max_size=6))
def test_random_pointing_baseline_is_the_share_of_hit_pixels(raw):
    h, w = 7, 9
    boxes = torch.tensor(raw, dtype=torch.float64)
    inside = ev._box_masks(boxes, h, w).double().mean((1, 2)).mean().item() * 100
    assert ev.random_pointing_baseline(boxes, h, w) == pytest.approx(inside, abs=1e-9)
    # and the pointing game hits exactly when a single-pixel peak is in one of those pixels
    for y in range(h):
        for x in range(w):
            hm = torch.zeros(len(raw), h, w)
            hm[:, y, x] = 1
            want = ev._box_masks(boxes, h, w)[:, y, x].double().mean().item() * 100
            assert ev.pointing_game(hm, boxes) == pytest.approx(want)


def test_patch_heatmap_shape_and_peak_in_most_similar_patch():
    g = torch.Generator().manual_seed(0)
    gh, gw, e = 3, 4, 8
    patches = F.normalize(torch.randn(gh * gw, e, generator=g), dim=-1)
    best = 6                                                 # row 1, column 2
    text = patches[best] * 3.0                               # not unit: cosine re-normalises
    hm = ev.patch_heatmap(patches, text, (gh, gw), (48, 64))
    assert hm.shape == (48, 64) and (hm >= 0).all()
    y, x = divmod(int(hm.argmax()), 64)
    assert (y // 16, x // 16) == divmod(best, gw)
    coarse = ev.patch_heatmap(patches, text, (gh, gw), (gh, gw))     # no upsampling
    assert torch.allclose(coarse.sum(), torch.tensor(1.0)) and int(coarse.argmax()) == best


# -------------------------------------------------------------------- modality gap

def _sphere_clusters(n, d, gap_dims, angle, seed):
    """Unit vectors cos(a)*e_k + sin(a)*u_i, with the u_i symmetric (+-) and orthogonal to
    e_0, e_1, so the centroid is exactly cos(a)*e_k."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n // 2, d, generator=g)
    u[:, gap_dims] = 0
    u = F.normalize(torch.cat([u, -u]), dim=-1)
    def cluster(k):
        e = torch.zeros(d)
        e[k] = 1.0
        return math.cos(angle) * e + math.sin(angle) * u
    return cluster


def test_modality_gap_known_gap():
    angle = 0.6
    cluster = _sphere_clusters(200, 12, [0, 1], angle, seed=0)
    img, txt = cluster(0), cluster(1)                        # same u_i: matched pairs aligned
    m = ev.modality_gap(img, txt)
    assert m["centroid_distance"] == pytest.approx(math.cos(angle) * math.sqrt(2), abs=1e-5)
    assert m["matched_cos"] == pytest.approx(math.sin(angle) ** 2, abs=1e-5)
    brute = (img @ txt.T)[~torch.eye(200, dtype=torch.bool)].mean().item()
    assert m["random_cos"] == pytest.approx(brute, abs=1e-5)
    assert m["separability"] >= 99.0


def test_modality_gap_identical_embeddings_is_no_gap():
    cluster = _sphere_clusters(100, 12, [0, 1], 0.6, seed=1)
    emb = cluster(0)
    m = ev.modality_gap(emb, emb.clone())
    assert m["centroid_distance"] == pytest.approx(0.0, abs=1e-6)
    assert m["matched_cos"] == pytest.approx(1.0, abs=1e-6)
    assert m["separability"] == 50.0                         # exactly: each point has both labels


def test_modality_gap_rejects_misaligned_input():
    with pytest.raises(ValueError, match="aligned"):
        ev.modality_gap(torch.randn(5, 3), torch.randn(6, 3))


def test_pca_2d_recovers_a_planar_layout():
    g = torch.Generator().manual_seed(0)
    plane = torch.randn(50, 2, generator=g) * torch.tensor([5.0, 1.0])
    basis, _ = torch.linalg.qr(torch.randn(10, 2, generator=g))          # orthonormal (10, 2)
    x = plane @ basis.T + 3.0                                            # offset: PCA centres
    xy = ev.pca_2d(x)
    assert xy.shape == (50, 2)
    assert torch.allclose(torch.cdist(xy, xy), torch.cdist(plane, plane), atol=1e-3)
    assert xy[:, 0].var() > xy[:, 1].var()
    assert torch.equal(ev.pca_2d(x), xy)
