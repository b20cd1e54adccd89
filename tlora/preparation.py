"""The task side of TLoRA for a model of any size: covariance, spectrum and sensitivity, one decoder layer at a time.

:func:`prepare` is the one public call: a model folder is streamed (:mod:`tlora.stream`: skeleton on the meta
device, one decoder layer on the device at a time), a loaded model goes through the whole-model functions. The
streamed statistics are today's, computed in another order: the loop over calibration batches runs inside the loop
over layers. For each layer, its groups' per-sample-centred float64 sums are accumulated by the same accumulator as
:func:`tlora.covariance.collect_covariance` (same masks, centring and batching), its modules' spectra are computed
as soon as the sums are complete (:func:`tlora.spectrum.module_spectrum`), both are written to their stores, and the
layer is freed. Peak memory is one layer's weights, the calibration hidden states, one layer's (or, under
``max_sum_bytes``, one group's) float64 sums and one module's solver workspace, whatever the depth (DESIGN §6a).

Resume: with ``out``, the stores are built in place and record after each layer how many layers are done; a rerun
with the same inputs replays the finished layers' forward (their statistics are not recomputed) and goes on from
the first unfinished one. The result is bit-identical to an uninterrupted run (tested by SIGKILL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zarr
from torch import nn
from tqdm.auto import tqdm

from tlora._zarr_store import write_matrix
from tlora.covariance import (
    Covariance,
    Precision,
    _Accumulator,
    _array_name,
    _check_batches,
    collect_covariance,
    forward_inputs,
    load_covariance,
)
from tlora.sensitivity import Scores, score_sensitivity, stream_sensitivity
from tlora.spectrum import Solver, Spectrum, compute_spectrum, load_spectrum, module_spectrum
from tlora.stream import LayerStream, capture, tail
from tlora.targets import Target, Targets, TargetSpec, find_targets, get_module, weight_out_in

log = logging.getLogger(__name__)

COVARIANCE_STORE = "covariance.zarr"
SPECTRUM_STORE = "spectrum.zarr"
LayerEvent = Callable[[int, str], None]
"""``on_layer(i, what)``: decoder layer ``i`` was ``"replayed"`` (forward only, on resume) or ``"computed"``."""


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` returns: the same types as the whole-model functions'."""

    covariance: Covariance
    spectrum: Spectrum | None
    scores: Scores | None


