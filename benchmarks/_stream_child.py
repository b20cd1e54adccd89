"""One measured stage of ``stream_prepare.py`` in a fresh process: its wall and CPU time and the process's peak RSS.

    python benchmarks/_stream_child.py STAGE FOLDER WORK --n N --T T [--r-max R] [--precision P] [--threads K]

Stages: ``covariance`` (layer-streamed covariance and spectrum, built into WORK), ``spectrum`` (a new r_max from
the stored covariance: weights streamed, no forward), ``sensitivity`` (streamed), ``allocation`` and ``init`` (from
the model's skeleton: shapes only, no weights), ``fingerprint`` (the model stage's hash, one tensor at a time), and
the peers ``whole`` (today's path: the model loaded whole, ``collect_covariance`` → ``compute_spectrum`` →
``score_sensitivity``) and ``streamed`` (``tlora.prepare`` on the folder: the same three, streamed). Prints one JSON
line. Peak RSS is ``VmHWM`` of this process, imports included (``base_mb``: the RSS after imports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peak_memory import mmap_large_allocations, status_kib


def batches(folder: Path, n: int, length: int, batch: int) -> list[dict]:
    """Calibration batches: stdlib-code for a folder with a tokenizer (SmolLM2), else seeded random ids."""
    import torch

    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from tlora.data import TaskSpec, build_calibration, fitting_rows, load_task, sample_calibration

        tok = AutoTokenizer.from_pretrained(folder)
        tok.pad_token = tok.pad_token or tok.eos_token
        train = load_task(TaskSpec(name="stdlib-code"))["train"]
        usable = fitting_rows(train, tok, length)  # as the calibration stage: rows whose prompt leaves a target
        indices = [usable[i] for i in sample_calibration(train.select(usable), n, 0)]
        calib = build_calibration(train, tok, task="stdlib-code", n_calib=n, seed=0, max_length=length,
                                  indices=indices)
        return calib.batches(batch)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 3] = -100  # the first third is "prompt", as in the calibration data
    mask = torch.ones_like(ids)
    return [{"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch], "labels": labels[i:i + batch]}
            for i in range(0, n, batch)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("folder", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r-max", type=int, default=32)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    mmap_large_allocations()
    import torch

    torch.set_num_threads(a.threads)
    from tlora import allocate, collect_covariance, compute_spectrum, find_targets, init_adapters, score_sensitivity
    from tlora.adapters import AdapterInfo, save_adapters
    from tlora.covariance import load_covariance, save_covariance
    from tlora.preparation import prepare, stream_covariance, stream_spectrum
    from tlora.sensitivity import Scores, stream_sensitivity
    from tlora.spectrum import load_spectrum, save_spectrum
    from tlora.stream import LayerStream

    data = batches(a.folder, a.n, a.T, a.batch)
    a.work.mkdir(parents=True, exist_ok=True)
    base = status_kib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    extra: dict = {}
    if a.stage == "covariance":
        import tlora.preparation

        solve, spent = tlora.preparation.module_spectrum, []

        def timed_solve(*args, **kwargs):  # the spectra's share of the stage: they are computed layer by layer
            c = time.process_time()
            out = solve(*args, **kwargs)
            spent.append(time.process_time() - c)
            return out

        tlora.preparation.module_spectrum = timed_solve
        stream = LayerStream(a.folder)
        cov, spec = stream_covariance(stream, data, r_max=a.r_max, precision=a.precision, out=a.work / "stats",
                                      model_fingerprint="bench", progress=False)
        extra = {"n_groups": len(cov.sums), "peak_resident": stream.peak_resident, "spectrum_cpu_s": sum(spent),
                 "solvers": {s: sum(v == s for v in spec.solver.values()) for s in set(spec.solver.values())}}
    elif a.stage == "spectrum":
        cov = load_covariance(a.work / "stats" / "covariance.zarr", lazy=True)
        spec = stream_spectrum(LayerStream(a.folder), cov, a.r_max + 1, progress=False)
        extra = {"solvers": {s: sum(v == s for v in spec.solver.values()) for s in set(spec.solver.values())}}
    elif a.stage == "sensitivity":
        scores = stream_sensitivity(LayerStream(a.folder), data, progress=False)
        (a.work / "scores.json").write_text(scores.model_dump_json())
    elif a.stage in ("allocation", "init"):
        skeleton = LayerStream(a.folder).model
        shapes = {n: (t.d_out, t.d_in) for n, t in find_targets(skeleton, example_inputs={}).modules.items()}
        scores = Scores.model_validate_json((a.work / "scores.json").read_text())
        alloc = allocate(scores.scores, r=8, alpha=16, mode="balanced", scale="normalized", shapes=shapes,
                         max_rank=a.r_max)
        if a.stage == "init":
            spec = load_spectrum(a.work / "stats" / "spectrum.zarr")
            save_adapters(init_adapters(skeleton, spec, alloc), a.work / "adapter",
                          AdapterInfo(freeze_a=True, init="spectrum", allocation=alloc))
        extra = {"total_rank": sum(m.rank for m in alloc.modules.values())}
    elif a.stage == "fingerprint":
        extra = {"fingerprint": LayerStream(a.folder).fingerprint()}
    elif a.stage == "whole":
        from transformers import AutoModelForCausalLM  # as load_model does, without a tokenizer to need

        model = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.float32, use_safetensors=True).eval()
        targets = find_targets(model, "all-linear")
        cov = collect_covariance(model, data, targets, precision=a.precision, model_fingerprint="bench",
                                 progress=False)
        spec = compute_spectrum(model, cov, a.r_max, model_fingerprint="bench")
        scores = score_sensitivity(model, data, targets, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        save_covariance(a.work / "covariance.zarr", cov)  # untimed: the artifacts the comparison reads
        save_spectrum(a.work / "spectrum.zarr", spec)
        (a.work / "scores.json").write_text(scores.model_dump_json())
    elif a.stage == "streamed":
        got = prepare(a.folder, data, r_max=a.r_max, precision=a.precision, out=a.work, model_fingerprint="bench",
                      progress=False)
        (a.work / "scores.json").write_text(got.scores.model_dump_json())
    else:
        raise SystemExit(f"unknown stage {a.stage}")
    if a.stage != "whole":
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"stage": a.stage, "wall_s": wall, "cpu_s": cpu, "peak_mb": status_kib("VmHWM") / 1024,
                      "base_mb": base / 1024, "pid": os.getpid(), **extra}), flush=True)


if __name__ == "__main__":
    main()
