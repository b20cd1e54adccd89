"""The task-side stages, shared by every budget and method: model, calibration, covariance, spectrum, sensitivity.

Each stage is a params model (what it reads, DESIGN §2) and a compute function that writes the stage's
artifact files through the library's own save functions. Covariance and sensitivity also have a *mix* form:
a calibration mixture of several datasets combines each dataset's cached partial sums (sums and counts add,
scaled by per-sample weights) instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flows import plots
from flows.config import CalibrationSource, PipelineConfig
from flows.lineage import Dataset
from flows.progress import stage_progress
from flows.stage import UNKEYED, RunContext, StageOutput, StageParams, StageResult, stage_task
from tlora.covariance import Covariance, load_covariance, merge_covariances, save_covariance
from tlora.data import (
    Calibration,
    TaskSpec,
    build_calibration,
    fitting_rows,
    load_calibration,
    load_task,
    sample_calibration,
    save_calibration,
)
from tlora.models import convert_gguf, demo_gguf_path, ensure_demo_model, load_model
from tlora.preparation import COVARIANCE_STORE, SPECTRUM_STORE, default_dtype, stream_covariance, stream_spectrum
from tlora.sensitivity import Scores, score_sensitivity, stream_sensitivity
from tlora.spectrum import load_spectrum, save_spectrum
from tlora.stream import LayerStream
from tlora.targets import TargetSpec, find_targets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelInfo(BaseModel):
    """``fingerprint.json`` of the model stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str
    source: str
    identity: str
    dtype: str
    n_parameters: int
    trust_remote_code: bool = False


class ModelParams(StageParams):
    identity: str
    """sha256 of a local source's files (so a moved copy keeps its key), or the hub id."""
    dtype: Literal["float32", "bfloat16", "float16"]
    """Resolved (``auto``: bfloat16 on CUDA, float32 elsewhere), so a CPU and a GPU model never share a key."""
    trust_remote_code: bool
    source: str = Field(json_schema_extra=UNKEYED)

    @classmethod
    def of(cls, cfg: PipelineConfig) -> ModelParams:
        m = cfg.model
        return cls(identity=source_identity(m.source), dtype=resolve_dtype(m.dtype, cfg.device),
                   trust_remote_code=m.trust_remote_code, source=m.source)


def resolve_dtype(dtype: str, device: str) -> str:
    """The model dtype ``auto`` stands for on ``device`` (``auto`` devices resolved first); others as given."""
    if dtype != "auto":
        return dtype
    return str(default_dtype(resolve_device(device))).removeprefix("torch.")


def resolve_device(device: str) -> str:
    """``auto`` as ``cuda`` where this machine has a GPU, else ``cpu``; anything else as given."""
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def compute_model(p: ModelParams, ctx: RunContext, out: Path) -> StageOutput:
    """The model as an HF safetensors folder (linked from a local source, else saved) and its fingerprint, hashed
    one tensor at a time (the model is never loaded whole here)."""
    folder = _local_folder(p.source)
    if folder is not None:
        shutil.copytree(folder, out, copy_function=_link_or_copy, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".*"))
    else:
        model, tokenizer = load_model(p.source, trust_remote_code=p.trust_remote_code)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
    stream = LayerStream(out, dtype=DTYPES[p.dtype])
    info = ModelInfo(fingerprint=stream.fingerprint(), source=p.source, identity=p.identity, dtype=p.dtype,
                     n_parameters=sum(t.numel() for t in stream.model.parameters()),
                     trust_remote_code=p.trust_remote_code)
    (out / "fingerprint.json").write_text(info.model_dump_json(indent=2))
    return StageOutput(metrics={"n_parameters": info.n_parameters})


class CalibrationParams(StageParams):
    model: StageResult
    task_id: dict
    """The task spec with its data files replaced by their content hashes."""
    n_calib: int
    seed: int
    max_length: int
    task: TaskSpec = Field(json_schema_extra=UNKEYED)

    @classmethod
    def of(cls, cfg: PipelineConfig, source: CalibrationSource, model: StageResult) -> CalibrationParams:
        c = cfg.calibration
        return cls(model=model, task_id=task_identity(source.task), n_calib=source.n_calib or c.n_calib, seed=c.seed,
                   max_length=c.max_length, task=source.task)


