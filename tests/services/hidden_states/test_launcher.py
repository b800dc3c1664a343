"""LocalService.launch: a child that dies says why, even when the cause is printed long before its end."""

from __future__ import annotations

import pytest

from services.hidden_states.launcher import LocalService

# A child that fails the way vLLM's does: the cause in an early line (the engine's own process),
# then a long traceback of the parent that ends in "See root cause above".
FAILING_CHILD = """
import sys
print("INFO starting")
print("ValueError: Free memory on device (1.2/79.2 GiB) on startup is less than desired")
for i in range(80):
    print(f"  File 'frame{i}.py', line {i}")
print("RuntimeError: Engine core initialization failed. See root cause above.")
sys.exit(1)
"""


def test_a_child_that_exits_is_reported_with_its_early_cause_and_its_last_lines(tmp_path):
    child = tmp_path / "failing_child.py"
    child.write_text(FAILING_CHILD)
    with pytest.raises(RuntimeError) as raised:
        LocalService.launch([str(child)], timeout_s=60.0)
    message = str(raised.value)
    assert "exit code 1" in message
    assert "Free memory on device" in message  # the cause, 80 lines before the end
    assert "See root cause above" in message  # and the end itself
    assert "INFO starting" not in message  # lines that name no error stay out
    assert "frame79.py" in message and "frame10.py" not in message
