"""Performance of sensitivity scoring and B-only training against named peers (issue 5), SmolLM2-135M.

Two comparisons, each on the same tokens in the same run, median of ``--repeats`` interleaved repeats:

- **sensitivity**: ``tlora.score_sensitivity`` (only target weights require grad; each gradient is reduced
  to its score and freed by a post-accumulate-grad hook) vs the naive peer: a plain ``loss.backward()``
  that materialises every target weight gradient, then scores them all. Calibration samples of the
  stdlib-code task, a batch of one each (the reference). Targets: peak memory ≤ 0.7×, time ≤ 1.1×.
- **training step**: B only (TLoRA: A a frozen buffer) vs PEFT LoRA (A and B trained) at the same
  per-module ranks (TLoRA's allocation from the scores above), one AdamW step on a batch of 8 × 256
  stdlib-code tokens. Targets: optimizer state 0.5×, step time ≤ 1.0×, peak memory below LoRA's by at
  least the lora_A inputs that B-only training need not keep (predicted from shapes; also counted exactly
  with autograd saved-tensor hooks).

Peak memory on CPU: every measurement runs in a child forked after the model is loaded; the child builds
its variant, reads every weight (they are mmapped from safetensors, and a child faults them in lazily),
resets its peak RSS (``/proc/self/clear_refs``), reads its RSS, runs the measured call once and reports the
growth of ``VmHWM`` over that RSS together with the call's wall time. glibc is told to serve every
allocation above 64 KiB with mmap (``mallopt``), so freed tensors leave RSS at once and RSS tracks live
tensor memory. With ``--device cuda`` the measurements run in-process on a fresh copy of the
model with ``torch.cuda.max_memory_allocated``, and absolute throughput is reported too.

    python benchmarks/perf_train.py                 # the full run: ~4 min of CPU on 1 thread (14 min wall
                                                    # on the shared 2-core machine at load average ~9)
    python benchmarks/perf_train.py --quick         # smoke run on a tiny random model (prints only)
    python benchmarks/perf_train.py --report        # rewrite the RESULTS.md section from the raw JSON
    python benchmarks/perf_train.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tlora
from tlora.adapters import init_adapters
from tlora.data import TaskSpec, build_calibration, fitting_rows, load_task, tokenize_examples
from tlora.methods import ABLATIONS, plan_allocation
from tlora.sensitivity import score_sensitivity
from tlora.targets import Targets, find_targets, get_module
from tlora.train import optimizer_state_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peak_memory import Run, measure_cuda, measure_forked, mmap_large_allocations
from _perf_train_report import HEADING, section, summarise
from _results import publish, update_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "results" / "perf_train.json"
ATTENTION_OUTPUT = ("self_attn.o_proj", "attn.c_proj")  # modules whose input SDPA keeps for its own backward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run on a tiny random model; prints only")
    p.add_argument("--samples", type=int, default=2, help="calibration samples scored per sensitivity repeat")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--report", action="store_true", help=f"only rewrite the RESULTS.md section from {RAW.name}")
    args = p.parse_args()
    if args.report:
        raw = json.loads(RAW.read_text())
        torch.set_num_threads(raw["args"]["threads"])  # the machine line names the run's thread count
        return update_section(HEADING, section(argparse.Namespace(**raw["args"]), raw["summary"]))
    if args.repeats < 3 and not args.quick:
        p.error("--repeats must be at least 3 (a median of >= 3 repeats)")
    if args.quick:
        args.batch_size, args.seq_len = 2, 64
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        mmap_large_allocations()
    elif not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")

    model, tokenizer = _tiny_llama() if args.quick else tlora.load_model("demo")
    model.requires_grad_(False)
    task = load_task(TaskSpec(name="stdlib-code"))
    train = task["train"]
    rows = train.select(fitting_rows(train, tokenizer, args.seq_len)[:600])
    calib = build_calibration(rows, tokenizer, task="stdlib-code", n_calib=args.samples, seed=0,
                              max_length=args.seq_len)
    samples = calib.batches(1)  # a batch of one each, trimmed to its own length
    batch = _dense_batch(tokenizer, rows, args.batch_size, args.seq_len)
    targets = find_targets(model, "all-linear")
    measure = measure_forked if args.device == "cpu" else measure_cuda
    load, start = [os.getloadavg()[0]], time.perf_counter()
    if args.device == "cuda":  # CUDA context, cuBLAS handles and kernels load on first use: not a peer's cost
        measure(model, lambda m: _sensitivity(m, samples, targets, "naive", args.device))

    sens: dict[str, list[dict]] = {"naive": [], "streaming": []}
    for _ in range(args.repeats):
        for variant in sens:  # interleaved, so a change in machine load hits both peers alike
            sens[variant].append(measure(model, lambda m, v=variant: _sensitivity(m, samples, targets, v, args.device)))
            print(f"sensitivity {variant}: {_brief(sens[variant][-1])}", flush=True)
    scores = sens["streaming"][0]["scores"]
    naive_scores = sens["naive"][0]["scores"]
    score_rel_err = max(abs(scores[n] - naive_scores[n]) / abs(naive_scores[n]) for n in scores)

    shapes = {n: (t.d_out, t.d_in) for n, t in targets.modules.items()}
    allocation = plan_allocation(ABLATIONS["tlora"], scores, shapes, r=args.r, alpha=args.alpha, max_rank=2 * args.r)
    step: dict[str, list[dict]] = {"lora": [], "b_only": []}
    if args.device == "cuda":
        measure(model, lambda m: _train_step(m, allocation, batch, "lora", args.device))
    for _ in range(args.repeats):
        for variant in step:
            step[variant].append(measure(model, lambda m, v=variant: _train_step(m, allocation, batch, v, args.device)))
            print(f"train step {variant}: {_brief(step[variant][-1])}", flush=True)

    load.append(os.getloadavg()[0])
    predicted = _predicted_saving(targets, allocation, args.batch_size * args.seq_len, dtype_bytes=4)
    predicted["optimizer_state_ratio"] = _predicted_state_ratio(targets, allocation)
    predicted["a_grad_flop_share"] = _a_grad_flop_share(model, targets, allocation)
    report = summarise(args, sens, step, predicted, score_rel_err, n_tokens=sum(s["input_ids"].numel()
                                                                              for s in samples))
    report["load_avg_1min"] = load
    report["run_wall_s"] = time.perf_counter() - start
    raw = {"args": vars(args), "summary": report, "raw": {"sensitivity": _strip(sens), "train_step": _strip(step)}}
    publish(HEADING, section(args, report), quick=args.quick, raw=raw, raw_path=RAW)


# --- the measured variants: each builds its state, then returns the call to measure ----------------------


def _sensitivity(model: nn.Module, samples: list[dict[str, torch.Tensor]], targets: Targets, variant: str,
                 device: str) -> Run:
    samples = [{k: v.to(device) for k, v in s.items()} for s in samples]
    if variant == "streaming":
        return lambda: {"scores": score_sensitivity(model, samples, targets, progress=False).scores}

    weights = {name: get_module(model, name).weight for name in targets}

    def naive() -> dict[str, Any]:
        """The peer: every target gradient alive at once after a plain backward, then scored."""
        sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in weights}
        model.eval()
        for w in weights.values():
            w.requires_grad_(True)
        for sample in samples:
            model(**sample).loss.backward()
            for name, w in weights.items():
                sums[name] += (w.detach() * w.grad).abs().mean(dtype=torch.float64)
            for w in weights.values():
                w.grad = None
        return {"scores": {name: s.item() / len(samples) for name, s in sums.items()}}

    return naive


def _train_step(model: nn.Module, allocation, batch: dict[str, torch.Tensor], variant: str, device: str) -> Run:
    """One AdamW step of PEFT LoRA (A and B trained) or of B only (A a frozen buffer), same ranks."""
    adapted = init_adapters(model, None, allocation, init="lora", freeze_a=variant == "b_only").to(device)
    adapted.train()
    batch = {k: v.to(device) for k, v in batch.items()}
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)  # the Trainer's default optimizer (adamw_torch)
    held = {t.untyped_storage().data_ptr() for t in [*adapted.parameters(), *adapted.buffers()]}

    def run() -> dict[str, Any]:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in held:  # weights are held anyway; count what the forward pass keeps for backward
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = adapted(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"saved_activation_bytes": sum(saved.values()), "optimizer_state_bytes":
                optimizer_state_bytes(optimizer), "trainable_params": sum(p.numel() for p in trainable),
                "loss": loss.item()}

    return run


# --- data and prediction ---------------------------------------------------------------------------------


def _tiny_llama() -> tuple[nn.Module, Any]:
    """A 2-layer random Llama with SmolLM2's tokenizer, for --quick."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tlora.models import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval(), tokenizer


