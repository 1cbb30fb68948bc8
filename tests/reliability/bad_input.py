"""Fault 6: bad input and odd use. Each case is run by the master of a fault loop (or by a fresh
interpreter where the case ends that interpreter) and checks what arrives, exactly.

- invalid-utf8: stray, truncated, overlong and surrogate-encoding byte sequences written to
  sys.stdout.buffer, split across writes, the last one cut at exit: what arrives is what
  bytes.decode("utf-8", "replace") makes of all of it, from the master and from a child;
- huge-write: one 100 MB write (1,000,000 lines) from the master and from a child, and a 10 MB
  line without a newline: every character arrives, in order, nothing spilled;
- not-a-str: write(b"x"), write(None), write(3), buffer.write("x"), buffer.write(None) raise the
  same TypeError as without the library, in the master and in a child; writing goes on after;
- nul: NUL bytes inside lines, at their ends, alone, through the text and the buffer layer;
- ansi: a storm of ANSI escapes (colours, cursor moves, line clears, OSC titles, \\r progress
  bars, backspaces, bells) in random pieces from the master and four children: each one's text
  arrives exactly as written;
- closed-stdout: sys.stdout closed by the user (master and child), fd 1 closed (child): the same
  error as without the library, stderr still captured, uninstall() and exit clean;
- replaced-stdout: sys.stdout replaced by the user after install(): the replacement is the
  user's (not captured, left in place by uninstall()); what reaches the original stream object
  (sys.__stdout__, a tee that forwards to it) is captured once, in the master and in a child;
- uninstall-twice: twice in the master, twice in a child, from four threads at once;
- nested: install() in a child and again in its child: each session gets the lines of its
  process and of every process below it, once, in order;
- shutdown: the master's interpreter ends (no join) while children and a daemon thread print:
  it exits 0 within its bounds, children finish to their terminals, what was delivered is each
  child's lines from the start, once, in order, and /dev/shm is clean.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import safe_redirect
from safe_redirect import Record

from .faults import segments_of
from .tally import Tally, child_exit, common_prefix_length, reap, wait_until

CASES = ("invalid-utf8", "huge-write", "not-a-str", "nul", "ansi", "closed-stdout",
         "replaced-stdout", "uninstall-twice", "nested", "shutdown")


def bad_input(cases: tuple[str, ...] = CASES, repeats: int = 1) -> Tally:
    tally = Tally(fault="bad input and odd use")
    for _ in range(repeats):
        for name in cases:
            tally.runs += 1
            _CASES[name](tally)
    return tally


def _texts_by_pid(records: list[Record]) -> dict[int, str]:
    out: dict[int, str] = {}
    for record in records:
        out[record.pid] = out.get(record.pid, "") + record.text
    return out


def _count_text(tally: Tally, who: str, expected: str, got: str) -> None:
    """One writer's text: its lines are counted; any difference is a problem."""
    tally.count_lines(who, expected.splitlines(), got.splitlines())
    if got != expected:
        at = common_prefix_length(got, expected)
        tally.problem(f"{who}: text differs at {at}: {got[at:at + 30]!r} vs "
                      f"{expected[at:at + 30]!r}")


def _in_master_and_child(tally: Tally, case: str, write: Callable[[], None], expected: str,
                         **install: object) -> None:
    """Run `write` in the master and in a forked child under one session; both texts exact."""
    records: list[Record] = []
    with safe_redirect.install(records.append, **install) as session:  # type: ignore[arg-type]
        write()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child_exit(write)
        if reap(pid, 60) != 0:
            tally.problem(f"{case}: the child failed or hung")
        if not session.flush(timeout=60):
            tally.hang(f"{case}: flush")
        spilled = session.stats().spilled_bytes
    texts = _texts_by_pid(records)
    _count_text(tally, f"{case}: master", expected, texts.get(os.getpid(), ""))
    _count_text(tally, f"{case}: child", expected, texts.get(pid, ""))
    if spilled:
        tally.problem(f"{case}: {spilled} bytes spilled")


