"""Passwords and tokens: generating them and hashing them the way Mosquitto reads them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

MOSQUITTO_ITERATIONS = 101  # what mosquitto_passwd writes for `$7$`


def new_secret(nbytes: int = 24) -> str:
    """A random URL-safe secret (passwords, API tokens)."""
    return secrets.token_urlsafe(nbytes)


def mosquitto_hash(password: str, *, salt: bytes | None = None) -> str:
    """``$7$101$<salt>$<hash>``: PBKDF2-SHA512 with a 12-byte salt, as ``mosquitto_passwd`` writes.

    Mosquitto 2.0 silently ignores entries whose salt has another size.
    """
    salt = os.urandom(12) if salt is None else salt
    if len(salt) != 12:
        raise ValueError("mosquitto expects a 12-byte salt")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_ITERATIONS, 64)
    return f"$7${MOSQUITTO_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, encoded: str) -> bool:
    _, kind, iterations, salt_b64, hash_b64 = encoded.split("$")
    if kind != "7":
        return False
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt_b64), int(iterations), 64
    )
    return hmac.compare_digest(digest, base64.b64decode(hash_b64))
