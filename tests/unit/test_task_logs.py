"""The agent task runner's per-container log buffer (agent/tasks.py): bounded, cursors,
answers bounded; and container exit codes as ECS reports them."""

from __future__ import annotations

import os
import signal

from cellcloud.agent.tasks import _Container
from cellcloud.core import messages as m
from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.sandbox.container_guest import exit_code


def _ctr() -> _Container:
    return _Container(m.TaskContainer("web", ("sha256:" + "a" * 64,), ("srv",)))


def test_cursors_give_each_line_once() -> None:
    c = _ctr()
    c.add_lines("stdout", [[1, b"one"], [2, b"two"]])
    lines, cur, _ = c.lines_after(0, 1 << 20)
    assert [(ln.time_ms, ln.text, ln.stream) for ln in lines] == [
        (1, "one", "stdout"), (2, "two", "stdout")]
    c.add_lines("stderr", [[3, b"\xffthree"], "junk", [4, "not bytes"]])  # malformed: skipped
    lines, cur2, _ = c.lines_after(cur, 1 << 20)
    assert [(ln.text, ln.stream) for ln in lines] == [("\ufffdthree", "stderr")]
    assert c.lines_after(cur2, 1 << 20)[0] == [] and c.lines_after(cur2, 1 << 20)[1] == cur2


def test_the_buffer_is_bounded_and_counts_what_it_dropped() -> None:
    c = _ctr()
    line = b"x" * 1000
    n = 3 * DEFAULT_LIMITS.task_log_bytes_max // 1000
    for i in range(n):
        c.add_lines("stdout", [[i, line]])
    assert c.log_bytes <= DEFAULT_LIMITS.task_log_bytes_max
    assert c.dropped > 0 and c.dropped + len(c.logs) == n
    # A cursor older than the oldest kept line starts at the oldest kept one.
    lines, cur, used = c.lines_after(0, 1 << 30)
    assert lines[0].time_ms == c.dropped and cur == n and len(lines) == len(c.logs)
    # One answer carries at most its budget (at least one line), the rest comes next.
    part, cur_a, used_a = c.lines_after(0, 10_000)
    assert 0 < len(part) < len(lines) and used_a <= 10_000
    rest, cur_b, _ = c.lines_after(cur_a, 1 << 30)
    assert len(part) + len(rest) == len(lines) and cur_b == n


def test_exit_codes_are_128_plus_the_signal() -> None:
    for status, code in ((0, 0), (3 << 8, 3), (signal.SIGKILL, 137), (signal.SIGTERM, 143)):
        assert exit_code(status) == code
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert exit_code(status) == 137
