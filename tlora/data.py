"""Tasks as data, tokenized with prompt tokens labelled -100, and the seeded calibration sample (DESIGN §1.1).

A task is a dataset (the mined stdlib-code pairs, local JSON/JSONL/parquet files, or a hub id), a prompt
template over its fields, and a metric. :func:`load_task` gives every task the same shape: a ``DatasetDict``
with ``train``/``validation``/``test`` splits of ``id``, ``prompt`` (the rendered template) and ``response``.
Splits a source lacks are assigned by sha256 of the record id, so they are the same in every process.

An example is ``prompt ids + response ids + EOS``, the prompt tokenized on its own exactly as it is at
generation time; labels are -100 on the prompt. The calibration sample is ``n_calib`` train rows drawn
without replacement by a seeded numpy Generator; its row indices, record ids and a sha256 of the token
tensors go into ``meta.json`` beside ``calibration.safetensors``, so the exact samples can be rebuilt and checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from tlora.stdlib_code import code_exact_match, mine_stdlib_code

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100
CALIBRATION_VERSION = 1
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TENSORS = ("input_ids", "attention_mask", "labels")


class TaskSpec(BaseModel):
    """What a task is: where its records come from, how a record becomes prompt and response, its metric."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    source: Literal["stdlib-code", "json", "hub"] = "stdlib-code"
    path: str | dict[str, str] | None = None
    """json: a .json/.jsonl/.parquet file, a folder holding ``train``/``validation``/``test`` files, or a mapping
    split -> file; hub: a dataset id. stdlib-code takes none."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    id_field: str | None = None
    """Field holding a stable record id, hashed to assign missing splits; default: the prompt field."""
    template: str | None = None
    """``str.format`` template over the record's fields giving the prompt text (default: the prompt field)."""
    metric: Literal["code_exact_match", "exact_match", "none"] = "exact_match"
    """Default: ``code_exact_match`` for stdlib-code, ``exact_match`` (stripped strings equal) otherwise."""
    validation: float = Field(0.1, gt=0, lt=0.5)
    """Fraction of records hashed into validation when the source has no validation split."""
    test: float = Field(0.1, gt=0, lt=0.5)
    """Fraction of records hashed into test when the source has no test split."""
    max_examples: int | None = Field(None, gt=0)
    """At most this many examples per split (a stable hash-ordered subset), for quick runs."""

    @model_validator(mode="before")
    @classmethod
    def _source_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source", "stdlib-code") == "stdlib-code":
            data = {"metric": "code_exact_match", "id_field": "qualname", **data}
        return data

    @model_validator(mode="after")
    def _path_matches_source(self) -> TaskSpec:
        if (self.source == "stdlib-code") != (self.path is None):
            raise ValueError(f"source {self.source!r} " + ("takes no path" if self.path else "needs a path"))
        return self

    @property
    def prompt_template(self) -> str:
        return self.template if self.template is not None else "{" + self.prompt_field + "}"


class CalibrationMeta(BaseModel):
    """``meta.json`` of a calibration artifact: enough to rebuild and verify the exact samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Literal["calibration"] = "calibration"
    stage_version: int = CALIBRATION_VERSION
    task: str
    n_calib: int
    seed: int
    indices: list[int]  # rows of the task's train split, in draw order
    ids: list[str]  # their record ids (qualified names for stdlib-code)
    train_fingerprint: str  # sha256 of the train split's ids, prompts and responses
    tokenizer: str
    max_length: int
    n_truncated: int
    data_fingerprint: str  # sha256 of the three token tensors
    inputs: dict[str, str] = Field(default_factory=dict)  # cache keys of the inputs, filled by the flow


@dataclass(frozen=True)
class Calibration:
    """Tokenized calibration samples, right-padded to one width, and their manifest."""

    input_ids: torch.Tensor  # [n_calib, T], int64, pad id after the sequence
    attention_mask: torch.Tensor  # [n_calib, T], int64, 0 on padding
    labels: torch.Tensor  # [n_calib, T], int64, -100 on prompt and padding
    meta: CalibrationMeta

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive batches of ``batch_size`` samples, each trimmed to its own longest sequence."""
        out = []
        for i in range(0, len(self.input_ids), batch_size):
            width = int(self.attention_mask[i:i + batch_size].sum(1).max())
            out.append({k: getattr(self, k)[i:i + batch_size, :width] for k in _TENSORS})
        return out


