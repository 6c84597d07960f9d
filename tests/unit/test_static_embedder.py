"""The static embedder: its rows are MiniLM's own vectors for single word pieces, prompts average them, and the
distilled table is cached on disk and rebuilt when the file does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import routers.embedding.static as static
from routers.embedding.factory import embedder_id, make_embedder
from routers.embedding.onnx import OnnxMiniLMEmbedder
from routers.embedding.static import STATIC_ID, StaticEmbedder, distil_table, load_or_distil

WORDS = ["paris", "bread", "python", "stock", "joke", "france", "capital", "the", "of", "what", "is"]


@pytest.fixture(scope="module")
def minilm() -> OnnxMiniLMEmbedder:
    return OnnxMiniLMEmbedder()


@pytest.fixture(scope="module")
def partial(minilm: OnnxMiniLMEmbedder) -> tuple[StaticEmbedder, dict[str, int]]:
    """A static embedder whose table holds real distilled rows for WORDS only (distilling all 30,522 pieces
    takes about 20 s; these tests need a few)."""
    vocab = minilm.tokenizer.get_vocab()
    ids = {w: vocab[w] for w in WORDS}
    table = np.zeros((minilm.tokenizer.get_vocab_size(), minilm.dim), dtype=np.float32)
    table[list(ids.values())] = distil_table(minilm, list(ids.values()))
    return StaticEmbedder(table), ids


def test_a_single_piece_gets_exactly_minilms_vector(
    minilm: OnnxMiniLMEmbedder, partial: tuple[StaticEmbedder, dict[str, int]]
) -> None:
    emb, _ = partial
    got = emb.embed(WORDS)
    want = minilm.embed(WORDS)
    cos = (got * want).sum(axis=1)
    assert cos.min() > 0.9999, dict(zip(WORDS, cos.round(6), strict=True))


def test_a_prompt_is_the_normalised_mean_of_its_pieces(partial: tuple[StaticEmbedder, dict[str, int]]) -> None:
    emb, ids = partial
    rows = emb.table
    texts = ["What is the capital of France?", "bread", "", "   \n", "Paris  PARIS paris"]
    out = emb.embed(texts)
    assert out.shape == (5, emb.dim) and out.dtype == np.float32

    def expect(words: list[str]) -> npt.NDArray[np.float32]:
        # "?" has no distilled row in this partial table: a zero row that still counts in the mean, and the
        # normalisation removes the count, so only the direction is compared.
        v = rows[[ids[w] for w in words]].mean(axis=0)
        return np.asarray(v / np.linalg.norm(v), dtype=np.float32)

    np.testing.assert_allclose(out[0], expect(["what", "is", "the", "capital", "of", "france"]), atol=1e-5)
    np.testing.assert_allclose(out[1], expect(["bread"]), atol=1e-6)
    assert not out[2].any() and not out[3].any(), "nothing to embed gives the zero vector, not NaN"
    np.testing.assert_allclose(out[4], expect(["paris"]), atol=1e-6)  # lower-cased, repeats weigh equally
    # Order is the caller's, and a text's vector does not depend on its batch.
    np.testing.assert_array_equal(emb.embed(texts[::-1]), out[::-1])
    assert emb.embed([]).shape == (0, emb.dim)


def test_similar_prompts_are_closer_than_unrelated_ones(partial: tuple[StaticEmbedder, dict[str, int]]) -> None:
    emb, _ = partial
    a, b, c = emb.embed(["What is the capital of France?", "capital of France", "python joke"])
    assert a @ b > a @ c


def test_the_table_must_fit_the_tokenizer() -> None:
    with pytest.raises(ValueError, match="does not match the tokenizer"):
        StaticEmbedder(np.zeros((10, 384), dtype=np.float32))


def test_the_distilled_table_is_cached_and_rebuilt_when_it_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake_distil(model: OnnxMiniLMEmbedder, ids: object = None) -> npt.NDArray[np.float32]:
        calls.append(1)
        rng = np.random.default_rng(len(calls))
        return rng.standard_normal((model.tokenizer.get_vocab_size(), model.dim)).astype(np.float32)

    monkeypatch.setattr(static, "distil_table", fake_distil)
    first = load_or_distil(tmp_path)
    files = list(tmp_path.glob("static-minilm-*.npy"))
    assert len(calls) == 1 and len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    np.testing.assert_array_equal(load_or_distil(tmp_path), first)
    assert len(calls) == 1, "the second load reads the cache"

    np.save(files[0], np.zeros((3, 3), dtype=np.float32))  # a file that does not fit this model
    rebuilt = load_or_distil(tmp_path)
    assert len(calls) == 2 and rebuilt.shape == first.shape
    assert np.load(files[0]).shape == first.shape

    load_or_distil(None)  # no cache directory: distilled each time, nothing written
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 1


def test_spec_and_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = np.ones((30522, 384), dtype=np.float32)
    monkeypatch.setattr(static, "load_or_distil", lambda cache_dir: table)
    emb = make_embedder(" static ", tmp_path)
    assert isinstance(emb, StaticEmbedder) and emb.id == STATIC_ID == embedder_id("static")
    assert embedder_id("onnx") != STATIC_ID, "artifacts trained on one are refused by the other"
    with pytest.raises(ValueError, match="'static'"):
        make_embedder("word2vec")
