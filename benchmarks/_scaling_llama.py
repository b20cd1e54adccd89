"""LLaMA-2 predictions from the scaling sweep: per-stage time on one A100 (the measured CPU laws carried to
LLaMA-2 shapes, and analytic FLOPs over assumed GPU rates) and the per-GPU memory and shards each stage needs.
"""

from __future__ import annotations

import math

from _scaling_point import BASE, TRAIN_BATCH

LLAMA2 = {  # d, intermediate, layers, heads, kv heads, head_dim, vocab (HF configs of meta-llama/Llama-2-*-hf)
    "7B": (4096, 11008, 32, 32, 32, 128, 32000),
    "13B": (5120, 13824, 40, 40, 40, 128, 32000),
    "70B": (8192, 28672, 80, 64, 8, 128, 32000),
}
CALIB = {"n": 256, "T": 2048}  # the paper's 256 samples; 2048 tokens each is the worst case (LLaMA-2 context)
GPU = {  # achieved (not peak) throughput assumed for one A100-80GB, in FLOP/s; each is uncertain to about 2x
    "bf16_gemm": 120e12,  # ~40% of 312 TFLOP/s dense bf16 for batch-1 x 2048-token forward/backward
    "fp32_gemm": 14e12,  # ~70% of 19.5 TFLOP/s fp32 (TF32 off: torch's default for matmul)
    "fp64_gemm": 12e12,  # ~60% of 19.5 TFLOP/s fp64 tensor cores (W0·C and the Gram matrix)
    "fp64_eigh": 1e12,  # cuSOLVER syevd on 4096²-8192²: half of it is memory-bound tridiagonalisation
}


def llama_shapes(name: str) -> dict:
    """Per-layer target modules ``(d_out, d_in)`` and shared-input groups' d_in of a LLaMA-2 model."""
    d, f, layers, heads, kv, hd, vocab = LLAMA2[name]
    modules = {"q": (heads * hd, d), "k": (kv * hd, d), "v": (kv * hd, d), "o": (d, heads * hd),
               "gate": (f, d), "up": (f, d), "down": (d, f)}
    return {"d": d, "f": f, "layers": layers, "vocab": vocab, "heads_dim": heads * hd, "modules": modules,
            "groups": [d, heads * hd, d, f]}  # q/k/v, o, gate/up, down


def analytic_llama(name: str, n: int, seq: int) -> dict:
    """FLOPs and bytes of each stage for ``name`` on n samples of ``seq`` tokens, from shapes alone."""
    s = llama_shapes(name)
    tokens, layers = n * seq, s["layers"]
    linear = layers * sum(o * i for o, i in s["modules"].values())
    attn = 4 * layers * seq * s["heads_dim"]
    mods = [m for m in s["modules"].values()] * layers
    return {
        "forward_flops": tokens * (2 * linear + attn),
        "cov_gemm_flops": layers * sum(2 * tokens * g * g for g in s["groups"]),
        "spectrum_gemm_flops": sum(2 * o * i * i + 2 * max(o, i) * min(o, i) ** 2 for o, i in mods),
        "spectrum_eigh_flops": sum(9 * min(o, i) ** 3 for o, i in mods),
        "sensitivity_flops": 3 * tokens * (2 * linear + attn + 2 * s["d"] * s["vocab"]),
        "cov_bytes": layers * sum(8 * g * g for g in s["groups"]),
        "cov_bytes_per_layer": sum(8 * g * g for g in s["groups"]),
        "weights_bf16": 2 * (linear + 2 * s["d"] * s["vocab"]),
        "n_modules": len(mods), "linear_params": linear,
        # one module at a time: W0 and C and M in fp64, the Gram and eigh's workspace (~2 min²)
        "spectrum_peak_bytes": max(8 * (o * i + i * i + o * i + 3 * min(o, i) ** 2) for o, i in mods),
    }


