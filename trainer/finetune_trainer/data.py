"""Datasets: read files, check them against their format, tokenize, and mask the loss.

Files: JSON (an array, or one object per line), JSONL, Parquet, CSV or TSV, from a local path, a
folder or a glob (`data/*.jsonl`, `**` too) of such files, a folder written by `datasets`'
`save_to_disk` (its `train` split when it holds several), `s3://`/`pvc://` (through the storage
layer) or a Hugging Face dataset id (read through the local cache). Every problem is a DataError
naming the file and the line, row or column, because the user has to find it in their data.

Formats (canonical column names; the spec's `dataset.fields` maps the user's own names):
  text               {text}
  prompt_completion  {prompt, completion}
  messages           {messages: [{role, content}, ...]}     (rendered with the chat template)
                     also {conversations: [{from, value}, ...]} with human/gpt/... role names
  alpaca             {instruction, input?, output}          (rendered with the Alpaca prompt)
  preference         {prompt?, chosen, rejected}            (for dpo/reward/ppo recipes; strings or
                                                            message lists, see preference.py)

Tokenized rows carry `input_ids` and `labels`, with -100 on tokens that carry no loss. The masks
are built here rather than by TRL, because TRL's assistant-only loss needs `{% generation %}`
markers in the chat template (most templates have none): for each assistant turn we render the
conversation up to it with the generation prompt and up to its end, and label the tokens in
between. prompt_completion is tokenized exactly as TRL's SFTTrainer does (prompt, then
prompt + completion + EOS, completion starting at their common prefix), so our loss equals a plain
TRL script's.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from finetune_api.spec import DatasetSpec

from . import uris
from .errors import DataError

IGNORE_INDEX = -100
SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
GLOB_CHARS = "*?["
FILE_TYPES = ".json, .jsonl, .parquet, .csv or .tsv"

#: Message keys recognised without dataset.fields.role/content: (speaker, text) pairs, in the
#: order they are tried (OpenAI style, then ShareGPT style).
MESSAGE_KEYS = (("role", "content"), ("from", "value"))
#: Role names recognised without dataset.fields.roles (lower-cased) -> the chat template's roles.
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "tool": "tool", "function": "tool",
}
#: Columns tried, in order, when the default column of a field is absent and not mapped.
COLUMN_ALIASES = {"messages": ("conversations", "conversation")}

#: canonical field -> required?
FORMAT_FIELDS: dict[str, dict[str, bool]] = {
    "text": {"text": True},
    "prompt_completion": {"prompt": True, "completion": True},
    "messages": {"messages": True},
    "alpaca": {"instruction": True, "input": False, "output": True},
    "preference": {"prompt": False, "chosen": True, "rejected": True},
}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass(frozen=True)
class Row:
    """One record and where it came from (for error messages)."""

    where: str
    values: dict[str, Any]


# --- reading files ---------------------------------------------------------------------------


def split_glob(uri: str) -> tuple[str, str | None]:
    """(the URI of the folder before the first glob component, the pattern below it), or (uri, None)."""
    parts = uri.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in GLOB_CHARS):
            base = "/".join(parts[:i]) or "/"
            return (base + "/" if base in (".", "..") else base), "/".join(parts[i:])
    return uri, None


def is_saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _check_type(path: Path) -> Path:
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}: use {FILE_TYPES}")
    return path


def _files(path: Path, uri: str, pattern: str | None = None) -> list[Path]:
    if pattern is not None:
        if not path.is_dir():
            raise DataError(f"{uri}: no such folder {path} to match {pattern!r} in")
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if not found:
            raise DataError(f"{uri}: no file matches")
        return [_check_type(p) for p in found]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not found:
            raise DataError(f"{uri}: folder holds no {FILE_TYPES} files (nor a datasets save_to_disk folder)")
        return found
    if not path.exists():
        raise DataError(f"{uri}: no such file or folder")
    return [_check_type(path)]


def not_utf8(path: Path) -> DataError:
    """The first line of a file that is not UTF-8 (a decoder's own position is inside its buffer)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return DataError(f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                         "save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text")


def _read_json(path: Path) -> Iterator[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: item {i}: expected a JSON object, got {type(rec).__name__}")
            yield Row(f"{path}: item {i}", rec)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
        yield Row(f"{path}: line {lineno}", rec)


def _read_csv(path: Path, delimiter: str = ",") -> Iterator[Row]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for rec in reader:
                # Header is line 1, so record n sits on line n + 1 (without embedded newlines).
                where = f"{path}: line {reader.line_num}"
                if None in rec:  # more cells than the header names
                    raise DataError(f"{where}: invalid {kind}: {len(rec) - 1 + len(rec[None])} cells, "
                                    f"the header names {len(reader.fieldnames or [])}")
                yield Row(where, dict(rec))
        except csv.Error as exc:
            raise DataError(f"{path}: line {reader.line_num}: invalid {kind}: {exc}") from None
        except UnicodeDecodeError:
            raise not_utf8(path) from None


def _read_tsv(path: Path) -> Iterator[Row]:
    return _read_csv(path, "\t")


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
        i = 0
        for batch in batches:
            for rec in batch.to_pylist():
                yield Row(f"{path}: row {i}", rec)
                i += 1
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None


def _read_saved(path: Path) -> Iterator[Row]:
    """A datasets save_to_disk folder: the Dataset, or the `train` split of a DatasetDict."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: not a readable datasets save_to_disk folder: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: saved DatasetDict has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    for i, rec in enumerate(loaded):
        yield Row(f"{path}: row {i}", dict(rec))


READERS = {"json": _read_json, "csv": _read_csv, "tsv": _read_tsv, "parquet": _read_parquet}


def iter_rows(uri: str, workdir: Path) -> Iterator[Row]:
    """Every record of a dataset URI in order, with its provenance, read lazily file by file."""
    base, pattern = split_glob(uri)
    path = uris.resolve(base, workdir / "data")
    if path is None:
        yield from _read_hub(uri)
        return
    if pattern is None and is_saved_dataset(path):
        yield from _read_saved(path)
        return
    # Remote data is read from a local copy; messages name the object the user gave, not the copy.
    local, shown = str(path), base.rstrip("/") if uris.is_remote(base) else str(path)

    def named(text: str) -> str:
        return text.replace(local, shown, 1) if local != shown else text

    try:
        for f in _files(path, uri, pattern):
            empty = True
            for row in READERS[SUFFIXES[f.suffix.lower()]](f):
                empty = False
                yield Row(named(row.where), row.values) if local != shown else row
            if empty:
                raise DataError(f"{f}: empty file: no records")
    except DataError as exc:
        if local == shown:
            raise
        raise DataError(named(str(exc))) from None


def read_rows(uri: str, workdir: Path, limit: int | None = None) -> list[Row]:
    """The records of a dataset URI (the first `limit` when given), with their provenance."""
    rows = iter_rows(uri, workdir)
    return list(rows if limit is None else itertools.islice(rows, limit))


def _read_hub(uri: str) -> Iterator[Row]:
    import datasets

    name = uris.hf_id(uri)
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise DataError(f"{uri}: cannot load dataset from the Hugging Face cache: {exc}") from None
    for i, rec in enumerate(ds):
        yield Row(f"{uri}: row {i}", dict(rec))


# --- checking rows against the format ---------------------------------------------------------


def _found(value: Any) -> str:
    """What was found instead of what was expected, short enough for one line."""
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(repr, value)) or 'none'}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _message_keys(msg: dict[str, Any], ds: DatasetSpec) -> tuple[str, str] | None:
    f = ds.fields
    if f.role is not None or f.content is not None:
        return f.role or "role", f.content or "content"
    return next(((r, c) for r, c in MESSAGE_KEYS if r in msg and c in msg), None)


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of {type, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def check_messages(where: str, column: str, value: Any, ds: DatasetSpec) -> list[dict[str, str]]:
    """A list of messages in the canonical {role, content} form with system/user/assistant/tool roles."""
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV/Parquet may hold messages as JSON text
        except json.JSONDecodeError:
            raise DataError(f"{where}: column {column!r}: expected a list of messages, got a string") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {column!r}: expected a non-empty list of messages, found {_found(value)}")
    roles = {**ROLE_ALIASES, **{k.lower(): v for k, v in (ds.fields.roles or {}).items()}}
    out = []
    for i, msg in enumerate(value):
        keys = _message_keys(msg, ds) if isinstance(msg, dict) else None
        if not isinstance(msg, dict) or keys is None or keys[0] not in msg or keys[1] not in msg:
            wanted = "'" + "'/'".join(keys) + "'" if keys else "'role'/'content' or 'from'/'value'"
            raise DataError(
                f"{where}: column {column!r}: message {i}: expected keys {wanted} (map yours with "
                f"dataset.fields.role and dataset.fields.content), found {_found(msg)}"
            )
        raw, text = msg[keys[0]], _text(msg[keys[1]])
        if not isinstance(raw, str) or text is None:
            bad, what = (keys[0], raw) if not isinstance(raw, str) else (keys[1], msg[keys[1]])
            raise DataError(f"{where}: column {column!r}: message {i}: {bad!r} must be a string, found {_found(what)}")
        role = roles.get(raw.lower())
        if role is None:
            raise DataError(
                f"{where}: column {column!r}: message {i}: unknown role {raw!r} (expected system, user, assistant "
                f"or tool, or a name mapped by dataset.fields.roles)"
            )
        out.append({"role": role, "content": text})
    return out


def _label(row: Row, column: str) -> str:
    """The gold class label of a row (dataset.fields.label), as text: CSV/JSON may hold numbers."""
    value = row.values.get(column)
    if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
        present = ", ".join(sorted(row.values)) or "none"
        raise DataError(
            f"{row.where}: column {column!r} (dataset.fields.label) needs a non-empty string or number "
            f"label; columns present: {present}"
        )
    return str(value)


def _column(row: Row, field: str, ds: DatasetSpec) -> str:
    """The row's column for a canonical field: the mapped one, else the default or a known alias."""
    column = ds.fields.column(field)
    if getattr(ds.fields, field) is None and column not in row.values:
        return next((a for a in COLUMN_ALIASES.get(field, ()) if a in row.values), column)
    return column


def canonical_rows(rows: list[Row], ds: DatasetSpec) -> list[dict[str, Any]]:
    """Rows renamed to canonical fields and type-checked; DataError names file, line and column."""
    wanted = FORMAT_FIELDS[ds.format]
    out = []
    for row in rows:
        rec: dict[str, Any] = {}
        for field, required in wanted.items():
            column = _column(row, field, ds)
            value = row.values.get(column)
            if value is None:
                if required:
                    present = ", ".join(sorted(row.values)) or "none"
                    raise DataError(
                        f"{row.where}: missing column {column!r} (format {ds.format} reads it as {field!r}; "
                        f"columns present: {present}; map yours with dataset.fields.{field})"
                    )
                if ds.format == "preference":
                    continue  # an absent prompt means the implicit-prompt layout (preference.py)
                value = ""
            if field == "messages" or (field in ("chosen", "rejected", "prompt") and isinstance(value, list)):
                value = check_messages(row.where, column, value, ds)
            elif not isinstance(value, str):
                raise DataError(f"{row.where}: column {column!r}: expected a string, found {_found(value)}")
            rec[field] = value
        if ds.fields.label is not None:
            rec["label"] = _label(row, ds.fields.label)
        if ds.format == "messages" and ds.loss_masking in ("assistant_only", "completion_only"):
            if not any(m["role"] == "assistant" for m in rec["messages"]):
                raise DataError(f"{row.where}: column {_column(row, 'messages', ds)!r}: no assistant message to learn")
        out.append(rec)
    return out


# --- tokenization and masks -------------------------------------------------------------------


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text=text)["input_ids"])


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _with_eos(text: str, eos: str | None) -> str:
    return text + eos if eos and not text.endswith(eos) else text


