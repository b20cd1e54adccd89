"""The per-budget stages: allocation, init, train, evaluate, merge (DESIGN §2).

These are what a new budget or method recomputes; everything they read from the task side (model, spectrum,
scores) comes from :mod:`flows.prepare` by reference. Every method (TLoRA, its ablations, the LoRA and PiSSA
baselines) runs through the same five stages: they differ only in the allocation and the adapter's init.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from pydantic import Field
from transformers.trainer_utils import get_last_checkpoint

from flows import plots
from flows.config import PipelineConfig
from flows.lineage import Dataset
from flows.prepare import load_base, model_skeleton, task_identity, task_splits
from flows.progress import ProgressCallback, stage_progress
from flows.stage import UNKEYED, RunContext, StageOutput, StageParams, StageResult, stage_task
from tlora.adapters import AdapterInfo, load_adapters, read_adapter_info, save_adapters
from tlora.allocation import Allocation, Budget
from tlora.data import TaskSpec, fitting_rows, tokenize_dataset
from tlora.evaluate import evaluate as evaluate_model
from tlora.evaluate import merge_adapters
from tlora.methods import Method, build_adapter, plan_allocation
from tlora.sensitivity import Scores
from tlora.spectrum import load_spectrum
from tlora.stdlib_code import code_exact_match
from tlora.targets import TargetSpec, find_targets
from tlora.train import train as train_adapter


class AllocationParams(StageParams):
    model: StageResult
    sensitivity: StageResult | None
    """None for methods that allocate without scores (LoRA, PiSSA, TLoRA with rank and scale off)."""
    targets: TargetSpec
    method: Method
    r: int
    alpha: float
    budget: Budget | None
    min_rank: int
    max_rank: int | None

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, sensitivity: StageResult | None) -> AllocationParams:
        a, method = cfg.allocation, cfg.method
        max_rank = a.max_rank
        if method.needs_spectrum:  # a rank above r_max has no singular vectors to start from
            max_rank = min(max_rank or cfg.spectrum.r_max, cfg.spectrum.r_max)
        if not (method.name == "tlora" and method.rank):  # uniform ranks: budget and bounds play no part
            budget, min_rank, max_rank = None, 0, None
        else:
            budget, min_rank = a.budget, a.min_rank
        return cls(model=model, sensitivity=sensitivity if method.needs_scores else None, targets=cfg.targets,
                   method=method, r=a.r, alpha=a.alpha, budget=budget, min_rank=min_rank, max_rank=max_rank)


def compute_allocation(p: AllocationParams, ctx: RunContext, out: Path) -> StageOutput:
    """Per-module rank, alpha and scaling under the budget, as ``allocation.json``."""
    targets = find_targets(model_skeleton(ctx, p.model), p.targets, example_inputs={})  # shapes only: no weights
    shapes = {name: (t.d_out, t.d_in) for name, t in targets.modules.items()}
    scores = None
    if p.sensitivity is not None:
        scores = Scores.model_validate_json((ctx.open(p.sensitivity) / "scores.json").read_text()).scores
    allocation = plan_allocation(p.method, scores, shapes, r=p.r, alpha=p.alpha, budget=p.budget,
                                 min_rank=p.min_rank, max_rank=p.max_rank)
    (out / "allocation.json").write_text(allocation.model_dump_json(indent=2))
    ranks = {name: m.rank for name, m in allocation.modules.items()}
    plots.save(plots.allocation_figure(ranks, scores, title=p.method.label), out, "allocation")
    trainable = "B" if p.method.needs_spectrum else "AB"
    return StageOutput(metrics={"total_rank": allocation.budget_rank, "n_kept": len(allocation.kept),
                                "trainable_params": allocation.trainable_params(shapes, trainable)})


class InitParams(StageParams):
    model: StageResult
    allocation: StageResult
    spectrum: StageResult | None
    method: Method
    dropout: float
    seed: int
    """Seeds PEFT's random A for the LoRA baseline and the ablations without spectral init."""

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, allocation: StageResult,
           spectrum: StageResult | None) -> InitParams:
        return cls(model=model, allocation=allocation, spectrum=spectrum if cfg.method.needs_spectrum else None,
                   method=cfg.method, dropout=cfg.train.dropout, seed=cfg.train.seed)