def compute_calibration(p: CalibrationParams, ctx: RunContext, out: Path) -> StageOutput:
    """``n_calib`` seeded train rows whose prompt leaves room for a target token, tokenized and padded."""
    tokenizer = load_tokenizer(ctx.open(p.model))
    train = task_splits(p.task, ctx.root)["train"]
    usable = fitting_rows(train, tokenizer, p.max_length)
    indices = [usable[i] for i in sample_calibration(train.select(usable), p.n_calib, p.seed)]
    calib = build_calibration(train, tokenizer, task=p.task.name, n_calib=p.n_calib, seed=p.seed,
                              max_length=p.max_length, indices=indices)
    calib = dataclasses.replace(calib, meta=calib.meta.model_copy(update={"inputs": {"model": p.model.key}}))
    save_calibration(out, calib)
    meta = calib.meta
    dataset = Dataset(name=f"{p.task.name}-calibration", context="calibration", digest=meta.data_fingerprint,
                      source=ctx.store().uri("calibration", p.key("calibration")),
                      rows={"id": meta.ids, "row": meta.indices})
    return StageOutput(metrics={"n_calib": meta.n_calib, "n_tokens": int(calib.attention_mask.sum()),
                                "n_truncated": meta.n_truncated}, datasets=[dataset])


class CalibrationReader(StageParams):
    """A stage that reads calibration samples (covariance, sensitivity): :meth:`samples` picks the ones it reads."""

    def samples(self, calib: Calibration) -> Calibration:
        """The calibration samples this stage reads: all of them (a shard reads a slice)."""
        return calib


class CovarianceParams(CalibrationReader):
    model: StageResult
    calibration: StageResult
    targets: TargetSpec
    precision: Literal["float32", "float64"]
    batch_size: int = Field(json_schema_extra=UNKEYED)
    r_max: int | None = Field(None, json_schema_extra=UNKEYED)
    """The spectrum stage's r_max and solver: each layer's spectra are computed as its sums complete and kept for
    that stage (:func:`spectrum_stash`); they are not part of this stage's key or artifact."""
    solver: str = Field("auto", json_schema_extra=UNKEYED)

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, calibration: StageResult) -> CovarianceParams:
        c = cfg.covariance
        return cls(model=model, calibration=calibration, targets=cfg.targets, precision=c.precision,
                   batch_size=c.batch_size, r_max=cfg.spectrum.r_max, solver=cfg.spectrum.solver)


def compute_covariance(p: CovarianceParams, ctx: RunContext, out: Path) -> StageOutput:
    """Per-sample-centred float64 input sums of every shared-input group, as ``covariance.zarr``, one decoder layer
    at a time; built in a work folder kept across runs, so a killed run resumes at its first unfinished layer."""
    stream, info = open_stream(ctx, p.model)
    calib = p.samples(load_calibration(ctx.open(p.calibration)))
    key = p.key("covariance")
    work = work_dir(ctx, "covariance", key)
    r_max = p.r_max if type(p).samples is CalibrationReader.samples else None  # a shard's would be of its slice
    with stage_progress("covariance", "covariance", terminal=ctx.progress) as on_progress:
        cov, _ = stream_covariance(stream, calib.batches(p.batch_size), p.targets, r_max=r_max, solver=p.solver,
                                   precision=p.precision, out=work, compressors=ctx.compressors,
                                   model_fingerprint=info.fingerprint, data_fingerprint=calib.meta.data_fingerprint,
                                   progress=False, on_progress=on_progress)
    os.rename(work / COVARIANCE_STORE, out / COVARIANCE_STORE)
    if r_max is not None:
        os.rename(work / SPECTRUM_STORE, work / spectrum_stash(r_max, p.solver))
    return StageOutput(metrics={"n_tokens": cov.n_tokens, "n_samples": cov.n_samples, "n_groups": len(cov.sums),
                                "n_modules": len(cov.modules)})


def spectrum_stash(r_max: int, solver: str) -> str:
    """Where the spectrum the covariance stage computed on the way waits for the spectrum stage (in its work folder)."""
    return f"spectrum-r{r_max}-{solver}.zarr"


class MixParams(StageParams):
    """A calibration mixture: the parts' artifacts and each part's per-sample weight."""

    parts: list[StageResult]
    weights: list[float]


def compute_covariance_mix(p: MixParams, ctx: RunContext, out: Path) -> StageOutput:
    """The weighted covariance of the union of the parts' samples, from their cached sums."""
    cov = mix_covariances([load_covariance(ctx.open(r) / "covariance.zarr") for r in p.parts], p.weights)
    save_covariance(out / "covariance.zarr", cov, compressors=ctx.compressors)
    return StageOutput(metrics={"n_tokens": cov.n_tokens, "n_samples": cov.n_samples, "n_parts": len(p.parts)})


