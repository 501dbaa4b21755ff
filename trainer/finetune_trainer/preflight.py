"""`finetune preflight FILE.yaml [--gpu-memory 80Gi]`: will this job work, before any GPU is taken?

Reads the training data through the trainer's own loader (data.py, preference.py; the first
--sample rows of big data, and says so), renders the chat template, tokenizes as training will,
and reports: rows, token-length percentiles, the share of examples cut at maxSeqLength, the share
with no loss-carrying token, whether every completion ends with the end-of-sequence token in the
labels (else the model never learns to stop), one rendered example with the loss-carrying part
between [[ and ]], and the memory plan (memory_plan.py) with its verdict against --gpu-memory.

Exit codes as the trainer's: 42 when the job cannot work (data unreadable or in the wrong shape,
no example with a loss-carrying token, a plan that does not fit the GPU), 0 otherwise; what is
merely wasteful is printed as a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api import ManifestError
from finetune_api.constants import Env, ExitCode, Reason
from finetune_api.quantity import parse_bytes
from finetune_api.spec import PREFERENCE_OBJECTIVES, FineTuneJobSpec
from finetune_api.status import DataCheck, TerminationMessage

from . import data, memory_plan, preference, termination
from .errors import ConfigError, PermanentError

log = logging.getLogger(__name__)

#: Rows read by default; bigger datasets are checked on their first rows (stated in the report).
DEFAULT_SAMPLE = 2000
#: Warn when more than this share of examples is cut at maxSeqLength.
TRUNCATION_WARN = 0.05
LOSS_OPEN, LOSS_CLOSE = "[[", "]]"


@dataclass
class Report:
    """What the preflight found; `errors` mean the job cannot work."""

    source: str
    rows: int = 0
    sampled: bool = False
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    no_loss: int = 0
    #: examples whose every loss-carrying span ends with an end-of-sequence token; None: not checked
    eos_ok: int | None = None
    stop_tokens: list[str] = field(default_factory=list)
    example: str = ""
    plan: memory_plan.Plan | None = None
    gpu_memory: int | None = None
    on_gpu: bool = True
    largest_batch: int | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The error is the memory plan's (the data itself was fine): the operator's WillNotFit.
    will_not_fit: bool = False
    #: The reason of a trainer error that stopped the check (StorageError: access denied; InvalidSpec: no model).
    error_reason: str | None = None

    @property
    def exit_code(self) -> int:
        return ExitCode.PERMANENT if self.errors else ExitCode.SUCCESS

    def percentile(self, q: float) -> int:
        if not self.lengths:
            return 0
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]

    @property
    def truncated_share(self) -> float:
        return self.truncated / len(self.lengths) if self.lengths else 0.0

    @property
    def no_loss_share(self) -> float:
        return self.no_loss / len(self.lengths) if self.lengths else 0.0

    def summary(self) -> dict[str, Any]:
        """The few numbers the operator copies into status (camelCase, as the API)."""
        out: dict[str, Any] = {
            "ok": not self.errors,
            "rows": self.rows,
            "sampled": self.sampled,
            "tokens": sum(self.lengths),
            "truncatedShare": round(self.truncated_share, 4),
            "noLossShare": round(self.no_loss_share, 4),
        }
        if self.plan is not None and self.on_gpu:
            out["memoryPerGpuBytes"] = int(self.plan.required_bytes)
        if self.gpu_memory is not None:
            out["gpuMemoryBytes"] = self.gpu_memory
        if self.largest_batch is not None:
            out["largestBatch"] = self.largest_batch
        if self.errors:
            out["message"] = self.errors[0]
        return out

    @property
    def reason(self) -> str:
        """The operator's reason for this outcome (DataChecked condition, and Failed when not ok)."""
        if not self.errors:
            return Reason.DATA_VALID
        if self.will_not_fit:
            return Reason.WILL_NOT_FIT
        if self.error_reason in (Reason.STORAGE_ERROR, Reason.INVALID_SPEC):
            return self.error_reason
        return Reason.INVALID_DATA

    def termination_message(self) -> TerminationMessage:
        """What the preflight pod leaves for the operator (termination message contract)."""
        summary = self.summary()
        if self.errors:
            message = self.errors[0]
        else:
            message = f"preflight ok: {self.rows} rows{' (a sample)' if self.sampled else ''}, {summary['tokens']} tokens"
            if "memoryPerGpuBytes" in summary:
                message += f", about {memory_plan.gib(summary['memoryPerGpuBytes'])} per GPU"
            if self.warnings:
                message += f"; warning: {self.warnings[0]}"
        return TerminationMessage(outcome="failed" if self.errors else "succeeded", reason=self.reason,
                                  message=message, data_check=DataCheck.model_validate(summary))

    def lines(self) -> list[str]:
        out = [f"data: {self.source}"]
        if self.rows:
            note = f" (the first {self.rows} only: a sample; pass --sample to read more)" if self.sampled else ""
            out.append(f"  rows: {self.rows}{note}")
        if self.lengths:
            p = self.percentile
            out.append(f"  tokens per example: p50 {p(50)}, p90 {p(90)}, p99 {p(99)}, max {max(self.lengths)}")
            out.append(f"  cut at maxSeqLength: {self.truncated_share:.1%} ({self.truncated} of {len(self.lengths)})")
            out.append(f"  no loss-carrying token: {self.no_loss_share:.1%} ({self.no_loss})")
        if self.eos_ok is not None and self.lengths:
            stops = ", ".join(self.stop_tokens) or "none"
            verdict = "yes" if self.eos_ok == len(self.lengths) else f"NO ({len(self.lengths) - self.eos_ok} do not)"
            out.append(f"  every completion ends with an end-of-sequence token ({stops}) in the labels: {verdict}")
        if self.example:
            out.append(f"  example (the loss-carrying part between {LOSS_OPEN} and {LOSS_CLOSE}):")
            out.extend("    " + line for line in self.example.splitlines())
        if self.plan is not None:
            on_gpu = self.on_gpu
            out.append("memory plan:" if on_gpu else "memory plan (resources.gpusPerNode 0: one CPU process, fp32):")
            out.extend("  " + line for line in self.plan.lines("GPU" if on_gpu else "process"))
            if self.gpu_memory is not None:
                fits = self.plan.fits(self.gpu_memory)
                out.append(f"  GPU {memory_plan.gib(self.gpu_memory)}: {'fits' if fits else 'does NOT fit'}; "
                           f"largest batch size that fits: {self.largest_batch}")
        out.extend(f"warning: {w}" for w in self.warnings)
        out.extend(f"error: {e}" for e in self.errors)
        out.append("preflight: " + ("FAILED" if self.errors else "ok"))
        return out