def predict_llama(fits: dict, results: list[dict], name: str = "7B", n: int = CALIB["n"], seq: int = CALIB["T"]
                  ) -> dict:
    """Two predictions per stage: the measured CPU laws extrapolated, and analytic FLOPs / assumed GPU rates.

    Law route: ``t_cpu = a·d^b`` (width law of the largest points, 2 layers) × layers/2 × (T/128)^b_T ×
    (n/8)^b_n, without the T and n factors where a stage does not read them (spectrum reads neither, a train
    step of ``TRAIN_BATCH`` samples not n); then converted to GPU by the ratio of the assumed GPU rate to the
    CPU rate achieved at the widest measured point. The train step is per step, the other stages in total.
    """
    s, a = llama_shapes(name), analytic_llama(name, n, seq)
    widest = max((r for r in results if r["point"]["factor"] == "width"), key=lambda r: r["point"]["d"])
    wa = widest["analytic"]
    reads_tokens = {"covariance": True, "spectrum": False, "sensitivity": True, "train_step": True}
    reads_samples = {"covariance": True, "spectrum": False, "sensitivity": True, "train_step": False}
    step = 3 * TRAIN_BATCH * seq * (2 * a["linear_params"] + 4 * s["layers"] * seq * s["heads_dim"]
                                    + 2 * s["d"] * s["vocab"])
    work = {  # (analytic FLOPs at the target, FLOPs at the widest measured point, assumed GPU rate)
        "covariance": (a["forward_flops"] + a["cov_gemm_flops"], wa["forward_flops"] + wa["cov_gemm_flops"],
                       (a["forward_flops"] + a["cov_gemm_flops"])
                       / (a["forward_flops"] / GPU["bf16_gemm"] + a["cov_gemm_flops"] / GPU["fp32_gemm"])),
        "spectrum": (a["spectrum_gemm_flops"] + a["spectrum_eigh_flops"], wa["spectrum_flops"],
                     (a["spectrum_gemm_flops"] + a["spectrum_eigh_flops"])
                     / (a["spectrum_gemm_flops"] / GPU["fp64_gemm"] + a["spectrum_eigh_flops"] / GPU["fp64_eigh"])),
        "sensitivity": (a["sensitivity_flops"], wa["sensitivity_flops"], GPU["bf16_gemm"]),
        "train_step": (step, wa["train_flops"], GPU["bf16_gemm"]),
    }
    out = {"model": name, "n": n, "T": seq, "analytic": a, "stages": {}}
    for stage, (flops, flops_cpu_point, gpu_rate) in work.items():
        law = fits["width"][stage]["time_tail"]
        t_cpu = law["a"] * s["d"] ** law["b"] * s["layers"] / BASE["layers"]
        if reads_tokens[stage]:
            t_cpu *= (seq / BASE["T"]) ** fits["seq"][stage]["time_tail"]["b"]
        if reads_samples[stage]:
            t_cpu *= (n / BASE["n"]) ** fits["samples"][stage]["time_tail"]["b"]
        cpu_rate = flops_cpu_point / widest["time_s"][stage]
        out["stages"][stage] = {"cpu_law_s": t_cpu, "cpu_rate": cpu_rate, "gpu_rate": gpu_rate,
                                "gpu_from_law_s": t_cpu * cpu_rate / gpu_rate, "gpu_analytic_s": flops / gpu_rate,
                                "flops": flops}
    return out


def capacity(raw: dict, name: str, gpu_gib: float = 80.0) -> dict:
    """Per-GPU memory and time of each stage for ``name`` (A100-80GB, bf16 weights), and the shards it needs.

    Activation memory per (layer · token · d) comes from the measured SmolLM2 peaks (fp32, halved for bf16);
    the covariance store's Zstd ratio from SmolLM2's store; times from ``predict_llama``'s analytic route.
    """
    s, p = llama_shapes(name), raw["predict"][name]
    a, gib = p["analytic"], 2 ** 30
    anchor = next(r for r in raw["results"] if r["point"]["model"] == "smollm2")
    per_unit = {  # bytes per (layer · token · d): sensitivity runs one sample, a train step TRAIN_BATCH
        "sensitivity": anchor["peak_mb"]["sensitivity"] * 2 ** 20 / (30 * BASE["T"] * 576),
        "train_step": anchor["peak_mb"]["train_step"] * 2 ** 20 / (30 * TRAIN_BATCH * BASE["T"] * 576),
    }
    zstd = anchor["analytic"]["cov_store_zstd_mb"] * 2 ** 20 / anchor["analytic"]["cov_bytes"]
    usable = gpu_gib - 6  # CUDA context, allocator slack and fragmentation
    gpus_for_weights = math.ceil(a["weights_bf16"] / gib / (usable * 0.85))
    worker_gpus = 1 if gpus_for_weights == 1 else 2 ** math.ceil(math.log2(gpus_for_weights + 1))
    room = worker_gpus * usable - a["weights_bf16"] / gib
    layers_per_shard = max(1, min(s["layers"], int(room * 0.8 // (a["cov_bytes_per_layer"] / gib))))
    layer_shards = math.ceil(s["layers"] / layers_per_shard)
    st = p["stages"]
    tokens_act = CALIB["T"] * s["layers"] * s["d"]
    return {
        "weights_bf16_gib": a["weights_bf16"] / gib,
        "cov_raw_gib": a["cov_bytes"] / gib, "cov_zstd_gib": a["cov_bytes"] * zstd / gib, "zstd_ratio": zstd,
        "cov_per_layer_gib": a["cov_bytes_per_layer"] / gib, "worker_gpus": worker_gpus,
        "layers_per_shard": layers_per_shard, "layer_shards": layer_shards,
        "cov_mem_gib": a["weights_bf16"] / gib + layers_per_shard * a["cov_bytes_per_layer"] / gib,
        "cov_gpu_s": st["covariance"]["gpu_analytic_s"]
        + (layer_shards - 1) * a["forward_flops"] / GPU["bf16_gemm"],  # each layer shard reruns the forward
        "spectrum_mem_gib": a["weights_bf16"] / gib + a["spectrum_peak_bytes"] / gib,
        "spectrum_gpu_s": st["spectrum"]["gpu_analytic_s"],
        "sens_act_gib": per_unit["sensitivity"] / 2 * tokens_act / gib,
        "sens_gpu_s": st["sensitivity"]["gpu_analytic_s"],
        "train_act_gib_per_sample": per_unit["train_step"] / 2 * tokens_act / gib,
        "train_step_gpu_s": st["train_step"]["gpu_analytic_s"],
    }
