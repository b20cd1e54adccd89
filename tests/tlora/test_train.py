"""Training through the HF Trainer: B only for TLoRA, resume gives the uninterrupted result."""

import torch
from safetensors.torch import load_file

from tests.tlora.test_adapters import _allocation, _random_spectrum
from tlora.adapters import init_adapters
from tlora.targets import find_targets
from tlora.train import optimizer_state_bytes, train


def _tlora(tiny_model, seed=1):
    base = tiny_model("llama", seed=seed)
    targets = find_targets(base, "all-linear")
    return init_adapters(base, _random_spectrum(base, targets), _allocation(targets, ranks=[2, 3]))


def _examples(samples, n=24):
    return [{"input_ids": s["input_ids"].tolist(), "labels": s["labels"].tolist()} for s in samples(n, seed=3)]


def test_tlora_trains_b_only_and_state_is_half_of_lora(tiny_model, tiny_tokenizer, samples, tmp_path):
    model = _tlora(tiny_model)
    a_before = {n: b.clone() for n, b in model.named_buffers() if "lora_A" in n}
    result = train(model, tiny_tokenizer, _examples(samples), output_dir=tmp_path / "t", max_steps=4,
                   learning_rate=1e-2, batch_size=4, logging_steps=2, progress=False)
    assert result.steps == 4
    b_params = sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)
    assert result.trainable_params == b_params
    # Adam keeps two moments per trained weight (fp32) and a step counter per tensor
    n_tensors = sum(1 for n, _ in model.named_parameters() if "lora_B" in n)
    assert result.optimizer_state_bytes == 2 * 4 * b_params + 4 * n_tensors
    assert all(torch.equal(b, a_before[n]) for n, b in model.named_buffers() if "lora_A" in n)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


def test_resume_gives_the_uninterrupted_adapter(tiny_model, tiny_tokenizer, samples, tmp_path):
    kwargs = dict(max_steps=6, learning_rate=1e-2, batch_size=4, save_steps=3, seed=7, progress=False,
                  warmup_ratio=0.2, scheduler="cosine", output_dir=tmp_path / "run")
    full = _tlora(tiny_model)
    train(full, tiny_tokenizer, _examples(samples), **kwargs)
    final = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    # An interruption after step 3 leaves exactly checkpoint-3 behind.
    for path in sorted((tmp_path / "run" / "checkpoint-6").iterdir()):
        path.unlink()
    (tmp_path / "run" / "checkpoint-6").rmdir()

    resumed = _tlora(tiny_model)
    result = train(resumed, tiny_tokenizer, _examples(samples), **kwargs)
    assert result.resumed_from is not None and result.resumed_from.endswith("checkpoint-3")
    again = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    assert set(again) == set(final) and any("lora_B" in k for k in final)
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=0, atol=0)
    b_now = {n: p for n, p in resumed.named_parameters() if "lora_B" in n}
    b_full = {n: p for n, p in full.named_parameters() if "lora_B" in n}
    assert all(torch.equal(b_now[n], b_full[n]) for n in b_full)


def test_bad_examples_are_rejected_before_training(tiny_model, tiny_tokenizer, tmp_path):
    import pytest

    model = _tlora(tiny_model)
    with pytest.raises(ValueError, match="no target tokens"):
        train(model, tiny_tokenizer, [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}],
              output_dir=tmp_path, max_steps=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="no examples"):
        train(model, tiny_tokenizer, [], output_dir=tmp_path, max_steps=1, learning_rate=1e-3)


def test_optimizer_state_bytes_counts_tensors():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(10)
    opt.step()
    assert optimizer_state_bytes(opt) == 10 * 4 * 2 + 4