# --- data -----------------------------------------------------------------------------------------


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of loss-carrying labels."""
    spans, start = [], None
    for i, lab in enumerate([*labels, data.IGNORE_INDEX]):
        if lab != data.IGNORE_INDEX and start is None:
            start = i
        elif lab == data.IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def render(tokenizer: Any, ex: dict[str, list[int]]) -> str:
    """The example's text with each loss-carrying part between LOSS_OPEN and LOSS_CLOSE."""
    ids, parts, pos = ex["input_ids"], [], 0
    for start, end in _spans(ex["labels"]):
        parts += [tokenizer.decode(ids[pos:start]), LOSS_OPEN, tokenizer.decode(ids[start:end]), LOSS_CLOSE]
        pos = end
    parts.append(tokenizer.decode(ids[pos:]))
    return "".join(parts)


def stop_token_ids(tokenizer: Any, model_dir: Path | None) -> set[int]:
    """Tokens that end generation: the tokenizer's EOS and the generation config's eos_token_id."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return ids


def _ends_with_stop(ex: dict[str, list[int]], stops: set[int]) -> bool:
    # The stop token closes each span, or sits just before its last token (a template's newline).
    return all(bool(stops & set(ex["input_ids"][max(start, end - 2):end])) for start, end in _spans(ex["labels"]))


def check_sft(report: Report, records: list[dict[str, Any]], tokenizer: Any, spec: FineTuneJobSpec,
              stops: set[int]) -> None:
    ds = spec.dataset
    report.eos_ok = 0
    report.stop_tokens = sorted(tokenizer.convert_ids_to_tokens(list(stops)))
    for rec in records:
        ex = data.tokenize_example(rec, tokenizer, ds)
        report.lengths.append(len(ex["input_ids"]))
        report.eos_ok += _ends_with_stop(ex, stops)
        if len(ex["input_ids"]) > ds.max_seq_length:
            report.truncated += 1
        cut = data.truncate(ex, ds.max_seq_length)
        if all(lab == data.IGNORE_INDEX for lab in cut["labels"]):
            report.no_loss += 1
        elif not report.example:
            report.example = render(tokenizer, ex)


def check_pairs(report: Report, pairs: list[dict[str, Any]], tokenizer: Any, spec: FineTuneJobSpec) -> None:
    ds = spec.dataset
    for pair in pairs:
        prompt = preference.prompt_text(pair["prompt"], tokenizer)
        prompt_ids = data._ids(tokenizer, prompt)
        longest = 0
        for answer in (pair["chosen"], pair["rejected"]):
            ids = data._ids(tokenizer, prompt + preference.answer_text(answer))
            longest = max(longest, len(ids))
        report.lengths.append(longest)
        if longest > ds.max_seq_length:
            report.truncated += 1
        if len(prompt_ids) >= ds.max_seq_length:
            report.no_loss += 1  # the prompt alone fills maxSeqLength: no answer token is left
        elif not report.example:
            report.example = (f"{prompt}{LOSS_OPEN}{preference.answer_text(pair['chosen'])}{LOSS_CLOSE}"
                              f"  (rejected: {preference.answer_text(pair['rejected'])!r})")


#: What the preflight needs of a model: its config and tokenizer, never the weights.
SMALL_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                     "merges.txt", "added_tokens.json")


def _model_dir(spec: FineTuneJobSpec, workdir: Path) -> Path | None:
    """The model folder: a local one as it is; of a remote (s3://, pvc://) one only the config and
    tokenizer files, so that a CPU pod does not download the weights; None for a hub id."""
    from . import storage, uris

    uri = spec.model.uri
    if not uris.is_remote(uri) or spec.model.gguf_file:
        path = uris.resolve(uri, workdir / "model")
        return path if path is not None and path.is_dir() else None
    folder = workdir / "model-files"
    for name in SMALL_MODEL_FILES:
        try:
            storage.fetch(f"{uri.rstrip('/')}/{name}", folder)
        except Exception as exc:  # absent files are normal (a model has one tokenizer format)
            log.debug("%s/%s: not fetched: %s", uri, name, exc)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model {uri}: no config.json there")
    return folder


def _model_config(spec: FineTuneJobSpec, model_dir: Path | None) -> Any:
    from transformers import AutoConfig

    m = spec.model
    source = str(model_dir) if model_dir is not None else m.uri.removeprefix("hf://")
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    if m.revision:
        kwargs["revision"] = m.revision
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {m.uri}: cannot read its config: {exc}") from None


def plan_for(spec: FineTuneJobSpec, config: Any, seq_len: int | None = None) -> memory_plan.Plan:
    shape = memory_plan.shape_of(config)
    on_gpu = spec.resources.gpus_per_node > 0
    return memory_plan.estimate(memory_plan.setup_from_spec(spec, shape, seq_len, on_gpu=on_gpu))


def run(spec: FineTuneJobSpec, workdir: Path, *, gpu_memory: int | None = None,
        sample: int = DEFAULT_SAMPLE) -> Report:
    """Check the data and the memory plan of a spec; never raises for what it is there to find."""
    from . import models

    ds = spec.dataset
    report = Report(source=ds.train)
    try:
        rows = data.read_rows(ds.train, workdir, limit=sample + 1)
        report.sampled = len(rows) > sample
        rows = rows[:sample]
        report.rows = len(rows)
        model_dir = _model_dir(spec, workdir)
        model_spec = spec.model
        if model_dir is not None and spec.model.tokenizer is None:
            model_spec = spec.model.model_copy(update={"uri": str(model_dir)})  # fetched once
        tokenizer = models.load_tokenizer(model_spec, workdir)
        if spec.objective.type in PREFERENCE_OBJECTIVES and ds.format == "preference":
            pairs, _ = preference.check_pairs(rows, ds, ds.train)
            check_pairs(report, pairs, tokenizer, spec)
        else:
            check_sft(report, data.canonical_rows(rows, ds), tokenizer, spec, stop_token_ids(tokenizer, model_dir))
        config = _model_config(spec, model_dir)
    except PermanentError as exc:
        report.errors.append(str(exc))
        report.error_reason = exc.reason
        return report
    if report.lengths and report.no_loss == len(report.lengths):
        report.errors.append(
            f"{ds.train}: no example keeps a loss-carrying token within maxSeqLength {ds.max_seq_length} "
            f"(loss masking {ds.loss_masking}): there is nothing to learn"
        )
    elif report.no_loss:
        report.warnings.append(f"{report.no_loss} examples carry no loss token within maxSeqLength "
                               f"{ds.max_seq_length} and are dropped")
    if report.truncated_share > TRUNCATION_WARN:
        report.warnings.append(
            f"{report.truncated_share:.0%} of examples are longer than maxSeqLength {ds.max_seq_length} and are "
            f"cut (p90 is {report.percentile(90)} tokens)"
        )
    if report.eos_ok is not None and report.lengths and report.eos_ok < len(report.lengths):
        report.warnings.append(
            f"{len(report.lengths) - report.eos_ok} of {len(report.lengths)} examples have a completion that does "
            f"not end with an end-of-sequence token ({', '.join(report.stop_tokens) or 'none'}) in the labels: "
            "the model will not learn to stop; fix model.chatTemplate or the tokenizer's eos_token"
        )
    # The longest batch sets the peak: the longest example seen, or maxSeqLength if not all were read.
    longest = max(report.lengths, default=ds.max_seq_length)
    seq_len = ds.max_seq_length if (ds.packing or report.sampled) else min(longest, ds.max_seq_length)
    report.plan = plan_for(spec, config, seq_len)
    report.on_gpu = spec.resources.gpus_per_node > 0
    if gpu_memory is not None and not report.on_gpu:
        report.warnings.append("--gpu-memory ignored: the spec runs on CPU (resources.gpusPerNode 0)")
    elif gpu_memory is not None:
        report.gpu_memory = gpu_memory
        report.largest_batch = report.plan.largest_batch(gpu_memory)
        if not report.plan.fits(gpu_memory):
            report.will_not_fit = not report.errors
            hint = (f"batchSize {report.largest_batch} fits" if report.largest_batch
                    else "not even batchSize 1 fits: use qlora, gradientCheckpointing, or more GPUs with fsdp")
            report.errors.append(
                f"will not fit: needs about {memory_plan.gib(report.plan.required_bytes)} per GPU "
                f"(batchSize {spec.hyperparameters.batch_size} x {seq_len} tokens), the GPU has "
                f"{memory_plan.gib(gpu_memory)}; {hint}"
            )
    return report


# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune preflight", description=__doc__.splitlines()[0])
    p.add_argument("file", metavar="FILE.yaml", nargs="?",
                   help="A FineTuneJob manifest; without it, the spec JSON at $FINETUNE_SPEC_PATH (the operator's "
                   "preflight pod), and the summary also goes to the termination message.")
    p.add_argument("--gpu-memory", metavar="SIZE", help="Memory of one GPU, e.g. 80Gi: give the plan a verdict.")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"Rows to read at most (default {DEFAULT_SAMPLE}).")
    p.add_argument("--workdir", type=Path, metavar="DIR", help="Scratch folder for remote data (default: a temp dir).")
    p.add_argument("--json", action="store_true", help="Print the summary as one JSON object (last line).")
    return p


def _read_spec(file: str | None) -> FineTuneJobSpec:
    """The spec of a manifest file, or (no file: in the operator's pod) the mounted spec JSON."""
    if file is None:
        from .entrypoint import read_spec

        return read_spec(os.environ.get(Env.SPEC_PATH))
    from finetune_cli.manifests import load_job

    return load_job(Path(file), local_run=True).spec  # local data and output paths are fine here


def main(argv: list[str]) -> int:
    import tempfile

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    gpu_memory = None
    if args.gpu_memory is not None:
        try:
            gpu_memory = parse_bytes(args.gpu_memory)
        except ValueError as exc:
            print(f"finetune preflight: --gpu-memory: {exc}", file=sys.stderr)
            return 2
    if args.sample < 1:
        print("finetune preflight: --sample must be at least 1", file=sys.stderr)
        return 2
    try:
        spec = _read_spec(args.file)
    except (ManifestError, ConfigError) as exc:
        print(str(exc), file=sys.stderr)
        if args.file is None:
            termination.write(TerminationMessage(outcome="failed", reason=Reason.INVALID_DATA, message=str(exc)))
        return ExitCode.PERMANENT
    with tempfile.TemporaryDirectory(prefix="finetune-preflight-", dir=args.workdir) as tmp:
        report = run(spec, Path(tmp), gpu_memory=gpu_memory, sample=args.sample)
    # A no-op where there is no termination log (a user's machine).
    termination.write(report.termination_message())
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("error:") else sys.stdout)
    if args.json:
        print(json.dumps(report.summary(), sort_keys=True))
    return report.exit_code