# -- invalid UTF-8

_BAD_BYTES = [
    b"ascii line\n",
    *[bytes([b]) for b in range(0x80, 0x100, 7)], b"\n",  # stray continuation and lead bytes
    b"truncated two \xc3\n", b"truncated three \xe2\x82\n", b"truncated four \xf0\x9f\x98\n",
    b"overlong \xc0\xaf \xe0\x80\xaf\n", b"surrogate \xed\xa0\x80\xed\xbf\xbf\n",
    b"beyond U+10FFFF \xf4\x90\x80\x80\n", b"split snowman \xe2", b"\x98", b"\x83 whole\n",
    b"good \xf0\x9f\x98\x80 emoji\n", b"ends cut at exit \xe2\x82",
]


def _invalid_utf8(tally: Tally) -> None:
    def write() -> None:
        for blob in _BAD_BYTES:
            sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()

    _in_master_and_child(tally, "invalid-utf8", write,
                         b"".join(_BAD_BYTES).decode("utf-8", "replace"))


# -- a huge write

def _huge_write(tally: Tally) -> None:
    lines = "".join(f"{i:09d} {'h' * 89}\n" for i in range(1_000_000))  # 100 MB, one write
    one_line = "".join(f"{i:09d}" for i in range(1_000_000)) + "\n"  # 10 MB, no line end
    expected = {"lines": hashlib.sha256(lines.encode()).hexdigest(),
                "one line": hashlib.sha256(one_line.encode()).hexdigest()}
    hashes: dict[tuple[int, str], hashlib._Hash] = {}
    sizes: dict[tuple[int, str], int] = {}
    current = {"what": "lines"}

    def on_output(record: Record) -> None:  # hashes, not copies: memory stays small
        key = (record.pid, current["what"])
        hashes.setdefault(key, hashlib.sha256()).update(record.text.encode())
        sizes[key] = sizes.get(key, 0) + len(record.text)

    with safe_redirect.install(on_output) as session:
        for what, text in (("lines", lines), ("one line", one_line)):
            current["what"] = what
            sys.stdout.write(text)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                child_exit(lambda text=text: sys.stdout.write(text))
            if reap(pid, 90) != 0:
                tally.problem(f"huge-write: the child writing {what} failed or hung")
            if not session.flush(timeout=90):
                tally.hang("huge-write: flush")
            for who, p in (("master", os.getpid()), ("child", pid)):
                size = len(text)
                got = hashes.get((p, what))
                n = text.count("\n")
                tally.written += n
                if got is None or got.hexdigest() != expected[what]:
                    tally.lost += n
                    tally.problem(f"huge-write: {who}'s {what}: {sizes.get((p, what), 0)} of "
                                  f"{size} characters, or not the same ones")
                else:
                    tally.delivered += n
        if session.stats().spilled_bytes:
            tally.problem("huge-write: bytes spilled")


# -- not a str

def _type_errors() -> list[str]:
    """What each bad write raises, as `type: message`."""
    out = []
    for write, arg in ((sys.stdout.write, b"x"), (sys.stdout.write, None),
                       (sys.stdout.write, 3), (sys.stdout.buffer.write, "x"),
                       (sys.stdout.buffer.write, None)):
        try:
            write(arg)  # type: ignore[operator]
            out.append("no error")
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _not_a_str(tally: Tally) -> None:
    plain = _type_errors()
    records: list[Record] = []
    r, w = os.pipe()
    with safe_redirect.install(records.append) as session:
        hooked = _type_errors()
        print("after the errors")

        def child() -> None:
            os.write(w, "\n".join(_type_errors()).encode())
            print("child after the errors")

        pid = fork_and_reap(tally, "not-a-str", child)
        os.close(w)
        in_child = os.read(r, 65536).decode().split("\n")
        os.close(r)
        session.flush(timeout=30)
    tally.written += len(plain) * 2
    for where, got in (("master", hooked), ("child", in_child)):
        same = sum(a == b for a, b in zip(plain, got, strict=False))
        tally.delivered += same
        if got != plain:
            tally.lost += len(plain) - same
            tally.problem(f"not-a-str: {where} raised {got}, without the library {plain}")
    texts = _texts_by_pid(records)
    _count_text(tally, "not-a-str: master", "after the errors\n", texts.get(os.getpid(), ""))
    _count_text(tally, "not-a-str: child", "child after the errors\n", texts.get(pid, ""))