def prepare(
    source: str | Path | nn.Module | LayerStream,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: TargetSpec = "all-linear",
    *,
    r_max: int | None = 16,
    sensitivity: bool = True,
    solver: Solver = "auto",
    precision: Precision = "float32",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    out: str | Path | None = None,
    max_sum_bytes: int | None = None,
    max_memory: int | None = None,
    model_fingerprint: str | None = None,
    data_fingerprint: str | None = None,
    progress: bool = True,
) -> Prepared:
    """Covariance, spectrum (top ``r_max`` vectors, or none) and sensitivity scores of a model on calibration batches.

    Args:
        source: a model folder (HF safetensors; streamed layer by layer), a :class:`LayerStream` over one, or a
            loaded model (the whole-model functions run on it).
        batches: padded batches with ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding -100).
        dtype: compute dtype of a streamed model's weights; ``None``: bfloat16 on CUDA, float32 elsewhere.
        out: with a streamed model, a folder where ``covariance.zarr`` and ``spectrum.zarr`` are built layer by
            layer (and resumed from); the returned covariance then reads its sums from there one group at a time.
            Without it, everything is kept in memory.
        max_sum_bytes: with a streamed model, the most bytes of float64 sums (and their float32 scratch) held at
            once; a layer whose groups exceed it runs once per batch of groups. ``None``: no limit.
        max_memory: with a streamed model, bytes the model's weights may take on the device: where all its decoder
            layers fit, they stay resident once loaded (the sensitivity then reads each layer once, not twice per
            chunk). ``None``: one layer at a time.
        model_fingerprint: recorded on the artifacts; computed from the weights when ``None``.
    """
    batches = list(batches)
    if isinstance(source, nn.Module):
        tgt = find_targets(source, targets)
        cov = collect_covariance(source, batches, tgt, precision=precision, model_fingerprint=model_fingerprint,
                                 data_fingerprint=data_fingerprint, progress=progress)
        spec = compute_spectrum(source, cov, r_max, solver=solver, model_fingerprint=cov.model_fingerprint) \
            if r_max else None
        scores = score_sensitivity(source, batches, tgt, progress=progress) if sensitivity else None
        return Prepared(cov, spec, scores)
    stream = source if isinstance(source, LayerStream) else LayerStream(
        source, device=device, dtype=dtype or default_dtype(device))
    if max_memory is not None and stream.weight_bytes() <= max_memory:
        stream.max_resident = len(stream.layers)
    cov, spec = stream_covariance(stream, batches, targets, r_max=r_max, solver=solver, precision=precision,
                                  out=out, max_sum_bytes=max_sum_bytes, model_fingerprint=model_fingerprint,
                                  data_fingerprint=data_fingerprint, progress=progress)
    scores = stream_sensitivity(stream, batches, list(cov.modules), progress=progress) if sensitivity else None
    return Prepared(cov, spec, scores)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """``auto`` dtype of a model's weights: bfloat16 on CUDA, float32 elsewhere (statistics stay float32 → float64)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def stream_covariance(
    stream: LayerStream,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: TargetSpec = "all-linear",
    *,
    r_max: int | None = None,
    solver: Solver = "auto",
    precision: Precision = "float32",
    out: str | Path | None = None,
    max_sum_bytes: int | None = None,
    compressors: Any = "default",
    hidden_device: torch.device | str | None = None,
    model_fingerprint: str | None = None,
    data_fingerprint: str | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    on_layer: LayerEvent | None = None,
) -> tuple[Covariance, Spectrum | None]:
    """:func:`tlora.covariance.collect_covariance` (and, with ``r_max``, the spectrum) one decoder layer at a time.

    Same sums as the whole-model path: float64 within 1e-12 in ``float64`` precision, within float32 rounding by
    default (tested on Llama, GPT-2 and BERT). ``on_progress(layers_done, n_layers)`` after each layer.
    ``hidden_device``: where the calibration hidden states wait between layers (``"cpu"`` when they do not fit the
    device: 256 samples × 2048 tokens of a 70B model are 8.6 GB in bf16, twice that with the layer's outputs).

    Raises:
        ValueError: as :func:`collect_covariance`, before any forward pass.
    """
    batches = list(batches)
    _check_batches(batches)
    if r_max is not None and r_max < 1:
        raise ValueError(f"r_max must be >= 1, got {r_max}")
    spec_targets = find_targets(stream.model, targets, example_inputs={})  # names and shapes from the skeleton
    if model_fingerprint is None:
        model_fingerprint = stream.fingerprint()
    dtype = torch.float64 if precision == "float64" else torch.float32
    stream.load_outside()
    model, layers, n_layers = stream.model, stream.layers, len(stream.layers)
    inputs = [forward_inputs(model, b, stream.device) for b in batches]
    masks = [x["attention_mask"].ne(0) for x in inputs]
    n_tokens, n_samples = sum(int(m.sum()) for m in masks), sum(m.shape[0] for m in masks)
    hidden, calls = [], []
    for x in inputs:
        h, c = capture(model, layers, x)
        hidden.append(h if hidden_device is None else h.to(hidden_device))
        calls.append(c)
    run = hashlib.sha256(json.dumps([model_fingerprint, data_fingerprint, targets, precision, r_max, solver,
                                     n_tokens, n_samples], default=str).encode()).hexdigest()
    stores = _Stores(out, run, with_spectrum=r_max is not None, compressors=compressors)
    done = stores.layers_done
    tgt: Targets | None = None
    sums: dict[str, torch.Tensor] = {}  # kept only without ``out``
    vectors: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    used: dict[str, str] = {}
    bar = tqdm(total=n_layers, desc="covariance", unit="layer", disable=not progress)
    with bar:
        for i in range(n_layers):
            with stream.layer(i) as layer:
                if tgt is None:
                    tgt = _group_by_layer(stream, spec_targets, layer, calls[0][0], hidden[0])
                    names = {g: _array_name(g, k) for k, g in enumerate(tgt.groups)}
                groups = {g: m for g, m in tgt.groups.items() if _layer_of(stream, g) == i}
                if i < done:
                    hidden = [c[i](layer, h) for c, h in zip(calls, hidden, strict=True)]
                    event = "replayed"
                else:
                    layer_sums, hidden = _layer_sums(layer, f"{stream.prefix}.{i}.", groups, calls, i, hidden, masks,
                                                     dtype, max_sum_bytes)
                    spectra = _spectra(layer, f"{stream.prefix}.{i}.", groups, layer_sums, n_samples, r_max, solver)
                    _keep(stores, names, layer_sums, spectra, sums, vectors, values, used, i + 1)
                    del layer_sums, spectra  # else they live on while the next layer's sums build (measured: +1.4 GB)
                    event = "computed"
            if on_layer is not None:
                on_layer(i, event)
            bar.update(1)
            if on_progress is not None:
                on_progress(i + 1, n_layers)
    assert tgt is not None
    outside = {g: m for g, m in tgt.groups.items() if _layer_of(stream, g) is None}
    if outside:  # e.g. BERT's pooler: run by the model itself after its last layer
        layer_sums = _outside_sums(stream, outside, inputs, hidden, masks, dtype)
        spectra = _spectra(model, "", outside, layer_sums, n_samples, r_max, solver)
        _keep(stores, names, layer_sums, spectra, sums, vectors, values, used, n_layers)
    modules = {name: t.group for name, t in tgt.modules.items()}
    meta = {"n_tokens": n_tokens, "n_samples": n_samples, "model_fingerprint": model_fingerprint,
            "data_fingerprint": data_fingerprint}
    if out is None:
        cov = Covariance(sums={g: sums[g] for g in tgt.groups}, modules=modules, centering="per_sample", **meta)
        spec = Spectrum(vectors={m: vectors[m] for m in modules}, values={m: values[m] for m in modules},
                        r_max=r_max, solver={m: used[m] for m in modules}, model_fingerprint=model_fingerprint) \
            if r_max is not None else None
        return cov, spec
    stores.finish(names, modules, meta, r_max, list(modules))
    cov = load_covariance(Path(out) / COVARIANCE_STORE, lazy=True)
    spec = load_spectrum(Path(out) / SPECTRUM_STORE) if r_max is not None else None
    return cov, spec


def stream_spectrum(stream: LayerStream, covariance: Covariance, r_max: int, *, solver: Solver = "auto",
                    out: str | Path | None = None, progress: bool = True) -> Spectrum:
    """The spectrum of a stored covariance with the weights streamed layer by layer: no forward pass, one layer's
    weights and one group's sum in memory at a time."""
    by_layer: dict[int | None, list[str]] = {}
    for name in covariance.modules:
        by_layer.setdefault(_layer_of(stream, name), []).append(name)
    vectors, values, used = {}, {}, {}
    stream.load_outside()
    for i in tqdm(sorted(by_layer, key=lambda k: -1 if k is None else k), desc="spectrum", unit="layer",
                  disable=not progress):
        stream.model if i is None else stream.load(i)
        cache: dict[str, torch.Tensor] = {}
        for name in by_layer[i]:
            group = covariance.modules[name]
            if group not in cache:
                cache = {group: covariance.sums[group].to(stream.device)}
            module = get_module(stream.model, name)
            weight = weight_out_in(module)
            r = min(r_max, *weight.shape)
            vectors[name], values[name], used[name] = module_spectrum(weight, cache[group], covariance.n_samples, r,
                                                                      solver)
        if i is not None and stream.max_resident == 1:
            stream.free(i)
    names = list(covariance.modules)
    spec = Spectrum(vectors={m: vectors[m] for m in names}, values={m: values[m] for m in names}, r_max=r_max,
                    solver={m: used[m] for m in names}, model_fingerprint=covariance.model_fingerprint)
    if out is not None:
        from tlora.spectrum import save_spectrum
        save_spectrum(out, spec)
    return spec


# --- the per-layer pieces ---------------------------------------------------------------------------------------

def _layer_of(stream: LayerStream, name: str) -> int | None:
    """The decoder layer a module belongs to, or None for one outside the layers."""
    head = f"{stream.prefix}."
    if not name.startswith(head):
        return None
    return int(name[len(head):].split(".", 1)[0])


def _group_by_layer(stream: LayerStream, targets: Targets, layer: nn.Module, call: Any, hidden: torch.Tensor
                    ) -> Targets:
    """The targets grouped by shared input: found in decoder layer 0 by tensor identity (one forward of one
    batch), applied to every layer by relative name (the layers are one class); modules outside are their own."""
    head = f"{stream.prefix}.0."
    rel = [n[len(head):] for n in targets.modules if n.startswith(head)]
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0])

        return hook

    handles = [get_module(layer, n).register_forward_pre_hook(record(n)) for n in rel]
    try:
        with torch.no_grad():
            call(layer, hidden)
    finally:
        for h in handles:
            h.remove()
    leader_of: dict[str, str] = {}
    leaders: list[str] = []
    for n in rel:  # module order: a group is named after its first member
        leader = next((g for g in leaders if seen.get(n) is not None and seen.get(g) is seen.get(n)), n)
        if leader == n:
            leaders.append(n)
        leader_of[n] = leader
    groups: dict[str, list[str]] = {}
    modules = {}
    for name, t in targets.modules.items():
        i = _layer_of(stream, name)
        if i is None:
            group = name
        else:
            head_i = f"{stream.prefix}.{i}."
            relative = name[len(head_i):]
            group = head_i + leader_of.get(relative, relative)
        groups.setdefault(group, []).append(name)
        modules[name] = Target(**(t.model_dump() | {"group": group}))
    return Targets(modules=modules, groups=groups)