def compute_init(p: InitParams, ctx: RunContext, out: Path) -> StageOutput:
    """The untrained PEFT adapter folder (A from the spectrum and frozen for TLoRA, B = 0)."""
    # TLoRA's A comes from the spectrum and B is 0: the base weights are never read, so a skeleton does
    model = model_skeleton(ctx, p.model) if p.method.needs_spectrum else load_base(ctx, p.model)[0]
    allocation = Allocation.model_validate_json((ctx.open(p.allocation) / "allocation.json").read_text())
    spectrum = load_spectrum(ctx.open(p.spectrum) / "spectrum.zarr") if p.spectrum is not None else None
    torch.manual_seed(p.seed)
    adapted = build_adapter(model, p.method, allocation, spectrum, dropout=p.dropout)
    init = "spectrum" if p.method.needs_spectrum else ("pissa" if p.method.name == "pissa" else "lora")
    save_adapters(adapted, out, AdapterInfo(freeze_a=p.method.needs_spectrum, init=init, allocation=allocation))
    trainable = sum(t.numel() for t in adapted.parameters() if t.requires_grad)
    return StageOutput(metrics={"trainable_params": trainable})


class TrainParams(StageParams):
    model: StageResult
    init: StageResult
    task_id: dict
    max_steps: int
    learning_rate: float
    batch_size: int
    grad_accum: int
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_length: int
    seed: int
    precision: str
    task: TaskSpec = Field(json_schema_extra=UNKEYED)
    logging_steps: int = Field(10, json_schema_extra=UNKEYED)
    save_steps: int | None = Field(None, json_schema_extra=UNKEYED)
    register_as: str | None = Field(None, json_schema_extra=UNKEYED)

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, init: StageResult) -> TrainParams:
        t = cfg.train
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.tracking.model_name or f"tlora-{cfg.task.name}-{cfg.method.label}")
        return cls(model=model, init=init, task_id=task_identity(cfg.task), task=cfg.task, max_steps=t.max_steps,
                   learning_rate=t.learning_rate, batch_size=t.batch_size, grad_accum=t.grad_accum,
                   scheduler=t.scheduler, warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay,
                   max_length=t.max_length, seed=t.seed, precision=t.precision, logging_steps=t.logging_steps,
                   save_steps=t.save_steps,
                   register_as=name.strip("-") if cfg.tracking.register_model else None)


def compute_train(p: TrainParams, ctx: RunContext, out: Path) -> StageOutput:
    """The trained adapter folder, its last checkpoints and ``trainer_state.json``.

    Checkpoints go to ``<root>/work/train/<key>`` while training, so a killed run resumes from the last one.
    """
    model, tokenizer, _ = load_base(ctx, p.model)
    init_dir = ctx.open(p.init)
    adapted = load_adapters(model, init_dir, is_trainable=True)
    train_split = task_splits(p.task, ctx.root)["train"]
    train_split = train_split.select(fitting_rows(train_split, tokenizer, p.max_length))
    examples = tokenize_dataset(train_split, tokenizer, max_length=p.max_length)
    work = Path(ctx.root) / "work" / "train" / p.key("train")
    with stage_progress("train", "training", terminal=ctx.progress) as on_progress:
        result = train_adapter(adapted, tokenizer, examples, output_dir=work, max_steps=p.max_steps,
                               learning_rate=p.learning_rate, batch_size=p.batch_size, grad_accum=p.grad_accum,
                               scheduler=p.scheduler, warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay,
                               seed=p.seed, logging_steps=p.logging_steps, save_steps=p.save_steps,
                               precision=p.precision, progress=False, callbacks=[ProgressCallback(on_progress)])
    save_adapters(adapted, out, read_adapter_info(init_dir))
    last = get_last_checkpoint(str(work))
    shutil.copyfile(Path(last) / "trainer_state.json", out / "trainer_state.json")
    plots.save(plots.loss_figure(result.log_history), out, "loss")  # what trainer_state.json holds
    shutil.move(work, out / "checkpoints")
    (out / "train_result.json").write_text(result.model_dump_json(indent=2))
    dataset = Dataset(name=f"{p.task.name}-train", context="train", source=json.dumps(p.task_id, sort_keys=True),
                      digest=_ids_digest(train_split["id"][:]), rows={"id": train_split["id"][:]})
    losses = [(int(h["step"]), float(h["loss"])) for h in result.log_history if "loss" in h]
    return StageOutput(metrics={"train_loss": result.train_loss, "steps": result.steps,
                                "trainable_params": result.trainable_params,
                                "optimizer_state_bytes": result.optimizer_state_bytes, "train_wall_s": result.wall_s},
                       series={"loss": losses}, datasets=[dataset], register_as=p.register_as)


