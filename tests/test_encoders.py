from __future__ import annotations

import numpy as np
import pytest

from mode_ray.encoders import build_encoder


@pytest.fixture(scope="module")
def minilm():
    return build_encoder("minilm", device="cpu", batch_size=4)


def _check_normalised(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_minilm_shape_norm_and_semantics(minilm):
    texts = [
        "a handwritten digit seven",
        "the number 7 written by hand with a pen",
        "a seamless red and white checkerboard pattern",
        "a purple triangle icon on a plain background",
        "the letter K printed in bold type",
    ]
    vectors = minilm.encode(texts)  # batch_size 4: exercises two batches
    _check_normalised(vectors, 5, 384)
    assert minilm.dim == 384 and minilm.encoder_id == "minilm:all-MiniLM-L6-v2"
    sims = vectors @ vectors[0]
    assert sims[1] > max(sims[2], sims[3], sims[4])
    assert minilm.encode([]).shape == (0, 384)


def test_hf_pooler_encoder_on_tiny_local_bert(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "digit", "seven", "letter"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model_dir = tmp_path / "tiny-bert"
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    enc = build_encoder(f"hf:{model_dir}", device="cpu", batch_size=2)
    vectors = enc.encode(["a red circle", "digit seven", "a letter"])
    _check_normalised(vectors, 3, 16)
    assert enc.encoder_id == f"hf:{model_dir}"


def test_open_clip_text_tower_is_deterministic():
    a = build_encoder("open_clip:mode-tiny", device="cpu")
    b = build_encoder("open_clip:mode-tiny", device="cpu")
    va, vb = a.encode(["a red circle", "digit seven"]), b.encode(["a red circle", "digit seven"])
    _check_normalised(va, 2, 64)
    np.testing.assert_allclose(va, vb, atol=1e-6)
    assert a.encoder_id == "open_clip:mode-tiny"


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_encoder("word2vec")
