"""Security: no pickle in any loading path, remote code off by default, artifact names kept inside the store,
servers on 127.0.0.1 unless configured otherwise."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from flows.config import ModelConfig
from flows.prepare import ModelParams
from flows.store import Store, check_names
from tests.flows.conftest import REPO

SOURCES = sorted([*(REPO / "tlora").rglob("*.py"), *(REPO / "flows").rglob("*.py")])
KEY = "0f" * 32
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def calls(path: Path) -> list[tuple[str, ast.Call]]:
    """Every call in a module as (dotted callee, node)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            out.append((ast.unparse(node.func), node))
    return out


def keyword(node: ast.Call, name: str):
    found = [k.value for k in node.keywords if k.arg == name]
    return found[0] if found else None


def test_the_scan_sees_the_sources():
    assert len(SOURCES) > 20 and any(p.name == "store.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_in_loading_paths(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & PICKLERS, (path, node.lineno)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in PICKLERS, (path, node.lineno)
            assert not (node.module == "torch" and "load" in {a.name for a in node.names}), (path, node.lineno)
    for callee, node in calls(path):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if callee.endswith("torch.load"):
            flag = keyword(node, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}: torch.load without weights_only"
        assert not callee.endswith(("read_pickle", "pickle.load", "pickle.loads")), where
        allow = keyword(node, "allow_pickle")
        assert not (isinstance(allow, ast.Constant) and allow.value is True), f"{where}: allow_pickle=True"
        serializer = keyword(node, "result_serializer")
        if keyword(node, "persist_result") is not None:  # Prefect's default result serializer is pickle
            assert isinstance(serializer, ast.Constant) and serializer.value == "json", f"{where}: pickled results"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_remote_code_is_never_turned_on_in_code(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            flag = keyword(node, "trust_remote_code")
            assert not (isinstance(flag, ast.Constant) and flag.value is True), (path, node.lineno)
        if isinstance(node, ast.FunctionDef):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            for arg, default in zip(args, defaults, strict=True):
                if arg.arg == "trust_remote_code" and default is not None:
                    assert isinstance(default, ast.Constant) and default.value is False, (path, node.lineno)
        if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "trust_remote_code" and node.value:
            assert isinstance(node.value, ast.Constant) and node.value.value is False, (path, node.lineno)


def test_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
    assert ModelParams.model_fields["trust_remote_code"].is_required()  # always passed from the config


@pytest.mark.parametrize(("stage", "key"), [
    ("../covariance", KEY), ("covariance/../../x", KEY), ("/etc", KEY), ("covariance", "../" + KEY[3:]),
    ("covariance", KEY[:-1] + "/"), ("covariance", "~"), ("covariance", ""), ("", KEY), ("covariance", KEY.upper()),
    ("covariance", KEY + "0"), ("..", KEY), ("covariance", "..%2f" + KEY[5:]),
])
def test_names_that_could_leave_the_store_are_refused(tmp_path, stage, key):
    store = Store(str(tmp_path / "stages"), tmp_path)
    for use in (lambda: store.uri(stage, key), lambda: store.verify(stage, key), lambda: store.path(stage, key),
                lambda: store.lock(stage, key).__enter__(), lambda: store.staging(stage, key).__enter__()):
        with pytest.raises(ValueError, match=r"stage name|artifact key"):
            use()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was created on the way


@given(stage=st.text(max_size=12), key=st.text(alphabet="0123456789abcdef./\\~-_", min_size=60, max_size=68))
def test_every_accepted_name_stays_inside_the_store(stage, key):
    base = Path("/srv/store/stages")
    store = Store(str(base), "/srv/store")
    try:
        check_names(stage, key)
    except ValueError:
        with pytest.raises(ValueError):
            store.uri(stage, key)
        return
    final = Path(store.uri(stage, key)).resolve()
    assert final.parent.parent == base and final.name == key


SERVER_FILES = [p for p in REPO.rglob("*") if p.is_file() and not {".git", ".venv", "artifacts", "tests",
                                                                    "node_modules"} & set(p.relative_to(REPO).parts)
                and (p.suffix in {".py", ".yaml", ".yml", ".toml", ".sh", ".cfg"} or p.name in {"Makefile",
                                                                                             "Dockerfile"})]


def test_servers_bind_loopback_unless_configured():
    """A literal wildcard bind (0.0.0.0, ::) anywhere the project starts servers must come from configuration."""
    wildcard = re.compile(r"""(0\.0\.0\.0|host\s*=\s*["']::["']|--host[ =]+::)""")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in SERVER_FILES
                 for i, line in enumerate(p.read_text(errors="ignore").splitlines(), 1)
                 if wildcard.search(line) and "${" not in line and "environ" not in line
                 and p.name != "docker-compose.yml"]  # container-side binds: see the next test
    assert offenders == []


def test_compose_services_listen_inside_their_network_and_publish_only_on_loopback():
    """In deploy/docker-compose.yml a server binds 0.0.0.0 inside its container (the only way the other containers
    reach it); what reaches the host is its published ports, and those must all be 127.0.0.1."""
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    published = [str(p) for svc in compose["services"].values() for p in svc.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
