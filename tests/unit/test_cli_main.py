"""The `eagle-dist` console script: one subcommand per tool, each reaching that tool's main."""

from __future__ import annotations

import importlib
import tomllib

import pytest
from helpers import REPO

from eagle_dist.cli import main as cli


def test_the_console_script_is_the_dispatcher_and_the_only_one():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"eagle-dist": "eagle_dist.cli.main:main"}


def test_usage_lists_every_tool_and_each_tool_has_a_main(capsys):
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    for name, (module, _) in cli.TOOLS.items():
        assert f"  {name} " in printed
        assert callable(importlib.import_module(module).main), module
    assert cli.main([]) == 2  # no tool named: the usage, and a usage error


def test_an_unknown_tool_is_one_error_with_the_usage(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown tool 'trian'" in err and "usage: eagle-dist TOOL" in err


@pytest.mark.parametrize("name", ["sweep", "checkpoint", "checkpoints"])
def test_a_tool_gets_the_rest_of_the_arguments(name, tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    args = ["report", str(missing)] if name == "sweep" else ["verify", str(missing)]
    code = cli.main([name, *args])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert str(missing) in captured.err  # the tool itself answered, naming the path it was given
