"""The shared worker token read from a file, refused as ssh refuses a private key others can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rpcnode.errors import IkctlError

MIN_TOKEN_CHARS = 16  # a shorter shared secret is guessable from outside (the HMAC challenge allows retries)


class TokenFileError(IkctlError):
    """A token file that must not be used; the message names the file and what to do."""


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in `path` (surrounding whitespace removed): only the owner may read the file, the content is
    UTF-8 text of at least MIN_TOKEN_CHARS characters."""
    p = Path(path)
    try:
        st = p.stat()
        raw = p.read_bytes()
    except OSError as e:
        raise TokenFileError(f"cannot read {p}: {e.strerror}") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise TokenFileError(f"{p} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"chmod 600 {p}")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"{p} is not UTF-8 text; write the token as one line of text") from None
    if not token:
        raise TokenFileError(f"{p} is empty")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(f"the token in {p} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                             "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token
