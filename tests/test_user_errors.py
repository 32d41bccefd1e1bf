"""What a new user types first: help texts that explain every flag under the name the user
typed, and a missing data folder answered with the command that creates it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_crossget import cli


@pytest.mark.parametrize("verb", ["chat", "serve"])
def test_every_flag_of_chat_and_serve_has_help(verb: str) -> None:
    import importlib

    module = importlib.import_module(cli.VERBS[verb][0])
    parser = module.build_parser()
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert undocumented == []
    dtype = next(a for a in parser._actions if a.dest == "dtype")
    assert "bf16" in dtype.help and "fp32" in dtype.help


def test_data_help_calls_itself_crossget_data(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["data", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: crossget data ") and "python -m" not in out
    with pytest.raises(SystemExit):
        cli.main(["data", "make", "--help"])
    assert capsys.readouterr().out.startswith("usage: crossget data make ")


def test_eval_on_a_missing_data_folder_names_the_command_that_makes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "data" / "testbed"
    argv = ["eval", "--model", "reference", "--task", "testbed", "--data", str(missing)]
    assert cli.main([*argv, "--budgets", "64", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"data folder {missing} does not exist" in err
    assert f"`crossget data make --out {missing}`" in err
    assert "data/testbed-demo/seed0-224px" in err and "python -m eval.testbed.data" not in err
    # A folder that is not a testbed export: the same command, not the module path.
    (tmp_path / "empty").mkdir()
    argv[argv.index(str(missing))] = str(tmp_path / "empty")
    assert cli.main([*argv, "--budgets", "64", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "crossget data make --out DIR" in err and "Traceback" not in err
