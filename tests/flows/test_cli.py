"""The ``tlora`` command line: configs refused before anything runs, budgets and methods parsed, help shown."""

import pytest
from typer.testing import CliRunner

from flows.cli import app, parse_budget, parse_method
from tests.flows.conftest import REPO
from tlora.allocation import Budget

DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.mark.parametrize(("args", "message"), [
    (["run", DEMO, "--set", "allocation.r=0"], "allocation.r"),
    (["run", DEMO, "--set", "train.epochs=3"], "train.epochs"),
    (["run", str(REPO / "configs" / "missing.yaml")], "does not exist"),
    (["sweep", DEMO, "--budget", "lots"], "budget 'lots'"),
    (["sweep", DEMO, "--method", "dora"], "method 'dora'"),
])
def test_bad_input_exits_2_and_names_the_problem(args, message):
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and message in result.output, result.output


def test_budgets_and_methods_parse():
    assert parse_budget("840") == parse_budget("rank=840") == Budget(rank=840)
    assert parse_budget("params=120000") == Budget(params=120000)
    assert parse_budget("default") is None
    assert parse_method("+Init+RA").label == "+Init+RA" and parse_method("lora").name == "lora"


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("run", "sweep", "lineage", "report"):
        assert command in result.output
