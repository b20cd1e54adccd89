"""Train an adapter with the transformers ``Trainer`` over its trainable parameters only (DESIGN §1.6).

One loop for every method: TLoRA, its ablations and the baselines differ only in how the adapter was
built (``tlora.adapters.build_adapter``) — in init and in which weights require grad. The Trainer gives
checkpoints, resume, gradient accumulation, schedulers and mixed precision on GPU; its optimizer is
built over parameters with ``requires_grad`` only, so TLoRA's optimizer holds B alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class TrainResult(BaseModel):
    """What a training run did: steps, losses, and what it cost in parameters and optimizer state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int
    train_loss: float
    trainable_params: int
    optimizer_state_bytes: int
    resumed_from: str | None
    wall_s: float
    log_history: list[dict[str, Any]]


def train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[dict[str, Any]],
    *,
    output_dir: str | Path,
    max_steps: int,
    learning_rate: float,
    batch_size: int = 8,
    grad_accum: int = 1,
    scheduler: str = "linear",
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    save_steps: int | None = None,
    logging_steps: int = 10,
    eval_examples: Sequence[dict[str, Any]] | None = None,
    eval_steps: int | None = None,
    resume: bool = True,
    precision: Precision = "auto",
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on tokenized examples; resume from the last checkpoint.

    Args:
        train_examples: dicts with ``input_ids`` and ``labels`` (prompt tokens -100), unpadded.
        output_dir: checkpoints go to ``output_dir/checkpoint-<step>``; a later call with
            ``resume=True`` continues from the newest one and ends with the same adapter as an
            uninterrupted run (same seed; the Trainer restores data order and RNG states).
        precision: ``auto`` is bf16 on a CUDA device that supports it, else fp32.
        callbacks: extra ``TrainerCallback``s, e.g. to report progress.

    Raises:
        ValueError: no trainable parameter, no example, or an example without target tokens.
    """
    _check_examples(train_examples, "train")
    if eval_examples is not None:
        _check_examples(eval_examples, "eval")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("the model has no trainable parameter: build it with tlora.adapters.build_adapter")
    output_dir = Path(output_dir)
    bf16, fp16 = _mixed_precision(precision)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup_ratio,  # transformers 5: a float < 1 is a fraction of max_steps
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        save_strategy="steps",
        save_steps=save_steps or max_steps,
        save_total_limit=2,
        logging_steps=logging_steps,
        eval_strategy="steps" if eval_examples is not None else "no",
        eval_steps=eval_steps or logging_steps,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_as_features(train_examples),
        eval_dataset=_as_features(eval_examples) if eval_examples is not None else None,
        data_collator=collator,
        callbacks=list(callbacks) if callbacks else None,
    )
    checkpoint = get_last_checkpoint(str(output_dir)) if resume and output_dir.is_dir() else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    state_bytes = optimizer_state_bytes(trainer.optimizer)
    log.info("trained %d steps: %d trainable parameters, optimizer state %.1f MB",
             output.global_step, trainable, state_bytes / 2**20)
    return TrainResult(
        steps=output.global_step,
        train_loss=float(output.training_loss),
        trainable_params=trainable,
        optimizer_state_bytes=state_bytes,
        resumed_from=checkpoint,
        wall_s=wall,
        log_history=trainer.state.log_history,
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state (Adam's moments, step counters)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def _as_features(examples: Sequence[dict[str, Any]]) -> list[dict[str, list[int]]]:
    return [{"input_ids": list(map(int, e["input_ids"])), "labels": list(map(int, e["labels"]))} for e in examples]


def _check_examples(examples: Sequence[dict[str, Any]], split: str) -> None:
    if len(examples) == 0:
        raise ValueError(f"the {split} split has no examples")
    for i, e in enumerate(examples):
        if "input_ids" not in e or "labels" not in e:
            raise ValueError(f"{split} example {i} lacks input_ids/labels (has {sorted(e)})")
        if all(int(t) == -100 for t in e["labels"]):
            raise ValueError(f"{split} example {i} has no target tokens (every label is -100)")


def _mixed_precision(precision: Precision) -> tuple[bool, bool]:
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(), False
    return precision == "bf16", precision == "fp16"
