"""Data-parallel training of one init adapter on several GPUs of a host, under torchrun or accelerate launch.

    torchrun --nproc_per_node 4 -m flows.train_ddp job.yaml
    accelerate launch --num_processes 4 -m flows.train_ddp job.yaml

Every rank loads the base model and the init adapter; the HF Trainer (``tlora.train.train``) sees the launcher's
environment, wraps the model in DistributedDataParallel and shards each global batch of ``batch_size × ranks ×
grad_accum`` examples across the ranks, so gradients are averaged every step and all ranks hold the same B. Rank 0
alone writes the trained adapter. Each rank writes ``ranks/<rank>.json`` (what it trained, a digest of its
trainable weights) so the caller can check that every rank ran and that they agree. On CPU the same script runs
over gloo: ``torchrun --nproc_per_node 2 -m flows.train_ddp job.yaml``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from tlora.adapters import load_adapters, read_adapter_info, save_adapters
from tlora.data import TaskSpec, fitting_rows, load_task, tokenize_dataset
from tlora.models import load_model
from tlora.train import Precision, train


class DDPJob(BaseModel):
    """One training job: the base model and init adapter folders (the ``model`` and ``init`` stage artifacts)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    model: Path
    """An HF model folder with its tokenizer."""
    init: Path
    """The untrained PEFT adapter folder (with TLoRA's ``tlora.json`` sidecar when A is frozen)."""
    task: TaskSpec
    output: Path
    """Gets ``adapter/`` (rank 0), ``checkpoints/`` and ``ranks/<rank>.json``."""
    max_steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(8, gt=0)
    """Per rank: the global batch is ``batch_size × ranks × grad_accum``."""
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(256, gt=1)
    scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    precision: Precision = "auto"
    logging_steps: int = Field(10, gt=0)


class RankReport(BaseModel):
    """``ranks/<rank>.json``: what one rank trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int
    world_size: int
    steps: int
    train_loss: float
    trainable_digest: str
    """sha256 of the trainable weights after training, in name order: equal across ranks under DDP."""
    saved_adapter: bool


def run(job: DDPJob) -> RankReport:
    """Train on this rank's share of each batch; rank 0 saves the adapter. Returns this rank's report."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(job.model, device=device)
    adapted = load_adapters(model, job.init, is_trainable=True)
    with tempfile.TemporaryDirectory(prefix=f"tlora-ddp-{rank}-") as cache:  # no two ranks share a data cache
        split = load_task(job.task, cache_dir=cache)["train"]
    split = split.select(fitting_rows(split, tokenizer, job.max_length))
    examples = tokenize_dataset(split, tokenizer, max_length=job.max_length)
    result = train(adapted, tokenizer, examples, output_dir=job.output / "checkpoints", max_steps=job.max_steps,
                   learning_rate=job.learning_rate, batch_size=job.batch_size, grad_accum=job.grad_accum,
                   scheduler=job.scheduler, warmup_ratio=job.warmup_ratio, weight_decay=job.weight_decay,
                   seed=job.seed, logging_steps=job.logging_steps, precision=job.precision, progress=rank == 0)
    if rank == 0:
        save_adapters(adapted, job.output / "adapter", read_adapter_info(job.init))
    report = RankReport(rank=rank, world_size=world, steps=result.steps, train_loss=result.train_loss,
                        trainable_digest=trainable_digest(adapted), saved_adapter=rank == 0)
    (job.output / "ranks").mkdir(parents=True, exist_ok=True)
    (job.output / "ranks" / f"{rank}.json").write_text(report.model_dump_json(indent=2))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody exits (and tears the group down) before rank 0 has saved
        torch.distributed.destroy_process_group()
    return report


def trainable_digest(model: torch.nn.Module) -> str:
    """sha256 over the trainable tensors' names and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: torchrun --nproc_per_node N -m flows.train_ddp JOB.yaml")
    path = Path(args[0])
    if not path.is_file():
        raise SystemExit(f"job file {path} does not exist")
    run(DDPJob.model_validate(yaml.safe_load(path.read_text())))


if __name__ == "__main__":
    main()
