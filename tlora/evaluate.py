"""Evaluate a (PEFT or plain HF) causal LM on a task, and merge its adapter into a plain HF model (DESIGN §1.7).

Held-out loss is token-weighted over target tokens (labels != -100, shifted as HF does):

    loss = Σ_examples Σ_targets −log p(y_t | y_<t) / Σ_examples n_targets,   perplexity = exp(loss)

so it equals the HF ``labels`` loss of each example alone (batch of 1), weighted by its target-token count,
whatever the batch size and padding. Generation is greedy with left padding, so a batch returns what each
prompt returns alone. The task metric is exact match under a caller-given ``match`` (the task owns
normalisation). ``merge_adapters`` folds B·A·scaling into W0 (``merge_and_unload``); the merged model's
logits equal the adapter model's within fp32 tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class LossResult(BaseModel):
    """Held-out loss over target tokens, weighted by token (not by example)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    loss: float
    """Mean cross-entropy (nats) over all target tokens."""
    perplexity: float
    """``exp(loss)``."""
    n_tokens: int
    """Target tokens scored: labels != -100 after the one-token shift."""
    token_accuracy: float
    """Fraction of target tokens where the logits' argmax is the label."""


class EvalResult(BaseModel):
    """What ``metrics.json`` holds for one evaluated model."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    loss: float
    perplexity: float
    token_accuracy: float
    exact_match: float | None = None
    """Fraction of generated answers that ``match`` their reference; ``None`` when nothing was generated."""
    n_examples: int
    """Examples the loss is over."""
    n_generated: int | None = None
    """Prompts the exact match is over (may be a subset of the examples, since generation costs more)."""
    n_tokens: int


def heldout_loss(model: nn.Module, examples: Sequence[Mapping[str, Sequence[int] | torch.Tensor]], *,
                 batch_size: int = 8, progress: bool = True) -> LossResult:
    """Score ``examples`` (unpadded ``input_ids`` and ``labels``, prompt labelled -100) by teacher forcing.

    Examples are sorted by length and right-padded per batch; padding changes no valid position of a
    causal model, so the result does not depend on ``batch_size`` (up to float rounding).

    Raises:
        ValueError: an example is padded or its ``labels`` length differs; no example has a target token.
    """
    rows = [_example_tensors(e, i) for i, e in enumerate(examples)]
    if not any(bool((labels[1:] != IGNORE_INDEX).any()) for _, labels in rows):
        raise ValueError("no target tokens to score: every label is -100 (after the one-token shift)")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)  # less padding per batch
    device = _device(model)
    nll_sum, n_correct, n_tokens = 0.0, 0, 0
    starts = range(0, len(order), batch_size)
    with _eval_mode(model), torch.no_grad():
        for start in tqdm(starts, desc="held-out loss", disable=not progress):
            input_ids, attention_mask, labels = _pad_right([rows[i] for i in order[start:start + batch_size]])
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            targets = labels[:, 1:].to(device)  # [B, T-1]: position t predicts token t+1
            keep = targets != IGNORE_INDEX
            picked = logits[:, :-1][keep].float()  # [N, V]: upcast only the target positions, as HF upcasts
            nll_sum += F.cross_entropy(picked, targets[keep], reduction="sum").double().item()
            n_correct += int((picked.argmax(-1) == targets[keep]).sum())
            n_tokens += int(keep.sum())
    loss = nll_sum / n_tokens
    return LossResult(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, n_tokens=n_tokens,
                      token_accuracy=n_correct / n_tokens)


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, max_new_tokens: int,
             batch_size: int = 8, stop_strings: Sequence[str] | None = None, progress: bool = True) -> list[str]:
    """Greedily continue each prompt; return only the new text, cut before the first stop string.

    Prompts are tokenized with the tokenizer's defaults (special tokens included) and left-padded, so every
    prompt ends at the same column and a batch gives what each prompt gives alone. The tokenizer's
    ``padding_side`` (and ``pad_token``, set to EOS when it has none) are restored afterwards.
    """
    device = _device(model)
    stops = list(stop_strings or [])
    texts: list[str] = []
    with _left_padding(tokenizer), _eval_mode(model), torch.no_grad():
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
            width = enc["input_ids"].shape[1]
            stopping = StoppingCriteriaList([_StopStrings(tokenizer, stops, width)] if stops else [])
            out = model.generate(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id, stopping_criteria=stopping,
            )  # [B, T_prompt + T_new]
            new = out[:, width:]
            texts.extend(_cut(t, stops) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return texts


def task_metrics(predictions: Sequence[str], references: Sequence[str], *,
                 match: Callable[[str, str], bool]) -> dict[str, float | int]:
    """Exact-match rate and counts of ``predictions`` against ``references`` under ``match(pred, ref)``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: pass one per prompt")
    if not predictions:
        raise ValueError("no predictions to score")
    n_correct = sum(bool(match(p, r)) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": n_correct / len(predictions), "n_correct": n_correct, "n_examples": len(predictions)}


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None,
             examples: Sequence[Mapping[str, Sequence[int] | torch.Tensor]], *,
             prompts: Sequence[str] | None = None, references: Sequence[str] | None = None,
             match: Callable[[str, str], bool] | None = None, max_new_tokens: int = 256,
             stop_strings: Sequence[str] | None = None, batch_size: int = 8, progress: bool = True) -> EvalResult:
    """Held-out loss on ``examples``, plus exact match of greedy answers to ``prompts`` when they are given.

    Raises:
        ValueError: ``prompts`` without ``references``, ``match`` or ``tokenizer`` (or references without prompts).
    """
    if (prompts is None) != (references is None):
        raise ValueError("pass prompts and references together (one reference per prompt), or neither")
    if prompts is not None and (match is None or tokenizer is None):
        raise ValueError("exact match needs a tokenizer and a match(prediction, reference) callable")
    scored = heldout_loss(model, examples, batch_size=batch_size, progress=progress)
    exact_match, n_generated = None, None
    if prompts is not None:
        predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               stop_strings=stop_strings, progress=progress)
        metrics = task_metrics(predictions, references, match=match)
        exact_match, n_generated = metrics["exact_match"], metrics["n_examples"]
    result = EvalResult(loss=scored.loss, perplexity=scored.perplexity, token_accuracy=scored.token_accuracy,
                        exact_match=exact_match, n_examples=len(examples), n_generated=n_generated,
                        n_tokens=scored.n_tokens)
    log.info("evaluated: %s", result.model_dump_json())
    return result


