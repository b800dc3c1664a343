"""The job log file: lines as a terminal shows them, tail, reading on from an offset, size bound."""

from __future__ import annotations

from services.control_plane.job_logs import as_shown, read_from, tail, tail_with_offset, trim


def test_progress_bars_show_their_last_state():
    assert as_shown("epoch 0:  10%\repoch 0:  50%\repoch 0: 100%") == "epoch 0: 100%"
    assert as_shown("done\r   \r") == "done"
    assert as_shown("\r\r") == ""


def test_tail_returns_complete_lines_and_where_they_end(tmp_path):
    log = tmp_path / "train.log"
    assert tail_with_offset(log, 5) == ([], 0)  # no file yet
    log.write_text("a\nb\n\nc\npartial")
    lines, offset = tail_with_offset(log, 2)
    assert lines == ["b", "c"] and offset == len("a\nb\n\nc\n")
    with open(log, "a") as handle:
        handle.write(" line\nd\n")
    assert read_from(log, offset) == (["partial line", "d"], log.stat().st_size)
    assert read_from(log, log.stat().st_size) == ([], log.stat().st_size)


def test_tail_of_a_long_log_reads_from_the_end(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail(log, 3) == ["line 99997", "line 99998", "line 99999"]


def test_a_log_past_its_limit_keeps_its_newest_half(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i:05d} {'x' * 40}\n" for i in range(5000)))  # ~255 KB
    offset_before = log.stat().st_size
    assert trim(log, 64 * 1024)
    text = log.read_text()
    assert len(text.encode()) <= 64 * 1024
    first, second = text.splitlines()[:2]
    assert first.startswith("[control plane") and "older bytes dropped" in first
    assert second.startswith("line ") and second.endswith("x" * 40)  # cut at a line boundary
    assert tail(log, 1) == [f"line 04999 {'x' * 40}"]
    assert not trim(log, 64 * 1024)
    # A follower whose offset is past the new end starts over from the top.
    assert read_from(log, offset_before)[0][0] == first
