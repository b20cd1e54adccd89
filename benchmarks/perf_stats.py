"""Performance of the statistics stages (covariance, spectrum, Zarr store) against named peers, same run, same data.

Every figure is a ratio against a peer timed in the same process on the same tokens or matrices, as the median
of ``--repeats`` runs, the peers interleaved round-robin so that load drift on a shared machine hits all alike:

* covariance: ``tlora.collect_covariance`` vs PEFT's CorDA covariance collection
  (``peft.tuners.lora.corda.calib_cov_distribution``, the covariance step of ``preprocess_corda``, with its own
  forward hooks, one sample per forward as its hook requires) and vs a plain no-grad forward over the same batches;
* covariance numerics: both precisions against a float64 numpy oracle on the same activations;
* spectrum: ``tlora.compute_spectrum`` (``auto``) vs an exact float64 ``torch.linalg.svd`` of W0·C per module;
* store: ``save_covariance``/``load_covariance`` (the pipeline's codec) vs ``numpy.save``/``numpy.load``.

    python benchmarks/perf_stats.py                 # SmolLM2-135M, writes RESULTS.md and results/perf_stats.json
    python benchmarks/perf_stats.py --quick         # seconds-long smoke run on a tiny model; writes nothing
    python benchmarks/perf_stats.py --device cuda   # also reports absolute throughput
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _perf_store import STORE_REPEATS, bench_store  # noqa: E402
from _results import machine_line, publish, timed_round_robin, update_section  # noqa: E402

import tlora  # noqa: E402
from tlora.covariance import Covariance, collect_covariance  # noqa: E402
from tlora.data import TaskSpec, build_calibration, fitting_rows, load_task, sample_calibration  # noqa: E402
from tlora.models import model_fingerprint  # noqa: E402
from tlora.spectrum import compute_spectrum  # noqa: E402
from tlora.targets import find_targets, get_module, weight_out_in  # noqa: E402

HEADING = "## Performance: statistics"
RAW = HERE / "results" / "perf_stats.json"
NEAR_GAP = 1e-2  # σ_r and σ_r+1 "nearly coincide" when (σ_r − σ_r+1)/σ_r is below this
TARGETS = {"corda_speedup": 2.0, "forward_ratio": 1.6, "err_fp32": 1e-5, "err_fp64": 1e-12, "spectrum_speedup": 3.0,
           "sine": 1e-4, "energy": 1e-6, "store_time_ratio": 1.5, "store_size_ratio": 1.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="covariance batch size (the pipeline's default)")
    p.add_argument("--r-max", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny random model, 1 repeat; prints, writes nothing")
    p.add_argument("--report", action="store_true", help="only rewrite RESULTS.md from results/perf_stats.json")
    args = p.parse_args()
    if args.report:
        out = json.loads(RAW.read_text())
        if "macs_per_token" not in out:  # written before the figure existed: the shapes give it
            out["macs_per_token"] = macs_per_token(find_targets(tlora.load_model("demo")[0], "all-linear"))
            RAW.write_text(json.dumps(out, indent=1))
        update_section(HEADING, text := report(out, argparse.Namespace(**out["args"])))
        print(text)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n_calib, args.max_length, args.r_max, args.repeats = 4, 48, 8, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    load = [os.getloadavg()[0]]
    model, calib = setup(args)
    device = torch.device(args.device)
    model.to(device)
    targets = find_targets(model, "all-linear")
    fingerprint = model_fingerprint(model)
    out: dict = {"args": vars(args), "n_modules": len(targets.modules), "n_groups": len(targets.groups),
                 "n_tokens": int(calib.attention_mask.sum()), "macs_per_token": macs_per_token(targets)}
    print(f"{out['n_modules']} modules, {out['n_groups']} groups, {out['n_tokens']} tokens", flush=True)
    out["covariance"], cov = bench_covariance(model, calib, targets, fingerprint, args)
    load.append(os.getloadavg()[0])
    out["numerics"] = bench_numerics(model, calib, targets, fingerprint)
    out["spectrum"] = bench_spectrum(model, cov, fingerprint, args)
    load.append(os.getloadavg()[0])
    out["store"] = bench_store(cov, max(args.repeats, STORE_REPEATS))
    load.append(os.getloadavg()[0])
    out["load_average"] = load
    publish(HEADING, report(out, args), quick=args.quick, raw=out, raw_path=RAW)


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, tlora.data.Calibration]:
    """SmolLM2-135M (--quick: a tiny random Llama with its vocabulary) and stdlib-code calibration, as the pipeline
    builds it."""
    model, tokenizer = tlora.load_model("demo")
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
    train = load_task(TaskSpec(name="stdlib-code"))["train"]
    usable = fitting_rows(train, tokenizer, args.max_length)  # as flows/prepare.py's calibration stage
    indices = [usable[i] for i in sample_calibration(train.select(usable), args.n_calib, 0)]
    calib = build_calibration(train, tokenizer, task="stdlib-code", n_calib=args.n_calib, seed=0,
                              max_length=args.max_length, indices=indices)
    return model, calib


def macs_per_token(targets) -> dict[str, float]:
    """Multiply-adds per token: the target linears' forward, CorDA's XᵀX per module, tlora's per group."""
    mods = targets.modules.values()
    d = {g: targets.modules[g].d_in for g in targets.groups}
    # On CPU tlora's XᵀX is a SYRK: one triangle, d(d+1)/2 multiply-adds per token (on CUDA 5/8 of d², block rows).
    return {"forward_linears": float(sum(t.d_in * t.d_out for t in mods)),
            "corda": float(sum(t.d_in ** 2 for t in mods)),
            "tlora": float(sum(x * (x + 1) / 2 for x in d.values()))}


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bench_covariance(model, calib, targets, fingerprint, args) -> tuple[dict, Covariance]:
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution

    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in calib.batches(args.batch_size)]
    singles = [{k: v.to(device) for k, v in b.items()} for b in calib.batches(1)]
    unpadded = [b["input_ids"][:, b["attention_mask"][0].bool()] for b in singles]  # the same valid tokens
    fwd = {"use_cache": False, "logits_to_keep": 1}  # what collect_covariance passes: no KV cache, no full logits
    result: dict[str, Covariance] = {}

    def ours() -> None:
        result["cov"] = collect_covariance(model, batches, targets, model_fingerprint=fingerprint, progress=False)

    config = LoraConfig(r=8, target_modules=list(targets.modules), init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="kpm"))

    def corda() -> None:
        def run_model() -> None:
            for ids in unpadded:
                model(input_ids=ids, **fwd)

        try:
            calib_cov_distribution(model, config, run_model, None, None)
        finally:
            for name in targets.modules:
                module = get_module(model, name)
                for attr in ("covariance_matrix", "sample_count"):
                    if hasattr(module, attr):
                        delattr(module, attr)

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **fwd)

    model.eval()
    print("covariance:", flush=True)
    times = timed_round_robin({"tlora": ours, "corda": corda, "forward": forward},
                              args.repeats, warmup=1, sync=_sync(device))
    n = int(calib.attention_mask.sum())
    for t in times.values():
        t["tokens_per_s"] = n / t["median_s"]
    med = {k: v["median_s"] for k, v in times.items()}
    return {"times": times, "corda_speedup": med["corda"] / med["tlora"],
            "forward_ratio": med["tlora"] / med["forward"],
            "padded_tokens": int(sum(b["input_ids"].numel() for b in batches))}, result["cov"]


