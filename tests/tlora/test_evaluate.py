"""Evaluate and merge: loss = HF labels loss per example, batching changes nothing, merged logits = adapter logits."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tlora.adapters import init_adapters
from tlora.allocation import Allocation, ModuleAllocation
from tlora.evaluate import EvalResult, evaluate, generate, heldout_loss, merge_adapters, task_metrics
from tlora.spectrum import Spectrum
from tlora.targets import find_targets, weight_out_in

VOCAB = 96  # the tiny models' vocabulary (tests/conftest.py)


def _tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny models' ids: [PAD]=0, <s>=1, </s>=2, [UNK]=3, w4..w95; adds BOS."""
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    pad = {"pad_token": "[PAD]"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   **pad)


def _prompts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(4, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),),
                                                          generator=g)) for _ in range(n)]


def _greedy_oracle(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, full forward per step, argmax; stop at EOS."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


# ---- held-out loss -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_heldout_loss_equals_token_weighted_hf_loss(kind, tiny_model, samples):
    model = tiny_model(kind, seed=2)
    examples = samples(7, seed=3)
    nll, n_total, n_correct = 0.0, 0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = e["input_ids"][None], e["labels"][None]
            out = model(input_ids=ids, labels=labels)
            keep = labels[0, 1:] != -100
            nll += float(out.loss) * int(keep.sum())
            n_total += int(keep.sum())
            n_correct += int((out.logits[0, :-1].argmax(-1)[keep] == labels[0, 1:][keep]).sum())
    got = heldout_loss(model, examples, batch_size=3, progress=False)
    assert got.n_tokens == n_total
    assert got.loss == pytest.approx(nll / n_total, rel=1e-5)
    assert got.perplexity == pytest.approx(np.exp(nll / n_total), rel=1e-5)
    assert got.token_accuracy == pytest.approx(n_correct / n_total)


def test_heldout_loss_does_not_depend_on_batching_or_input_type(tiny_model, samples):
    model = tiny_model("llama", seed=2)
    examples = samples(9, seed=4, min_len=3, max_len=20)
    as_lists = [{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist()} for e in examples]
    one = heldout_loss(model, examples, batch_size=1, progress=False)
    for batched in (heldout_loss(model, examples, batch_size=4, progress=False),
                    heldout_loss(model, as_lists, batch_size=9, progress=False)):
        assert batched.n_tokens == one.n_tokens
        assert batched.loss == pytest.approx(one.loss, rel=1e-5)
        assert batched.token_accuracy == one.token_accuracy
    model.train()
    heldout_loss(model, examples[:2], progress=False)
    assert model.training  # the caller's mode is restored


def test_heldout_loss_rejects_padded_or_empty_examples(tiny_model):
    model = tiny_model("llama")
    ids = [5, 6, 7, 8]
    with pytest.raises(ValueError, match="no target tokens"):
        heldout_loss(model, [{"input_ids": ids, "labels": [-100, -100, -100, -100]}], progress=False)
    with pytest.raises(ValueError, match="padded"):
        heldout_loss(model, [{"input_ids": ids, "labels": ids, "attention_mask": [1, 1, 1, 0]}], progress=False)
    with pytest.raises(ValueError, match="3 labels"):
        heldout_loss(model, [{"input_ids": ids, "labels": ids[:3]}], progress=False)


# ---- generation and exact match ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_generation_equals_one_prompt_greedy(kind, tiny_model):
    model, tokenizer = tiny_model(kind, seed=5), _tokenizer()
    prompts = _prompts(5)
    tokenizer.padding_side = "right"
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert tokenizer.padding_side == "right"
    assert batched == [_greedy_oracle(model, tokenizer, p, 6) for p in prompts]
    assert batched == generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1, progress=False)
    assert all(b for b in batched)  # something was generated, and no prompt text came back
    assert not any(b.startswith(p) for b, p in zip(batched, prompts, strict=True))


def test_generation_cuts_at_stop_string_and_pads_with_eos_when_no_pad(tiny_model):
    model, tokenizer = tiny_model("llama", seed=5), _tokenizer(with_pad=False)
    prompts = _prompts(3, seed=1)
    full = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, progress=False)
    assert tokenizer.pad_token is None
    stop = full[0].split()[2]
    cut = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, stop_strings=[stop], progress=False)
    assert cut == [t[: t.find(stop)] if stop in t else t for t in full]
    assert cut[0] != full[0]


def test_task_metrics_counts_matches():
    got = task_metrics(["a ", "b", "c"], ["a", "x", "c"], match=lambda p, r: p.strip() == r.strip())
    assert got == {"exact_match": pytest.approx(2 / 3), "n_correct": 2, "n_examples": 3}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        task_metrics(["a", "b"], ["a"], match=str.__eq__)


