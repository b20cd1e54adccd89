"""The LLaMA-2-7B-shaped preparation on one CUDA GPU, bf16 weights: time and ``torch.cuda.max_memory_allocated`` per
stage, against the paper's script (232 s and 17,098 MB on one A800). Run by ``benchmarks/gpu_check.sh``.

    python3 benchmarks/gpu_prepare.py --folder /tmp/llama2-7b-shape --out result.json

Builds the random-weight model from ``LlamaConfig`` on the machine (no download), then in one process: the
layer-streamed covariance with each layer's spectra (r_max 32), the streamed sensitivity, the allocation and the
init adapter from the skeleton. Peaks are each stage's own (the counter is reset before it); goal ≤ 8 GB, ≤ 60 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_prepare import LLAMA2_7B, write_random_llama

PAPER = {"time_s": 232, "peak_mb": 17098, "gpu": "A800"}
SMOKE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 4000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, default=Path("/tmp/llama2-7b-shape"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--r-max", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="a 4-layer width-256 model on the CPU: checks the script")
    a = ap.parse_args()
    import torch

    from tlora import allocate, find_targets, init_adapters
    from tlora.adapters import AdapterInfo, save_adapters
    from tlora.preparation import stream_covariance
    from tlora.sensitivity import stream_sensitivity
    from tlora.stream import LayerStream

    t0 = time.perf_counter()
    shape = SMOKE if a.smoke else LLAMA2_7B
    device, dtype = ("cpu", torch.float32) if a.smoke else ("cuda", torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    write_random_llama(a.folder, shape)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab_size"], (a.n, a.T), generator=g)
    labels = ids.clone()
    labels[:, : a.T // 3] = -100
    data = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]), "labels": labels[i:i + 4]}
            for i in range(0, a.n, 4)]
    work = a.folder.parent / (a.folder.name + "-work")
    stream = LayerStream(a.folder, device=device, dtype=dtype)
    state: dict = {}

    def covariance() -> dict:
        _, spec = stream_covariance(stream, data, r_max=a.r_max, out=work, model_fingerprint="gpu-check",
                                      progress=False)
        state["spec"] = spec
        return {"solvers": {s: sum(v == s for v in spec.solver.values()) for s in set(spec.solver.values())}}

    def sensitivity() -> dict:
        state["scores"] = stream_sensitivity(stream, data, progress=False)
        return {}

    def allocation() -> dict:
        shapes = {n: (t.d_out, t.d_in) for n, t in find_targets(stream.model, example_inputs={}).modules.items()}
        state["alloc"] = allocate(state["scores"].scores, r=8, alpha=16, shapes=shapes, max_rank=a.r_max)
        return {}

    def init() -> dict:
        skeleton = LayerStream(a.folder, dtype=dtype).model  # a fresh skeleton: PEFT wraps in place
        save_adapters(init_adapters(skeleton, state["spec"], state["alloc"]), work / "adapter",
                      AdapterInfo(freeze_a=True, init="spectrum", allocation=state["alloc"]))
        return {}

    stages = {}
    for name, fn in (("covariance+spectrum", covariance), ("sensitivity", sensitivity), ("allocation", allocation),
                     ("init", init)):
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        extra = fn()
        sync()
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        stages[name] = {"time_s": time.perf_counter() - t, "peak_mb": peak, **extra}
        print(f"{name}: {stages[name]['time_s']:.1f} s, peak {stages[name]['peak_mb']:.0f} MiB {extra}", flush=True)
    total = sum(s["time_s"] for s in stages.values())
    peak = max(s["peak_mb"] for s in stages.values())
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "build_model_s": build_s,
              "stages": stages, "total_s": total, "peak_mb": peak, "paper": PAPER,
              "goal": {"time_s": 60, "peak_mb": 8192}}
    a.out.write_text(json.dumps(result, indent=1))
    print(f"total {total:.1f} s (paper {PAPER['time_s']} s), peak {peak:.0f} MiB (paper {PAPER['peak_mb']} MB) on "
          f"{result['device']}")


if __name__ == "__main__":
    main()
