"""Prefill features: the hidden states of a small causal language model reading each prompt.

Runs in the vLLM worker's virtualenv (`deploy/vllm-cpu/setup.sh`), which has torch and transformers; the
gateway's own environment never imports torch. Reads prompts as JSON lines (`{"id": ..., "text": ...}`),
writes one `chunk-NNNNN.npz` per `--chunk` prompts into OUT (ids, float32 features of shape
(n, layers, 2 poolings, hidden), token counts, seconds of CPU and wall time). Chunks are written whole
(a temporary file, then a rename) and skipped when present, so an interrupted run loses at most the chunk
in progress and the same command resumes it.

Features per prompt, for each chosen layer (hidden_states index: 0 is the token embeddings, L the last
layer after its final norm): the last token's state and the mean over the prompt's tokens (the
beginning-of-sequence token left out of the mean: its state is an attention sink of outsized norm).

    python loadtest/prefill/extract.py --model-dir DIR --prompts P.jsonl --out DIR [--layers auto]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def layer_choice(n_layers: int, spec: str) -> list[int]:
    """hidden_states indices: `auto` = early (a quarter of the way), middle and last."""
    if spec == "auto":
        return sorted({max(1, round(n_layers / 4)), round(n_layers / 2), n_layers})
    return [int(v) for v in spec.split(",")]


def flops_per_prompt(config: Any, n_params_blocks: int, tokens: int) -> float:
    """Forward FLOPs for one prompt of `tokens` tokens: 2 per weight per token in the blocks (the embedding
    lookup is free and no LM head runs), plus attention scores and mixing (2 x 2 x T^2 x heads x head_dim per
    layer, an upper bound where layers attend within a sliding window)."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2.0 * n_params_blocks * tokens + 4.0 * int(config.num_hidden_layers) * tokens * tokens * heads * head_dim


def _batches(chunk: list[int], lengths: list[int], budget: int) -> list[tuple[int, list[int]]]:
    """(offset in the chunk, prompt indices) of consecutive batches whose padded size stays within `budget`
    tokens (a chunk is sorted by length, so the last prompt of a batch is its longest): short prompts go
    many to a forward pass, whose fixed cost would otherwise dominate."""
    out: list[tuple[int, list[int]]] = []
    start = 0
    while start < len(chunk):
        end = start + 1
        while end < len(chunk) and lengths[chunk[end]] * (end + 1 - start) <= budget:
            end += 1
        out.append((start, chunk[start:end]))
        start = end
    return out


def _adds_bos(tok: Any) -> bool:
    """Whether the tokenizer puts its beginning-of-sequence token in front (Gemma's does, SmolLM2's not)."""
    ids = tok("x")["input_ids"]
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def main() -> None:
    """Extract features for every prompt not yet in OUT."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", default="auto")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass (at most)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                    help="bfloat16 runs about twice as fast on CPUs with AVX512-BF16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stop = {"now": False}
    # Ctrl-C: finish the chunk in progress (written whole), then stop; a second Ctrl-C stops at once.
    def on_sigint(signum: int, frame: object) -> None:
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True
        print("stopping after this chunk (Ctrl-C again to stop now)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, on_sigint)

    rows = [json.loads(line) for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModel.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    layers = layer_choice(n_layers, args.layers)
    embed_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n)
    block_params = sum(p.numel() for p in model.parameters()) - embed_params
    # Deterministic order (by length, then id) so that chunk k always holds the same prompts.
    lengths = [len(tok(r["text"], truncation=True, max_length=args.max_tokens)["input_ids"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (lengths[i], str(rows[i]["id"])))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model_dir": str(args.model_dir), "layers": layers, "n_layers": n_layers, "hidden": int(cfg.hidden_size),
            "max_tokens": args.max_tokens, "block_params": block_params, "embed_params": embed_params,
            "poolings": ["last", "mean"], "dtype": args.dtype, "bos_added": _adds_bos(tok)}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    chunks = [order[i:i + args.chunk] for i in range(0, len(order), args.chunk)]
    for k, chunk in enumerate(chunks):
        path = args.out / f"chunk-{k:05d}.npz"
        if path.exists():
            continue
        if stop["now"]:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        # float32: a few dimensions of Gemma's residual stream pass float16's range (65504) on long prompts.
        feats = np.zeros((len(chunk), len(layers), 2, int(cfg.hidden_size)), dtype=np.float32)
        ntok = np.zeros(len(chunk), dtype=np.int32)
        flops = 0.0
        for b, idx in _batches(chunk, lengths, args.batch_tokens):
            enc = tok([rows[i]["text"] for i in idx], truncation=True, max_length=args.max_tokens, padding=True,
                      return_tensors="pt")
            with torch.inference_mode():
                out = model(**enc, output_hidden_states=True)
            mask = enc["attention_mask"].to(torch.float32)
            n = mask.sum(dim=1).to(torch.long)
            skip = 1 if meta["bos_added"] else 0
            mean_mask = mask.clone()
            mean_mask[:, :skip] = 0
            mean_mask[mean_mask.sum(dim=1) == 0, 0] = 1  # a prompt of BOS alone: its only state
            for li, layer in enumerate(layers):
                h = out.hidden_states[layer].to(torch.float32)
                last = h[torch.arange(h.shape[0]), n - 1]
                mean = (h * mean_mask[:, :, None]).sum(dim=1) / mean_mask.sum(dim=1, keepdim=True)
                feats[b:b + len(idx), li, 0] = last.numpy()
                feats[b:b + len(idx), li, 1] = mean.numpy()
            ntok[b:b + len(idx)] = n.numpy()
            flops += sum(flops_per_prompt(cfg, block_params, int(t)) for t in n.tolist())
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, ids=np.array([str(rows[i]["id"]) for i in chunk]), feats=feats, tokens=ntok,
                 cpu_s=time.process_time() - c0, wall_s=time.perf_counter() - t0, flops=flops)
        tmp.rename(path)
        print(f"chunk {k + 1}/{len(chunks)}: {len(chunk)} prompts, {int(ntok.sum())} tokens, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    done = sum(1 for k in range(len(chunks)) if (args.out / f"chunk-{k:05d}.npz").exists())
    print(f"{done}/{len(chunks)} chunks in {args.out}", flush=True)
    sys.exit(0 if done == len(chunks) else 130)


if __name__ == "__main__":
    main()
