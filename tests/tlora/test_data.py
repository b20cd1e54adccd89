"""Tasks as data: stdlib-code mining, hash splits, user JSONL, labels on response tokens, calibration artifacts."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tlora.data import (
    IGNORE_INDEX,
    TaskSpec,
    build_calibration,
    compute_metric,
    fitting_rows,
    load_calibration,
    load_task,
    sample_calibration,
    save_calibration,
    split_of,
    tokenize_dataset,
    tokenize_example,
    tokenize_examples,
)
from tlora.stdlib_code import code_exact_match, mine_stdlib_code, normalize_code

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_tokenizer(*, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on one stdlib file (any text encodes); ``bos`` adds a BOS like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = (STDLIB / "textwrap.py").read_text().splitlines(keepends=True)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   name_or_path="tiny-bpe")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stdlib-code-cache")


@pytest.fixture(scope="module")
def mined(cache_dir) -> list[dict]:
    return mine_stdlib_code(cache_dir=cache_dir)  # the one full mining run of this file (~5 s)


@pytest.fixture(scope="module")
def task(mined, cache_dir):
    return load_task(TaskSpec(name="stdlib-code"), cache_dir=cache_dir)


def write_jsonl(path: Path, n: int, **extra) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} + {i}?", "response": str(2 * i), **extra}) + "\n")
    return path


# --- stdlib-code mining ------------------------------------------------------------------------------------------


def test_mining_finds_many_pairs_that_are_their_functions_source(mined):
    assert len(mined) > 2000
    assert len({r["qualname"] for r in mined}) == len(mined)
    parsed = 0
    for r in mined:
        assert r["prompt"].lstrip().startswith(("def ", "async def ", "@")), r["qualname"]
        assert r["response"].startswith("\n") and r["response"].strip()
        try:
            tree = ast.parse(r["prompt"] + r["response"])
        except SyntaxError:
            continue
        fn = tree.body[0]
        parsed += isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and len(fn.body) >= 2
    assert parsed / len(mined) > 0.99
    assert not any(r["path"].split("/")[0] in ("test", "idlelib", "lib2to3") for r in mined)


def test_mining_is_deterministic_across_processes_and_cached(mined, cache_dir):
    assert mine_stdlib_code(cache_dir=cache_dir) == mined  # read back from the JSONL cache
    assert len(list(cache_dir.glob("*.jsonl"))) == 1
    here = mine_stdlib_code(stdlib=STDLIB / "email")
    # Load the module by path: importing the tlora package would import torch and take seconds.
    module = Path(__file__).parents[2] / "tlora" / "stdlib_code.py"
    code = (f"import importlib.util as u, json, sys; s = u.spec_from_file_location('m', {str(module)!r}); "
            f"m = u.module_from_spec(s); s.loader.exec_module(m); "
            f"json.dump(m.mine_stdlib_code(stdlib={str(STDLIB / 'email')!r}), sys.stdout)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout)
    assert here == there and len(here) > 5


def test_code_exact_match_ignores_formatting_only():
    ref = "\n    x = compute(a, b)\n    return x\n"
    assert code_exact_match("x = compute(a,b)  # why\n\nreturn x", ref)
    assert code_exact_match("        x = compute(a, b)\n        return x   \n", ref)
    assert not code_exact_match("x = compute(b, a)\nreturn x", ref)
    assert not code_exact_match("x = compute(a, b\n", ref)  # does not parse, text differs
    assert normalize_code("\n    a = 1   \n\n    b = 2\n") == "a = 1\nb = 2"
    assert compute_metric("code_exact_match", ["return x", "return y"], ["\n    return x\n"] * 2) == \
        {"code_exact_match": 0.5}
    assert compute_metric("exact_match", [" 4 "], ["4"]) == {"exact_match": 1.0}
    assert compute_metric("none", ["a"], ["b"]) == {}


# --- tasks and splits --------------------------------------------------------------------------------------------


def test_split_is_a_stable_hash_and_roughly_80_10_10(mined):
    for key in ("json.decoder.JSONDecoder.decode", "x", ""):
        u = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64
        assert split_of(key) == ("test" if u < 0.1 else "validation" if u < 0.2 else "train")
    splits = [split_of(r["qualname"]) for r in mined]
    for name, expected in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert abs(splits.count(name) / len(splits) - expected) < 0.03
    # A larger validation fraction takes records from train only: test stays put.
    assert all(split_of(r["qualname"], validation=0.3) == "test" for r, s in zip(mined, splits, strict=True)
               if s == "test")


def test_stdlib_task_has_three_splits_of_id_prompt_response(task, mined):
    assert set(task) == {"train", "validation", "test"}
    assert sum(len(ds) for ds in task.values()) == len(mined)
    by_id = {r["qualname"]: r for r in mined}
    for name, ds in task.items():
        assert ds.column_names == ["id", "prompt", "response"]
        row = ds[0]
        assert split_of(row["id"]) == name and row["prompt"] == by_id[row["id"]]["prompt"]
    assert TaskSpec(name="stdlib-code").metric == "code_exact_match"


def test_max_examples_takes_a_stable_subset_per_split(task, cache_dir):
    small = load_task(TaskSpec(name="stdlib-code", max_examples=40), cache_dir=cache_dir)
    again = load_task(TaskSpec(name="stdlib-code", max_examples=40), cache_dir=cache_dir)
    for name in task:
        assert len(small[name]) == 40 and small[name]["id"][:] == again[name]["id"][:]
        assert set(small[name]["id"][:]) <= set(task[name]["id"][:])


def test_user_jsonl_works_with_no_code_change(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", 300, lang="en")
    task = load_task(TaskSpec(name="mine", source="json", path=str(path)))
    assert {n: len(ds) for n, ds in task.items()}.keys() == {"train", "validation", "test"}
    assert sum(len(ds) for ds in task.values()) == 300 and min(len(ds) for ds in task.values()) > 10
    row = task["test"][0]
    assert row["response"] == str(2 * int(row["prompt"].split()[2])) and split_of(row["prompt"]) == "test"
    templated = load_task(TaskSpec(name="mine", source="json", path=str(path), template="Q ({lang}): {prompt}\nA:"))
    assert templated["train"][0]["prompt"].startswith("Q (en): What is")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    Dataset.from_dict({"question": [r["prompt"] for r in rows], "answer": [r["response"] for r in rows]}).to_parquet(
        tmp_path / "qa.parquet")
    qa = load_task(TaskSpec(name="qa", source="json", path=str(tmp_path / "qa.parquet"), prompt_field="question",
                            response_field="answer"))
    for split in task:
        assert qa[split].to_dict() == task[split].to_dict()


def test_json_folder_keeps_its_own_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", 200)
    write_jsonl(tmp_path / "test.jsonl", 7)
    task = load_task(TaskSpec(name="mine", source="json", path=str(tmp_path)))
    assert len(task["test"]) == 7 and len(task["train"]) + len(task["validation"]) == 200
    by_dict = load_task(TaskSpec(name="mine", source="json", path={"train": str(tmp_path / "train.jsonl"),
                                                                    "dev": str(tmp_path / "test.jsonl")}))
    assert len(by_dict["validation"]) == 7


def test_bad_tasks_fail_before_training_with_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", 300)
    with pytest.raises(ValueError, match=r"no field\(s\) \['answer'\].*\['prompt', 'response'\]"):
        load_task(TaskSpec(name="mine", source="json", path=str(path), response_field="answer"))
    with pytest.raises(ValueError, match=r"no field\(s\) \['lang'\]"):
        load_task(TaskSpec(name="mine", source="json", path=str(path), template="{lang}: {prompt}"))
    with pytest.raises(ValueError, match=r"split .* is empty"):
        load_task(TaskSpec(name="tiny", source="json", path=str(write_jsonl(tmp_path / "tiny.jsonl", 3))))
    with pytest.raises(ValueError, match="does not exist"):
        load_task(TaskSpec(name="mine", source="json", path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "holes.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match="'response' is empty in 1 record"):
        load_task(TaskSpec(name="holes", source="json", path=str(tmp_path / "holes.jsonl")))
    with pytest.raises(ValueError, match="could not load hub dataset 'nobody/nothing'"):
        load_task(TaskSpec(name="hub", source="hub", path="nobody/nothing"))  # offline (conftest)
    with pytest.raises(ValidationError):
        TaskSpec(name="mine", source="json")  # no path
    with pytest.raises(ValidationError):
        TaskSpec(name="stdlib-code", promt_field="x")  # typo


# --- tokenization ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [False, True])
def test_labels_are_ignore_index_exactly_on_prompt_tokens(bos):
    tok = make_tokenizer(bos=bos)
    prompt, response = 'def f(x):\n    """Return x."""', "\n    return x\n"
    ex = tokenize_example(tok, prompt, response, max_length=128)
    n_prompt = len(tok(prompt)["input_ids"])  # with BOS when the tokenizer adds one
    ids, labels = ex["input_ids"], ex["labels"]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[:n_prompt] == tok(prompt)["input_ids"] and (ids[0] == tok.bos_token_id) == bos
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[n_prompt:-1]) == response
    assert ex["attention_mask"] == [1] * len(ids)


def test_truncation_is_counted_and_no_target_is_an_error(caplog):
    tok = make_tokenizer()
    prompt, response = 'def f(x):\n    """Return x."""', "\n    return x\n" * 4
    full = tokenize_example(tok, prompt, response, max_length=1000)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="tlora.data"):
        rows = tokenize_examples(tok, [prompt, "x"], [response, "y"], max_length=n_prompt + 3)
    assert rows[0]["input_ids"] == full[:n_prompt + 3] and rows[0]["labels"][n_prompt:] == full[n_prompt:n_prompt + 3]
    assert f"truncated 1 of 2 examples to max_length={n_prompt + 3} ({len(full) - n_prompt - 3} tokens" in caplog.text
    with pytest.raises(ValueError, match=r"1 of 2 examples keep no target token.*\['long'\]"):
        tokenize_examples(tok, [prompt, "x"], [response, "y"], max_length=n_prompt, ids=["long", "short"])
    with pytest.raises(ValueError, match="every response is empty"):
        tokenize_examples(tok, ["a", "b"], ["", ""], max_length=64)


def test_tokenize_dataset_rows_match_examples(tmp_path):
    tok = make_tokenizer()
    task = load_task(TaskSpec(name="mine", source="json", path=str(write_jsonl(tmp_path / "m.jsonl", 100))))
    rows = tokenize_dataset(task["validation"], tok, max_length=64)
    first = task["validation"][0]
    assert rows[0] == tokenize_example(tok, first["prompt"], first["response"], max_length=64)
    assert len(rows) == len(task["validation"])


@pytest.mark.slow
def test_demo_tokenizer_on_stdlib_code(task):
    from transformers import AutoTokenizer

    from tlora.models import ensure_demo_model

    tok = AutoTokenizer.from_pretrained(ensure_demo_model())  # converts the shipped GGUF once (~20 s)
    rows = task["validation"].select(range(20))
    for row, ex in zip(rows, tokenize_examples(tok, rows["prompt"][:], rows["response"][:], max_length=2048),
                       strict=True):
        n_prompt = sum(label == IGNORE_INDEX for label in ex["labels"])
        assert tok.decode(ex["input_ids"][:n_prompt]) == row["prompt"]
        assert tok.decode(ex["input_ids"][n_prompt:-1]) == row["response"]
        assert ex["input_ids"][-1] == tok.eos_token_id


# --- calibration -------------------------------------------------------------------------------------------------


def test_calibration_sample_is_seeded_and_rebuilt_exactly_from_its_record(task):
    tok, train = make_tokenizer(), task["train"]
    a = sample_calibration(train, 16, seed=3)
    assert a == sample_calibration(train, 16, seed=3) != sample_calibration(train, 16, seed=4)
    assert len(set(a)) == 16 and all(0 <= i < len(train) for i in a)
    with pytest.raises(ValueError, match="n_calib=5 must be between 1"):
        sample_calibration(train.select(range(4)), 5, seed=0)
    # Cut the longest samples: max_length just past the longest prompt keeps a target token in every sample.
    full = [tokenize_example(tok, train[i]["prompt"], train[i]["response"], max_length=10**6) for i in a]
    max_length = max(ex["labels"].count(IGNORE_INDEX) for ex in full) + 1
    calib = build_calibration(train, tok, task="stdlib-code", n_calib=16, seed=3, max_length=max_length)
    meta = calib.meta
    assert meta.indices == a and meta.ids == [train[i]["id"] for i in a] and meta.n_calib == 16
    assert meta.n_truncated == sum(len(ex["input_ids"]) > max_length for ex in full) > 0
    rebuilt = build_calibration(train, tok, task="stdlib-code", n_calib=16, seed=-1, max_length=max_length,
                                indices=meta.indices)
    assert torch.equal(rebuilt.input_ids, calib.input_ids) and rebuilt.meta.data_fingerprint == meta.data_fingerprint


def test_calibration_padding_and_batches(task):
    tok, train = make_tokenizer(), task["train"]
    calib = build_calibration(train, tok, task="stdlib-code", n_calib=6, seed=0, max_length=4096)
    lengths = calib.attention_mask.sum(1)
    assert calib.input_ids.dtype == torch.long and calib.input_ids.shape[1] == int(lengths.max())
    for row, n in enumerate(lengths.tolist()):
        ex = tokenize_example(tok, train[calib.meta.indices[row]]["prompt"], train[calib.meta.indices[row]]["response"],
                              max_length=4096)
        assert calib.input_ids[row, :n].tolist() == ex["input_ids"] and calib.labels[row, :n].tolist() == ex["labels"]
        assert (calib.input_ids[row, n:] == tok.pad_token_id).all() and (calib.labels[row, n:] == IGNORE_INDEX).all()
        assert (calib.attention_mask[row, n:] == 0).all()
    batches = calib.batches(4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert batches[1]["input_ids"].shape[1] == int(lengths[4:].max())
    assert torch.equal(batches[0]["labels"], calib.labels[:4, : int(lengths[:4].max())])


def test_calibration_artifact_round_trip_and_checksum(task, tmp_path):
    calib = build_calibration(task["train"], make_tokenizer(), task="stdlib-code", n_calib=8, seed=1, max_length=4096)
    folder = save_calibration(tmp_path / "calib", calib)
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.safetensors", "meta.json"]
    back = load_calibration(folder)
    assert back.meta == calib.meta and back.meta.stage == "calibration" and back.meta.tokenizer == "tiny-bpe"
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(back, key), getattr(calib, key))
    from safetensors.torch import save_file

    tampered = {k: getattr(calib, k).clone() for k in ("input_ids", "attention_mask", "labels")}
    tampered["labels"][0, -1] = 7
    save_file(tampered, folder / "calibration.safetensors")
    with pytest.raises(ValueError, match="data_fingerprint"):
        load_calibration(folder)


def test_fitting_rows_keeps_prompts_that_leave_a_target_token(tmp_path):
    tok = make_tokenizer()
    task = load_task(TaskSpec(name="mine", source="json", path=str(write_jsonl(tmp_path / "m.jsonl", 40))))
    split = task["train"]
    lengths = [len(tok(p)["input_ids"]) for p in split["prompt"]]
    limit = sorted(lengths)[len(lengths) // 2] + 1  # about half the prompts fit
    rows = fitting_rows(split, tok, limit)
    assert rows == [i for i, n in enumerate(lengths) if n < limit] and 0 < len(rows) < len(split)
    tokenize_examples(tok, split.select(rows)["prompt"], split.select(rows)["response"], max_length=limit)
    with pytest.raises(ValueError, match="no example's prompt fits"):
        fitting_rows(split, tok, min(lengths))
