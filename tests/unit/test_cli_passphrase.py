"""`pyvol sync key add` reads the new passphrase from a terminal (twice) or one line of
stdin, never from its arguments."""

from __future__ import annotations

import getpass
import io
from collections.abc import Iterator

import pytest

from plugin import cli


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def typed(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    prompts: list[str] = []
    it: Iterator[str] = iter(answers)

    def fake(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(it)

    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr(getpass, "getpass", fake)
    return prompts


def test_a_terminal_asks_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = typed(monkeypatch, "s3cret pass", "s3cret pass")
    assert cli._new_passphrase("vault") == "s3cret pass"
    assert prompts == ["new passphrase for vault: ", "again: "]


def test_two_different_answers_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    typed(monkeypatch, "s3cret pass", "s3cret pasS")
    with pytest.raises(cli.ClientFailure, match="the two passphrases differ"):
        cli._new_passphrase("vault")


def test_stdin_gives_one_line_without_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("  spaced pass \r\nsecond line\n"))
    assert cli._new_passphrase("vault") == "  spaced pass "


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_an_empty_passphrase_is_refused(monkeypatch: pytest.MonkeyPatch, stdin: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(cli.ClientFailure, match="the new passphrase is empty"):
        cli._new_passphrase("vault")
