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
