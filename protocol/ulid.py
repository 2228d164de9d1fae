"""ULIDs: 128-bit ids, 48 bits of milliseconds then 80 random bits, in Crockford base32.

Sortable by creation time, unique without coordination, and 26 characters on the wire.
"""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def new_ulid(now: float | None = None) -> str:
    """A new ULID for the given UNIX time (seconds), or for now."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def valid_ulid(text: str) -> bool:
    """True when ``text`` is a canonical (upper-case) ULID."""
    return bool(_ULID_RE.match(text))
