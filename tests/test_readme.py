"""Every command in the README's code blocks runs as written, on the shipped model, except those in EXCLUDED.

Commands run in this process through click's test runner (the code the console script runs, without a new
interpreter and torch import per command; test_cli.test_installed_console_script runs the script itself), from a
temporary folder holding the files they name. The Python API block runs as a script.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from helpers import run_cli

README = Path(__file__).resolve().parent.parent / "README.md"
EXCLUDED = {
    "python3 -m venv": "creates a virtual environment",
    ".": "activates it (a shell builtin)",
    "pip install": "installs from the network",
    "python -m pytest": "the test suite itself",
    "torchrun": "starts two processes that each load the model; tests/test_distributed.py runs them",
    "mtp-runtime train": "trains for minutes to hours (and names placeholder folders); tests/test_train.py trains "
                         "micro models with the same code",
    "mtp-runtime bench": "a benchmark runs for about a minute by design; tests/test_cli.py runs each of its "
                         "options on a tiny model",
    "mtp-runtime serve": "starts a server that runs until it is stopped; tests/test_serve.py starts one and sends "
                         "these requests",
    "curl": "needs the server started above; tests/test_serve.py sends the same requests",
    "kill": "stops the server started above",
}
"""Command prefixes not run here, and why."""
FILES = {"p.py": "def main():\n    print('hello')\n"}
"""Files the README's commands read, written into the folder they run in."""


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks as its words, shell quoting applied (`a && b` is two commands;
    `echo X | cmd` stays one, its pipe a word), comments dropped, backslash-continued lines joined."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # a backslash continues the line
            lexer = shlex.shlex(line, posix=True, punctuation_chars="&|")
            lexer.whitespace_split = True
            words, command = list(lexer), []
            for word in words + ["&&"]:
                if word == "&&":
                    commands += [command] if command else []
                    command = []
                else:
                    command.append(word)
    return commands


def _excluded(command: list[str]) -> str | None:
    text = shlex.join(command)
    return next((why for prefix, why in EXCLUDED.items() if text == prefix or text.startswith(prefix + " ")), None)


COMMANDS = readme_commands()
RUN = [c for c in COMMANDS if _excluded(c) is None]


def test_every_readme_command_is_run_or_excluded_with_a_reason():
    assert len(RUN) >= 6 and all(c[0] in ("mtp-runtime", "echo") for c in RUN), RUN
    assert {_excluded(c) for c in COMMANDS} - {None} == set(EXCLUDED.values())  # every exclusion is used


@pytest.mark.parametrize("command", RUN, ids=[shlex.join(c) for c in RUN])
def test_readme_command_runs_as_written(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    stdin = None
    if command[0] == "echo":  # echo TEXT | mtp-runtime ...
        assert command[2] == "|", command
        stdin, command = command[1] + "\n", command[3:]
    assert command[0] == "mtp-runtime"
    result = run_cli(*command[1:], input=stdin)
    assert result.exit_code == 0, (command, result.output[-2000:])
    assert result.stdout.strip()


def test_readme_python_api_block_runs(tmp_path, monkeypatch, capsys):
    (code,) = [block for block in _blocks("python") if "openai" not in block]  # test_serve runs the client
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()
