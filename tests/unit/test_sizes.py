"""``-o size=`` values: binary units, a unit required, bounds, and text back."""

from __future__ import annotations

import pytest

from backends.image import ImageBackend
from backends.sizes import GiB, MiB, TiB, format_size, parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("512M", 512 * MiB),
    ("10G", 10 * GiB),
    ("10g", 10 * GiB),
    ("10GiB", 10 * GiB),
    ("10Gi", 10 * GiB),
    ("10GB", 10 * GiB),  # binary whatever the spelling: one meaning per letter
    ("1.5T", 1536 * GiB),
    ("100MiB", 100 * MiB),
    ("32768K", 32 * MiB),
    (" 2 G ", 2 * GiB),
    ("32M", 32 * MiB),
    ("16T", 16 * TiB),
])
def test_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "says"), [
    ("10", "no unit"),
    ("1.5", "no unit"),
    ("2048K", "too small"),
    ("31M", "too small"),
    ("17T", "too large"),
    ("1P", "too large"),
    ("", "must be a size"),
    ("ten G", "must be a size"),
    ("10X", "must be a size"),
    ("-1G", "must be a size"),
    ("1e3G", "must be a size"),
    ("10 G B", "must be a size"),
])
def test_parse_refuses_saying_what_is_expected(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as excinfo:
        parse_size(text)
    assert "such as 512M, 10G or 1.5T" in str(excinfo.value)
    assert "at least 32M" in str(excinfo.value)


@pytest.mark.parametrize(("size", "text"), [
    (10 * GiB, "10 GiB"),
    (1536 * GiB, "1.5 TiB"),
    (512 * MiB, "512 MiB"),
    (100 * MiB + 1, "100 MiB"),
    (1023, "1023 B"),
    (int(1.25 * GiB), "1.25 GiB"),
])
def test_format(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("text", ["32M", "512M", "10G", "1.5T", "16T", "1.25G"])
def test_round_trip_through_the_shown_text(text: str) -> None:
    size = parse_size(text)
    assert parse_size(format_size(size).replace(" ", "")) == size


def test_the_image_backend_declares_size_with_this_parser() -> None:
    [option] = [o for o in ImageBackend.options if o.name == "size"]
    assert option.parse("10G") == 10 * GiB
    assert option.show(10 * GiB) == "10 GiB"
    assert "512M" in option.help