def test_evaluate_combines_loss_and_exact_match_and_round_trips(tiny_model, samples):
    model, tokenizer = _adapter(tiny_model, "llama", "spectrum"), _tokenizer()  # a PEFT model, as flows pass
    examples, prompts = samples(4), _prompts(4)
    answers = generate(model, tokenizer, prompts, max_new_tokens=4, progress=False)
    references = [*answers[:3], "w4 w4"]
    result = evaluate(model, tokenizer, examples, prompts=prompts, references=references, match=str.__eq__,
                      max_new_tokens=4, batch_size=2, progress=False)
    loss = heldout_loss(model, examples, progress=False)
    assert result.exact_match == pytest.approx(3 / 4) and result.n_generated == 4
    assert (result.loss, result.n_tokens, result.n_examples) == (pytest.approx(loss.loss), loss.n_tokens, 4)
    assert EvalResult.model_validate_json(result.model_dump_json()) == result
    loss_only = evaluate(model, None, examples, progress=False)
    assert loss_only.exact_match is None and loss_only.n_generated is None
    with pytest.raises(ValueError, match="together"):
        evaluate(model, tokenizer, examples, prompts=prompts, match=str.__eq__, progress=False)
    with pytest.raises(ValueError, match="match"):
        evaluate(model, tokenizer, examples, prompts=prompts, references=references, progress=False)
    with pytest.raises(ValueError):
        EvalResult.model_validate({**result.model_dump(), "typo": 1})


# ---- merge ---------------------------------------------------------------------------------------------------


def _random_spectrum(model, targets, r_max=8, seed=0):
    """Top right singular vectors of W0·C for a random SPD C (as tests/tlora/test_adapters.py builds it)."""
    rng = np.random.default_rng(seed)
    vectors, values = {}, {}
    for name, t in targets.modules.items():
        x = rng.standard_normal((4 * t.d_in, t.d_in))
        w = weight_out_in(model.get_submodule(name)).detach().double().numpy()
        _, s, vh = np.linalg.svd(w @ (x.T @ x))
        k = min(r_max, t.d_in, t.d_out)
        vectors[name], values[name] = torch.from_numpy(vh[:k].copy()), torch.from_numpy(s[:k].copy())
    return Spectrum(vectors=vectors, values=values, r_max=r_max)


def _adapter(tiny_model, kind: str, init: str):
    """An adapter on a tiny model with B moved off zero, so merging has something to fold in."""
    base = tiny_model(kind, seed=1)
    targets = find_targets(base, "all-linear")
    modules = {n: ModuleAllocation(rank=[2, 5, 0, 3][i % 4], alpha=8.0 * (1 + i % 3), scaling=2.0 * (1 + i % 3))
               for i, n in enumerate(targets.names)}
    allocation = Allocation(modules=modules, r=4, alpha=8.0, mode="balanced", scale="reference",
                            budget_rank=sum(m.rank for m in modules.values()))
    spectrum = _random_spectrum(base, targets) if init == "spectrum" else None
    peft_model = init_adapters(base, spectrum, allocation, init=init)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    return peft_model


@pytest.mark.parametrize(("kind", "init"), [("llama", "spectrum"), ("gpt2", "spectrum"), ("llama", "lora"),
                                           ("gpt2", "lora"), ("llama", "pissa")])
def test_merged_model_matches_adapter_and_reloads(kind, init, tiny_model, tmp_path):
    peft_model = _adapter(tiny_model, kind, init)
    frozen_a = any("lora_A" in n for n, _ in peft_model.named_buffers())
    assert frozen_a == (init == "spectrum")  # TLoRA's A is a buffer, and merging must fold it in too
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert not torch.allclose(expected, tiny_model(kind, seed=1)(input_ids=ids).logits, atol=1e-3)

    folder = merge_adapters(peft_model, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp folder left behind
    assert {p.name for p in folder.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in n for n, _ in reloaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        # merging worked on a copy: the caller's adapter model is unchanged and still an adapter model
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())


def test_merge_saves_tokenizer_and_refuses_existing_folder(tiny_model, tmp_path):
    peft_model, tokenizer = _adapter(tiny_model, "llama", "spectrum"), _tokenizer()
    folder = merge_adapters(peft_model, tmp_path / "merged", tokenizer=tokenizer)
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    with pytest.raises(FileExistsError, match="exists"):
        merge_adapters(peft_model, folder)
    with pytest.raises(TypeError, match="PEFT model"):
        merge_adapters(tiny_model("llama"), tmp_path / "plain")
