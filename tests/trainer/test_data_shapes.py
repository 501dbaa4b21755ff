"""The data shapes users bring, each trained for a few real steps on the tiny model, and the
one-line error (exit 42) when a file does not have the shape its spec declares.

Every file is written here, small, from the toy facts; nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import API_VERSION, KIND, ExitCode
from finetune_api.resource import parse_spec
from finetune_api.spec import DatasetSpec
from finetune_trainer import data, preference, run_manifest
from finetune_trainer.runner import Overrides, run_job
from harness.model_plugin import toy_facts

FACTS = toy_facts()[:16]  # 16 rows: 4 held out at validationSplit 0.25, 12 to train on


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train(make_spec: Callable[..., dict[str, Any]], out: Path, dataset: dict[str, Any],
           objective: dict[str, Any] | None = None, method: dict[str, Any] | None = None) -> dict[str, Any]:
    """Two optimizer steps on the tiny model; returns the run's metrics."""
    sections: dict[str, Any] = {
        "dataset": {"validationSplit": 0.25, "maxSeqLength": 128, **dataset},
        "hyperparameters": {"maxSteps": 2, "batchSize": 4},
        "evaluation": {"baseline": False},
    }
    if objective is not None:
        sections["objective"] = objective
    if method is not None:
        sections["method"] = method
    spec = make_spec(out / "artifact", **sections)
    result = run_job(parse_spec(spec), overrides=Overrides(serve_metrics=False, progress=False, workdir=out / "w"))
    assert result.artifact is not None
    assert result.metrics["train"]["steps"] == 2
    return result.metrics


# --- chat conversations with other keys and role names ------------------------------------------


def sharegpt_rows() -> list[dict[str, Any]]:
    return [
        {"conversations": [
            {"from": "system", "value": "You name colors."},
            {"from": "human", "value": f"What color is the {t}?"},
            {"from": "gpt", "value": f"The {t} is {c}."},
        ]}
        for t, c in FACTS
    ]


def test_sharegpt_from_value_human_gpt_is_read_without_configuration(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    f = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    ds = DatasetSpec.model_validate({"train": str(f), "format": "messages", "maxSeqLength": 128})
    splits = data.load_splits(ds, tmp_path, seed=0)
    assert splits.train[0]["messages"][1:] == [
        {"role": "user", "content": splits.train[0]["messages"][1]["content"]},
        {"role": "assistant", "content": splits.train[0]["messages"][2]["content"]},
    ]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ex = data.tokenize_example(splits.train[0], tok, ds)
    trained = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100])
    # Only the gpt turn (mapped to assistant) carries loss, with its end-of-turn token.
    assert trained == splits.train[0]["messages"][2]["content"] + "<|im_end|>\n"


