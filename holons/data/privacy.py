"""Pseudonymous identifiers: keyed hashes (HMAC-SHA256 with a site secret) of patient, study and series ids.

A keyed hash cannot be reversed by hashing candidate ids without the secret, so the manifest can leave the
site while the same patient still maps to the same pseudonym on every run that uses the same secret.
Plain SHA-256 is available only when the user explicitly accepts it (short ids are easy to brute-force).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from holons.errors import HolonsError

SECRET_ENV = "HOLONS_SITE_SECRET"
PSEUDONYM_HEX = 32  # 128 bits: collisions are negligible for any archive

_NO_SECRET_MESSAGE = (
    f"no site secret for pseudonymizing patient/study/series ids: set ${SECRET_ENV} or pass --secret-file F "
    "(or --allow-unkeyed-hashes to accept plain SHA-256 hashes, which are weaker)"
)


class MissingSecretError(HolonsError):
    """No site secret was configured and unkeyed hashes were not explicitly allowed."""


def load_site_secret(secret_file: Path | None, allow_unkeyed: bool) -> bytes | None:
    """The site secret: the file when given, else ``$HOLONS_SITE_SECRET``.

    Returns None (unkeyed hashes) only when neither is set and ``allow_unkeyed`` is true; otherwise a missing,
    unreadable or empty secret raises a ``HolonsError`` that says how to provide one.
    """
    if secret_file is not None:
        try:
            secret = Path(secret_file).expanduser().read_bytes().strip()
        except OSError as e:
            raise HolonsError(f"cannot read the site secret file {secret_file}: {e.strerror}") from None
        if not secret:
            raise HolonsError(f"the site secret file {secret_file} is empty")
        return secret
    env = os.environ.get(SECRET_ENV, "").strip()
    if env:
        return env.encode("utf-8")
    if allow_unkeyed:
        return None
    raise MissingSecretError(_NO_SECRET_MESSAGE)


def pseudonymize(raw_id: str | None, secret: bytes | None) -> str:
    """Hex pseudonym of an identifier (HMAC-SHA256 when keyed, SHA-256 otherwise); "" for a missing id."""
    value = (raw_id or "").strip().strip("\x00").strip()
    if not value:
        return ""
    data = value.encode("utf-8", errors="surrogateescape")
    if secret is None:
        digest = hashlib.sha256(data).hexdigest()
    else:
        digest = hmac.new(secret, data, hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX]


def secret_fingerprint(secret: bytes | None) -> str:
    """A short public tag telling whether two runs used the same secret (it reveals nothing about it)."""
    if secret is None:
        return "unkeyed"
    return hmac.new(secret, b"holons/site-secret-fingerprint", hashlib.sha256).hexdigest()[:16]