def load_task(spec: TaskSpec, *, cache_dir: str | Path | None = None) -> DatasetDict:
    """Load a task as ``train``/``validation``/``test`` splits of ``id``, ``prompt`` and ``response`` strings.

    Args:
        cache_dir: where stdlib-code keeps its mined pairs between runs (mining takes seconds).

    Raises:
        ValueError: a field the spec or template names is missing (the message lists those that exist),
            a value is missing, or a split ends up empty.
    """
    if spec.source == "stdlib-code":
        raw = {"train": Dataset.from_list(mine_stdlib_code(cache_dir=cache_dir))}
    else:
        raw = _load_source(spec)
    template, id_field = spec.prompt_template, spec.id_field or spec.prompt_field
    fields = _template_fields(template)
    splits: dict[str, dict[str, list[str]]] = {s: {"id": [], "prompt": [], "response": []} for s in SPLITS}
    for split, ds in raw.items():
        missing = [f for f in dict.fromkeys([*fields, spec.response_field, id_field]) if f not in ds.column_names]
        if missing:
            raise ValueError(f"task {spec.name!r}: split {split!r} has no field(s) {missing}; its fields are "
                             f"{ds.column_names} (set prompt_field/response_field/id_field/template to match)")
        columns = {f: ds[f][:] for f in dict.fromkeys([*fields, spec.response_field, id_field])}  # [:]: a list
        for col, values in columns.items():
            if (n_none := sum(v is None for v in values)) > 0:
                raise ValueError(f"task {spec.name!r}: field {col!r} is empty in {n_none} record(s) of {split!r}")
        fractions = {"validation": 0.0 if "validation" in raw else spec.validation,
                     "test": 0.0 if "test" in raw else spec.test}
        for i in range(len(ds)):
            record = {f: columns[f][i] for f in fields}
            key = str(columns[id_field][i])
            target = split if split != "train" else split_of(key, **fractions)
            splits[target]["id"].append(key)
            splits[target]["prompt"].append(template.format_map(record))
            splits[target]["response"].append(str(columns[spec.response_field][i]))
    if spec.max_examples is not None:
        splits = {s: _subset(cols, spec.max_examples) for s, cols in splits.items()}
    sizes = {s: len(cols["id"]) for s, cols in splits.items()}
    for split, size in sizes.items():
        if size == 0:
            raise ValueError(f"task {spec.name!r}: split {split!r} is empty (sizes: {sizes}); give the source more "
                             f"records or a {split} split of its own")
    log.info("task %s: %s", spec.name, sizes)
    return DatasetDict({s: Dataset.from_dict(cols) for s, cols in splits.items()})


