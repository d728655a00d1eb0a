"""The text-to-image testbed's data: captions of the bundled digits from their labels and two
properties measured on each image, held-out phrasings, the frozen word-level T5 encoder in
the Hugging Face layout, and caption shards of the digits made by prepare-data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.data import digit_captions as D
from dit_compress.data.datasets import _sklearn_digits, bundled_digits, digits_arrays, digits_split, load_data


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _slant64(im: np.ndarray) -> float:
    """Shear of one image re-derived in float64 from its definition: the least-squares slope
    of column on row, weighted by intensity, sign flipped because rows run downwards."""
    rows, cols = np.nonzero(im >= 0)
    w = im[rows, cols].astype(np.float64)
    r = rows - np.average(rows, weights=w)
    c = cols - np.average(cols, weights=w)
    return float(-(w * r * c).sum() / (w * r * r).sum())


def test_properties_follow_their_definitions():
    upright = np.zeros((8, 8))
    upright[1:7, 4] = 10
    right = np.zeros((8, 8))  # top to the right: the stroke leans right
    for i, r in enumerate(range(1, 7)):
        right[r, 6 - i] = 10
    ink, slant = D.properties(np.stack([upright, right, right[:, ::-1]]))
    assert ink.tolist() == [60.0, 60.0, 60.0]
    assert abs(slant[0]) < 1e-12 and slant[1] > 0.9 and slant[2] < -0.9
    images, _ = _sklearn_digits()
    _, s = D.properties(images[:50])
    assert np.allclose(s, [_slant64(im) for im in images[:50].astype(np.float64)], atol=1e-9)


def test_captions_name_their_digit_and_use_the_vocabulary_only():
    images, labels = _sklearn_digits()
    for split, held in (("train", False), ("test", True)):
        idx = digits_split(split, len(images))
        caps = D.digit_captions(images, labels, idx, held_out=held)
        assert [D.digit_of(c) for c in caps] == labels[idx].tolist()
        assert all(w in D.VOCABULARY for c in caps for w in c.split())
        assert len(set(caps)) > 100  # templates and adjectives vary
    again = D.digit_captions(images, labels, digits_split("train", len(images))[:20], held_out=False)
    assert again == D.digit_captions(images, labels, digits_split("train", len(images))[:20], held_out=False)


def test_held_out_captions_are_phrasings_never_seen_in_training():
    images, labels = _sklearn_digits()
    train = set(D.digit_captions(images, labels, np.arange(len(images)), held_out=False))
    held = set(D.digit_captions(images, labels, np.arange(len(images)), held_out=True))
    assert train.isdisjoint(held)


def test_adjectives_split_each_class_into_thirds():
    images, labels = _sklearn_digits()
    adjs = D.adjectives(images, labels)
    for c in range(10):
        idx = np.nonzero(labels == c)[0]
        thick = np.mean(["thick" in adjs[i] for i in idx])
        thin = np.mean(["thin" in adjs[i] for i in idx])
        assert 0.28 < thick < 0.38 and 0.28 < thin < 0.38
        ink = images[idx].sum((1, 2))
        assert ink[["thick" in adjs[i] for i in idx]].min() > ink[["thin" in adjs[i] for i in idx]].max()


def test_slant_words_follow_the_lean_s_magnitude_either_way():
    # one class of anti-aliased strokes: 3 near vertical, 3 leaning left, 3 leaning right
    def stroke(shear):
        im = np.zeros((8, 8))
        for r in range(1, 7):
            c = 3.5 + shear * (3.5 - r)
            lo = int(np.floor(c))
            im[r, lo], im[r, lo + 1] = 10 * (lo + 1 - c), 10 * (c - lo)
        return im

    shears = (0.0, 0.05, -0.05, -0.5, -0.6, -0.7, 0.55, 0.65, 0.75)
    images = np.stack([stroke(s) for s in shears])
    adjs = D.adjectives(images, np.zeros(9, dtype=np.int64))
    words = [[w for w in a if w in D.SLANT] for a in adjs]
    assert words[:3] == [["upright"]] * 3
    assert words[5] == words[8] == ["slanted"]  # the strongest lean either way, left included
    assert words[3] == words[6] == []


def test_the_text_encoder_is_a_t5_and_a_word_level_tokenizer_in_the_hugging_face_layout(tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    from dit_compress.data.text import TextEncoder

    D.build_text_encoder(tmp_path / "a", seed=0)
    D.build_text_encoder(tmp_path / "b", seed=0)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a" / "tokenizer"))
    v = {w: i for i, w in enumerate(D.VOCABULARY)}
    assert tok("A thick Seven")["input_ids"] == [v["a"], v["thick"], v["seven"], v["</s>"]]
    assert tok("a purple seven")["input_ids"] == [v["a"], v["<unk>"], v["seven"], v["</s>"]]
    a = T5EncoderModel.from_pretrained(str(tmp_path / "a" / "text_encoder"))
    b = T5EncoderModel.from_pretrained(str(tmp_path / "b" / "text_encoder"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    enc = TextEncoder(tmp_path / "a", max_length=16)
    caps, cut = enc.encode(["a thick seven", "the digit 7", "seven"])
    assert caps.emb.shape == (3, 16, 64) and cut == 0
    assert caps.mask.sum(1).tolist() == [4, 4, 2]
    ids = tok(["a thick seven"], return_tensors="pt")
    with torch.no_grad():
        ref = a(**ids).last_hidden_state[0]
    assert torch.allclose(caps.emb[0, :4], ref, atol=1e-6)
    assert not torch.allclose(caps.emb[0], caps.emb[1])


def test_bundled_digits_are_named_exactly(tmp_path):
    assert bundled_digits("digits") == "train" and bundled_digits("digits:test") == "test"
    assert bundled_digits("digits-latents") is None and bundled_digits("./digits") is None
    with pytest.raises(Exception, match="does not exist"):
        load_data(str(tmp_path / "nowhere" / "digits-latents"))
    (tmp_path / "digits-latents").mkdir()
    with pytest.raises(Exception, match="empty or holds no known data layout"):
        load_data(str(tmp_path / "digits-latents"))  # a folder named like the digits is read as a folder


@pytest.mark.slow
def test_prepare_data_makes_caption_shards_of_the_digits(tmp_path):
    D.build_text_encoder(tmp_path / "te")
    r = run("prepare-data", "digits:train", "--text-encoder", tmp_path / "te", "--max-length", "16",
            "-o", tmp_path / "train", "--json")
    assert r.exit_code == 0, r.output
    data = load_data(str(tmp_path / "train"))
    x, y = digits_arrays("train")
    assert np.array_equal(np.asarray(data.x), x) and data.classes.tolist() == y.tolist()
    assert [D.digit_of(t) for t in data.texts] == y.tolist() and data.y.emb.shape[1:] == (16, 64)
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["images"] == "digits:train" and "training" in manifest["captions"]
    r = run("prepare-data", "digits:test", "--text-encoder", tmp_path / "te", "--max-length", "16",
            "-o", tmp_path / "test")
    assert r.exit_code == 0, r.output
    held = load_data(str(tmp_path / "test"))
    assert set(held.texts).isdisjoint(data.texts) and len(held) == len(digits_arrays("test")[0])
    for bad, msg in ((["digits:valid", "--text-encoder", tmp_path / "te"], "unknown digits split"),
                     (["digits"], "with --text-encoder")):
        r = run("prepare-data", *bad, "-o", tmp_path / "bad")
        assert r.exit_code == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad").exists()
