"""The library's one channel to the user: fd 2, one line per message, never raising."""

from __future__ import annotations

import os
import subprocess
import sys

from safe_redirect.diagnostics import warn


def test_a_message_is_one_line_on_fd_2(capfd) -> None:
    warn("safe_redirect: one")
    warn("safe_redirect: two\n")  # a traceback ends in a newline: no empty line after it
    out, err = capfd.readouterr()
    assert (out, err) == ("", "safe_redirect: one\nsafe_redirect: two\n")


def test_text_the_encoding_lacks_is_escaped_not_raised(capfd) -> None:
    warn("bad \udcff byte")
    assert capfd.readouterr().err == "bad \\udcff byte\n"


def test_a_closed_fd_2_is_no_error() -> None:
    code = ("import os; from safe_redirect.diagnostics import warn; os.close(2); warn('x'); "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=os.environ)
    assert (result.returncode, result.stdout) == (0, "ok\n")


def test_a_spawned_process_says_what_it_cannot_patch() -> None:
    code = "from safe_redirect.bootstrap import process_startup; process_startup()"
    env = {**os.environ, "SAFE_REDIRECT_PATCH": "wandb, nope"}
    env.pop("SAFE_REDIRECT_ATTACH", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.stderr == "safe_redirect: SAFE_REDIRECT_PATCH: unknown name 'nope'\n"