def fork_and_reap(tally: Tally, case: str, body: Callable[[], object]) -> int:
    pid = os.fork()
    if pid == 0:
        child_exit(body)
    code = reap(pid, 60)
    if code is None:
        tally.hang(f"{case}: a child")
    elif code != 0:
        tally.problem(f"{case}: a child exited {code}")
    return pid


# -- NUL bytes

def _nul(tally: Tally) -> None:
    text = "a\x00b\n\x00\n\x00\x00\x00\nend with nul\x00\n"

    def write() -> None:
        sys.stdout.write(text)
        sys.stdout.buffer.write(text.encode())
        sys.stdout.buffer.flush()

    _in_master_and_child(tally, "nul", write, text + text)


# -- an ANSI storm

_ESCAPES = ["\x1b[31m", "\x1b[1;32;44m", "\x1b[0m", "\x1b[2K", "\x1b[1A", "\x1b[10D", "\x1b[?25l",
            "\x1b[?25h", "\x1b]0;window title\x07", "\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\",
            "\r", "\b\b", "\t", "\x07", "\x1b[38;5;208m", "\x1b[s", "\x1b[u", "\x1bc"]


def ansi_storm(seed: int, size: int = 200_000) -> list[str]:
    """Pieces of text that, joined, are a progress-bar-and-colour storm of about `size` chars."""
    rng = random.Random(seed)
    text = []
    n = 0
    while n < size:
        if rng.random() < 0.1:
            piece = f"\r[{'#' * rng.randint(0, 40):<40}] {rng.randint(0, 100)}%"
        elif rng.random() < 0.5:
            piece = rng.choice(_ESCAPES)
        else:
            piece = "".join(rng.choice("abc xyz☃é0123456789") for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.05:
            piece += "\n"
        text.append(piece)
        n += len(piece)
    joined = "".join(text) + "\n"
    cuts = sorted(rng.sample(range(1, len(joined)), 2000))
    return [joined[a:b] for a, b in zip([0, *cuts], [*cuts, len(joined)], strict=True)]


def _ansi(tally: Tally) -> None:
    records: list[Record] = []
    with safe_redirect.install(records.append) as session:
        pieces = {k: ansi_storm(k) for k in range(5)}
        pids = {}
        for k in range(1, 5):
            pid = os.fork()
            if pid == 0:
                child_exit(lambda k=k: [sys.stdout.write(p) for p in pieces[k]])
            pids[pid] = k
        for piece in pieces[0]:
            sys.stdout.write(piece)
        for pid in pids:
            if reap(pid, 60) != 0:
                tally.problem(f"ansi: child {pid} failed or hung")
        if not session.flush(timeout=60):
            tally.hang("ansi: flush")
    pids[os.getpid()] = 0
    texts = _texts_by_pid(records)
    for pid, k in pids.items():
        _count_text(tally, f"ansi: writer {k}", "".join(pieces[k]), texts.get(pid, ""))


# -- closed stdout

_CLOSED_MASTER = """
import os, sys
def attempt():
    sys.stdout.close()
    try:
        print("into a closed stream")
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

if sys.argv[1] == "plain":
    print("error:", attempt(), file=sys.stderr)
    sys.exit(0)
import safe_redirect
got = []
session = safe_redirect.install(got.append)
error = attempt()
print("stderr still captured", file=sys.stderr)
session.flush(10)
session.uninstall()
print("error:", error, file=sys.stderr)
print("delivered:", repr("".join(r.text for r in got)), file=sys.stderr)
"""


def _closed_stdout(tally: Tally) -> None:
    # the master closes its own sys.stdout: a fresh interpreter, with and without the library
    runs = {}
    for how in ("plain", "hooked"):
        done = subprocess.run([sys.executable, "-c", _CLOSED_MASTER, how], capture_output=True,
                              text=True, timeout=60, env=_clean_env())
        runs[how] = done
        if done.returncode != 0:
            tally.problem(f"closed-stdout: the {how} master exited {done.returncode}: "
                          f"{done.stderr[-500:]}")
    plain_error = [x for x in runs["plain"].stderr.splitlines() if x.startswith("error:")]
    hooked = runs["hooked"].stderr.splitlines()
    hooked_error = [x for x in hooked if x.startswith("error:")]
    tally.written += 2
    if hooked_error != plain_error or not plain_error:
        tally.problem(f"closed-stdout: master raised {hooked_error}, without the library "
                      f"{plain_error}")
        tally.lost += 1
    else:
        tally.delivered += 1
    if "delivered: 'stderr still captured\\n'" not in hooked:
        tally.problem(f"closed-stdout: the master's stderr was not captured: {hooked}")
        tally.lost += 1
    else:
        tally.delivered += 1
    # a child closes sys.stdout, another closes fd 1
    plain = []
    for closer in (_close_sys_stdout, _close_fd_1):
        r, w = os.pipe()
        fork_and_reap(tally, "closed-stdout", lambda closer=closer, w=w: closer(w))
        os.close(w)
        plain.append(os.read(r, 4096).decode())
        os.close(r)
    records: list[Record] = []
    with safe_redirect.install(records.append) as session:
        pids = []
        for k, closer in enumerate((_close_sys_stdout, _close_fd_1)):
            r, w = os.pipe()
            pid = fork_and_reap(tally, "closed-stdout", lambda closer=closer, w=w: closer(w))
            os.close(w)
            got = os.read(r, 4096).decode()
            os.close(r)
            pids.append(pid)
            tally.written += 1
            if got != plain[k]:
                tally.problem(f"closed-stdout: {closer.__name__} in a child: {got!r}, without "
                              f"the library {plain[k]!r}")
                tally.lost += 1
            else:
                tally.delivered += 1
        session.flush(timeout=30)
    texts = _texts_by_pid(records)
    for pid in pids:
        err = "".join(r.text for r in records if r.pid == pid and r.stream == "stderr")
        _count_text(tally, "closed-stdout: a child's stderr", "stderr still works\n", err)
        if "into a closed" in texts.get(pid, ""):
            tally.problem("closed-stdout: a write that failed was captured")


def _close_sys_stdout(report: int) -> None:
    print("before the close")
    sys.stdout.close()
    try:
        print("into a closed stream")
        os.write(report, b"no error")
    except Exception as exc:
        os.write(report, f"{type(exc).__name__}: {exc}".encode())
    print("stderr still works", file=sys.stderr)
    sys.stdout = io.StringIO()  # so that the exit's flush does not fail


def _close_fd_1(report: int) -> None:
    os.close(1)
    try:
        print("into a closed fd" + "x" * 10_000)  # larger than the buffer: written at once
        os.write(report, b"no error")
    except Exception as exc:
        os.write(report, f"{type(exc).__name__}: {exc}".encode())
    print("stderr still works", file=sys.stderr)
    sys.stdout = io.StringIO()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SAFE_REDIRECT_")}


# -- sys.stdout replaced by the user

def _replaced_stdout(tally: Tally) -> None:
    records: list[Record] = []
    original = sys.stdout
    users = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            users.write(text)
            return original.write(text)

    with safe_redirect.install(records.append) as session:
        print("before the replacement")
        sys.stdout = users
        try:
            print("into the user's StringIO")
            print("through the original object", file=sys.__stdout__)
            pid = fork_and_reap(tally, "replaced-stdout", lambda: (
                print("child into its StringIO"),
                print("child through the original object", file=sys.__stdout__)))
            sys.stdout = Tee()
            print("through the user's tee")
        finally:
            sys.stdout = original
        print("after the user put it back")
        session.flush(timeout=30)
        sys.stdout = users
        session.uninstall()  # must leave the user's object in place
        still_users = sys.stdout is users
        sys.stdout = original
    if not still_users:
        tally.problem("replaced-stdout: uninstall() took the user's sys.stdout away")
    texts = _texts_by_pid(records)
    _count_text(tally, "replaced-stdout: master",
                "before the replacement\nthrough the original object\nthrough the user's tee\n"
                "after the user put it back\n", texts.get(os.getpid(), ""))
    _count_text(tally, "replaced-stdout: child", "child through the original object\n",
                texts.get(pid, ""))


# -- uninstall twice

def _uninstall_twice(tally: Tally) -> None:
    records: list[Record] = []
    session = safe_redirect.install(records.append)
    print("master line")

    def child() -> None:
        print("child line")
        session.uninstall()
        session.uninstall()
        print("child after its uninstall")  # terminal only

    pid = fork_and_reap(tally, "uninstall-twice", child)
    errors: list[str] = []

    def uninstall() -> None:
        try:
            session.uninstall()
            session.stats()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=uninstall) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        if thread.is_alive():
            tally.hang("uninstall-twice: uninstall() from a thread")
    session.uninstall()
    if errors:
        tally.problem(f"uninstall-twice: uninstall() from four threads raised {errors[0]}")
    if session.flush() is not True:
        tally.problem("uninstall-twice: flush() after uninstall() is not a no-op")
    texts = _texts_by_pid(records)
    _count_text(tally, "uninstall-twice: master", "master line\n", texts.get(os.getpid(), ""))
    _count_text(tally, "uninstall-twice: child", "child line\n", texts.get(pid, ""))


