"""The memory contract of the layer-streamed preparation (DESIGN §6a) as numbers, from shapes alone.

Peak device memory = the weights outside the decoder layers + one decoder layer + the calibration hidden states +
one layer's float64 sums (or, under ``max_sum_bytes``, one group's) + one module's solver workspace. The terms are
the code's own allocations (tlora/preparation.py, tlora/sensitivity.py, tlora/spectrum.py ``_krylov``); the
formula is checked against measured peaks in ``stream_prepare.py`` (its report prints both) before it predicts
larger models. Times are FLOPs over assumed GPU rates: a prediction, ±2×, until ``gpu_check.sh`` has run.
"""

from __future__ import annotations

GIB = 2**30
MODELS = {  # hidden, ffn, layers, heads, kv heads, vocab
    "LLaMA-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "LLaMA-2-13B": (5120, 13824, 40, 40, 40, 32000),
    "LLaMA-2-70B": (8192, 28672, 80, 64, 8, 32000),
    "Llama-3-8B": (4096, 14336, 32, 32, 8, 128256),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064),
}
KRYLOV_COLUMNS = 40 * (32 + 16)  # KRYLOV_MAX_STEPS blocks of r_max + oversampling, at r_max 32
H100 = {"bf16": 400e12, "fp32": 40e12, "fp64": 40e12, "read_gbs": 2.0}  # achieved-rate assumptions, ±2×


def shapes(hidden: int, ffn: int, heads: int, kv: int) -> dict[str, tuple[int, int]]:
    """One decoder layer's target modules, ``[d_out, d_in]``."""
    head = hidden // heads
    return {"q": (hidden, hidden), "k": (kv * head, hidden), "v": (kv * head, hidden), "o": (hidden, hidden),
            "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}


def contract(model: tuple, *, tokens: int, batch_tokens: int, weight_bytes: int, cpu: bool = False,
             sum_split: bool = False) -> dict[str, float]:
    """Peak bytes of the covariance stage and of the sensitivity stage, term by term, for ``tokens`` calibration
    tokens in batches of ``batch_tokens`` (``cpu``: the float32 SYRK scratch beside each float64 sum)."""
    hidden, ffn, layers, heads, kv, vocab = model
    mods = shapes(hidden, ffn, heads, kv)
    groups = [hidden, hidden, hidden, ffn]  # q/k/v, o, gate/up, down: their inputs' widths
    sums = [(12 if cpu else 8) * d * d for d in groups]
    d_out, d_in = max(mods.values(), key=lambda s: s[1] * s[1] + s[0] * s[1])
    common = {
        "outside weights": 2 * vocab * hidden * weight_bytes,
        "one layer's weights": sum(a * b for a, b in mods.values()) * weight_bytes,
        "hidden states": 2 * tokens * hidden * weight_bytes,  # the running layer's inputs and outputs
        "one batch's activations": batch_tokens * (3 * ffn + 6 * hidden) * 4,
    }
    cov = common | {"one layer's sums": max(sums) if sum_split else sum(sums),
                    "solver workspace": 8 * (d_out * d_in + KRYLOV_COLUMNS * (d_in + d_out))}  # fp64 W0, bases
    sens = common | {"stored layer inputs": layers * tokens * hidden * weight_bytes,
                     "one weight's gradient": 4 * max(a * b for a, b in mods.values())}
    return {"covariance": cov, "sensitivity": sens,
            "peak": max(sum(cov.values()), sum(sens.values()))}


def time_s(model: tuple, *, tokens: int, rates: dict = H100, steps: int = 25) -> dict[str, float]:
    """Seconds per stage at ``rates``: covariance (forward + float32 SYRK), spectrum (Krylov, float64), sensitivity
    (forward, recompute and backward: 4 forwards), and reading the weights twice per pass."""
    hidden, ffn, layers, heads, kv, _ = model
    mods = shapes(hidden, ffn, heads, kv)
    params = layers * sum(a * b for a, b in mods.values())
    fwd = 2 * params * tokens
    syrk = layers * tokens * (3 * hidden * hidden + ffn * ffn)
    krylov = layers * sum(steps * 2 * (i * i + o * i) * (32 + 16) * 2 for o, i in mods.values())
    read = 2 * params / (rates["read_gbs"] * 1e9)
    return {"covariance": fwd / rates["bf16"] + syrk / rates["fp32"] + read, "spectrum": krylov / rates["fp64"],
            "sensitivity": 4 * fwd / rates["bf16"] + 2 * read}
