"""Reading a token from a file: what every service and client does with its --token-file.

Here, below all of them and free of heavy imports, so the control plane's settings, the trainer's
metric sink, the agent and the hidden-state service read a token file the same way and say the
same things about one that cannot work.
"""

from __future__ import annotations

from pathlib import Path


class CredentialsError(ValueError):
    """A token or TLS file that cannot be used; the message names it and says what to do."""


def read_token_file(path: Path, *, name: str) -> str:
    """The token in `path`, surrounding whitespace stripped. `name` says where the path came from
    (a flag such as `--token-file`, or a variable) and starts every error message."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialsError(f"{name} {path}: cannot read it ({exc.strerror or exc})") from None
    if not token:
        raise CredentialsError(f"{name} {path} is empty")
    return token
