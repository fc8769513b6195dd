"""Volume names: [A-Za-z0-9][A-Za-z0-9_.-]{0,254}, everything else refused with a clear Err."""

from __future__ import annotations

import pytest

from plugin.errors import InvalidName
from plugin.names import validate_volume_name

ACCEPTED = [
    "a",
    "0",
    "data",
    "My_Volume-1.2",
    "a..b",  # dots inside a single path component are harmless
    "x-",
    "x.",
    "a" * 255,
    "f" * 64,  # docker run -v /path: anonymous volumes get 64 hex digits
    "0123456789abcdef" * 4,
]

REJECTED = [
    "",
    ".",
    "..",
    "../x",
    "x/..",
    "a/b",
    "/abs",
    "/",
    "x\0y",
    "\0",
    "a" * 256,
    ".hidden",
    "-flag",
    "_x",
    " x",
    "x ",
    "x y",
    "x\n",  # a trailing newline must not slip past an anchored regex
    "x\ny",
    "x\\y",
    "x:y",
    "x@y",
    "é",
    "vol-é",
    "Ⅻ",  # a unicode "letter" that is not ASCII
    "\uff11\uff12",  # fullwidth digits one and two
]


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted(name: str) -> None:
    assert validate_volume_name(name) == name


@pytest.mark.parametrize("name", REJECTED)
def test_rejected_with_clear_message(name: str) -> None:
    with pytest.raises(InvalidName) as excinfo:
        validate_volume_name(name)
    message = str(excinfo.value)
    if name:
        assert "invalid volume name" in message
        assert "A-Z a-z 0-9 _ . -" in message
    else:
        assert "no volume name" in message


@pytest.mark.parametrize("value", [None, 5, b"bytes", ["a"], {"a": 1}])
def test_non_strings_rejected(value: object) -> None:
    with pytest.raises(InvalidName):
        validate_volume_name(value)


def test_long_name_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidName) as excinfo:
        validate_volume_name("b" * 10_000)
    assert len(str(excinfo.value)) < 300
