import subprocess
import sys

from lorakit.cli import main


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: lorakit" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("lorakit ")


def test_every_verb_has_a_help_page(capsys):
    import argparse

    from lorakit.cli import build_parser

    parser = build_parser()
    parser.format_help()  # the verb summaries
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in verbs.choices.items():
        assert f"usage: lorakit {name}" in sub.format_help()


def test_ctrl_c_while_the_verbs_import_is_one_line_and_exit_130(capsys, monkeypatch):
    import lorakit.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["train"]) == 130
    assert capsys.readouterr().err == "lorakit: interrupted\n"