def alpaca_prompt(instruction: str, input_text: str) -> str:
    block = f"### Input:\n{input_text}\n\n" if input_text else ""
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if input_text else "",
        instruction=instruction,
        input_block=block,
    )


def tokenize_example(rec: dict[str, Any], tokenizer: Any, ds: DatasetSpec) -> dict[str, list[int]]:
    """input_ids and labels of one canonical record (not truncated)."""
    eos = tokenizer.eos_token
    mask_prompt = ds.loss_masking in ("completion_only", "assistant_only")
    if ds.format == "text":
        ids = _ids(tokenizer, _with_eos(rec["text"], eos))
        return {"input_ids": ids, "labels": list(ids)}
    if ds.format in ("prompt_completion", "alpaca"):
        if ds.format == "alpaca":
            prompt, completion = alpaca_prompt(rec["instruction"], rec["input"]), rec["output"]
        else:
            prompt, completion = rec["prompt"], rec["completion"]
        prompt_ids = _ids(tokenizer, prompt)
        ids = _ids(tokenizer, _with_eos(prompt + completion, eos))
        start = _common_prefix(prompt_ids, ids) if mask_prompt else 0
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]}
    if ds.format == "messages":
        messages = rec["messages"]
        ids = _chat_ids(tokenizer, messages)
        if not mask_prompt:
            return {"input_ids": ids, "labels": list(ids)}
        labels = [IGNORE_INDEX] * len(ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if ds.loss_masking == "completion_only":
            turns = turns[-1:]
        for i in turns:
            start = _common_prefix(_chat_ids(tokenizer, messages[:i], add_generation_prompt=True), ids)
            end = _common_prefix(_chat_ids(tokenizer, messages[: i + 1]), ids)
            labels[start:end] = ids[start:end]
        return {"input_ids": ids, "labels": labels}
    raise DataError(f"dataset.format {ds.format}: not a supervised fine-tuning format")


def truncate(example: dict[str, list[int]], max_length: int) -> dict[str, list[int]]:
    return {k: v[:max_length] for k, v in example.items()}


# --- the whole pipeline -------------------------------------------------------------------------


@dataclass
class Splits:
    """Canonical records of the train and held-out splits (before tokenization)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


T = TypeVar("T")


def split_held_out(
    train: list[T], held: list[T] | None, ds: DatasetSpec, seed: int, what: str = "rows"
) -> tuple[list[T], list[T]]:
    """The training and held-out records, for every objective alike.

    `held` is dataset.validation's records when given; else a seeded share of train
    (validationSplit, default 0.1, at least one) is held out. maxSamples caps the training rows.
    """
    if held is None:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * (ds.validation_split or 0.1)))
        if len(train) - n_eval < 1:
            raise DataError(f"{ds.train}: {len(train)} {what} are too few to hold out {n_eval} for validation")
        eval_idx = set(order[:n_eval])
        held = [r for i, r in enumerate(train) if i in eval_idx]
        train = [r for i, r in enumerate(train) if i not in eval_idx]
    if ds.max_samples is not None:
        train = train[: ds.max_samples]
    return train, held


def load_splits(ds: DatasetSpec, workdir: Path, seed: int) -> Splits:
    """Read, check and split the data; `max_samples` caps the training rows."""
    train = canonical_rows(read_rows(ds.train, workdir), ds)
    held = canonical_rows(read_rows(ds.validation, workdir), ds) if ds.validation is not None else None
    train, held = split_held_out(train, held, ds, seed)
    return Splits(train=train, eval=held)


def tokenize_rows(records: list[dict[str, Any]], tokenizer: Any, ds: DatasetSpec, name: str) -> Any:
    """A datasets.Dataset of input_ids/labels, truncated, without rows that carry no loss."""
    import datasets

    out = []
    for rec in records:
        ex = truncate(tokenize_example(rec, tokenizer, ds), ds.max_seq_length)
        if any(label != IGNORE_INDEX for label in ex["labels"]):
            out.append(ex)
    if not out:
        raise DataError(
            f"{name} split of {ds.train}: no example keeps a completion token after truncation to "
            f"maxSeqLength {ds.max_seq_length}"
        )
    return datasets.Dataset.from_list(out)


@dataclass
class SftData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any
    train_tokens: int
    #: Canonical held-out records before tokenization (prompt, reference answer, `label` when
    #: dataset.fields.label is set), for generation metrics (BLEU/ROUGE/win-rate/accuracy/F1).
    eval_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def prepare_sft(ds: DatasetSpec, tokenizer: Any, workdir: Path, seed: int) -> SftData:
    splits = load_splits(ds, workdir, seed)
    train = tokenize_rows(splits.train, tokenizer, ds, "train")
    held = tokenize_rows(splits.eval, tokenizer, ds, "validation")
    return SftData(
        train=train, eval=held, train_tokens=sum(len(x) for x in train["input_ids"]), eval_records=splits.eval
    )