def split_of(key: str, validation: float = 0.1, test: float = 0.1) -> Literal["train", "validation", "test"]:
    """The split a record id falls in: sha256 of the id as a number in [0, 1), test first, then validation."""
    u = _unit(key)
    if u < test:
        return "test"
    return "validation" if u < test + validation else "train"


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, *, max_length: int
) -> dict[str, list[int]]:
    """Tokenize one example: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt)."""
    return tokenize_examples(tokenizer, [prompt], [response], max_length=max_length)[0]


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    ids: Sequence[str] | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize examples as ``prompt + response + EOS``, cut to ``max_length`` tokens (a warning counts the cuts).

    Raises:
        ValueError: the tokenizer has no EOS, every response is empty (the task yields no target tokens),
            or an example keeps no target token after truncation (its prompt alone fills ``max_length``).
    """
    return _encode(tokenizer, prompts, responses, max_length=max_length, ids=ids)[0]


def tokenize_dataset(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, max_length: int) -> Dataset:
    """A task split as ``input_ids``/``attention_mask``/``labels`` rows, for training and held-out loss."""
    rows = tokenize_examples(tokenizer, dataset["prompt"][:], dataset["response"][:], max_length=max_length,
                             ids=dataset["id"][:])
    return Dataset.from_dict({k: [row[k] for row in rows] for k in _TENSORS})


def fitting_rows(split: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[int]:
    """Rows whose prompt leaves at least one target token in ``max_length`` (the rest would be refused).

    Raises:
        ValueError: no row fits.
    """
    prefix = len(_special_prefix(tokenizer))  # counted as tokenize_examples lays the prompt out
    lengths = [prefix + len(ids) for ids in tokenizer(split["prompt"][:], add_special_tokens=False)["input_ids"]]
    rows = [i for i, n in enumerate(lengths) if n < max_length]
    if not rows:
        raise ValueError(f"no example's prompt fits in max_length={max_length} tokens; raise max_length")
    return rows


def sample_calibration(train: Dataset, n_calib: int, seed: int) -> list[int]:
    """Draw ``n_calib`` distinct row indices of the train split with a seeded numpy Generator, in draw order."""
    if not 0 < n_calib <= len(train):
        raise ValueError(f"n_calib={n_calib} must be between 1 and the train split's size, {len(train)}")
    return np.random.default_rng(seed).choice(len(train), size=n_calib, replace=False).tolist()


def build_calibration(
    train: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    n_calib: int,
    seed: int,
    max_length: int,
    indices: Sequence[int] | None = None,
) -> Calibration:
    """Sample, tokenize and pad the calibration set (right padding: pad id, mask 0, labels -100).

    Args:
        indices: rebuild from recorded rows (``meta.indices``) instead of drawing them from ``seed``.
    """
    if indices is None:
        indices = sample_calibration(train, n_calib, seed)
    elif len(indices) != n_calib:
        raise ValueError(f"{len(indices)} indices given for n_calib={n_calib}")
    rows = train.select(indices)
    examples, n_truncated = _encode(tokenizer, rows["prompt"][:], rows["response"][:], max_length=max_length,
                                    ids=rows["id"][:])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(e["input_ids"]) for e in examples)
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    tensors = {k: torch.tensor([e[k] + [fill] * (width - len(e[k])) for e in examples], dtype=torch.long)
               for k, fill in fills.items()}
    meta = CalibrationMeta(
        task=task, n_calib=n_calib, seed=seed, indices=list(indices), ids=rows["id"][:],
        train_fingerprint=_records_fingerprint(train), tokenizer=str(tokenizer.name_or_path),
        max_length=max_length, n_truncated=n_truncated, data_fingerprint=_tensors_fingerprint(tensors),
    )
    return Calibration(**tensors, meta=meta)


def save_calibration(path: str | Path, calib: Calibration) -> Path:
    """Write ``calibration.safetensors`` and ``meta.json`` into the folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: getattr(calib, k).contiguous() for k in _TENSORS}, path / "calibration.safetensors",
              metadata={"data_fingerprint": calib.meta.data_fingerprint})
    (path / "meta.json").write_text(calib.meta.model_dump_json(indent=2))
    return path


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration folder back and check its tensors against the recorded fingerprint.

    Raises:
        ValueError: the tensors do not match ``meta.data_fingerprint`` (the artifact is corrupt).
    """
    path = Path(path)
    meta = CalibrationMeta.model_validate_json((path / "meta.json").read_text())
    tensors = load_file(path / "calibration.safetensors")
    if _tensors_fingerprint(tensors) != meta.data_fingerprint:
        raise ValueError(f"{path}: calibration tensors do not match meta.json's data_fingerprint")
    return Calibration(**{k: tensors[k] for k in _TENSORS}, meta=meta)


def compute_metric(metric: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The task metric over paired predictions and references (``{}`` for ``"none"``)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if metric == "none" or not references:
        return {}
    same = code_exact_match if metric == "code_exact_match" else lambda p, r: p.strip() == r.strip()
    return {metric: sum(map(same, predictions, references)) / len(references)}


def _load_source(spec: TaskSpec) -> dict[str, Dataset]:
    """The source's own splits (aliases like ``dev`` renamed), always including ``train``."""
    if spec.source == "hub":
        try:
            loaded = load_dataset(str(spec.path))
        except Exception as err:  # the hub client raises many types; none is actionable beyond its message
            raise ValueError(f"task {spec.name!r}: could not load hub dataset {spec.path!r}: {err}") from err
        files = None
    else:
        files = _data_files(spec)
        builders = {_BUILDERS.get(Path(f).suffix.lower()) for f in files.values()}
        if None in builders or len(builders) != 1:
            raise ValueError(f"task {spec.name!r}: data files must all be .json, .jsonl or .parquet, got "
                             f"{sorted(files.values())}")
        loaded = load_dataset(builders.pop(), data_files=files)
    splits = {_SPLIT_ALIASES[s]: ds for s, ds in loaded.items() if s in _SPLIT_ALIASES}
    if "train" not in splits:
        raise ValueError(f"task {spec.name!r}: no train split in {files or spec.path} (splits: {list(loaded)})")
    return splits


