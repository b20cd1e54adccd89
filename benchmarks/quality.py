"""Quality table: TLoRA, its ablations, LoRA and PiSSA on stdlib-code with SmolLM2-135M (CPU-sized).

Every method trains the same steps at the same config rank; each picks its learning rate from a grid on
the validation split (a frozen task-aware A carries far more input energy than a random A, so one shared
rate would not be fair); the main methods are then reported at their own best rate and the ablations at
TLoRA's, over several seeds, on the test split. Results go to ``benchmarks/RESULTS.md`` (a section of
its own) and raw figures to ``benchmarks/results/quality.json``; finished runs are kept there, so an
interrupted benchmark resumes where it stopped.

    python benchmarks/quality.py            # the full table (about an hour on 2 CPU cores)
    python benchmarks/quality.py --quick    # a smoke run of a few minutes
    # the same table split over two processes (one per core), then one report from both parts:
    python benchmarks/quality.py --labels tlora lora pissa +Init +SA
    python benchmarks/quality.py --labels +RA +RA+SA +Init+RA +Init+SA --part=_ablations
    python benchmarks/quality.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tlora
from tlora.data import TaskSpec, build_calibration, load_task, tokenize_examples
from tlora.methods import ABLATIONS, plan_allocation
from tlora.stdlib_code import code_exact_match

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import update_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "results" / "quality.json"
MAIN = ("lora", "pissa", "tlora")
STOP = ["\ndef ", "\nclass ", "\n\n\n"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (does not overwrite the full results)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3])
    p.add_argument("--n-eval", type=int, default=48, help="validation/test examples for loss and token accuracy")
    p.add_argument("--n-generate", type=int, default=16, help="test prompts for exact match")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: robust when other work shares the cores; spinning OpenMP threads on an "
                        "oversubscribed machine slowed generation 100x here)")
    p.add_argument("--report", action="store_true", help="only rewrite RESULTS.md from the finished runs")
    p.add_argument("--labels", nargs="+", choices=sorted(ABLATIONS), default=None,
                   help="train only these methods (after the learning-rate selection), e.g. to split the table "
                        "over two processes with --part")
    p.add_argument("--part", default="", help="suffix of this process's raw results file (quality<part>.json)")
    args = p.parse_args()
    if args.report:  # every part's finished runs; the preparation figures of the main part
        parts = [json.loads(f.read_text()) for f in sorted(RAW.parent.glob("quality*.json")) if "quick" not in f.name]
        main_part = next(part for part in parts if not part["args"].get("part"))
        runs = {k: v for part in parts for k, v in part["runs"].items()}
        return write_results(argparse.Namespace(**main_part["args"]), main_part["prep"], runs)
    if args.quick:
        args.steps, args.seeds, args.lrs, args.n_eval, args.n_generate = 3, 1, [1e-3], 8, 4
    raw_path = RAW.with_name(f"quality{args.part}-quick.json" if args.quick else f"quality{args.part}.json")
    if not raw_path.is_file() and RAW.is_file():  # a new part starts from the finished runs of the main one
        raw_path.write_text(RAW.read_text())
    torch.set_num_threads(args.threads)

    model, tokenizer = tlora.load_model("demo")
    task = load_task(TaskSpec(name="stdlib-code"))
    def examples(split, n):
        """The first ``n`` examples of ``split`` that fit ``max_length`` whole (none truncated)."""
        rows = task[split]
        tokens = tokenize_examples(tokenizer, rows["prompt"], rows["response"], max_length=1024)
        keep = [i for i, t in enumerate(tokens) if len(t["input_ids"]) <= args.max_length][:n]
        return rows.select(keep), [tokens[i] for i in keep]
    train_rows, train_examples = examples("train", len(task["train"]))
    _, val_examples = examples("validation", args.n_eval)
    test_rows, test_examples = examples("test", args.n_eval)
    gen_rows = test_rows.select(range(args.n_generate))

    # Preparation, once for every TLoRA variant: calibration -> covariance -> spectrum, sensitivity.
    prep = {}
    t0 = time.perf_counter()
    calib = build_calibration(train_rows, tokenizer, task="stdlib-code", n_calib=args.n_calib, seed=0,
                              max_length=args.max_length)
    targets = tlora.find_targets(model, "all-linear")
    t1 = time.perf_counter()
    cov = tlora.collect_covariance(model, calib.batches(8), targets)
    t2 = time.perf_counter()
    spectrum = tlora.compute_spectrum(model, cov, r_max=2 * args.r)
    t3 = time.perf_counter()
    scores = tlora.score_sensitivity(model, calib.batches(8), targets).scores
    t4 = time.perf_counter()
    prep = {"calibration_s": t1 - t0, "covariance_s": t2 - t1, "spectrum_s": t3 - t2, "sensitivity_s": t4 - t3}
    shapes = {n: (t.d_out, t.d_in) for n, t in targets.modules.items()}
    del model

    done = json.loads(raw_path.read_text())["runs"] if raw_path.is_file() else {}

    def run(label: str, lr: float, seed: int) -> dict:
        key = f"{label}|lr={lr:g}|seed={seed}|steps={args.steps}|bs={args.batch_size}|r={args.r}|t={args.threads}"
        if key in done:
            return done[key]
        method = ABLATIONS[label]
        base, _ = tlora.load_model("demo")
        allocation = plan_allocation(method, scores, shapes, r=args.r, alpha=args.alpha, max_rank=2 * args.r)
        adapted = tlora.build_adapter(base, method, allocation, spectrum if method.needs_spectrum else None)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            trained = tlora.train(adapted, tokenizer, train_examples, output_dir=out, max_steps=args.steps,
                                  learning_rate=lr, batch_size=args.batch_size, seed=seed, warmup_ratio=0.1,
                                  logging_steps=max(1, args.steps // 4), progress=False)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        val = tlora.heldout_loss(adapted, val_examples, progress=False)
        test = tlora.evaluate(adapted, tokenizer, test_examples, prompts=gen_rows["prompt"],
                              references=gen_rows["response"], match=code_exact_match,
                              max_new_tokens=args.max_new_tokens, stop_strings=STOP, progress=False)
        result = {"label": label, "lr": lr, "seed": seed, "trainable_params": trained.trainable_params,
                  "optimizer_state_bytes": trained.optimizer_state_bytes, "train_loss": trained.train_loss,
                  "val_loss": val.loss, "test_loss": test.loss, "test_token_accuracy": test.token_accuracy,
                  "test_exact_match": test.exact_match, "train_wall_s": wall, "train_cpu_s": cpu}
        done[key] = result
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps({"args": vars(args), "prep": prep, "runs": done}, indent=1))
        print(f"{key}: val {val.loss:.4f} test {test.loss:.4f} acc {test.token_accuracy:.4f} "
              f"em {test.exact_match:.3f} ({wall:.0f} s)", flush=True)
        return result

    labels = args.labels or list(ABLATIONS)
    # Learning rate chosen on validation loss, seed 0, for the main methods this process needs (the ablations
    # run at TLoRA's rate, so TLoRA's is chosen first).
    needed = ["tlora"] * any(label not in MAIN for label in labels) + [m for m in MAIN if m in labels]
    best_lr = {}
    for label in dict.fromkeys(needed):
        best_lr[label] = min(args.lrs, key=lambda lr, label=label: run(label, lr, 0)["val_loss"])
    for label in labels:
        for seed in range(args.seeds):
            run(label, best_lr.get(label, best_lr["tlora"]), seed)
    if not args.quick:
        write_results(args, prep, done)


def write_results(args, prep: dict, done: dict) -> None:
    """The quality section of RESULTS.md from the finished runs (a partial table names what is missing)."""
    runs = list(done.values())
    seed0 = {(r["label"], r["lr"]): r["val_loss"] for r in runs if r["seed"] == 0}
    best_lr = {label: min((lr for lr in args.lrs if (label, lr) in seed0), key=lambda lr, lb=label: seed0[lb, lr])
               for label in MAIN if any((label, lr) in seed0 for lr in args.lrs)}
    rows = {}
    for label in ABLATIONS:
        lr = best_lr.get(label, best_lr.get("tlora"))
        found = sorted((r for r in runs if r["label"] == label and r["lr"] == lr), key=lambda r: r["seed"])
        if found:
            rows[label] = found

    def ms(values):
        values = [v for v in values if v is not None]
        if len(values) < 2:
            return f"{values[0]:.4f}" if values else "–"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    lora_params = rows["lora"][0]["trainable_params"]
    order = [label for label in ("lora", "pissa", "tlora", "+Init", "+RA", "+SA", "+Init+RA", "+Init+SA", "+RA+SA")
             if label in rows]
    lines = [
        "## Quality: stdlib-code, SmolLM2-135M-Instruct (`benchmarks/quality.py`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s); "
        f"Python {platform.python_version()}, torch {torch.__version__}. "
        f"Config rank r={args.r}, alpha={args.alpha:g}, all-linear targets (210 modules), {args.steps} steps of "
        f"batch {args.batch_size}, sequences ≤ {args.max_length} tokens, warmup 10 %, linear decay, AdamW. "
        f"TLoRA: n_calib={args.n_calib}, balanced ranks (max 2r), normalized scales. Evaluation on "
        f"{args.n_eval} test examples (loss, token accuracy over target tokens) and {args.n_generate} greedy "
        f"generations of ≤ {args.max_new_tokens} tokens (exact match of the body); {args.seeds} seeds (data "
        "order; LoRA's random A). Only examples that fit the length whole are used (none truncated).",
        "",
        "Learning rate chosen per main method on validation loss (seed 0); ablations at TLoRA's rate.",
        "",
        "| method | trainable params | × LoRA | lr | seeds | test loss | token accuracy | exact match |"
        " train s (wall) | train CPU s |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|",
    ]
    for label in order:
        rs = rows[label]
        lines.append(
            f"| {label} | {rs[0]['trainable_params']:,} | {rs[0]['trainable_params'] / lora_params:.2f} | "
            f"{rs[0]['lr']:g} | {len(rs)} | {ms([r['test_loss'] for r in rs])} | "
            f"{ms([r['test_token_accuracy'] for r in rs])} | "
            f"{ms([r['test_exact_match'] for r in rs])} | {statistics.mean(r['train_wall_s'] for r in rs):.0f} | "
            f"{statistics.mean(r['train_cpu_s'] for r in rs):.0f} |")
    lines += ["", "Validation loss per learning rate (seed 0):", "",
              "| method | " + " | ".join(f"lr={lr:g}" for lr in args.lrs) + " |",
              "|---|" + "---:|" * len(args.lrs)]
    for label in MAIN:
        lines.append(f"| {label} | " + " | ".join(f"{seed0[label, lr]:.4f}" if (label, lr) in seed0 else "–"
                                                  for lr in args.lrs) + " |")
    lines += ["", "TLoRA preparation (once for all variants): " + ", ".join(
        f"{k.removesuffix('_s')} {v:.1f} s" for k, v in prep.items()), ""]
    update_section("## Quality:", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
