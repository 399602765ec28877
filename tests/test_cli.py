"""The command line: every stage's commands are reachable, and the public API resolves."""

import subprocess
import sys

import pytest

import histotransfer
from histotransfer.cli import COMMANDS, build_parser, main


def test_every_registered_command_is_dispatched_to_its_stage():
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)
    assert registered == set(COMMANDS)
    for command, module in COMMANDS.items():
        alone = build_parser(command)._subparsers._group_actions[0].choices
        assert command in alone, f"{module} does not register {command}"


@pytest.mark.parametrize("name", histotransfer.__all__)
def test_public_api_names_resolve(name):
    assert getattr(histotransfer, name) is not None


def test_public_api_names_stay_functions_once_every_subpackage_is_imported():
    """A subpackage import sets the package attribute of its name: no API name may be one."""
    code = (
        "import importlib, pkgutil, histotransfer as ht\n"
        "for m in pkgutil.iter_modules(ht.__path__): importlib.import_module(f'histotransfer.{m.name}')\n"
        "bad = [n for n in ht.__all__ if type(getattr(ht, n)).__name__ == 'module']\n"
        "assert not bad, bad\n"
        "assert ht.fine_tune.__module__ == 'histotransfer.finetune.run'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_api_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_function"):
        histotransfer.no_such_function  # noqa: B018


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(
        [
            "train",
            "--features",
            str(tmp_path / "missing"),
            "--labels",
            str(tmp_path / "l.csv"),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("histotransfer train: error:") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "histotransfer", "encoders"], capture_output=True, text=True, check=True
    ).stdout
    assert "densenet121" in out and "mormont-mtl-resnet50" in out