def bench_numerics(model, calib, targets, fingerprint) -> dict:
    """Normalized Frobenius error of both precisions against numpy float64 sums of the very activations hooked."""
    layer = {n: n.split(".layers.")[1].split(".")[0] for n in targets.modules if ".layers." in n}
    layers = sorted(set(layer.values()), key=int)
    picked = {layers[0], layers[len(layers) // 2], layers[-1]}
    names = [n for n, i in layer.items() if i in picked]
    sub = find_targets(model, names)
    batches = calib.batches(4)[:2]
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    errors = {}
    for precision in ("float32", "float64"):
        seen: dict[str, list[np.ndarray]] = {g: [] for g in sub.groups}
        handles = [get_module(model, g).register_forward_pre_hook(
            lambda _m, a, keep=seen[g]: keep.append(a[0].detach().double().cpu().numpy())) for g in sub.groups]
        try:
            cov = collect_covariance(model, batches, sub, precision=precision, model_fingerprint=fingerprint,
                                     progress=False)
        finally:
            for h in handles:
                h.remove()
        worst = 0.0
        for g in sub.groups:
            s = 0.0
            for x, b in zip(seen[g], batches, strict=True):
                mask = b["attention_mask"].bool().cpu().numpy()
                for i in range(x.shape[0]):
                    xs = x[i][mask[i]]
                    xc = xs - xs.mean(0)
                    s = s + xc.T @ xc
            err = np.linalg.norm(cov.sums[g].numpy() - s) / np.linalg.norm(s)
            worst = max(worst, float(err))
        errors[precision] = worst
    return {"groups": len(sub.groups), "samples": sum(len(b["input_ids"]) for b in batches),
            "layers": sorted(picked, key=int), "err_fp32": errors["float32"], "err_fp64": errors["float64"]}


def bench_spectrum(model, cov: Covariance, fingerprint: str, args) -> dict:
    device = next(model.parameters()).device
    names = list(cov.modules)
    exact: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ours: dict = {}

    def peer() -> None:
        c = {}
        for name in names:
            group = cov.modules[name]
            if group not in c:
                c = {group: cov.matrix(name).to(device)}
            m = weight_out_in(get_module(model, name)).detach().to(torch.float64) @ c[group]
            _, s, vh = torch.linalg.svd(m, full_matrices=False)
            exact[name] = (vh, s)

    def fast() -> None:
        ours["spectrum"] = compute_spectrum(model, cov, args.r_max, model_fingerprint=fingerprint)  # as the stage

    print("spectrum:", flush=True)
    times = timed_round_robin({"exact": peer, "tlora": fast}, args.repeats, warmup=0, sync=_sync(device))
    spectrum = ours["spectrum"]
    rows = []
    for name in names:
        vh, s = exact[name]
        a = spectrum.vectors[name].to(device)
        r = a.shape[0]
        b = vh[:r]
        sine = float(torch.linalg.matrix_norm(a.T - b.T @ (b @ a.T), 2)) if r < vh.shape[1] else 0.0
        m = weight_out_in(get_module(model, name)).detach().to(torch.float64) @ cov.matrix(name).to(device)
        e_ours, e_exact = (float(torch.linalg.matrix_norm(m @ v.T)) for v in (a, b))
        gap = float((s[r - 1] - s[r]) / s[r - 1]) if r < len(s) else 1.0
        near = gap < NEAR_GAP
        ok = sine <= TARGETS["sine"] or (near and abs(e_ours / e_exact - 1) <= TARGETS["energy"])
        rows.append({"module": name, "r": r, "solver": spectrum.solver[name], "sine": sine,
                     "energy_rel": abs(e_ours / e_exact - 1), "rel_gap": gap, "near": near, "ok": ok})
    clear = [x for x in rows if not x["near"]]
    near = [x for x in rows if x["near"]]
    return {"times": times, "speedup": times["exact"]["median_s"] / times["tlora"]["median_s"],
            "solvers": {k: sum(x["solver"] == k for x in rows) for k in ("krylov", "gram", "exact")},
            "n_ok": sum(x["ok"] for x in rows), "n": len(rows), "n_near": len(near),
            "max_sine_clear": max((x["sine"] for x in clear), default=0.0),
            "max_sine": max(x["sine"] for x in rows), "max_energy": max(x["energy_rel"] for x in rows),
            "max_energy_near": max((x["energy_rel"] for x in near), default=0.0), "modules": rows}


def report(out: dict, args: argparse.Namespace) -> str:
    c, nu, sp, st = out["covariance"], out["numerics"], out["spectrum"], out["store"]
    t = TARGETS

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    cmd = "python benchmarks/perf_stats.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("quick", "report"))
    ct = c["times"]
    model_name = "a tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct"
    lines = [
        f"{HEADING} (`benchmarks/perf_stats.py`)", "",
        machine_line(args.device), "",
        f"Command: `{cmd}`. Model {model_name}, all-linear targets ({out['n_modules']} modules in "
        f"{out['n_groups']} shared-input groups); calibration: stdlib-code, n_calib={args.n_calib}, seed 0, "
        f"max_length={args.max_length}, as the pipeline's calibration stage draws it ({out['n_tokens']} valid tokens). "
        f"Medians of {args.repeats} interleaved repeats ({len(out['store']['times']['npy_write']['times_s'])} for "
        "the store, whose rounds take seconds); 1-minute load average during the run: "
        + ", ".join(f"{x:.1f}" for x in out["load_average"]) + ".", "",
        "| figure | tlora | peer | ratio | target | |", "|---|---:|---:|---:|---|---|",
        f"| covariance vs CorDA | {ct['tlora']['median_s']:.2f} s | {ct['corda']['median_s']:.2f} s | "
        f"{c['corda_speedup']:.2f}× faster | ≥ {t['corda_speedup']:.0f}× | "
        f"{met(c['corda_speedup'] >= t['corda_speedup'])} |",
        f"| covariance vs plain no-grad forward | {ct['tlora']['median_s']:.2f} s | "
        f"{ct['forward']['median_s']:.2f} s | {c['forward_ratio']:.2f}× the time | ≤ {t['forward_ratio']}× | "
        f"{met(c['forward_ratio'] <= t['forward_ratio'])} |",
        f"| covariance error, fp32 GEMM | {nu['err_fp32']:.1e} | numpy float64 | | ≤ 1e-5 | "
        f"{met(nu['err_fp32'] <= t['err_fp32'])} |",
        f"| covariance error, float64 | {nu['err_fp64']:.1e} | numpy float64 | | ≤ 1e-12 | "
        f"{met(nu['err_fp64'] <= t['err_fp64'])} |",
        f"| spectrum, {sp['n']} modules, r_max={args.r_max} | {sp['times']['tlora']['median_s']:.2f} s | "
        f"{sp['times']['exact']['median_s']:.2f} s | {sp['speedup']:.2f}× faster | ≥ {t['spectrum_speedup']:.0f}× | "
        f"{met(sp['speedup'] >= t['spectrum_speedup'])} |",
        f"| spectrum subspace | {sp['n_ok']}/{sp['n']} modules within | exact SVD | | sin ≤ 1e-4, or energy ≤ 1e-6 "
        f"where σ_r ≈ σ_r+1 | {met(sp['n_ok'] == sp['n'])} |",
        f"| store write | {st['times']['zarr_write']['median_s']:.2f} s | "
        f"{st['times']['npy_write']['median_s']:.2f} s | {st['write_ratio']:.2f}× | ≤ 1.5× | "
        f"{met(st['write_ratio'] <= t['store_time_ratio'])} |",
        f"| store read | {st['times']['zarr_read']['median_s']:.2f} s | {st['times']['npy_read']['median_s']:.2f} s | "
        f"{st['read_ratio']:.2f}× | ≤ 1.5× | {met(st['read_ratio'] <= t['store_time_ratio'])} |",
        f"| store size | {st['bytes']['zarr'] / 2**20:.1f} MiB | {st['bytes']['npy'] / 2**20:.1f} MiB | "
        f"{st['size_ratio']:.5f}× | ≤ 1× | {met(st['size_ratio'] <= t['store_size_ratio'])} |",
        "",
        f"- **Covariance.** tlora: `collect_covariance` at batch {args.batch_size} (padded, trimmed per batch: "
        f"{c['padded_tokens']} token slots), one hook per shared-input group, per-sample centring, fp32 SYRK (one "
        f"triangle, scipy's BLAS) into float64 sums; {ct['tlora']['tokens_per_s']:.0f} tokens/s. "
        f"Peer CorDA: PEFT {__import__('peft').__version__}'s `calib_cov_distribution` (the covariance step of "
        "`preprocess_corda`, corda_method kpm) with its own forward hooks on every target module (q, k and v each "
        "get their own matrix): per module and sample it scales the input by 1/max(input), checks it for NaN/Inf, "
        "adds the uncentred fp32 XᵀX to a per-module fp32 sum, and divides by the sample count at the end; its hook "
        "squeezes a batch of 1, so `run_model` feeds each sample alone, unpadded (the same valid tokens); "
        f"{ct['corda']['tokens_per_s']:.0f} tokens/s. Plain forward: the same batches and forward arguments as "
        "tlora's (no KV cache, logits of the last position only), no hooks; "
        f"{ct['forward']['tokens_per_s']:.0f} tokens/s.",
        f"- **Numerics.** {nu['groups']} groups (layers {', '.join(nu['layers'])}), {nu['samples']} samples in "
        "padded batches of 4; the oracle hooks the same modules in the same forward passes and sums the "
        "per-sample-centred float64 products in numpy. Error = ‖S − S_oracle‖_F / ‖S_oracle‖_F, worst group.",
        "- **Spectrum.** tlora: `compute_spectrum(solver=\"auto\")`, which includes W0·C per module, given the "
        "model's fingerprint as the pipeline's spectrum stage is (its model stage records it once); solvers used: "
        f"{sp['solvers']}. Peer: W0·C then `torch.linalg.svd` (float64, all singular "
        f"vectors) per module. {sp['n_near']} of {sp['n']} modules have σ_r and σ_r+1 within 1 % "
        f"((σ_r − σ_r+1)/σ_r < {NEAR_GAP}), where the top-r subspace is ill-defined and captured energy "
        f"‖W0·C·Aᵀ‖_F is the criterion. Worst sin θ where the gap is clear: {sp['max_sine_clear']:.1e}; worst sin θ "
        f"overall: {sp['max_sine']:.1e}; worst relative energy error: {sp['max_energy']:.1e}.",
        f"- **Store.** The covariance's {out['n_groups']} float64 matrices: `save_covariance`/`load_covariance` "
        "with their defaults, which the pipeline uses (each sum whole, `[d_in, d_in]` float64, chunks of whole rows, "
        + ("uncompressed, its chunk files and metadata written directly and read straight into the result"
           if "compact_write_ratio" in st else
           "Blosc LZ4 level 1 with bit shuffle")
        + ") vs one `numpy.save` file per matrix / `numpy.load`, both in a temporary folder on the same disk "
        "(page cache); each write into a fresh folder (the pipeline writes into a fresh staging folder), the "
        "previous one deleted untimed; each timed fn started after `os.sync()`, `gc.collect()` and glibc's "
        "`malloc_trim(0)`; after an untimed first round, the six fns in a new shuffled order each round. "
        f"Round trip bit-exact: {st['round_trip_exact']}. "
        + (f"Compact (`store.compress: true`, i.e. `compressors='compact'`: Blosc LZ4 level 1, bit shuffle): write "
           f"{st['compact_write_ratio']:.2f}×, read {st['compact_read_ratio']:.2f}×, size "
           f"{st['compact_size_ratio']:.2f}× of numpy's." if "compact_write_ratio" in st else
           f"Uncompressed (`compressors=None`): write {st['raw_write_ratio']:.2f}×, read "
           f"{st['raw_read_ratio']:.2f}×, size {st['raw_size_ratio']:.2f}× of numpy's."),
    ]
    mac = {k: v / 1e6 for k, v in out["macs_per_token"].items()}
    lines.append(
        f"- **Work per token.** The target linears' forward: {mac['forward_linears']:.1f} M multiply-adds; "
        f"CorDA's XᵀX per module: {mac['corda']:.1f} M; tlora's per shared-input group, one triangle (SYRK): "
        f"{mac['tlora']:.1f} M. From the arithmetic alone, "
        f"tlora's covariance costs (forward + its GEMMs)/forward ≈ "
        f"{(mac['forward_linears'] + mac['tlora']) / mac['forward_linears']:.2f}× a forward, and CorDA's "
        f"(forward + its GEMMs)/(forward + tlora's) ≈ "
        f"{(mac['forward_linears'] + mac['corda']) / (mac['forward_linears'] + mac['tlora']):.2f}× tlora's; "
        "measured ratios above that are batching, hook and GEMM-shape effects.")
    if args.device == "cuda":
        lines.append(f"- **Throughput ({args.device}).** covariance {ct['tlora']['tokens_per_s']:.0f} tokens/s "
                     f"(forward {ct['forward']['tokens_per_s']:.0f}); spectrum "
                     f"{sp['n'] / sp['times']['tlora']['median_s']:.1f} modules/s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
