"""Tiny models, tokenizers and datasets for trainer tests (pytest plugin `harness.model_plugin`).

Everything is built on the fly, offline, in a few seconds, and shared by the whole session:

- `tiny_tokenizer_dir` -> Path: a byte-level BPE tokenizer (vocab ~400) trained on the toy corpus
  below, saved as a `PreTrainedTokenizerFast` folder, with ChatML special tokens
  (`<|im_start|>`, `<|im_end|>`, eos `<|endoftext|>`, pad `<pad>`) and a ChatML chat template
  (the same shape as SmolLM2's, without `{% generation %}` markers).
- `tiny_model_dir` -> Path: a random-weight `LlamaForCausalLM` (hidden 32, 2 layers, 4 heads,
  2 KV heads, intermediate 64) with that tokenizer, saved with `save_pretrained` (fp32,
  safetensors). Load it with `AutoModelForCausalLM.from_pretrained(tiny_model_dir)`.
- `toy_data_dir` -> Path: a folder of tiny learnable datasets, one file per format, all from the
  same 48 facts ("the color of X is Y"):
    `text.jsonl` ({"text"}), `prompt_completion.jsonl` ({"prompt", "completion"}),
    `messages.jsonl` ({"messages": [system, user, assistant]}), `alpaca.jsonl`
    ({"instruction", "input", "output"}), `preference.jsonl` ({"prompt", "chosen", "rejected"}),
    `renamed.jsonl` (prompt_completion with columns "question"/"answer"), plus `.csv` and
    `.parquet` copies of prompt_completion.
- `toy_rows` -> list[dict]: the prompt/completion rows themselves.
- `job_spec(tmp_path-like output, **overrides)` via the `make_spec` fixture: a FineTuneJobSpec
  dict (wire form) for the tiny model and toy data that tests tweak per method.

The session also sets HF_HUB_OFFLINE=1: tests never reach a hub.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_THINGS = [
    "apple", "banana", "cherry", "grape", "lemon", "lime", "plum", "peach", "pear", "kiwi", "mango", "melon",
    "sky", "grass", "snow", "coal", "blood", "sun", "sea", "rose", "violet", "cloud", "ash", "sand",
    "tomato", "carrot", "pepper", "corn", "olive", "berry", "orange", "fig", "date", "beet", "leek", "onion",
    "frog", "crow", "swan", "flamingo", "canary", "panther", "polar bear", "zebra", "tiger", "mouse", "fox", "wolf",
]
_COLORS = ["red", "yellow", "green", "blue", "white", "black", "purple", "orange", "pink", "gray", "brown", "gold"]


def toy_facts() -> list[tuple[str, str]]:
    return [(thing, _COLORS[i % len(_COLORS)]) for i, thing in enumerate(_THINGS)]


def _rows() -> list[dict[str, str]]:
    return [{"prompt": f"What color is the {t}?", "completion": f" The {t} is {c}."} for t, c in toy_facts()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def toy_rows() -> list[dict[str, str]]:
    return _rows()


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy-data")
    rows = _rows()
    _write_jsonl(out / "prompt_completion.jsonl", rows)
    _write_jsonl(out / "text.jsonl", [{"text": r["prompt"] + r["completion"]} for r in rows])
    _write_jsonl(
        out / "messages.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "You name colors."},
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"].strip()},
                ]
            }
            for r in rows
        ],
    )
    _write_jsonl(
        out / "alpaca.jsonl",
        [{"instruction": "Name the color.", "input": r["prompt"], "output": r["completion"].strip()} for r in rows],
    )
    _write_jsonl(
        out / "preference.jsonl",
        [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " I do not know."} for r in rows],
    )
    _write_jsonl(out / "renamed.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in rows])
    with (out / "prompt_completion.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), out / "prompt_completion.parquet")
    return out


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + r["completion"] for r in _rows()] + [
        "You name colors. Name the color. user assistant system I do not know.",
        # The Alpaca prompt (finetune_trainer.data.ALPACA_PROMPT), so alpaca rows stay short.
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n\n### Input:\n"
        "\n### Response:\n",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    _train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_spec(tiny_model_dir: Path, toy_data_dir: Path) -> Callable[..., dict[str, Any]]:
    """A FineTuneJobSpec (wire dict) for the tiny model: `make_spec(output, method={...}, ...)`.

    Keyword arguments replace top-level sections (merged one level deep for dicts).
    """

    def build(output: Path | str, **sections: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {
                "train": str(toy_data_dir / "prompt_completion.jsonl"),
                "format": "prompt_completion",
                "maxSeqLength": 64,
                "validationSplit": 0.25,
            },
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "hyperparameters": {
                "maxSteps": 30, "batchSize": 8, "learningRate": 1e-2, "warmupRatio": 0.0,
                "scheduler": "constant", "seed": 7,
            },
            "resources": {"gpusPerNode": 0},
            "output": {"uri": str(output)},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "method":
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        return spec

    return build