def merge_adapters(peft_model: nn.Module, folder: str | Path, *,
                   tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Fold the adapter into W0 and save a plain HF safetensors folder, atomically (temp folder + rename).

    ``merge_and_unload`` mutates the model it is called on, so this merges a deep copy: the caller's adapter
    model stays usable, at the cost of holding two copies of the model in memory while it runs.

    Returns:
        ``folder``, holding ``config.json``, ``model.safetensors`` (``generation_config.json`` when the
        model has one) and the tokenizer's files if one is passed; no adapter files.

    Raises:
        TypeError: ``peft_model`` has no adapter to merge.
        FileExistsError: ``folder`` exists (remove it first; whether to recompute is the caller's call).
    """
    if not hasattr(peft_model, "merge_and_unload"):
        raise TypeError(f"merge_adapters needs a PEFT model, got {type(peft_model).__name__}")
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists: remove it before merging into it again")
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.eval()
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex}"
    try:
        merged.save_pretrained(tmp)  # transformers 5 always writes safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("merged adapter into %s", folder)
    return folder


def _example_tensors(example: Mapping[str, Sequence[int] | torch.Tensor], index: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)  # [T]
    labels = torch.as_tensor(example["labels"], dtype=torch.long).reshape(-1)  # [T]
    if labels.shape != input_ids.shape:
        raise ValueError(f"example {index}: {len(labels)} labels for {len(input_ids)} input_ids")
    mask = example.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).all()):
        raise ValueError(f"example {index} is padded (attention_mask has zeros): pass unpadded examples")
    return input_ids, labels


def _pad_right(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack into ``[B, T]`` input_ids (pad 0), attention_mask (pad 0) and labels (pad -100)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        input_ids[b, :len(ids)], attention_mask[b, :len(ids)], labels[b, :len(ids)] = ids, 1, lab
    return input_ids, attention_mask, labels


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    if pad is None and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
    tokenizer.padding_side = "left"  # decoder-only: prompts must end where generation starts
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


class _StopStrings(StoppingCriteria):
    """Finish a row once its decoded new text contains a stop string.

    HF's own ``stop_strings`` maps the vocabulary to strings by probing the tokenizer, which fails for some
    tokenizers; decoding the same way as the returned text keeps stopping and cutting consistent.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], width: int) -> None:
        self.tokenizer, self.stops, self.width = tokenizer, list(stops), width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)  # [B]


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string: generation stops *after* it, at times mid-token."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text
