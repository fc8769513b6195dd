"""Volume sizes as users write them (``512M``, ``10G``, ``1.5T``) and as pyvol shows them.

All units are binary (``1G`` is 2**30 bytes) whatever the spelling (``G``, ``Gi``, ``GiB``,
``GB``): one meaning per letter, as ``truncate -s`` has it.  A bare number is refused rather
than guessed (bytes? megabytes?).
"""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
MIN_SIZE = 32 * MiB
"""The smallest ext4 with a journal that leaves room for data."""
MAX_SIZE = 16 * TiB
"""The largest file an ext4 host (4 KiB blocks) can hold, roughly."""

_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1024 * TiB}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([KMGTP])(?:I?B|I)?", re.IGNORECASE)
EXPECTED = ("must be a size with a unit such as 512M, 10G or 1.5T "
            "(binary units; at least 32M, at most 16T)")


def parse_size(text: str) -> int:
    """``10G`` -> 10737418240.  Raises ValueError saying what is expected."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        if re.fullmatch(r"\d+(\.\d+)?", text.strip()):
            raise ValueError(f"{text!r} has no unit: {EXPECTED}")
        raise ValueError(f"{text!r} {EXPECTED}")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[unit.upper()])
    if size < MIN_SIZE:
        raise ValueError(f"{text!r} is too small: {EXPECTED}")
    if size > MAX_SIZE:
        raise ValueError(f"{text!r} is too large: {EXPECTED}")
    return size


def format_size(size: int) -> str:
    """10737418240 -> ``10 GiB``; 1.5 TiB -> ``1.5 TiB``; at most two decimals."""
    for unit, factor in (("PiB", 1024 * TiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB),
                         ("KiB", KiB)):
        if size >= factor:
            text = f"{size / factor:.2f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    return f"{size} B"