def mix_covariances(parts: list[Covariance], weights: list[float]) -> Covariance:
    """One pass over the union of the parts' samples, each sample of part d counted ``weights[d]`` times.

    ``C = Σ_d w_d S_d / Σ_d w_d n_d``. The sums are stored scaled so that ``C = S / n_samples`` with
    ``n_samples`` the real count; with equal weights they simply add.
    """
    if len(parts) != len(weights):
        raise ValueError(f"{len(parts)} covariances for {len(weights)} weights")
    fingerprint = hashlib.sha256(json.dumps([[c.data_fingerprint, w] for c, w in zip(parts, weights, strict=True)])
                                 .encode()).hexdigest()
    if len(set(weights)) > 1:
        n = sum(c.n_samples for c in parts)
        total = sum(w * c.n_samples for c, w in zip(parts, weights, strict=True))
        parts = [dataclasses.replace(c, sums={g: s * (w * n / total) for g, s in c.sums.items()})
                 for c, w in zip(parts, weights, strict=True)]
    return merge_covariances(parts, data_fingerprint=fingerprint)


class SpectrumParams(StageParams):
    model: StageResult
    covariance: StageResult
    r_max: int
    solver: Literal["auto", "exact", "gram", "krylov"]

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, covariance: StageResult) -> SpectrumParams:
        return cls(model=model, covariance=covariance, r_max=cfg.spectrum.r_max, solver=cfg.spectrum.solver)


def compute_spectrum_stage(p: SpectrumParams, ctx: RunContext, out: Path) -> StageOutput:
    """Top ``r_max`` right singular vectors of ``W0·C`` per module, as ``spectrum.zarr``: the one the covariance
    stage computed on the way where it is there, else from the stored covariance, weights streamed, no forward."""
    stash = work_dir(ctx, "covariance", p.covariance.key, create=False) / spectrum_stash(p.r_max, p.solver)
    try:
        spectrum = load_spectrum(stash)
    except ValueError:  # no stash (a new r_max, or the covariance was reused): compute it
        stream, _ = open_stream(ctx, p.model)
        cov = load_covariance(ctx.open(p.covariance) / COVARIANCE_STORE, lazy=True)
        spectrum = stream_spectrum(stream, cov, p.r_max, solver=p.solver, progress=False)
        save_spectrum(out / SPECTRUM_STORE, spectrum, compressors=ctx.compressors)
    else:
        os.rename(stash, out / SPECTRUM_STORE)
        shutil.rmtree(stash.parent, ignore_errors=True)
    plots.save(plots.spectrum_figure({m: v.tolist() for m, v in spectrum.values.items()}), out, "spectrum")
    n_exact = sum(s == "exact" for s in spectrum.solver.values())
    return StageOutput(metrics={"n_modules": len(spectrum.vectors), "n_exact": n_exact,
                                "n_gram": len(spectrum.vectors) - n_exact})


class SensitivityParams(CalibrationReader):
    model: StageResult
    calibration: StageResult
    targets: TargetSpec
    mode: Literal["per_sample", "batched"]
    batch_size: int | None
    """Only ``batched`` scores depend on it; None for ``per_sample``."""

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, calibration: StageResult) -> SensitivityParams:
        s = cfg.sensitivity
        return cls(model=model, calibration=calibration, targets=cfg.targets, mode=s.mode,
                   batch_size=s.batch_size if s.mode == "batched" else None)


def compute_sensitivity(p: SensitivityParams, ctx: RunContext, out: Path) -> StageOutput:
    """``mean |W ⊙ ∇W L|`` per target module over the calibration samples, as ``scores.json`` (per sample: one
    decoder layer at a time; batched: the model loaded whole)."""
    calib = p.samples(load_calibration(ctx.open(p.calibration)))
    with stage_progress("sensitivity", "sensitivity", terminal=ctx.progress) as on_progress:
        if p.mode == "per_sample":
            stream, _ = open_stream(ctx, p.model)
            scores = stream_sensitivity(stream, calib.batches(1), p.targets, progress=False, on_progress=on_progress)
        else:
            model, _, _ = load_base(ctx, p.model)
            scores = score_sensitivity(model, calib.batches(p.batch_size or 1), find_targets(model, p.targets),
                                       mode=p.mode, progress=False, on_progress=on_progress)
    (out / "scores.json").write_text(scores.model_dump_json(indent=2))
    return StageOutput(metrics={"n_samples": scores.n_samples, "n_modules": len(scores.scores)})


def compute_sensitivity_mix(p: MixParams, ctx: RunContext, out: Path) -> StageOutput:
    """The weighted mean score over the union of the parts' samples, from their cached means and counts."""
    scores = mix_scores([Scores.model_validate_json((ctx.open(r) / "scores.json").read_text()) for r in p.parts],
                        p.weights)
    (out / "scores.json").write_text(scores.model_dump_json(indent=2))
    return StageOutput(metrics={"n_samples": scores.n_samples, "n_parts": len(p.parts)})