# -- nested sessions

def _nested(tally: Tally) -> None:
    with tempfile.TemporaryDirectory(prefix="safe_redirect-nested-") as tmp:
        def logger(path: str) -> Callable[[Record], None]:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            return lambda r: os.write(fd, "".join(f"{r.pid} {line}\n"
                                                  for line in r.text.splitlines()).encode())

        def grandchild() -> None:
            with safe_redirect.install(logger(f"{tmp}/grandchild")) as own:
                for i in range(100):
                    print(f"grandchild line {i}")
                own.flush(30)

        def child() -> None:
            with safe_redirect.install(logger(f"{tmp}/child")) as own:
                for i in range(100):
                    print(f"child line {i}")
                gpid = os.fork()
                if gpid == 0:
                    child_exit(grandchild)
                if reap(gpid, 60) != 0:
                    raise RuntimeError("the grandchild failed or hung")
                Path(f"{tmp}/gpid").write_text(str(gpid))
                own.flush(30)

        records: list[Record] = []
        with safe_redirect.install(records.append) as session:
            cpid = fork_and_reap(tally, "nested", child)
            session.flush(timeout=30)
        gpid = int(Path(f"{tmp}/gpid").read_text()) if Path(f"{tmp}/gpid").exists() else -1
        mine = [f"child line {i}" for i in range(100)]
        theirs = [f"grandchild line {i}" for i in range(100)]

        def logged(name: str, pid: int) -> list[str]:
            path = Path(f"{tmp}/{name}")
            text = path.read_text() if path.exists() else ""
            return [line.split(" ", 1)[1] for line in text.splitlines()
                    if line.startswith(f"{pid} ")]

        top = [line for r in records for line in r.text.splitlines()]
        tally.count_lines("nested: the top master gets the child", mine,
                          [x for x in top if x.startswith("child ")])
        tally.count_lines("nested: the top master gets the grandchild", theirs,
                          [x for x in top if x.startswith("grandchild ")])
        tally.count_lines("nested: the child's session gets its own lines", mine,
                          logged("child", cpid))
        tally.count_lines("nested: the child's session gets the grandchild", theirs,
                          logged("child", gpid))
        tally.count_lines("nested: the grandchild's session gets its own lines", theirs,
                          logged("grandchild", gpid))


