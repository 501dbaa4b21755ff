"""Offline inputs of the trainer benchmarks, built once into bench/.cache.

- a byte-level BPE tokenizer (ChatML template) trained on the benchmark's own word list;
- random-weight Llama models built from a config: `tiny` (the overhead and packing runs),
  `100m` (about 100 M parameters, the start-up run), `300m`, `1b` and `1.3b` (the model cache
  runs; sizes beside each in MODELS);
- `facts`: prompt/completion rows of uniform length (trainer overhead);
- `chat`: messages rows whose token lengths spread more than 10x (packing).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from .common import CACHE

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
THINGS = [
    "apple", "banana", "cherry", "grape", "lemon", "lime", "plum", "peach", "pear", "kiwi", "mango", "melon",
    "sky", "grass", "snow", "coal", "blood", "sun", "sea", "rose", "violet", "cloud", "ash", "sand",
    "tomato", "carrot", "pepper", "corn", "olive", "berry", "orange", "fig", "date", "beet", "leek", "onion",
]
COLORS = ["red", "yellow", "green", "blue", "white", "black", "purple", "orange", "pink", "gray", "brown", "gold"]
FILLER = (
    "please tell me quickly because my friend asked about it yesterday and we could not agree on the answer "
    "so we argued for a long time about what the right color would be in the morning light or at night"
).split()

#: name -> LlamaConfig keyword arguments (vocab size comes from the tokenizer unless given).
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024},
    # 12 x (attention 2.4M + MLP 4.7M) + 32k x 768 tied embeddings ~= 110M parameters.
    "100m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12, "max_position_embeddings": 1024, "vocab_size": 32000,
             "tie_word_embeddings": True},
    # 20 x (attention 4.2M + MLP 8.7M) + 32k x 1024 tied embeddings ~= 290M parameters, 1.16 GB
    # of fp32 safetensors: the model cache run with a download that weighs more.
    "300m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20, "num_attention_heads": 16,
             "num_key_value_heads": 16, "max_position_embeddings": 1024, "vocab_size": 32000,
             "tie_word_embeddings": True},
    # 16 x (attention 16.8M + MLP 34.6M) + 32k x 2048 tied embeddings ~= 890M parameters, 3.55 GB of
    # fp32 safetensors: the model cache's record before 1.3b.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 16, "max_position_embeddings": 1024, "vocab_size": 32000,
           "tie_word_embeddings": True},
    # 24 x (attention 16.8M + MLP 34.6M) + 32k x 2048 tied embeddings ~= 1.3B parameters, 5.2 GB of
    # fp32 safetensors: the model cache's recorded run (cache_bench.MODEL). The 23 GB test machine
    # keeps its entry in the page cache next to MinIO's copy while no third copy (a run with the
    # cache off) comes between the fill and the warm run (FINDINGS section 5).
    "1.3b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 16, "max_position_embeddings": 1024, "vocab_size": 32000,
             "tie_word_embeddings": True},
}


def _corpus() -> list[str]:
    lines = [f"What color is the {t}? The {t} is {c}." for t in THINGS for c in COLORS[:3]]
    lines.append(" ".join(FILLER))
    lines.append("You name colors. user assistant system")
    return lines


def tokenizer_dir() -> Path:
    out = CACHE / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def model_config(name: str) -> Any:
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    kwargs = {"vocab_size": len(tokenizer), "tie_word_embeddings": False, **MODELS[name]}
    return LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **kwargs)


def model_dir(name: str) -> Path:
    """A saved random-weight model (fp32 safetensors) with the tokenizer next to it."""
    out = CACHE / f"model-{name}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(name))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(tmp)
    tmp.rename(out)
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def facts_data(rows: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl): prompt/completion facts; eval is a fixed held-out file so both
    sides of a comparison train on exactly the same rows."""
    out = CACHE / f"facts-{rows}"
    train, held = out / "train.jsonl", out / "eval.jsonl"
    if train.exists() and held.exists():
        return train, held
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        t = THINGS[i % len(THINGS)]
        c = COLORS[(i * 7 + len(t)) % len(COLORS)]
        pre = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))
        data.append({"prompt": f"{pre}: what color is the {t}?", "completion": f" The {t} is {c}."})
    n_eval = max(8, rows // 8)
    return _write_jsonl(train, data[n_eval:]), _write_jsonl(held, data[:n_eval])


def head_rows(path: Path, n: int) -> Path:
    """The first `n` rows of a JSON-lines file, as a file next to it."""
    out = path.with_name(f"{path.stem}-{n}{path.suffix}")
    if not out.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        tmp.rename(out)
    return out


def chat_data(rows: int = 384, seed: int = 0, min_words: int = 1, max_words: int = 400) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of chat rows; user turns carry a log-uniform number of filler words
    (as real chat data: many short turns, a few long ones), so token lengths spread > 10x. The
    last two training rows carry the fewest and the most words, so even a small set spans the range."""
    out = CACHE / f"chat-{rows}-{min_words}-{max_words}"
    train, held = out / "train.jsonl", out / "eval.jsonl"
    if train.exists() and held.exists():
        return train, held
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        t = THINGS[i % len(THINGS)]
        c = COLORS[(i * 5 + len(t)) % len(COLORS)]
        n = round(math.exp(rng.uniform(math.log(min_words), math.log(max_words))))
        n = {rows - 2: min_words, rows - 1: max_words}.get(i, n)
        filler = " ".join(rng.choice(FILLER) for _ in range(n))
        data.append({"messages": [
            {"role": "user", "content": f"{filler}. What color is the {t}?"},
            {"role": "assistant", "content": f"The {t} is {c}."},
        ]})
    n_eval = max(8, rows // 8)
    return _write_jsonl(train, data[n_eval:]), _write_jsonl(held, data[:n_eval])


def token_lengths(path: Path) -> list[int]:
    """Token count of each chat row (as the recipe renders it), to report the spread."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    out = []
    for line in path.read_text().splitlines():
        ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True)["input_ids"]
        out.append(len(ids))
    return out