def _passes(groups: Mapping[str, list[str]], layer: nn.Module, prefix: str, dtype: torch.dtype,
            max_sum_bytes: int | None) -> list[dict[str, list[str]]]:
    """The layer's groups in consecutive batches whose float64 sums (plus float32 scratch) fit ``max_sum_bytes``."""
    if max_sum_bytes is None:
        return [dict(groups)]
    per_value = 8 + (4 if dtype == torch.float32 else 0)
    passes: list[dict[str, list[str]]] = [{}]
    size = 0
    for g, members in groups.items():
        d = weight_out_in(get_module(layer, g[len(prefix):])).shape[1]
        need = d * d * per_value
        if passes[-1] and size + need > max_sum_bytes:
            passes.append({})
            size = 0
        passes[-1][g] = members
        size += need
    return passes


def _layer_sums(layer: nn.Module, prefix: str, groups: Mapping[str, list[str]], calls: list[list[Any]], i: int,
                hidden: list[torch.Tensor], masks: list[torch.Tensor], dtype: torch.dtype,
                max_sum_bytes: int | None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Decoder layer ``i`` over every batch: its groups' sums, and its outputs (the next layer's inputs)."""
    sums: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []
    for k, part in enumerate(_passes(groups, layer, prefix, dtype, max_sum_bytes)):
        acc = _Accumulator(part, dtype)
        handles = [get_module(layer, g[len(prefix):]).register_forward_pre_hook(acc.hook(g)) for g in part]
        try:
            with torch.no_grad():
                for j, (c, h, mask) in enumerate(zip(calls, hidden, masks, strict=True)):
                    acc.start(mask)
                    y = c[i](layer, h)
                    acc.finish(j)
                    if k == 0:
                        outputs.append(y)
        finally:
            for handle in handles:
                handle.remove()
        sums.update({g: acc.result(g) for g in part})
    if not groups:
        with torch.no_grad():
            outputs = [c[i](layer, h) for c, h in zip(calls, hidden, strict=True)]
    return sums, outputs


def _outside_sums(stream: LayerStream, groups: Mapping[str, list[str]], inputs: list[dict[str, Any]],
                  hidden: list[torch.Tensor], masks: list[torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Sums of targets outside the decoder layers, from the model's own forward after its last layer."""
    acc = _Accumulator(groups, dtype)
    handles = [get_module(stream.model, g).register_forward_pre_hook(acc.hook(g)) for g in groups]
    try:
        with torch.no_grad():
            for j, (x, h, mask) in enumerate(zip(inputs, hidden, masks, strict=True)):
                acc.start(mask)
                tail(stream.model, stream.layers, x, h.to(stream.device))
                acc.finish(j)
    finally:
        for handle in handles:
            handle.remove()
    return {g: acc.result(g) for g in groups}