def mix_scores(parts: list[Scores], weights: list[float]) -> Scores:
    """``s_i = Σ_d w_d n_d s_di / Σ_d w_d n_d``: each part's mean times its count is its partial sum."""
    names, modes = list(parts[0].scores), {s.mode for s in parts}
    if any(list(s.scores) != names for s in parts) or len(modes) > 1:
        raise ValueError("the mixture's sensitivity scores cover other modules or were scored in another mode")
    total = sum(w * s.n_samples for s, w in zip(parts, weights, strict=True))
    mixed = {n: sum(w * s.n_samples * s.scores[n] for s, w in zip(parts, weights, strict=True)) / total
             for n in names}
    return Scores(scores=mixed, n_samples=sum(s.n_samples for s in parts), mode=modes.pop())


model = stage_task("model", compute_model)
calibration = stage_task("calibration", compute_calibration)
covariance = stage_task("covariance", compute_covariance)
covariance_mix = stage_task("covariance", compute_covariance_mix, name="covariance-mix")
spectrum = stage_task("spectrum", compute_spectrum_stage)
sensitivity = stage_task("sensitivity", compute_sensitivity)
sensitivity_mix = stage_task("sensitivity", compute_sensitivity_mix, name="sensitivity-mix")


# --- helpers shared with the per-budget stages ------------------------------------------------------------------

def load_base(ctx: RunContext, model_ref: StageResult) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """The model stage's model (in its dtype, on the run's device), tokenizer and recorded fingerprint."""
    folder = ctx.open(model_ref)
    info = ModelInfo.model_validate_json((folder / "fingerprint.json").read_text())
    model, tokenizer = load_model(folder, dtype=DTYPES[info.dtype], device=ctx.device,
                                  trust_remote_code=info.trust_remote_code)
    return model, tokenizer, info


def open_stream(ctx: RunContext, model_ref: StageResult) -> tuple[LayerStream, ModelInfo]:
    """The model stage's folder as a :class:`LayerStream` (skeleton on meta, layers loaded one at a time) in its
    dtype, on the run's device, and its recorded fingerprint."""
    folder = ctx.open(model_ref)
    info = ModelInfo.model_validate_json((folder / "fingerprint.json").read_text())
    return LayerStream(folder, device=ctx.device, dtype=DTYPES[info.dtype]), info


def model_skeleton(ctx: RunContext, model_ref: StageResult) -> PreTrainedModel:
    """The model stage's model with its weights on the meta device: its modules and shapes, nothing loaded."""
    return open_stream(ctx, model_ref)[0].model


def work_dir(ctx: RunContext, stage: str, key: str, *, create: bool = True) -> Path:
    """A folder under ``<root>/work`` that outlives a killed run of the stage with this key (its partial results)."""
    folder = Path(ctx.root) / "work" / stage / key
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def task_splits(spec: TaskSpec, root: str):
    """The task's splits (stdlib-code mining is cached under ``<root>/cache/tasks``), loaded once per process."""
    return _task_splits(spec.model_dump_json(), str(Path(root).resolve() / "cache" / "tasks"))


def source_identity(source: str) -> str:
    """``sha256:<hex>`` of a local model source's files (the GGUF file for ``demo``), else ``id:<source>``."""
    path = demo_gguf_path() if source == "demo" else Path(source)
    return f"sha256:{_content_hash(path)}" if path.exists() else f"id:{source}"


def task_identity(spec: TaskSpec) -> dict:
    """The task spec as a key: data files by content hash, stdlib-code by the Python version mined."""
    data = spec.model_dump(mode="json")
    if spec.source == "json":
        paths = spec.path.values() if isinstance(spec.path, dict) else [spec.path]
        data["path"] = {Path(p).name: _content_hash(Path(p)) for p in paths}
    elif spec.source == "stdlib-code":
        data["python"] = platform.python_version()
    return data


@functools.lru_cache(maxsize=4)
def _task_splits(spec_json: str, cache_dir: str):
    return load_task(TaskSpec.model_validate_json(spec_json), cache_dir=cache_dir)


def _local_folder(source: str) -> Path | None:
    """The local HF folder holding ``source``: the converted demo or GGUF folder, or the folder itself."""
    if source == "demo":
        return ensure_demo_model()
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        folder = path.with_name(path.name + ".hf")
        return folder if (folder / "config.json").is_file() else convert_gguf(path, folder)
    return path if (path / "config.json").is_file() else None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a model file into the artifact (no copy of the weights), copying across filesystems."""
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def _content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative name, size, bytes; hidden entries skipped)."""
    h = hashlib.sha256()
    if path.is_file():
        files = {"": path}
    else:
        files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}
    for rel, f in files.items():
        h.update(f"{rel}:{f.stat().st_size};".encode())
        with f.open("rb") as stream:
            while chunk := stream.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
