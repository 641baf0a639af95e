"""`lorakit serve` flags that are wrong fail at once with one line and exit 2, before the
model loads."""

import subprocess
import sys

import pytest

from lorakit.cli.serve import parse_adapters
from lorakit.errors import LorakitError


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", "serve", *args], capture_output=True, text=True, timeout=120)


def test_a_missing_adapter_root_is_one_line_and_exit_2():
    done = _serve("--adapter-root", "/nonexistent")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("lorakit serve: error: --adapter-root /nonexistent does not exist; "
                                   "create the folder or give an existing one")
    assert "Traceback" not in done.stderr


def test_bad_limits_and_keys_are_refused_before_the_model_loads(tmp_path):
    for args, words in [(["--max-queue", "-1"], "--max-queue"), (["--request-timeout", "0"], "--request-timeout"),
                        (["--max-body-bytes", "0"], "--max-body-bytes"), (["--load-on-demand"], "--adapter-root"),
                        (["--api-key", ""], "--api-key"), (["--chat-template", "chatlm"], "--chat-template 'chatlm'")]:
        done = _serve("--model", str(tmp_path / "no-such-model"), *args)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_parse_adapter_flags():
    assert parse_adapters(["sql=a/b", "chat=c=d"]) == {"sql": "a/b", "chat": "c=d"}
    with pytest.raises(LorakitError, match="NAME=DIR"):
        parse_adapters(["nodir"])
    with pytest.raises(LorakitError, match="twice"):
        parse_adapters(["a=x", "a=y"])


def test_a_port_out_of_range_or_taken_is_one_line_before_the_model_loads(tmp_path):
    import socket

    done = _serve("--model", str(tmp_path / "no-such-model"), "--port", "99999")
    assert done.returncode == 2 and done.stderr.strip() == (
        "lorakit serve: error: --port 99999 is not a TCP port; give one from 0 (any free port) to 65535, e.g. 8000")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _serve("--model", str(tmp_path / "no-such-model"), "--port", str(port))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "give another --port" in done.stderr
