"""glibc's SHA-512 crypt scheme (`$6$`), in pure Python: what `doveadm pw -s SHA512-CRYPT`
writes after its `{SHA512-CRYPT}` prefix.

Used by the `ssh` rental provider (`ssh.py`) when it creates a Dovecot login: doveadm hashes
the generated password (read from stdin), and this module checks that the hash it returned
is a hash of that password, without putting the hash in argv (`doveadm pw -t HASH` would,
and `ps` shows argv). The `crypt` module is gone from Python 3.13. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final

# Dovecot's scheme prefix in a passwd-file (`{SHA512-CRYPT}$6$...`).
HASH_SCHEME: Final = "{SHA512-CRYPT}"
# glibc's SHA-512 crypt ("$6$"): `$6$[rounds=N$]SALT$HASH`, salt at most 16 characters.
_SHA512_CRYPT_RE: Final = re.compile(
    r"^\$6\$(?:rounds=(\d{1,9})\$)?([./0-9A-Za-z]{0,16})\$([./0-9A-Za-z]{86})$"
)
_CRYPT_ALPHABET: Final = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SHA512_CRYPT_ROUNDS: Final = (5000, 1000, 999_999_999)  # default, min, max
# verify_sha512_crypt refuses more (doveadm writes the default 5000): a hash read from a host
# must not make mailrec compute for hours.
_VERIFY_MAX_ROUNDS: Final = 1_000_000


def sha512_crypt(password: str, salt: str, rounds: int | None = None) -> str:
    """glibc's SHA-512 crypt (`$6$`, Drepper's "Unix crypt using SHA-256 and SHA-512"), what
    `doveadm pw -s SHA512-CRYPT` writes after its `{SHA512-CRYPT}` prefix.

    Here so a hash can be checked against the password without handing the hash to a command
    (`doveadm pw -t HASH` would put it in argv, which `ps` shows); the `crypt` module is gone
    from Python 3.13. `rounds=None` is the default 5000, written without `rounds=`.
    """
    if any(ch not in _CRYPT_ALPHABET for ch in salt):
        raise ValueError("a crypt salt is made of [./0-9A-Za-z]")
    default, low, high = _SHA512_CRYPT_ROUNDS
    count = default if rounds is None else min(max(rounds, low), high)
    key = password.encode()
    salt_bytes = salt.encode("ascii")[:16]
    b = hashlib.sha512(key + salt_bytes + key).digest()
    a = hashlib.sha512(key + salt_bytes)
    length = len(key)
    while length > 64:
        a.update(b)
        length -= 64
    a.update(b[:length])
    length = len(key)
    while length:
        a.update(b if length & 1 else key)
        length >>= 1
    digest = a.digest()
    p_bytes = (hashlib.sha512(key * len(key)).digest() * (len(key) // 64 + 1))[: len(key)]
    ds = hashlib.sha512(salt_bytes * (16 + digest[0])).digest()
    s_bytes = (ds * (len(salt_bytes) // 64 + 1))[: len(salt_bytes)]
    for i in range(count):
        h = hashlib.sha512(p_bytes if i & 1 else digest)
        if i % 3:
            h.update(s_bytes)
        if i % 7:
            h.update(p_bytes)
        h.update(digest if i & 1 else p_bytes)
        digest = h.digest()
    out: list[str] = []
    for i in range(21):
        triple = (i, i + 21, i + 42)
        first, second, third = triple[i % 3 :] + triple[: i % 3]
        word = (digest[first] << 16) | (digest[second] << 8) | digest[third]
        for _ in range(4):
            out.append(_CRYPT_ALPHABET[word & 0x3F])
            word >>= 6
    word = digest[63]
    for _ in range(2):
        out.append(_CRYPT_ALPHABET[word & 0x3F])
        word >>= 6
    prefix = "$6$" if rounds is None else f"$6$rounds={count}$"
    return f"{prefix}{salt_bytes.decode('ascii')}${''.join(out)}"


def verify_sha512_crypt(password: str, hashed: str) -> bool:
    """Whether `hashed` (`$6$...`, with or without `{SHA512-CRYPT}`) is a hash of `password`."""
    match = _SHA512_CRYPT_RE.match(hashed.removeprefix(HASH_SCHEME))
    if match is None:
        return False
    rounds = int(match.group(1)) if match.group(1) else None
    if rounds is not None and rounds > _VERIFY_MAX_ROUNDS:
        return False
    expected = sha512_crypt(password, match.group(2), rounds)
    return hmac.compare_digest(expected.encode(), hashed.removeprefix(HASH_SCHEME).encode())
