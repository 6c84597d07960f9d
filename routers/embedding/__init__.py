"""Prompt embedders for routing. May import numpy, onnxruntime and tokenizers (torch only inside `st`, when a
sentence-transformers embedder is built); never `server`, and nothing else of `routers` but this package.

- `base`: the `Embedder` protocol (float32, L2-normalised rows) and `l2_normalise`.
- `onnx`: `OnnxMiniLMEmbedder`, the default (int8 all-MiniLM-L6-v2 on onnxruntime, no torch, no hub).
- `static`: `StaticEmbedder`, word-piece vectors distilled from it, averaged: for CPU-only gateways that must
  embed many new prompts a second.
- `st`: `SentenceTransformerEmbedder`, any sentence-transformers model, on the GPU when there is one.
- `cache`: `CachedEmbedder` (in memory) and `embed_corpus` (whole tables, on disk), and the cache folders.
- `factory`: embedders by their short spec, and their ids without loading a model.
"""
