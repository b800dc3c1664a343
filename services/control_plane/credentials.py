"""Who a bearer token belongs to: the admin, a trainer agent, or the trainer of one job attempt.

    Authorization: Bearer <token>

- admin (`--token-file`, or $DFLASH_CONTROL_PLANE_TOKEN): every route. The single-token setup of
  earlier versions is this one; agents and trainers may still use it.
- agent (`--agent-token-file`, one token per line): the agent routes (services/control_plane/
  access.py). A line `NAME TOKEN` binds the token to the agent called NAME, so that agent cannot
  speak for another; a line with the token alone serves agents of any name (simpler, weaker:
  agents sharing it can act for each other).
- trainer: minted for one attempt of one job when it starts, handed to its trainer in
  $DFLASH_CONTROL_PLANE_TOKEN, good only for posting that job's metrics. It is an HMAC of the job
  id and attempt under a key derived from the admin token, so it needs no storage and survives a
  restart of the control plane; changing the admin token revokes every trainer token.

Tokens are compared in constant time, and never echoed, logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

TRAINER_PREFIX = "dflash-trainer:"
_AGENT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # as AgentRegister.name
_TRAINER_KEY_LABEL = b"dflash control plane: trainer tokens v1"


class Role(str, Enum):
    ADMIN = "admin"
    AGENT = "agent"
    TRAINER = "trainer"


@dataclass(frozen=True)
class Principal:
    """The holder of a token. `agent`: the agent name an agent token is bound to (None: any);
    `job_id`, `attempt`: the job attempt a trainer token was minted for."""

    role: Role
    agent: str | None = None
    job_id: str | None = None
    attempt: int | None = None

    def speaks_for_agent(self, name: str) -> bool:
        if self.role is Role.ADMIN:
            return True
        return self.role is Role.AGENT and self.agent in (None, name)


ADMIN = Principal(Role.ADMIN)


class Unauthenticated(Exception):
    """No bearer token at all (401)."""


class UnknownToken(Exception):
    """A bearer token that is none of this control plane's (403)."""


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when it is no such header."""
    scheme, _, given = header.partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


def read_agent_tokens(path: Path) -> dict[str, str | None]:
    """The agent token file as {token: agent name or None}. Raises ValueError naming the file and
    line for anything else: an empty file, a bad name, a token listed twice."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"--agent-token-file {path}: cannot read it ({exc})") from None
    tokens: dict[str, str | None] = {}
    for number, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"--agent-token-file {path}, line {number}"
        if len(words) > 2:
            raise ValueError(f"{where}: expected `TOKEN` or `AGENT_NAME TOKEN`, got {len(words)} words")
        name, token = (None, words[0]) if len(words) == 1 else (words[0], words[1])
        if name is not None and not _AGENT_NAME.match(name):
            raise ValueError(f"{where}: agent name {name!r} may hold only letters, digits, '.', '_' and '-'")
        if token.startswith(TRAINER_PREFIX):
            raise ValueError(f"{where}: a token may not start with {TRAINER_PREFIX!r} (trainer tokens do)")
        if token in tokens:
            raise ValueError(f"{where}: this token is listed twice; give each agent its own")
        tokens[token] = name
    if not tokens:
        raise ValueError(f"--agent-token-file {path} lists no token")
    return tokens


class Credentials:
    """The tokens of one control plane. Without an admin token nothing is checked (`enabled`
    False): the browser guard keeps such a control plane to its own host (browser_guard.py)."""

    def __init__(self, *, admin: str | None, agents: dict[str, str | None] | None = None) -> None:
        if agents and admin is None:
            raise ValueError("agent tokens need an admin token (--token-file) as well")
        if admin is not None and admin in (agents or {}):
            raise ValueError("an agent token may not be the admin token (--token-file)")
        self._admin = admin.encode() if admin is not None else None
        self._agents = [(token.encode(), name) for token, name in (agents or {}).items()]
        self._trainer_key = (
            hmac.new(self._admin, _TRAINER_KEY_LABEL, hashlib.sha256).digest() if self._admin else None
        )

    @property
    def enabled(self) -> bool:
        return self._admin is not None

    def identify(self, authorization: str) -> Principal:
        """The holder of the request's `Authorization` header value. Raises Unauthenticated or
        UnknownToken."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated
        given = token.encode()
        if self._admin is not None and hmac.compare_digest(given, self._admin):
            return ADMIN
        if token.startswith(TRAINER_PREFIX):
            return self._trainer(token)
        agent = None
        for known, name in self._agents:  # every one compared: the time says nothing of the match
            if hmac.compare_digest(given, known):
                agent = Principal(Role.AGENT, agent=name)
        if agent is None:
            raise UnknownToken
        return agent

    def trainer_token(self, job_id: str, attempt: int) -> str | None:
        """The token of this attempt's trainer; None when the control plane has no token."""
        if self._trainer_key is None:
            return None
        return f"{TRAINER_PREFIX}{job_id}:{attempt}:{self._mac(job_id, attempt)}"

    def _mac(self, job_id: str, attempt: int) -> str:
        assert self._trainer_key is not None
        return hmac.new(self._trainer_key, f"{job_id}:{attempt}".encode(), hashlib.sha256).hexdigest()

    def _trainer(self, token: str) -> Principal:
        job_id, _, rest = token.removeprefix(TRAINER_PREFIX).partition(":")
        attempt, _, mac = rest.partition(":")
        if self._trainer_key is None or not job_id or not attempt.isdigit():
            raise UnknownToken
        if not hmac.compare_digest(mac.encode(), self._mac(job_id, int(attempt)).encode()):
            raise UnknownToken
        return Principal(Role.TRAINER, job_id=job_id, attempt=int(attempt))
