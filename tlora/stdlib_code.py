"""The demo task, stdlib-code: docstring → function-body pairs mined with ``ast`` from the Python standard library.

Every machine with Python has the standard library, so the demo task needs no download. A pair is a
function or method with a docstring and a short body: the *prompt* is its decorators, ``def`` line and
docstring as source, the *response* is the rest of the body (starting with the docstring's newline), so
``prompt + response`` is the function's own source, dedented to column 0. Mining walks the files in sorted
order and keeps the first of equal qualified names or equal sources, so the result is the same list on
every run of a given Python version.

The metric is exact match after :func:`normalize_code` (or equal ``ast.dump`` when both sides parse).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MINER_VERSION = 1
"""Bump when the mining rules change: it is part of the cache file's name."""
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3",
                       "ensurepip", "turtledemo", "pydoc_data", "__pycache__", "lib-dynload"})
"""Folders never mined: test suites (their bodies are asserts), vendored or generated code."""


def mine_stdlib_code(
    *,
    max_body_lines: int = 12,
    max_prompt_lines: int = 24,
    stdlib: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> list[dict[str, str | int]]:
    """Mine docstring → body pairs from the standard library, in a fixed order.

    Args:
        max_body_lines: keep functions whose body after the docstring has 1 to this many lines.
        max_prompt_lines: keep functions whose decorators, signature and docstring fit in this many lines.
        stdlib: the folder to mine; defaults to this interpreter's standard library.
        cache_dir: if given, the list is read from / written to a JSONL file there whose name carries
            the Python version, the miner version and the arguments.

    Returns:
        Records with ``qualname`` (``"json.decoder.JSONDecoder.decode"``), ``prompt``, ``response``,
        ``path`` (relative to the stdlib folder) and ``lineno``.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    cache = None
    if cache_dir is not None:
        tag = json.dumps([sys.version_info[:3], MINER_VERSION, max_body_lines, max_prompt_lines, stdlib and str(root)])
        cache = Path(cache_dir) / f"stdlib-code-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.jsonl"
        if cache.is_file():
            try:
                with cache.open(encoding="utf-8") as f:
                    return [json.loads(line) for line in f]
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("cache %s is corrupt: mining again", cache)
    records: list[dict[str, str | int]] = []
    seen_names: set[str] = set()
    seen_sources: set[str] = set()
    n_files = n_failed = 0
    for path in _python_files(root):
        n_files += 1
        rel = path.relative_to(root).as_posix()
        try:
            with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
                source = f.read()
            tree = ast.parse(source, filename=rel)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            n_failed += 1
            continue
        lines = source.splitlines(keepends=True)
        module = _module_name(rel)
        for qualname, node in _functions(tree.body, module):
            pair = _pair(node, lines, max_body_lines=max_body_lines, max_prompt_lines=max_prompt_lines)
            if pair is None or qualname in seen_names or (pair[0] + pair[1]) in seen_sources:
                continue
            seen_names.add(qualname)
            seen_sources.add(pair[0] + pair[1])
            records.append({"qualname": qualname, "prompt": pair[0], "response": pair[1], "path": rel,
                            "lineno": node.lineno})
    log.info("mined %d stdlib-code pairs from %d files under %s (%d did not parse)", len(records), n_files, root,
             n_failed)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        tmp.replace(cache)
    return records


def normalize_code(text: str) -> str:
    """Strip trailing whitespace per line, drop blank lines and dedent: formatting that carries no meaning."""
    lines = [line.rstrip() for line in text.expandtabs(4).splitlines()]
    return textwrap.dedent("\n".join(line for line in lines if line))


def code_exact_match(prediction: str, reference: str) -> bool:
    """Whether two function bodies are the same code: equal ``ast.dump`` if both parse, else equal normalized text.

    Comments, blank lines, indentation depth and quote style do not count; anything else does.
    """
    pred, ref = normalize_code(prediction), normalize_code(reference)
    if pred == ref:
        return True
    try:
        return ast.dump(ast.parse(pred)) == ast.dump(ast.parse(ref))
    except (SyntaxError, ValueError):
        return False


def _python_files(root: Path) -> Iterator[Path]:
    """``*.py`` files under ``root`` in sorted order, skipping :data:`SKIP_DIRS`."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder) / name


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _functions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Functions and methods defined in a module or class body, also under ``if``/``try`` (platform variants)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}.{node.name}", node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}.{node.name}")
        elif isinstance(node, ast.If):
            yield from _functions(node.body + node.orelse, prefix)
        elif isinstance(node, ast.Try):
            yield from _functions(node.body + [s for h in node.handlers for s in h.body] + node.orelse
                                  + node.finalbody, prefix)


def _pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], *, max_body_lines: int,
          max_prompt_lines: int) -> tuple[str, str] | None:
    """``(prompt, response)`` source of one function, or None when it does not make a clean pair."""
    body = node.body
    if not (len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return None  # no docstring, or nothing after it
    if len(body) == 2 and _is_placeholder(body[1]):
        return None
    start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
    doc_end, first, end = body[0].end_lineno, body[1].lineno - 1, node.end_lineno
    if first < doc_end:
        return None  # body shares the docstring's line (``"""doc"""; x = 1``)
    prompt_lines, body_lines = lines[start:doc_end], lines[doc_end:end]
    n_code = sum(1 for line in body_lines if line.strip())
    if not 1 <= n_code <= max_body_lines or len(prompt_lines) > max_prompt_lines:
        return None
    indent = node.col_offset
    if any(line.strip() and (line[:indent].strip() or "\t" in line[: len(line) - len(line.lstrip())])
           for line in prompt_lines + body_lines):
        return None  # a line indented less than the def (inside a string) or with tabs: dedenting would break it
    for n in (n for stmt in body[1:] for n in ast.walk(stmt)):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return None
        if indent and isinstance(n, ast.Constant | ast.JoinedStr) and n.lineno != n.end_lineno:
            return None  # dedenting would change what this multi-line string holds
    prompt = "".join(line[indent:] if line.strip() else "\n" for line in prompt_lines)
    response = "".join(line[indent:] if line.strip() else "\n" for line in body_lines)
    # The docstring's newline opens the response: BPE merges it with the body's indent ("\n    "), and the
    # prompt must tokenize alone as it will at generation time.
    return prompt.removesuffix("\n"), "\n" + response.rstrip("\n") + "\n"


def _is_placeholder(stmt: ast.stmt) -> bool:
    """A body that is only `pass`, `...` or a raise of NotImplementedError: nothing for a model to learn."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False
