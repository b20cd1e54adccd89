"""One point of the scaling sweep, measured in its own process: each stage's CPU and wall time, its peak RSS
growth, and the FLOPs and bytes the stage must spend at that point's shapes.

A point is a random-weight Llama built from ``LlamaConfig`` (no download) or the real SmolLM2-135M-Instruct;
``scaling.py`` runs this module's ``measure_point`` in a child process with glibc's mmap threshold pinned.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

from _peak_memory import reset_peak, status_kib, trim_heap

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct"
STAGES = ("covariance", "spectrum", "sensitivity", "init", "train_step")
FACTORS = {"width": "d", "seq": "T", "samples": "n"}
BASE = {"d": 256, "T": 128, "n": 8, "layers": 2}
VOCAB = 2048
R_MAX, RANK, ALPHA, TRAIN_BATCH = 32, 8, 16.0, 4


def measure_point(point: dict, repeats: int) -> dict:
    """Build the point's model and samples, run every stage ``repeats`` times; times, peaks and analytics."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tlora import allocate, collect_covariance, compute_spectrum, find_targets, init_adapters, score_sensitivity
    from tlora.covariance import save_covariance

    torch.manual_seed(0)
    if point["model"] == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
    else:
        d = point["d"]
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=_intermediate(d),
                          num_hidden_layers=point["layers"], num_attention_heads=max(1, d // 64),
                          num_key_value_heads=max(1, d // 64), head_dim=min(64, d),
                          max_position_embeddings=max(1024, point["T"]), tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (point["n"], point["T"]), generator=g)
    labels = ids.clone()
    labels[:, : point["T"] // 3] = -100  # the first third is "prompt", as in the calibration data
    mask = torch.ones_like(ids)
    cov_batches = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in range(0, len(ids), 4)]
    sens_batches = [{"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1], "labels": labels[i:i + 1]}
                    for i in range(len(ids))]
    targets = find_targets(model, "all-linear")
    shapes = {n: (t.d_out, t.d_in) for n, t in targets.modules.items()}
    state: dict = {}

    def covariance():
        state["cov"] = collect_covariance(model, cov_batches, targets, progress=False)

    def spectrum():
        state["spec"] = compute_spectrum(model, state["cov"], R_MAX)

    def sensitivity():
        state["scores"] = score_sensitivity(model, sens_batches, targets, progress=False).scores

    def init():
        alloc = allocate(state["scores"], r=RANK, alpha=ALPHA, shapes=shapes)
        state["peft"] = init_adapters(state["fresh"], state["spec"], alloc)

    def train_step():
        peft = state["peft"]
        if "opt" not in state:
            state["opt"] = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
        b = min(TRAIN_BATCH, point["n"])
        peft(input_ids=ids[:b], attention_mask=mask[:b], labels=labels[:b]).loss.backward()
        state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)

    out: dict = {"point": point, "time_s": {}, "times_s": {}, "wall_s": {}, "peak_mb": {}}
    for name, fn in (("covariance", covariance), ("spectrum", spectrum), ("sensitivity", sensitivity),
                     ("init", init), ("train_step", train_step)):
        times, walls, peaks = [], [], []
        for k in range(repeats):
            if name == "init":
                state.pop("peft", None)
                state["fresh"] = copy.deepcopy(model)  # PEFT wraps in place: a fresh copy per repeat, untimed
            if name == "train_step" and k == 0:
                state["peft"].train()
            cpu, wall, peak = _timed_peak(fn)
            times.append(cpu)
            walls.append(wall)
            peaks.append(peak)
        out["time_s"][name] = statistics.median(times)
        out["times_s"][name] = times
        out["wall_s"][name] = statistics.median(walls)
        out["peak_mb"][name] = max(peaks)  # the first (cold) run usually holds the most
    out["solvers"] = {s: sum(v == s for v in state["spec"].solver.values()) for s in ("gram", "exact")}
    out["analytic"] = _analytic(model.config, targets, point)
    if point["model"] == "smollm2":
        with tempfile.TemporaryDirectory() as tmp:
            for label, comp in (("zstd", "auto"), ("raw", None)):
                save_covariance(Path(tmp) / label, state["cov"], compressors=comp)
                out["analytic"][f"cov_store_{label}_mb"] = _du(Path(tmp) / label) / 2**20
    return out


def _intermediate(d: int) -> int:
    """LLaMA's 8/3·d rounded up to a multiple of 64 (SmolLM2: 576 -> 1536)."""
    return int(math.ceil(8 * d / 3 / 64) * 64)


def _timed_peak(fn) -> tuple[float, float, float]:
    """CPU and wall seconds of ``fn()``, and the growth of peak RSS over the RSS just before it (MiB)."""
    trim_heap()
    rss0 = status_kib("VmRSS")
    reset_peak()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    c, t = time.process_time() - c0, time.perf_counter() - t0
    return c, t, (status_kib("VmHWM") - rss0) / 1024


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _analytic(cfg, targets, point: dict) -> dict:
    """FLOPs and bytes the stages must spend at this point, from shapes alone."""
    tokens = point["n"] * point["T"]
    group_d = [targets.modules[g].d_in for g in targets.groups]
    linear = sum(t.d_in * t.d_out for t in targets.modules.values())
    attn = 4 * cfg.num_hidden_layers * point["T"] * cfg.num_attention_heads * cfg.head_dim  # per token, QKᵀ + PV
    head = cfg.hidden_size * cfg.vocab_size
    return {
        "tokens": tokens,
        "linear_params": linear,
        "cov_gemm_flops": sum(2 * tokens * d * d for d in group_d),
        "forward_flops": tokens * (2 * linear + attn),  # logits_to_keep=1: the head costs nothing here
        "spectrum_flops": sum(2 * t.d_out * t.d_in ** 2 + 2 * max(t.d_in, t.d_out) * min(t.d_in, t.d_out) ** 2
                              + 9 * min(t.d_in, t.d_out) ** 3 for t in targets.modules.values()),
        "sensitivity_flops": 3 * tokens * (2 * linear + attn + 2 * head),
        "train_flops": 3 * min(TRAIN_BATCH, point["n"]) * point["T"] * (2 * linear + attn + 2 * head),
        "cov_bytes": sum(8 * d * d for d in group_d),
        "n_modules": len(targets.modules),
        "n_groups": len(group_d),
    }
