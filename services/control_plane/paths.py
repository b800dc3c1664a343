"""Job paths confined to the configured roots: a job may not read or write elsewhere on the host.

Each path field of a `TrainConfig` has the roots it may live under. A relative path is taken
under the field's first root; an absolute one must already be inside one of them. A `..`
component is refused outright (even one that would stay inside), symlinks are resolved before
the check (a link inside the root pointing out of it is refused), and the stored config carries
the resolved absolute path, so the trainer opens exactly what was checked.

What this cannot stop: a symlink created inside a root *after* submission. Whoever can write
into the roots is trusted as much as the trainer itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath


@dataclass(frozen=True)
class Roots:
    data: Path
    checkpoints: Path
    models: tuple[Path, ...] = ()  # where a local verifier may also be read from

    @classmethod
    def of(cls, *, data: Path, checkpoints: Path, models: tuple[Path, ...] = ()) -> Roots:
        return cls(
            data=Path(os.path.realpath(data)),
            checkpoints=Path(os.path.realpath(checkpoints)),
            models=tuple(Path(os.path.realpath(m)) for m in models),
        )

    def for_field(self, field: str) -> tuple[Path, ...]:
        """The roots `field` may point under, the default one (for relative paths) first."""
        if field == "save_path":
            return (self.checkpoints,)
        if field in ("data_path", "hidden_states_cache"):
            return (self.data,)
        if field == "verifier_name_or_path":
            return (*self.models, self.data, self.checkpoints)
        # Read-only inputs that are either data or a checkpoint.
        return (self.checkpoints, self.data) if field == "from_pretrained" else (self.data, self.checkpoints)


# TrainConfig fields that name files or folders on this host (`eval_prompts` too when path-like).
PATH_FIELDS = ("data_path", "save_path", "hidden_states_cache", "from_pretrained", "control_plane_token_file")


def is_local_model(value: object) -> bool:
    """A verifier named by a path on this host rather than a hub id (`org/name`) or
    `embedded:...`: absolute, or starting with `.` or `~`, or a `.gguf` file. A relative
    `org/name` is a hub id here: trainers run in their job's own folder, where no such folder is."""
    if not isinstance(value, str) or not value:
        return False
    return os.path.isabs(value) or value.startswith((".", "~")) or value.endswith(".gguf")


def is_path_like(value: object) -> bool:
    """A value that names a file or folder rather than a named set: a separator, a leading `.` or
    `~`, or a file suffix."""
    if not isinstance(value, str) or not value:
        return False
    return "/" in value or os.sep in value or value.startswith((".", "~")) or bool(PurePath(value).suffix)


class PathOutsideRoots(ValueError):
    """A job path that resolves outside its allowed roots (HTTP 422 naming the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(field: str, value: str | PurePath, roots: Roots) -> Path:
    """The resolved absolute path for `value`, or PathOutsideRoots naming `field` and the roots."""
    allowed = roots.for_field(field)
    raw = Path(value).expanduser()
    names = " or ".join(str(r) for r in allowed)
    if ".." in raw.parts:
        raise PathOutsideRoots(
            field, f"{field} {str(value)!r}: '..' is not allowed; give a path under {names}"
        )
    candidate = raw if raw.is_absolute() else allowed[0] / raw
    # realpath resolves every symlink that exists along the way, so a link escaping the root is
    # caught here; components that do not exist yet are kept as written (they cannot be links).
    resolved = Path(os.path.realpath(candidate))
    if not any(_inside(resolved, root) for root in allowed):
        via_link = " (through a symlink)" if resolved != candidate else ""
        raise PathOutsideRoots(
            field, f"{field} {str(value)!r} resolves to {resolved}{via_link}, outside {names}"
        )
    return resolved