# -- interpreter shutdown while children print

_SHUTDOWN_MASTER = """
import os, sys, threading, time
import safe_redirect
tmp = sys.argv[1]
log = os.open(f"{tmp}/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
safe_redirect.install(lambda r: os.write(log, "".join(
    f"{r.pid} {line}\\n" for line in r.text.splitlines()).encode()), exit_timeout=1.0)
print("segment", os.getpid(), file=sys.stderr, flush=True)

def daemon():
    while True:
        print("daemon thread line")

for k in range(3):
    if os.fork() == 0:
        fd = os.open(f"{tmp}/terminal-{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        with open(f"{tmp}/pid-{k}", "w") as out:
            out.write(str(os.getpid()))
        for i in range(300_000):
            print(f"child {k} line {i}")
        sys.stdout.flush()
        open(f"{tmp}/done-{k}", "w").close()
        os._exit(0)
threading.Thread(target=daemon, daemon=True).start()
time.sleep(0.1)
# the end of the script: the interpreter shuts down while the children print
"""


def _shutdown(tally: Tally, lines: int = 300_000) -> None:
    with tempfile.TemporaryDirectory(prefix="safe_redirect-shutdown-") as tmp:
        try:
            done = subprocess.run([sys.executable, "-c", _SHUTDOWN_MASTER, tmp],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=60,
                                  env=_clean_env())
        except subprocess.TimeoutExpired:
            tally.hang("shutdown: the master did not exit")
            return
        if done.returncode != 0 or "Fatal" in done.stderr:
            tally.problem(f"shutdown: the master exited {done.returncode}: {done.stderr[-800:]}")
        master = int(done.stderr.split("segment ")[1].split()[0])
        if not wait_until(lambda: all(Path(f"{tmp}/done-{k}").exists() for k in range(3)), 60,
                          step=0.01):
            tally.hang("shutdown: a child never finished")
        pids = [int(Path(f"{tmp}/pid-{k}").read_text()) for k in range(3)]
        if not wait_until(lambda: not any(_running(pid) for pid in pids), 30, step=0.01):
            tally.hang("shutdown: a child did not exit")
            for pid in pids:
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
        if segments_of(master):
            tally.problem(f"shutdown: segment left in /dev/shm: {segments_of(master)}")
        log = Path(f"{tmp}/log").read_text()
        delivered = 0
        for k, pid in enumerate(pids):
            expected = [f"child {k} line {i}" for i in range(lines)]
            shown = Path(f"{tmp}/terminal-{k}").read_text().splitlines()
            tally.count_lines(f"shutdown: child {k}'s terminal", expected, shown)
            got = [line.split(" ", 1)[1] for line in log.splitlines()
                   if line.startswith(f"{pid} ")]
            delivered += len(got)
            if got != expected[: len(got)]:
                tally.problem(f"shutdown: what on_output got of child {k} is not the start of "
                              "its lines, once, in order")
        tally.note("shutdown: children's lines delivered before the master exited", delivered)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_CASES: dict[str, Callable[[Tally], None]] = {
    "invalid-utf8": _invalid_utf8, "huge-write": _huge_write, "not-a-str": _not_a_str,
    "nul": _nul, "ansi": _ansi, "closed-stdout": _closed_stdout,
    "replaced-stdout": _replaced_stdout, "uninstall-twice": _uninstall_twice, "nested": _nested,
    "shutdown": _shutdown,
}