def _data_files(spec: TaskSpec) -> dict[str, str]:
    if isinstance(spec.path, dict):
        unknown = [s for s in spec.path if s not in _SPLIT_ALIASES]
        if unknown:
            raise ValueError(f"task {spec.name!r}: unknown split name(s) {unknown}; use {list(SPLITS)}")
        files = dict(spec.path)
    elif Path(spec.path).is_dir():
        folder = Path(spec.path)
        files = {s: str(f) for f in sorted(folder.iterdir()) if (s := f.name.split(".")[0]) in _SPLIT_ALIASES
                 and f.suffix.lower() in _BUILDERS}
        if not files:
            raise ValueError(f"task {spec.name!r}: folder {folder} has no train/validation/test .jsonl/.json/.parquet "
                             f"file (it holds {sorted(p.name for p in folder.iterdir())[:10]})")
    else:
        files = {"train": str(spec.path)}
    for f in files.values():
        if not Path(f).is_file():
            raise ValueError(f"task {spec.name!r}: data file {f} does not exist")
    return files


def _template_fields(template: str) -> list[str]:
    """Record fields a ``str.format`` template reads (``{a.b}`` and ``{a[0]}`` read ``a``)."""
    fields = [re.split(r"[.\[]", name)[0] for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if any(not f or f.isdigit() for f in fields):
        raise ValueError(f"template {template!r} must name its fields ({{prompt}}), not use positions ({{}})")
    return list(dict.fromkeys(fields))


def _subset(columns: dict[str, list[str]], n: int) -> dict[str, list[str]]:
    """The ``n`` records first in a salted hash order (independent of the split hash), kept in their order."""
    keep = sorted(sorted(range(len(columns["id"])), key=lambda i: _unit("subset/" + columns["id"][i]))[:n])
    return {k: [v[i] for i in keep] for k, v in columns.items()}


def _unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str], *,
            max_length: int, ids: Sequence[str] | None) -> tuple[list[dict[str, list[int]]], int]:
    """:func:`tokenize_examples`, also returning how many examples were truncated."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end the response with")
    prefix = _special_prefix(tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if prompts and not any(response_ids):
        raise ValueError("every response is empty: the task's response field yields no target tokens")
    out, n_cut, n_dropped, no_target = [], 0, 0, []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        n_prompt = len(prefix) + len(p)
        input_ids = [*prefix, *p, *r, tokenizer.eos_token_id]
        if len(input_ids) > max_length:
            n_cut, n_dropped = n_cut + 1, n_dropped + len(input_ids) - max_length
            input_ids = input_ids[:max_length]
        if n_prompt >= len(input_ids):
            no_target.append(ids[i] if ids is not None else i)
        labels = [IGNORE_INDEX] * min(n_prompt, len(input_ids)) + input_ids[n_prompt:]
        out.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    if n_cut:
        log.warning("truncated %d of %d examples to max_length=%d (%d tokens dropped)", n_cut, len(out),
                    max_length, n_dropped)
    if no_target:
        raise ValueError(f"{len(no_target)} of {len(out)} examples keep no target token at max_length={max_length} "
                         f"(their prompt alone fills it), e.g. {no_target[:5]}; raise max_length or shorten them")
    return out, n_cut


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama, nothing for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _records_fingerprint(ds: Dataset) -> str:
    h = hashlib.sha256()
    for row in zip(ds["id"][:], ds["prompt"][:], ds["response"][:], strict=True):
        h.update(json.dumps(row).encode())
    return h.hexdigest()


def _tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in _TENSORS:
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
