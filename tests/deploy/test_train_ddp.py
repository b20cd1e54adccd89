"""Data-parallel training on CPU: ``torchrun --nproc_per_node 2 -m flows.train_ddp`` over gloo, against one process.

Two ranks with a per-rank batch of 2 see the same global batches of 4 as one process with a batch of 4 (the Trainer
shards each global batch across ranks), so DDP's averaged gradients must give the same trained B, on both ranks.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flows.train_ddp import DDPJob, run
from tests.conftest import build_tiny, build_tiny_tokenizer
from tests.flows.conftest import write_task
from tlora.adapters import AdapterInfo, init_adapters, save_adapters
from tlora.methods import Method, plan_allocation
from tlora.targets import find_targets

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """A tiny Llama folder, a TLoRA-style init adapter (A frozen, B = 0) and a JSONL task."""
    root = tmp_path_factory.mktemp("ddp")
    model, tokenizer = build_tiny("llama", seed=0), build_tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    targets = find_targets(model, "all-linear")
    shapes = {n: (t.d_out, t.d_in) for n, t in targets.modules.items()}
    allocation = plan_allocation(Method(name="lora"), None, shapes, r=2, alpha=4)
    torch.manual_seed(0)
    adapted = init_adapters(model, None, allocation, init="lora", freeze_a=True)
    save_adapters(adapted, root / "init", AdapterInfo(freeze_a=True, init="lora", allocation=allocation))
    write_task(root / "task", seed=0, sizes=(24, 4, 4))
    return {"model": str(root / "model"), "init": str(root / "init"),
            "task": {"name": "tiny", "source": "json", "path": str(root / "task"), "id_field": "id"},
            "max_steps": STEPS, "learning_rate": 0.05, "max_length": 32, "logging_steps": 1, "precision": "fp32"}


def launch(job: dict, out: Path, *, ranks: int, batch_size: int) -> None:
    """``torchrun --nproc_per_node <ranks> -m flows.train_ddp``; the whole process group dies on timeout."""
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({**job, "output": str(out), "batch_size": batch_size}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "flows.train_ddp", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks, by the group we started
            proc.wait()
    assert proc.returncode == 0, output[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_average_gradients_like_one_process_over_the_global_batch(job, tmp_path):
    launch(job, tmp_path / "ddp", ranks=2, batch_size=2)
    torch.set_num_threads(1)
    run(DDPJob.model_validate({**job, "output": tmp_path / "single", "batch_size": 4}))  # the reference, in-process
    reports = [json.loads((tmp_path / "ddp" / "ranks" / f"{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["steps"]) for r in reports] == [(0, 2, STEPS), (1, 2, STEPS)]
    assert reports[0]["trainable_digest"] == reports[1]["trainable_digest"]  # both ranks hold the same B
    assert [r["saved_adapter"] for r in reports] == [True, False]  # saved once, by rank 0
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["adapter", "checkpoints", "ranks"]
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    init = load_file(Path(job["init"]) / "adapter_model.safetensors")
    assert ddp.keys() == single.keys() == init.keys()
    for name in ddp:
        if "lora_A" in name:  # frozen
            torch.testing.assert_close(ddp[name], init[name], rtol=0, atol=0)
        else:
            assert ddp[name].abs().max() > 1e-3, name  # B moved away from 0
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5)