def _spectra(root: nn.Module, prefix: str, groups: Mapping[str, list[str]], sums: Mapping[str, torch.Tensor],
             n_samples: int, r_max: int | None, solver: Solver) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    if r_max is None:
        return {}
    out = {}
    for g, members in groups.items():
        for name in members:
            weight = weight_out_in(get_module(root, name[len(prefix):]))
            out[name] = module_spectrum(weight, sums[g], n_samples, min(r_max, *weight.shape), solver)
    return out


def _keep(stores: _Stores, names: Mapping[str, str], layer_sums: dict[str, torch.Tensor],
          spectra: dict[str, tuple[torch.Tensor, torch.Tensor, str]], sums: dict, vectors: dict, values: dict,
          used: dict, layers_done: int) -> None:
    """One layer's results: written to the stores (then dropped), or kept in memory without stores."""
    for name, (v, s, u) in spectra.items():
        vectors[name], values[name], used[name] = v, s, u
    if stores.path is None:
        sums.update({g: s.cpu() for g, s in layer_sums.items()})
        return
    stores.write_layer(layers_done, {names[g]: s for g, s in layer_sums.items()}, spectra)


class _Stores:
    """``covariance.zarr`` and ``spectrum.zarr`` built in place, layer by layer, resumable by the same run.

    Each store says ``complete: false`` until :meth:`finish`; the covariance store's ``partial`` attribute records
    the run it belongs to (a hash of its inputs) and how many layers are in it, written after the layer's arrays.
    """

    def __init__(self, out: str | Path | None, run: str, *, with_spectrum: bool, compressors: Any = "default"
                 ) -> None:
        self.path = None if out is None else Path(out)
        self.compressors = compressors
        self.layers_done = 0
        self.used: dict[str, str] = {}
        if self.path is None:
            return
        cov_path, spec_path = self.path / COVARIANCE_STORE, self.path / SPECTRUM_STORE
        if cov_path.exists():
            attrs = zarr.open_group(str(cov_path), mode="r").attrs.asdict()
            partial = attrs.get("partial") or {}
            if partial.get("run") == run and (spec_path.exists() or not with_spectrum):
                self.layers_done = int(partial["layers_done"])
                self.used = dict(partial.get("solver", {}))
                log.info("resuming %s after %d layers", cov_path, self.layers_done)
        if self.layers_done == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            for p in (cov_path, spec_path):
                shutil.rmtree(p, ignore_errors=True)
            zarr.open_group(str(cov_path), mode="w").attrs.update({"complete": False,
                                                                 "partial": {"run": run, "layers_done": 0}})
            if with_spectrum:
                zarr.open_group(str(spec_path), mode="w").attrs.update({"complete": False})
        self.cov = zarr.open_group(str(cov_path), mode="a")
        self.spec = zarr.open_group(str(spec_path), mode="a") if with_spectrum else None
        self.run = run

    def write_layer(self, layers_done: int, sums: Mapping[str, torch.Tensor],
                    spectra: Mapping[str, tuple[torch.Tensor, torch.Tensor, str]]) -> None:
        for name, s in sums.items():
            if name in self.cov:  # left by a run killed inside this layer
                del self.cov[name]
            write_matrix(self.cov, name, s, compressors=self.compressors)
        for module, (v, s, u) in spectra.items():
            assert self.spec is not None
            if module in self.spec:
                del self.spec[module]
            write_matrix(self.spec, f"{module}/vectors", v, compressors=self.compressors)
            write_matrix(self.spec, f"{module}/values", s, compressors=self.compressors)
            self.used[module] = u
        self.cov.attrs["partial"] = {"run": self.run, "layers_done": layers_done, "solver": self.used}

    def finish(self, names: Mapping[str, str], modules: Mapping[str, str], meta: dict[str, Any], r_max: int | None,
               spectrum_modules: list[str]) -> None:
        if self.spec is not None:
            self.spec.attrs.update({"modules": spectrum_modules, "r_max": r_max,
                                    "solver": {m: self.used[m] for m in spectrum_modules},
                                    "model_fingerprint": meta["model_fingerprint"], "complete": True})
        self.cov.attrs.update({"modules": {m: names[g] for m, g in modules.items()}, "centering": "per_sample",
                               **meta})
        del self.cov.attrs["partial"]
        self.cov.attrs["complete"] = True
