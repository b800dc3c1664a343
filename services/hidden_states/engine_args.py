"""Arguments after `--`: vLLM engine arguments, minus the flags this service owns.

The tutorial's launch command passes `--port` (and users pass `--host`) after `--`, next to
vLLM's own flags; the service binds that port itself, so they are taken out here.
"""

from __future__ import annotations

from dflash_core.config import ServeHiddenStatesConfig

_OWN_FLAGS = ("--port", "--host")


def config_with_engine_args(
    config: ServeHiddenStatesConfig, passthrough: list[str]
) -> ServeHiddenStatesConfig:
    """`config` with `--port`/`--host` from `passthrough` applied and the rest appended to engine_args."""
    updates: dict[str, object] = {}
    rest: list[str] = []
    items = iter(passthrough)
    for item in items:
        name, eq, value = item.partition("=")
        if name not in _OWN_FLAGS:
            rest.append(item)
            continue
        if not eq:
            value = next(items, "")
        if not value:
            raise SystemExit(f"error: {name} after `--` needs a value")
        if name == "--port":
            if not value.isdigit() or not 0 <= int(value) < 65536:
                raise SystemExit(f"error: --port after `--` must be a number in 0..65535, got {value!r}")
            updates["port"] = int(value)
        else:
            updates["host"] = value
    if rest:
        updates["engine_args"] = [*config.engine_args, *rest]
    return ServeHiddenStatesConfig.model_validate({**config.model_dump(), **updates}) if updates else config