def _dense_batch(tokenizer, rows, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``batch_size`` training examples cut to exactly ``seq_len`` real tokens (no padding)."""
    examples = tokenize_examples(tokenizer, rows["prompt"][:], rows["response"][:], max_length=seq_len)
    full = [e for e in examples if len(e["input_ids"]) == seq_len][:batch_size]
    if len(full) < batch_size:
        raise ValueError(f"only {len(full)} examples reach {seq_len} tokens; lower --seq-len or --batch-size")
    return {k: torch.tensor([e[k] for e in full]) for k in ("input_ids", "attention_mask", "labels")}


def _predicted_saving(targets: Targets, allocation, n_tokens: int, dtype_bytes: int) -> dict[str, Any]:
    """Bytes of the lora_A inputs that LoRA keeps only for A's gradient, from shapes.

    LoRA's lora_A matmul keeps its input x for A's gradient; B-only keeps A·x (for B's gradient, both do)
    and A (for x's gradient), never x. Modules reading one tensor (q/k/v, gate/up) share one x. The input of
    the attention output projection is the attention output, which SDPA keeps for its own backward (the CPU
    flash kernel returns it in the layout the projection reads, so it is the same storage): LoRA's copy of
    that x costs nothing extra, and B-only cannot save it.
    """
    adapted = {n for n, m in allocation.modules.items() if m.rank > 0}
    groups = [g for g, members in targets.groups.items() if adapted & set(members)]
    own = [g for g in groups if not g.endswith(ATTENTION_OUTPUT)]
    per_token, upper = sum(targets[g].d_in for g in own), sum(targets[g].d_in for g in groups)
    return {"groups": len(own), "floats_per_token": per_token, "bytes": per_token * n_tokens * dtype_bytes,
            "all_groups": len(groups), "all_bytes": upper * n_tokens * dtype_bytes}


def _predicted_state_ratio(targets: Targets, allocation) -> float:
    """AdamW state of B only over that of A and B: two fp32 moments per weight, a 4-byte step per tensor.

    Not exactly 0.5: B is ``[d_out, r_i]`` and A ``[r_i, d_in]``, and d_out ≠ d_in for k/v, gate/up, down.
    """
    kept = {n: m.rank for n, m in allocation.modules.items() if m.rank > 0}
    b = sum(r * targets[n].d_out for n, r in kept.items())
    a = sum(r * targets[n].d_in for n, r in kept.items())
    return (8 * b + 4 * len(kept)) / (8 * (a + b) + 8 * len(kept))


def _a_grad_flop_share(model: nn.Module, targets: Targets, allocation) -> float:
    """What B-only skips, as a share of the step's matmul flops: A's weight gradient, 2·r_i·d_in per token.

    The step: forward and input-gradient matmuls of the frozen targets and the output head, 4·d_in·d_out per
    token each, plus LoRA's own (forward A, B; backward B's weight and input gradients, A's input gradient).
    """
    kept = {n: m.rank for n, m in allocation.modules.items() if m.rank > 0}
    head = model.get_output_embeddings().weight
    base = 4 * (sum(t.d_in * t.d_out for t in targets.modules.values()) + head.numel())
    lora = sum(2 * r * (2 * targets[n].d_in + 3 * targets[n].d_out) for n, r in kept.items())
    skipped = sum(2 * r * targets[n].d_in for n, r in kept.items())
    return skipped / (base + lora + skipped)


def _brief(r: dict[str, Any]) -> str:
    return f"peak {r['peak_bytes'] / 2**20:.1f} MiB, {r['time_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU"


def _strip(d: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {v: [{k: x for k, x in r.items() if k != "scores"} for r in runs] for v, runs in d.items()}


if __name__ == "__main__":
    sys.exit(main())
