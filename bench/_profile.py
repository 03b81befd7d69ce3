"""Where the guard spends its CPU: py-spy samples it under open-loop load and this ranks functions.

py-spy (``pip install py-spy``) attaches to the running guard without restarting it; ``--nonblocking``
reads its memory without pausing it, so the profile barely disturbs what it measures. Idle time (the
event loop waiting in epoll, the log writer waiting on its queue) is not sampled, and ``--gil`` samples
only the thread holding the GIL, so shares are of the guard's busy Python time (a thread waiting for
the GIL is not counted as working).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from _measure import Target, run_open_loop

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _frame_key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    return f"{m.group('func')} ({_short(m.group('file'))})" if m else frame.strip()


def rank(raw: str, top: int = 25) -> list[str]:
    """Self and inclusive shares per function from py-spy's collapsed-stack ("raw") output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_key(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for key in set(frames):
            incl[key] += n
        m = _FRAME.match(frames[-1])
        files[m.group("file") if m else "?"] += n
    if not total:
        return ["py-spy collected no samples"]
    out = [f"{total} busy samples", "", "self time (the function itself, not its callees):"]
    out += [f"  {n / total:6.1%}  {k}" for k, n in own.most_common(top)]
    out += ["", "inclusive time, guard_agent/ and detectors/ functions (with callees):"]
    ours = [(k, n) for k, n in incl.most_common() if "guard_agent/" in k or "detectors/" in k]
    out += [f"  {n / total:6.1%}  {k}" for k, n in ours[:top]]
    out += ["", "self time by file:"]
    out += [f"  {n / total:6.1%}  {k}" for k, n in files.most_common(15)]
    return out


def profile_guard(target: Target, work: Path, seconds: float, load_core: int) -> list[str]:
    """py-spy ``target`` while the open-loop generator sends 1000 req/s to it."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return ["py-spy not found: pip install py-spy (into this environment) to profile the guard"]
    raw = work / "guard-on.pyspy.txt"
    argv = [
        "taskset",
        "-c",
        str(load_core),
        pyspy,
        "record",
        "--pid",
        str(target.pid),
        "--duration",
        f"{seconds:g}",
        "--rate",
        "200",
        "--nonblocking",
        "--gil",
        "--format",
        "raw",
        "--output",
        str(raw),
    ]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    load = threading.Thread(
        target=run_open_loop,
        args=(target,),
        daemon=True,
        kwargs={"rate": 1000, "seconds": seconds, "warmup": 0.5, "load_core": load_core, "proxy_core": 0},
    )
    load.start()
    try:
        _, err = spy.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    load.join(timeout=seconds + 60)
    if spy.returncode != 0 or not raw.exists():
        return [f"py-spy failed ({spy.returncode}): {err.strip()[-500:]}"]
    return rank(raw.read_text())