def test_sharegpt_trains(make_spec: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    _train(make_spec, tmp_path, {"train": str(f), "format": "messages"})


def test_own_message_keys_and_role_names_through_the_mapping(make_spec: Callable[..., dict[str, Any]],
                                                             tmp_path: Path) -> None:
    rows = [{"dialog": [{"speaker": "Customer", "text": f"What color is the {t}?"},
                        {"speaker": "agent", "text": f"The {t} is {c}."}]} for t, c in FACTS]
    f = _jsonl(tmp_path / "support.jsonl", rows)
    dataset = {"train": str(f), "format": "messages",
               "fields": {"messages": "dialog", "role": "speaker", "content": "text",
                          "roles": {"customer": "user", "agent": "assistant"}}}
    ds = DatasetSpec.model_validate({**dataset, "maxSeqLength": 64})
    rec = data.canonical_rows(data.read_rows(str(f), tmp_path)[:1], ds)[0]
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    _train(make_spec, tmp_path, dataset)


# --- preference data in its three layouts, for dpo, reward and ppo ------------------------------


def explicit_rows() -> list[dict[str, Any]]:
    return [{"prompt": f"What color is the {t}?", "chosen": f" The {t} is {c}.", "rejected": " I do not know."}
            for t, c in FACTS]


def conversational_rows() -> list[dict[str, Any]]:
    return [{"prompt": [{"role": "user", "content": f"What color is the {t}?"}],
             "chosen": [{"role": "assistant", "content": f"The {t} is {c}."}],
             "rejected": [{"role": "assistant", "content": "I do not know."}]} for t, c in FACTS]


def implicit_rows() -> list[dict[str, Any]]:
    # The human-preference sets' layout: two whole transcripts, the prompt only inside them.
    return [{"chosen": f"\n\nHuman: What color is the {t}?\n\nAssistant: The {t} is {c}.",
             "rejected": f"\n\nHuman: What color is the {t}?\n\nAssistant: I do not know."} for t, c in FACTS]


def implicit_chat_rows() -> list[dict[str, Any]]:
    return [{"chosen": [{"from": "human", "value": f"What color is the {t}?"}, {"from": "gpt", "value": f"The {t} is {c}."}],
             "rejected": [{"from": "human", "value": f"What color is the {t}?"}, {"from": "gpt", "value": "No idea."}]}
            for t, c in FACTS]


LAYOUTS = {"explicit": explicit_rows, "conversational": conversational_rows, "implicit": implicit_rows,
           "implicit-chat": implicit_chat_rows}


def test_implicit_prompt_is_the_shared_beginning(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "hh.jsonl", implicit_rows())
    ds = DatasetSpec.model_validate({"train": str(f), "format": "preference"})
    pairs, chat = preference.check_pairs(data.read_rows(str(f), tmp_path), ds, str(f))
    assert not chat
    assert pairs[0] == {"prompt": "\n\nHuman: What color is the apple?\n\nAssistant:",
                        "chosen": " The apple is red.", "rejected": " I do not know."}
    # Answers that begin alike ("The ...") are not cut inside a word.
    assert preference.split_shared_text("Q: sky? A: The sky is blue.", "Q: sky? A: There is none.") == (
        "Q: sky? A:", " The sky is blue.", " There is none.")
    g = _jsonl(tmp_path / "hh-chat.jsonl", implicit_chat_rows())
    pairs, chat = preference.check_pairs(data.read_rows(str(g), tmp_path), ds.model_copy(update={"train": str(g)}), str(g))
    assert chat and pairs[0]["prompt"] == [{"role": "user", "content": "What color is the apple?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "The apple is red."}]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_preference_layouts_train(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                                  layout: str, objective: str) -> None:
    f = _jsonl(tmp_path / f"{layout}.jsonl", LAYOUTS[layout]())
    metrics = _train(make_spec, tmp_path, {"train": str(f), "format": "preference"}, objective={"type": objective},
                     method={"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    assert "evalLoss" in metrics["tuned"]


@pytest.mark.parametrize("layout", ["explicit", "conversational", "implicit"])
def test_preference_layouts_train_ppo(make_spec: Callable[..., dict[str, Any]], tiny_model_dir: Path,
                                      tmp_path: Path, layout: str) -> None:
    # The tiny causal LM loads as a reward model with a fresh score head: enough to take PPO steps.
    f = _jsonl(tmp_path / f"{layout}.jsonl", LAYOUTS[layout]())
    _train(make_spec, tmp_path, {"train": str(f), "format": "preference"},
           objective={"type": "ppo", "ppo": {"rewardModel": str(tiny_model_dir), "responseLength": 4}},
           method={"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})


# --- tabular files with the user's own column names, several files, globs, save_to_disk ----------


def _shape_rows(fmt: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows of a format under user column names, and the dataset.fields that maps them."""
    if fmt == "text":
        return [{"body": f"The {t} is {c}."} for t, c in FACTS], {"text": "body"}
    if fmt == "prompt_completion":
        return [{"question": f"What color is the {t}?", "answer": f" The {t} is {c}."} for t, c in FACTS], {
            "prompt": "question", "completion": "answer"}
    if fmt == "alpaca":
        return [{"task": "Name the color.", "context": t, "response": c} for t, c in FACTS], {
            "instruction": "task", "input": "context", "output": "response"}
    if fmt == "messages":
        # Tabular files hold a conversation as JSON text in one cell.
        return [{"chat": json.dumps([{"role": "user", "content": f"What color is the {t}?"},
                                     {"role": "assistant", "content": f"The {t} is {c}."}])} for t, c in FACTS], {
            "messages": "chat"}
    return [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in explicit_rows()], {
        "prompt": "q", "chosen": "good", "rejected": "bad"}


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writeheader()
        w.writerows(rows)


FORMATS = ["text", "prompt_completion", "alpaca", "messages", "preference"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tabular_files_with_own_columns_in_a_glob(tmp_path: Path, fmt: str, suffix: str) -> None:
    rows, fields = _shape_rows(fmt)
    (tmp_path / "parts").mkdir()
    _write_table(tmp_path / "parts" / f"part-0{suffix}", rows[:7])
    _write_table(tmp_path / "parts" / f"part-1{suffix}", rows[7:])
    (tmp_path / "parts" / "README.md").write_text("not data")
    ds = DatasetSpec.model_validate({"train": str(tmp_path / "parts" / f"*{suffix}"), "format": fmt,
                                     "fields": fields, "validationSplit": 0.25})
    rows_read = data.read_rows(ds.train, tmp_path)
    assert [r.where.split(": ")[0] for r in (rows_read[0], rows_read[7])] == [
        str(tmp_path / "parts" / f"part-0{suffix}"), str(tmp_path / "parts" / f"part-1{suffix}")]
    if fmt == "preference":
        pairs = preference.load_preference(ds, tmp_path, seed=0)
        assert len(pairs.train) + len(pairs.eval) == 16
        assert pairs.train[0]["prompt"].startswith("What color is the ")
    else:
        splits = data.load_splits(ds, tmp_path, seed=0)
        assert (len(splits.train), len(splits.eval)) == (12, 4)
    # The folder reads the same rows as the glob (README.md is skipped: not a data file type).
    assert [r.values for r in data.read_rows(str(tmp_path / "parts"), tmp_path)] == [r.values for r in rows_read]


@pytest.mark.parametrize(("fmt", "suffix"), [("prompt_completion", ".tsv"), ("alpaca", ".parquet"),
                                             ("messages", ".csv"), ("text", ".parquet"), ("preference", ".csv")])
def test_tabular_shapes_train(make_spec: Callable[..., dict[str, Any]], tmp_path: Path, fmt: str, suffix: str) -> None:
    rows, fields = _shape_rows(fmt)
    (tmp_path / "parts").mkdir()
    _write_table(tmp_path / "parts" / f"a{suffix}", rows[:8])
    _write_table(tmp_path / "parts" / f"b{suffix}", rows[8:])
    objective = {"type": "dpo"} if fmt == "preference" else None
    _train(make_spec, tmp_path, {"train": str(tmp_path / "parts" / f"*{suffix}"), "format": fmt, "fields": fields},
           objective=objective)


@pytest.mark.parametrize("as_dict", [False, True], ids=["Dataset", "DatasetDict"])
def test_datasets_save_to_disk_folder(make_spec: Callable[..., dict[str, Any]], tmp_path: Path, as_dict: bool) -> None:
    import datasets

    rows, fields = _shape_rows("prompt_completion")
    saved: Any = datasets.Dataset.from_list(rows)
    if as_dict:
        saved = datasets.DatasetDict({"train": saved, "test": saved.select(range(2))})
    saved.save_to_disk(str(tmp_path / "saved"))
    ds = DatasetSpec.model_validate({"train": str(tmp_path / "saved"), "format": "prompt_completion",
                                     "fields": fields})
    read = data.read_rows(ds.train, tmp_path)
    assert [r.values for r in read] == rows and read[3].where == f"{tmp_path / 'saved'}: row 3"
    _train(make_spec, tmp_path, {"train": str(tmp_path / "saved"), "format": "prompt_completion", "fields": fields})


def test_preference_and_sft_hold_out_the_same_way(tmp_path: Path) -> None:
    """One split for every objective: the same rows held out from the same file and seed."""
    f = _jsonl(tmp_path / "p.jsonl", explicit_rows())
    sft = DatasetSpec.model_validate({"train": str(f), "format": "prompt_completion",
                                      "fields": {"completion": "chosen"}, "validationSplit": 0.25})
    pref = DatasetSpec.model_validate({"train": str(f), "format": "preference", "validationSplit": 0.25})
    splits = data.load_splits(sft, tmp_path, seed=3)
    pairs = preference.load_preference(pref, tmp_path, seed=3)
    assert [r["prompt"] for r in splits.eval] == list(pairs.eval["prompt"])
    assert [r["prompt"] for r in splits.train] == list(pairs.train["prompt"])


# --- malformed: one line, file, row, expected field, what was found; exit 42 ---------------------


def _manifest(tmp_path: Path, spec: dict[str, Any]) -> Path:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "bad-data"}, "spec": spec}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


BAD = [
    ("messages", "c.jsonl", [{"conversations": [{"speaker": "human", "words": "hi"}]}], {},
     r"c\.jsonl: line 1: column 'conversations': message 0: expected keys 'role'/'content' or 'from'/'value' "
     r".*found an object with keys 'speaker', 'words'"),
    ("messages", "r.jsonl", [{"messages": [{"from": "narrator", "value": "hi"}]}], {},
     r"r\.jsonl: line 1: column 'messages': message 0: unknown role 'narrator' .*dataset\.fields\.roles"),
    ("messages", "n.jsonl", [{"messages": [{"role": "user", "content": 7}]}], {},
     r"n\.jsonl: line 1: column 'messages': message 0: 'content' must be a string, found int 7"),
    ("prompt_completion", "t.tsv", "question\tanswer\nWhat?\tblue\textra\n", {"prompt": "question", "completion": "answer"},
     r"t\.tsv: line 2: invalid TSV: 3 cells, the header names 2"),
    ("prompt_completion", "w.csv", "prompt,reply\nWhat?,blue\n", {},
     r"w\.csv: line 2: missing column 'completion' .*columns present: prompt, reply"),
    ("preference", "h.jsonl", [{"chosen": "Blue.", "rejected": "Red."}], {},
     r"h\.jsonl: line 1: empty prompt: .*share no leading text"),
    ("prompt_completion", "s.jsonl", [{"prompt": "a", "completion": ["b"]}], {},
     r"s\.jsonl: line 1: column 'completion': expected a string, found a list of 1"),
]


@pytest.mark.parametrize(("fmt", "name", "content", "fields", "expected"), BAD,
                         ids=["message-keys", "role-name", "content-type", "tsv-cells", "csv-column",
                              "implicit-no-shared-prompt", "completion-type"])
def test_malformed_shape_is_one_line_and_exit_42(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], fmt: str, name: str,
                                                 content: Any, fields: dict[str, str], expected: str) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        _jsonl(path, content * 8)
    spec = make_spec(tmp_path / "out", dataset={"train": str(path), "format": fmt, "fields": fields})
    if fmt == "preference":
        spec["objective"] = {"type": "dpo"}
    code = run_manifest.main([str(_manifest(tmp_path, spec)), "--no-progress", "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert code == ExitCode.PERMANENT
    assert "Traceback" not in err, err
    # Besides progress bars of loading the model, the one line that says what is wrong.
    lines = [line for line in err.splitlines() if "finetune run" in line]
    assert len(lines) == 1 and lines[0].startswith("finetune run: permanent error: "), err
    assert str(path) in lines[0] and re.search(expected, lines[0]), err
