"""Sensitivity score of each target module from a few calibration samples (DESIGN §1.4).

    s_i = (1/n) Σ_s mean(|W_i ⊙ ∂L_s/∂W_i|)

over the n calibration samples s, with L_s the causal-LM loss of sample s over its target tokens in HF
``labels`` semantics (prompt and padding labelled -100, mean over the predicted tokens), computed with a
batch of one as the reference does. The elementwise product does not depend on the weight's layout, so
GPT-2 ``Conv1D`` needs no transpose.

Memory invariant: only target weights require grad, and a post-accumulate-grad hook reduces each target
gradient to its running sum and frees it as soon as autograd has written it. So at most one target
gradient is alive at any time (asserted in the hook), never all of them at once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm.auto import tqdm

from tlora.stream import LayerStream, capture, tail
from tlora.targets import Targets, TargetSpec, find_targets, get_module

Mode = Literal["per_sample", "batched"]
Batch = Mapping[str, torch.Tensor]  # input_ids, labels: [batch, seq]; attention_mask optional, same shape


class Scores(BaseModel):
    """Sensitivity score per target module, keyed by full module name (the ``scores.json`` artifact)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scores: dict[str, float]
    n_samples: int
    mode: Mode


def score_sensitivity(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: Targets | TargetSpec,
    *,
    mode: Mode = "per_sample",
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    _on_reduce: Callable[[str, int], None] | None = None,
) -> Scores:
    """Score each target module by the mean ``|W ⊙ ∂L/∂W|`` over the calibration samples.

    The model runs in eval mode (no dropout); its train/eval flags, every parameter's ``requires_grad``
    and its hooks are restored afterwards, also on error. Target weights are left without ``.grad``
    (gradients they held before are discarded).

    Args:
        batches: padded batches (right or left padding) with ``input_ids``, ``labels`` and, unless there is
            no padding, ``attention_mask``.
        targets: the modules to score, or a spec passed to ``find_targets``.
        mode: ``per_sample`` drops each sample's padding and runs one forward and backward per sample (the
            reference). ``batched`` runs one backward per batch of the mean of its samples' losses and
            weights it by the batch size. That is an approximation, since ``|·|`` does not commute with
            the mean over samples: by the triangle inequality a batched score never exceeds the per-sample
            one, and the two agree only at batch size 1 (up to the loss's float32 upcast).
        on_progress: called as ``on_progress(samples_done, n_samples)`` after each sample (``per_sample``) or
            batch (``batched``).
        _on_reduce: for tests, called as ``_on_reduce(name, n_held)`` after each gradient is reduced, with
            the number of target weights that held a gradient just before it was freed.

    Raises:
        ValueError: no samples, a batch without ``input_ids`` or ``labels``, a sample that is all padding
            or has no target tokens, or a loss that is not finite (each names the sample).
    """
    if mode not in get_args(Mode):
        raise ValueError(f"mode must be one of {get_args(Mode)}, got {mode!r}")
    batches = [_with_mask(batch, j) for j, batch in enumerate(batches)]
    _check_samples(batches)
    if not isinstance(targets, Targets):
        targets = find_targets(model, targets)
    weights = {name: get_module(model, name).weight for name in targets}
    n_samples = sum(len(batch["input_ids"]) for batch in batches)
    device = next(model.parameters()).device
    sums = {name: torch.zeros((), dtype=torch.float64, device=w.device) for name, w in weights.items()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    training = {m: m.training for m in model.modules()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(_reducer(name, sums, weights, _on_reduce)))
        model.eval()
        bar = tqdm(total=n_samples, desc="sensitivity", unit="sample", disable=not progress)
        done = 0  # a disabled tqdm does not count
        with torch.enable_grad(), bar:
            for j, batch in enumerate(batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                if mode == "per_sample":
                    for i, sample in enumerate(_unpad(batch)):
                        loss = model(**sample).loss
                        _check_finite(loss[None], j, first=i)
                        loss.backward()
                        bar.update(1)
                        done += 1
                        if on_progress is not None:
                            on_progress(done, n_samples)
                else:
                    losses = _sample_losses(model, batch)
                    _check_finite(losses, j)
                    # Σ_s L_s = n_b · (batch-mean loss), and |·| is homogeneous: this weights the batch by n_b
                    losses.sum().backward()
                    bar.update(len(losses))
                    done += len(losses)
                    if on_progress is not None:
                        on_progress(done, n_samples)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for w in weights.values():
            w.grad = None  # an exception mid-backward can leave one behind
        for m, flag in training.items():
            m.training = flag
    return Scores(scores={name: s.item() / n_samples for name, s in sums.items()}, n_samples=n_samples, mode=mode)


def stream_sensitivity(
    stream: LayerStream,
    batches: Iterable[Batch],
    targets: Targets | TargetSpec = "all-linear",
    *,
    chunk_size: int | None = None,
    input_device: torch.device | str | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """:func:`score_sensitivity` (``per_sample``) of a model streamed one decoder layer at a time.

    Per chunk of samples: a forward that keeps each layer's input per sample, the model's own head and loss over the
    last layer's output (:func:`tlora.stream.tail`) for the gradient at the top, then a backward one layer at a
    time from the loss down: the layer is recomputed from its stored input, the incoming gradient back-propagated
    through it, its target weights' ``|W ⊙ ∇W|`` reduced into the scores as each gradient is written (and freed:
    one gradient alive at a time, as in :func:`score_sensitivity`), and the input gradient passed down. The same
    definition and, up to floating-point summation order, the same numbers as the whole-model path (tested).

    Args:
        chunk_size: samples per chunk (each chunk loads every layer twice); ``None``: all at once.
        input_device: where the stored layer inputs wait for the backward (``"cpu"`` when they do not fit the
            device: 256 samples × 512 tokens of a 7B model are 34 GB in bf16); ``None``: the compute device.

    Raises:
        ValueError: as :func:`score_sensitivity`; a target outside the decoder layers (before any compute).
    """
    batches = [_with_mask(batch, j) for j, batch in enumerate(batches)]
    _check_samples(batches)
    if not isinstance(targets, Targets):
        targets = find_targets(stream.model, targets, example_inputs={})
    head = f"{stream.prefix}."
    outside = [n for n in targets if not n.startswith(head)]
    if outside:
        raise ValueError(f"streamed sensitivity scores modules of the decoder layers ({stream.prefix}.*) only; "
                         f"{outside[:3]} are outside them: score this model loaded whole")
    by_layer: dict[int, list[str]] = {}
    for name in targets:
        by_layer.setdefault(int(name[len(head):].split(".", 1)[0]), []).append(name)
    stream.load_outside()
    model, layers, device = stream.model, stream.layers, stream.device
    keep = torch.device(input_device) if input_device is not None else device
    # No KV cache: a layer run twice (forward, then recomputed for the backward) would read its first keys back.
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    samples = [(j, i, {k: v.to(device) for k, v in s.items()} | extra)
               for j, batch in enumerate(batches) for i, s in enumerate(_unpad(batch))]
    n = len(samples)
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in targets}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:  # carried onto the real weights each time a layer is loaded
        get_module(model, name).weight.requires_grad_(True)
    chunk = chunk_size or n
    bar = tqdm(total=2 * len(layers) * -(-n // chunk), desc="sensitivity", unit="layer", disable=not progress)
    try:
        with bar:
            for start in range(0, n, chunk):
                part = samples[start:start + chunk]
                ins = [{k: v for k, v in s.items() if k != "labels"} for _, _, s in part]
                caught = [capture(model, layers, x) for x in ins]
                hidden = [h for h, _ in caught]
                calls = [c for _, c in caught]
                stored: list[list[torch.Tensor]] = [[] for _ in part]
                with torch.no_grad():
                    for li in range(len(layers)):
                        layer = stream.load(li)
                        for k, c in enumerate(calls):
                            stored[k].append(hidden[k].to(keep))
                            hidden[k] = c[li](layer, hidden[k])
                        bar.update(1)
                grads = []
                with torch.enable_grad():
                    for k, (j, i, s) in enumerate(part):
                        final = hidden[k].detach().requires_grad_(True)
                        loss = tail(model, layers, s, final).loss
                        _check_finite(loss[None], j, first=i)
                        loss.backward()
                        grads.append(final.grad)
                    for li in reversed(range(len(layers))):
                        layer = stream.load(li)
                        weights = {name: get_module(model, name).weight for name in by_layer.get(li, [])}
                        handles = [w.register_post_accumulate_grad_hook(_reducer(name, sums, weights, None))
                                   for name, w in weights.items()]
                        try:
                            for k, c in enumerate(calls):
                                x = stored[k][li].to(device).requires_grad_(True)
                                c[li](layer, x).backward(grads[k])
                                grads[k] = x.grad
                                stored[k][li] = None  # type: ignore[call-overload]
                        finally:
                            for handle in handles:
                                handle.remove()
                        bar.update(1)
                if on_progress is not None:
                    on_progress(min(start + chunk, n), n)
    finally:
        stream.free_all()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return Scores(scores={name: s.item() / n for name, s in sums.items()}, n_samples=n, mode="per_sample")


def _with_mask(batch: Batch, j: int) -> dict[str, torch.Tensor]:
    missing = [key for key in ("input_ids", "labels") if key not in batch]
    if missing:
        raise ValueError(f"batch {j} has no {missing}: pass labels with prompt and padding tokens set to -100")
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if ids.ndim != 2 or labels.shape != ids.shape or mask.shape != ids.shape:
        raise ValueError(f"batch {j}: input_ids, attention_mask and labels must share one [batch, seq] shape, got "
                         f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(labels.shape)}")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _check_samples(batches: list[dict[str, torch.Tensor]]) -> None:
    if sum(len(batch["input_ids"]) for batch in batches) == 0:
        raise ValueError("no calibration samples: pass at least one batch with input_ids and labels")
    for j, batch in enumerate(batches):
        for i, (mask, labels) in enumerate(zip(batch["attention_mask"].bool(), batch["labels"], strict=True)):
            if not mask.any():
                raise ValueError(f"sample {i} of batch {j} is all padding (its attention_mask is 0 everywhere)")
            # HF shifts labels: position t is predicted from t-1, so the first token is never a target
            if not (labels[mask][1:] != -100).any():
                raise ValueError(f"sample {i} of batch {j} has no target tokens: every label after the first "
                                 f"real token is -100")


def _reducer(name: str, sums: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
             on_reduce: Callable[[str, int], None] | None) -> Callable[[torch.Tensor], None]:
    def reduce(w: torch.Tensor) -> None:
        # O(N) per hook, O(N²) per backward: a few ms for hundreds of targets, next to a whole backward
        held = sum(other.grad is not None for other in weights.values())
        assert held == 1, f"{held} target gradients alive while reducing {name}; the memory invariant broke"
        wide = torch.promote_types(w.dtype, torch.float32)  # small bf16 products would round away
        sums[name] += (w.detach().to(wide) * w.grad.to(wide)).abs().mean(dtype=torch.float64)
        w.grad = None
        if on_reduce is not None:
            on_reduce(name, held)

    return reduce


def _unpad(batch: dict[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    """Each sample of a padded batch as a batch of one without padding (either padding side)."""
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        keep = mask.bool()
        yield {"input_ids": ids[keep][None], "attention_mask": mask[keep][None], "labels": labels[keep][None]}


def _sample_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's mean next-token loss over its target tokens: [batch], float32 or wider."""
    mask = batch["attention_mask"]
    # Count positions from each sample's first real token, so left padding sees the positions right padding sees
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids).logits  # [B, T, V]
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # HF's loss upcasts too
    # A target needs a real token to predict it: with left padding the first real token follows a pad
    predicted = mask[:, :-1].bool() & mask[:, 1:].bool()
    target = batch["labels"][:, 1:].masked_fill(~predicted, -100)  # [B, T-1]
    ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # [B, T-1], 0 if ignored
    return ce.sum(-1) / (target != -100).sum(-1)


def _check_finite(losses: torch.Tensor, j: int, first: int = 0) -> None:
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if bad:
        i = first + bad[0]
        raise ValueError(f"loss of sample {i} of batch {j} is {losses[bad[0]].item()}: check the model's weights "
                         f"and dtype (fp16 overflows easily)")
