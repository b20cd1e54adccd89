"""Model loading from folders and GGUF, fingerprints, and the library's import boundary."""

import ast
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_tokenizer
from tlora.models import DEMO_DIR, load_model, model_fingerprint

ROOT = Path(__file__).resolve().parents[2]


def test_fingerprint_is_stable_and_sees_one_weight(tiny_model):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_model("llama", seed=1))


def test_load_from_folder_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert tokenizer.pad_token == "<pad>"
    assert not loaded.training


def test_folder_without_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a model folder.*notes\.txt"):
        load_model(tmp_path)


def test_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="could not be read as a GGUF model"):
        load_model(fake)


def test_library_imports_neither_prefect_nor_mlflow():
    for path in sorted((ROOT / "tlora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"prefect", "mlflow", "flows"}, f"{path.name} imports {name}"


@pytest.mark.slow
def test_demo_model_converts_and_loads():
    model, tokenizer = load_model("demo")
    assert (DEMO_DIR / "model.safetensors").is_file()
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids).logits
    assert torch.isfinite(out).all()


def test_models_loaded_from_several_threads_at_once_stay_tied(tmp_path):
    """transformers patches PreTrainedModel.tie_weights at class level while loading; load_model serialises it."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

    tie = PreTrainedModel.tie_weights
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    build_tiny_tokenizer().save_pretrained(tmp_path / "m")
    with ThreadPoolExecutor(4) as pool:
        models = [m for m, _ in pool.map(lambda _: load_model(tmp_path / "m"), range(16))]
    assert PreTrainedModel.tie_weights is tie
    assert all(m.lm_head.weight is m.model.embed_tokens.weight for m in models)
    again, _ = load_model(tmp_path / "m")
    assert again.lm_head.weight is again.model.embed_tokens.weight
