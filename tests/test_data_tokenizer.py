"""Tokenizer claims: the shipped GPT-2 ranks work offline and give the reference ids; a
tokenizer's identity rebuilds exactly the same tokenizer (and a tampered one is refused);
an encoding that is not available offline fails fast with one message naming both fixes
(TIKTOKEN_CACHE_DIR, a ranks file path) and never touches the network; a pre-populated
TIKTOKEN_CACHE_DIR does work offline; train_bpe gives exactly the ranks of tiktoken's
educational bpe_train; padding/truncation/empty captions.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_tokenizer.py
"""
import hashlib
import json
import os

import numpy as np
import pytest

import data


@pytest.fixture(scope="module")
def gpt2():
    return data.load_tokenizer("gpt2")


def test_gpt2_reference_ids_offline(gpt2):
    assert gpt2.encode("a photo of a cat") == [64, 4590, 286, 257, 3797]
    assert gpt2.vocab_size == 50257
    assert gpt2.sha256 == data.GPT2_SHA256


def test_gpt2_round_trip_and_word_starts(gpt2):
    text = "Two dogs, 3 cats — and a café at 10:30!"
    assert gpt2.decode(gpt2.encode(text)) == text
    ws = gpt2.word_starts()
    assert ws.dtype == bool and ws.shape == (gpt2.vocab_size,)
    ids = gpt2.encode("a photo of a cat")
    assert [bool(ws[i]) for i in ids] == [False, True, True, True, True]
    assert not ws[50256]  # <|endoftext|>
    # special-token text is encoded as plain text, never as the special id
    assert 50256 not in gpt2.encode("<|endoftext|>")


def test_call_pads_truncates_and_rejects_empty(gpt2):
    ids, mask = gpt2(["a photo of a cat", "a dog"], 4)
    assert ids.dtype.is_floating_point is False and ids.shape == (2, 4) and mask.shape == (2, 4)
    assert ids[0].tolist() == [64, 4590, 286, 257] and mask[0].all()
    assert mask[1].tolist() == [True, True, False, False] and ids[1, 2:].tolist() == [0, 0]
    for bad in ["", "   \n\t"]:
        with pytest.raises(ValueError):
            gpt2([bad], 4)


def test_identity_round_trip_named(gpt2):
    ident = gpt2.identity()
    json.dumps(ident)
    assert ident["ranks"] is None and ident["name"] == "gpt2"
    tok = data.Tokenizer.from_identity(json.loads(json.dumps(ident)))
    assert tok.encode("a photo of a cat") == [64, 4590, 286, 257, 3797]
    bad = dict(ident, sha256="0" * 64)
    with pytest.raises(ValueError, match="hash"):
        data.Tokenizer.from_identity(bad)


def test_identity_round_trip_ranks_file(tmp_path):
    texts = ["a large red circle to the left of a small blue square", "a tiny green cross at the top"] * 3
    tok = data.train_bpe(texts, 300, tmp_path / "bpe.tiktoken")
    assert tok.name == "bpe"
    ident = json.loads(json.dumps(tok.identity()))
    os.remove(tmp_path / "bpe.tiktoken")  # the identity alone must suffice
    tok2 = data.Tokenizer.from_identity(ident)
    assert tok2.sha256 == tok.sha256 == hashlib.sha256(ident["ranks"].encode()).hexdigest()
    for t in texts:
        assert tok2.encode(t) == tok.encode(t) and tok2.decode(tok2.encode(t)) == t
    tampered = dict(ident, ranks=ident["ranks"].replace(" 256\n", " 999\n"))
    with pytest.raises(ValueError):
        data.Tokenizer.from_identity(tampered)


def test_ranks_file_path_loads(tmp_path):
    tok = data.train_bpe(["a red circle", "a blue square"], 400, tmp_path / "small.tiktoken")
    tok2 = data.load_tokenizer(str(tmp_path / "small.tiktoken"))
    assert tok2.name == "small" and tok2.sha256 == tok.sha256 and tok2.vocab_size == tok.vocab_size


def _offline_env(monkeypatch, tmp_path):
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("ONER_OFFLINE", "1")  # never try the network in tests
    return cache


@pytest.mark.parametrize("spec", ["cl100k_base", "no_such_encoding", "/nonexistent/dir/x.tiktoken"])
def test_offline_failure_names_both_fixes(monkeypatch, tmp_path, spec):
    _offline_env(monkeypatch, tmp_path)
    with pytest.raises(data.TokenizerUnavailable) as e:
        data.load_tokenizer(spec)
    msg = str(e.value)
    assert "TIKTOKEN_CACHE_DIR" in msg and "ranks file" in msg and spec in msg


def test_prepopulated_cache_works_offline(monkeypatch, tmp_path):
    """Fix (1) of the error message: a cache filled elsewhere loads with no network."""
    cache = _offline_env(monkeypatch, tmp_path)
    import gzip
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(gzip.decompress(data.GPT2_RANKS.read_bytes()))
    import tiktoken.registry as reg
    monkeypatch.setattr(reg, "ENCODINGS", {})  # no in-process cache
    enc = data._load_named_offline("r50k_base")
    assert enc.encode("a photo of a cat") == [64, 4590, 286, 257, 3797]


def test_train_bpe_equals_educational(tmp_path):
    from tiktoken._educational import bpe_train
    rng = np.random.default_rng(0)
    words = ["a", "large", "red", "circle", "left", "of", "tiny", "blue", "square", "the", "is", "above"]
    texts = [" ".join(rng.choice(words, int(rng.integers(3, 9)))) for _ in range(150)]
    full = data.train_bpe(texts, 10_000, tmp_path / "full.tiktoken").vocab_size  # stops early
    for vocab in (270, full):  # partial merges (ties matter) and all merges
        ref = bpe_train("\n".join(texts), vocab, data.GPT2_PAT, visualise=None)
        ours = data.train_bpe(texts, vocab, tmp_path / f"v{vocab}.tiktoken").enc._mergeable_ranks
        assert ours == ref


def test_train_bpe_stops_early_when_words_are_merged(tmp_path):
    texts = ["a red circle", "a blue circle"]
    tok = data.train_bpe(texts, 100_000, tmp_path / "t.tiktoken")
    assert tok.vocab_size < 300
    # every word became one token
    assert len(tok.encode("a red circle")) == 3 and len(tok.encode("a blue circle")) == 3