class EvaluateParams(StageParams):
    model: StageResult
    adapter: StageResult
    task_id: dict
    split: str
    max_examples: int | None
    max_generate: int
    max_new_tokens: int
    stop_strings: list[str]
    max_length: int
    task: TaskSpec = Field(json_schema_extra=UNKEYED)
    batch_size: int = Field(8, json_schema_extra=UNKEYED)

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, adapter: StageResult) -> EvaluateParams:
        e = cfg.evaluate
        return cls(model=model, adapter=adapter, task_id=task_identity(cfg.task), task=cfg.task, split=e.split,
                   max_examples=e.max_examples, max_generate=e.max_generate, max_new_tokens=e.max_new_tokens,
                   stop_strings=e.stop_strings, max_length=e.max_length, batch_size=e.batch_size)


def compute_evaluate(p: EvaluateParams, ctx: RunContext, out: Path) -> StageOutput:
    """Held-out loss on a fixed subset of the split and the task metric on its first prompts, as ``metrics.json``."""
    model, tokenizer, _ = load_base(ctx, p.model)
    adapted = load_adapters(model, ctx.open(p.adapter))
    split = task_splits(p.task, ctx.root)[p.split]
    rows = fitting_rows(split, tokenizer, p.max_length)
    subset = split.select(rows[: p.max_examples] if p.max_examples else rows)
    examples = tokenize_dataset(subset, tokenizer, max_length=p.max_length)
    generate = subset.select(range(min(p.max_generate, len(subset))))
    match = {"code_exact_match": code_exact_match, "exact_match": lambda a, b: a.strip() == b.strip()}.get(
        p.task.metric)
    ask = match is not None and len(generate) > 0
    result = evaluate_model(adapted, tokenizer, list(examples), prompts=generate["prompt"][:] if ask else None,
                            references=generate["response"][:] if ask else None, match=match,
                            max_new_tokens=p.max_new_tokens, stop_strings=p.stop_strings, batch_size=p.batch_size,
                            progress=ctx.progress)
    (out / "metrics.json").write_text(result.model_dump_json(indent=2))
    dataset = Dataset(name=f"{p.task.name}-{p.split}", context="evaluation",
                      source=json.dumps(p.task_id, sort_keys=True), digest=_ids_digest(subset["id"][:]),
                      rows={"id": subset["id"][:]})
    return StageOutput(metrics={"loss": result.loss, "perplexity": result.perplexity,
                                "token_accuracy": result.token_accuracy, "exact_match": result.exact_match},
                       datasets=[dataset])


class MergeParams(StageParams):
    model: StageResult
    adapter: StageResult

    @classmethod
    def of(cls, cfg: PipelineConfig, model: StageResult, adapter: StageResult) -> MergeParams:
        return cls(model=model, adapter=adapter)


def compute_merge(p: MergeParams, ctx: RunContext, out: Path) -> StageOutput:
    """The adapter folded into W0: a plain HF safetensors model folder with its tokenizer."""
    model, tokenizer, _ = load_base(ctx, p.model)
    adapted = load_adapters(model, ctx.open(p.adapter))
    merged = merge_adapters(adapted, out / "merged", tokenizer=tokenizer)
    for item in merged.iterdir():
        item.rename(out / item.name)
    merged.rmdir()
    return StageOutput()


allocation = stage_task("allocation", compute_allocation)
init = stage_task("init", compute_init)
train = stage_task("train", compute_train)
evaluate = stage_task("evaluate", compute_evaluate)
merge = stage_task("merge", compute_merge)


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()
