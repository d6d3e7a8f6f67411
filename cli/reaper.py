"""The reaper of `companion dev`: stops the servers it started once it is gone, however it went (even SIGKILL).

    python -m cli.reaper        (started by `companion dev`, which keeps the write end of its stdin)

`companion dev` writes one line per server it starts, "PID SIGNAL" (the signal that stops that server cleanly), and
"PID 0" for one that ended meanwhile.
When its stdin closes, because `companion dev` exited or was killed, the reaper sends each server still running its
signal, waits up to STOP_TIMEOUT_S for it to end, then kills what is left. A `companion dev` that stopped its servers
itself leaves the reaper nothing to do.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_TIMEOUT_S = 4.0


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended and not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc here: it answered the signal, so count it as running


def reap(watched: list[tuple[int, int]], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Send each (pid, signal) its signal, then SIGKILL whatever is still running after ``timeout_s``."""
    for pid, signum in watched:
        if alive(pid):
            os.kill(pid, signum)
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid, _ in watched) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, _ in watched:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for `companion dev`, which stops everything in order
    watched = []
    for line in sys.stdin:  # until `companion dev` is gone
        pid, signum = map(int, line.split())
        if signum:
            watched.append((pid, signum))
        else:  # it ended: by the time the reaper reaps, its pid may be another process's
            watched = [item for item in watched if item[0] != pid]
    reap(watched)


if __name__ == "__main__":
    main()
