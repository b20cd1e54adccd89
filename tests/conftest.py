"""Shared fixtures: tiny random models built from configs, and calibration batches with padding."""

from __future__ import annotations

import os

# Tiny matrices: threads only contend for CI's two cores (a 32x48 SVD went from 0.2 ms to 0.2 s). numpy may
# already be loaded by a pytest plugin, which is why `make test` sets these variables too.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

VOCAB = 96


def build_tiny(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer random model of the given family (llama with GQA, gpt2 with Conv1D, bert encoder)."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=128, pad_token_id=0)
        model = BertModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


def make_samples(n: int, *, seed: int = 0, min_len: int = 4, max_len: int = 12) -> list[dict[str, torch.Tensor]]:
    """``n`` unpadded samples of random length; the first third of each is prompt (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: max(1, length // 3)] = -100
        samples.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                        "labels": labels})
    return samples


def collate(samples: list[dict[str, torch.Tensor]], batch_size: int, *, side: str = "right"
            ) -> list[dict[str, torch.Tensor]]:
    """Pad samples into batches (pad id 0, mask 0, labels -100) on the given side."""
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        width = max(len(s["input_ids"]) for s in chunk)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for s in chunk:
            pad = width - len(s["input_ids"])
            for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
                filler = torch.full((pad,), fill, dtype=s[key].dtype)
                parts = (s[key], filler) if side == "right" else (filler, s[key])
                out[key].append(torch.cat(parts))
        batches.append({k: torch.stack(v) for k, v in out.items()})
    return batches


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_model("llama" | "gpt2" | "bert", seed=0)``."""
    return build_tiny


@pytest.fixture
def samples() -> Callable[..., list[dict[str, torch.Tensor]]]:
    """Factory: ``samples(n, seed=0)`` -> unpadded samples."""
    return make_samples


@pytest.fixture
def batches() -> Callable[..., list[dict[str, torch.Tensor]]]:
    """Factory: ``batches(samples, batch_size, side="right")`` -> padded batches."""
    return collate


def build_tiny_tokenizer():
    """A word-level tokenizer over ``VOCAB`` ids ("<pad>"=0, "<s>"=1, "</s>"=2, then "t3".."t95")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()
