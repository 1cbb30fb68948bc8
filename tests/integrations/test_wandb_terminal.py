"""What the patched console hands wandb, against wandb alone: terminal emulation (cursor
movement, erasing, colours, redraws), blank lines, and progress bars of several workers.

The parity tests run one script twice, on wandb alone and patched, offline, and compare the run's
output.log (or the callbacks' data) byte for byte.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from safe_redirect.drain import Record
from safe_redirect.integrations.wandb_terminal import (
    EmulatedLog,
    LineScreen,
    RawLog,
    emulated_screen_factory,
)

from ..conftest import run_python_file

wandb = pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")

# Each step is written (and flushed) alone, with a pause after it: the patched drain sees them in
# passes of their own, as a program's output that comes over time.
STEPS = [
    # blank lines between lines
    "A\n", "\n", "B\n", "\n", "\n", "C\n",
    # colours and styles, re-rendered by the emulator
    "\x1b[31mred\x1b[0m plain\n", "\x1b[1mbold\x1b[22m \x1b[44mon blue\x1b[0m\n",
    # a status line erased and replaced later
    "loading...\n", "\x1b[A\x1b[2Kloaded\n",
    # a progress bar drawn over itself with \r, then a line after it
    "step 1/4", "\rstep 2/4", "\rstep 3/4", "\rstep 4/4 done\n", "after the bar\n",
    # cursor up two lines, erase one and write it again, in one write. (Not "\x1b[J": wandb's
    # emulator caches its line count across it, and its reader loses the lines written after
    # it in the same batch of its thread: a race of wandb alone.)
    "x\ny\nz\n\x1b[2A\x1b[2Ky2\n",
    # erase a line's start, backspace, and a line of spaces only
    "abcdef\r\x1b[1Kgh\n", "ab\bX\n", "     \n",
    "last line\n",
]

PARITY_SCRIPT = """
import json, sys, time
console, patch = sys.argv[1:3]
if patch == "patched":
    import safe_redirect
    safe_redirect.patch_wandb()
import wandb
run = wandb.init(mode="offline", project="safe-redirect-test",
                 settings=wandb.Settings(console=console))
for step in json.loads(sys.argv[3]):
    sys.stdout.write(step)
    sys.stdout.flush()
    time.sleep(0.05)
run.finish()
print("FILES_DIR=" + run.settings.files_dir, file=sys.stderr)
"""


def output_log(result) -> str:
    files_dir = re.findall("^FILES_DIR=(.*)$", result.stderr, re.M)[-1]
    with open(f"{files_dir}/output.log", encoding="utf-8") as log:
        return log.read()


def run_steps(tmp_path, console: str, patch: str, steps: list[str]) -> str:
    import json

    result = run_python_file(tmp_path / f"{patch}.py", PARITY_SCRIPT, 240,
                             args=(console, patch, json.dumps(steps)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_log(result)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("console", ["wrap", "wrap_emu", "redirect"])
def test_output_log_reads_as_wandb_alone_writes_it(tmp_path, console) -> None:
    """One process: erased, redrawn and coloured lines, blank lines, a `\\r` progress bar."""
    alone = run_steps(tmp_path, console, "alone", STEPS)
    patched = run_steps(tmp_path, console, "patched", STEPS)
    assert patched == alone
    if console != "wrap":  # the emulator did its work (wandb-core renders "wrap" itself)
        assert "loading" not in alone and "step 3/4" not in alone and "\x1b[2K" not in alone
        assert "A\nB\nC\n" in alone


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cls", ["StreamWrapper", "StreamRawWrapper"])
def test_the_callbacks_get_what_wandbs_own_class_gives_them(tmp_path, cls) -> None:
    """The redirect class alone, no run: the bytes (or text) its callbacks received, joined."""
    code = """
        import json, sys, time
        cls, patch = sys.argv[1:3]
        if patch == "patched":
            import safe_redirect
            safe_redirect.patch_wandb()
        from wandb.sdk.lib import redirect
        got = []
        kwargs = {"flush_periodically": False} if cls == "StreamWrapper" else {}
        wrapper = getattr(redirect, cls)("stdout", cbs=[got.append], **kwargs)
        wrapper.install()
        for step in json.loads(sys.argv[3]):
            sys.stdout.write(step)
            sys.stdout.flush()
            time.sleep(0.02)
        wrapper.uninstall()
        joined = b"".join(got) if got and isinstance(got[0], bytes) else "".join(got).encode()
        print(repr(joined), file=sys.stderr)
    """
    import json

    # redrawn lines come once, as shown: here in the write that finishes them
    steps = [s for s in STEPS if s != "\x1b[A\x1b[2Kloaded\n"]
    steps += ["loading\x1b[2K\rdone\n"]
    data = {}
    for patch in ("alone", "patched"):
        result = run_python_file(tmp_path / f"{patch}.py", code, 120,
                                 args=(cls, patch, json.dumps(steps)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        data[patch] = result.stderr.strip().splitlines()[-1]
    assert data["patched"] == data["alone"]


BARS_SCRIPT = """
import multiprocessing, sys, time
from tqdm import tqdm

def work(task):
    for bar in range(2):
        for _ in tqdm(range(40), desc=f"t{task}b{bar}", mininterval=0, ascii=True):
            time.sleep(0.002)
    print(f"task {task} done", flush=True)

if __name__ == "__main__":
    console = sys.argv[1]
    import safe_redirect
    safe_redirect.patch_wandb()
    import wandb
    run = wandb.init(mode="offline", project="safe-redirect-test",
                     settings=wandb.Settings(console=console))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(work, range(4), chunksize=1)
    print("master done")
    run.finish()
    print("FILES_DIR=" + run.settings.files_dir, file=sys.stderr)
"""

TAG = r"\[[^\]\r\n]*\] "


@pytest.mark.timeout(600)
@pytest.mark.parametrize("console", ["wrap", "wrap_emu", "redirect"])
def test_progress_bars_of_four_workers_land_as_their_last_state(tmp_path, console) -> None:
    """4 spawn-Pool workers drawing 2 tqdm bars each at the same time: each bar is one line, its
    final state, under the tag of the worker that drew it; a tag only at a line's start."""
    pytest.importorskip("tqdm")
    result = run_python_file(tmp_path / "bars.py", BARS_SCRIPT, 500, args=(console,),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = output_log(result)
    lines = log.splitlines()
    assert "\r" not in log
    assert not [x for x in lines if re.fullmatch(f"({TAG})+ *", x)], "a line of tags only"
    assert not [x for x in lines if re.search(f".{TAG}", x[1:]) and x.count("] ") > 1]
    assert lines.count("master done") == 1
    for task in range(4):
        done = [x for x in lines if x.endswith(f"task {task} done")]
        assert len(done) == 1, done
        tag = done[0][:-len(f"task {task} done")]
        assert re.fullmatch(TAG, tag), done
        for bar in range(2):
            drawn = [x for x in lines if f"t{task}b{bar}:" in x]
            assert len(drawn) == 1, drawn
            assert drawn[0].startswith(f"{tag}t{task}b{bar}: 100%|##########| 40/40 "), drawn


# -- the module on its own: records in, what the callbacks get out


def record(text: str, pid: int = 1, tag: str = "", stream: str = "stdout") -> Record:
    return Record(stream, text, tag, pid, None, 0)


def test_two_writers_redrawing_at_once_each_land_their_last_state() -> None:
    log = EmulatedLog(emulated_screen_factory())
    for step in range(1, 4):
        log.feed(record(f"\rA {step}/3", 2, "[rank0] ", "stderr"))
        log.feed(record(f"\rB {step}/3", 3, "[rank1] ", "stderr"))
        assert log.end_pass(False) == []  # nothing finished yet
    log.feed(record("\n", 3, "[rank1] ", "stderr"))
    log.feed(record("master\n"))
    log.feed(record("\n", 2, "[rank0] ", "stderr"))
    assert log.end_pass(True) == [("stderr", "[rank1] B 3/3\n"), ("stdout", "master\n"),
                                  ("stderr", "[rank0] A 3/3\n")]


def test_an_erase_written_soon_after_takes_back_lines_a_pass_had_finished() -> None:
    """wandb's own `test_erase_screen`: a screen drawn and then cleared by a second print (in a
    later drain pass, patched) leaves nothing, as wandb's emulators, read every 2 s, leave
    nothing. Text waits `settle_ns` before its screen takes it; older text goes on at once."""
    log = EmulatedLog(emulated_screen_factory())
    now = time.time_ns()
    log.feed(Record("stdout", "QWERT\nYUIOP\n12345\n", "", 1, None, now))
    assert log.end_pass(False) == []  # not settled yet
    log.feed(Record("stdout", "\x1b[2J\n", "", 1, None, now + 1000))
    assert log.end_pass(True) == []
    log.feed(Record("stdout", "one\ntwo\nthree\n", "", 1, None, now - 10**9))
    assert log.end_pass(False) == [("stdout", "one\ntwo\n")]  # written long ago: at once


def test_the_last_line_of_a_pass_waits_and_a_redraw_changes_it_in_place() -> None:
    log = EmulatedLog(emulated_screen_factory())
    log.feed(record("first\nsecond\nloading\n"))
    assert log.end_pass(False) == [("stdout", "first\nsecond\n")]  # the log holds one back too
    log.feed(record("\x1b[A\x1b[2Kloaded\n"))
    assert log.end_pass(False) == []
    log.feed(record("next\n"))
    assert log.end_pass(False) == [("stdout", "loaded\n")]
    log.feed(record("[other]\n", 2, "[rank1] "))  # another writer's line after "next"
    assert log.end_pass(False) == [("stdout", "next\n")]
    log.feed(record("\x1b[A\x1b[2Knext!\n"))  # not the log's last line: a line of its own
    log.feed(record("\x1b[A\x1b[A\x1b[2Kfirst!\n"))  # above the last: lost, as wandb's reads
    assert log.end_pass(True) == [("stdout", "[rank1] [other]\nnext!\n")]


def test_a_redraw_after_a_flush_takes_back_the_line_while_it_is_the_logs_last() -> None:
    log = EmulatedLog(emulated_screen_factory())
    log.feed(record("one\ntwo\nthree"))
    assert log.end_pass(True) == [("stdout", "one\ntwo\nthree\n")]
    log.feed(record(" and four\nfive\n"))
    assert log.end_pass(True) == [("stdout", "\rthree and four\nfive\n")]


def test_blank_lines_go_with_the_line_after_them_and_tags_only_in_front_of_text() -> None:
    log = EmulatedLog(emulated_screen_factory())
    out = []
    for text in ["A\n", "\n", "B\n", "\n", "\n", "C\n"]:
        log.feed(record(text, 2, "[rank0] "))
        out += log.end_pass(False)
    # the first batch has two lines for the log, the last line (C) waits
    assert out == [("stdout", "[rank0] A\n\n[rank0] B\n\n\n")]
    out += log.end_pass(True)
    assert "".join(text for _, text in out) == "[rank0] A\n\n[rank0] B\n\n\n[rank0] C\n"


def test_plain_lines_after_colour_keep_the_colour() -> None:
    log = EmulatedLog(emulated_screen_factory())
    log.feed(record("\x1b[31mred\n"))
    log.feed(record("still red\n"))
    log.feed(record("\x1b[0mplain\n"))
    log.feed(record("plain too\n"))
    assert log.end_pass(True) == [
        ("stdout", "\x1b[31mred\n\x1b[31mstill red\nplain\nplain too\n")]


def test_the_fallback_without_wandbs_emulator_resolves_carriage_returns() -> None:
    log = EmulatedLog(LineScreen)
    log.feed(record("50%\r100%\nnext\n", 2, "[rank0] "))
    assert log.end_pass(True) == [("stdout", "[rank0] 100%\n[rank0] next\n")]


def test_raw_keeps_the_masters_text_and_finishes_a_workers_lines() -> None:
    log = RawLog()
    log.feed(record("bar 1\r"))
    log.feed(record("w 1\rw 2", 2, "[rank0] "))
    log.feed(record("bar 2\r"))
    assert log.end_pass(False) == [("stdout", "bar 1\rbar 2\r")]
    log.feed(record("\rw 3\n\nafter\n", 2, "[rank0] "))
    assert log.end_pass(False) == [("stdout", "\n[rank0] w 3\n\n[rank0] after\n")]


def test_wandbs_emulator_is_the_one_used() -> None:
    from safe_redirect.integrations.wandb_terminal import EmulatedScreen

    assert isinstance(emulated_screen_factory()(), EmulatedScreen)


def crdeduped(chunks: list[str]) -> bytes:
    """What wandb's CRDedupedFile writes for these callback texts, closed."""
    import io

    from wandb.sdk.lib.filesystem import CRDedupedFile

    class Kept(io.BytesIO):
        def close(self) -> None:
            self.kept = self.getvalue()

    target = Kept()
    log = CRDedupedFile(target)
    for chunk in chunks:
        log.write(chunk.encode())
    log.close()
    return target.kept


PIECES = ["a", "bc", " ", "\n", "\n\n", "\r", "\x1b[31m", "\x1b[0m", "\x1b[2K", "\x1b[K",
          "\x1b[1K", "\x07", "\b", "\x1b[A\x1b[2K", "\x1b[J", "é"]


@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=6).map("".join), max_size=12),
       st.lists(st.booleans(), min_size=12, max_size=12))
@settings(max_examples=300, deadline=None)
def test_one_writer_in_passes_writes_the_log_wandb_writes_in_one(writes, pass_ends) -> None:
    """Any writes of one process, the batches cut anywhere: the log reads as wandb's emulator
    read once at the end (as an offline run does) and written by its CRDedupedFile. (A cursor
    moved up past the last line that went out is outside this: see the README.)"""
    from wandb.sdk.lib.redirect import TerminalEmulator

    assume("".join(writes).count("\x1b[A") <= 1)
    alone = TerminalEmulator()
    log = EmulatedLog(emulated_screen_factory())
    chunks: list[str] = []
    for text, pass_end in zip(writes, pass_ends, strict=False):
        alone.write(text)
        log.feed(record(text))
        if pass_end:
            chunks += [text for _, text in log.end_pass(False)]
    chunks += [text for _, text in log.end_pass(True)]
    alone._num_lines = None  # (a cache "\x1b[J" leaves stale: see the README)
    assert crdeduped(chunks) == crdeduped([text for text in [alone.read()] if text])


def test_a_line_that_waited_long_goes_on_and_a_redraw_then_takes_it_back() -> None:
    log = EmulatedLog(emulated_screen_factory())
    log.release_after = 0.0  # (2 s in use)
    log.feed(record("zero\none\ntwo\n"))
    assert log.end_pass(False) == [("stdout", "zero\none\n")]
    assert log.end_pass(False) == [("stdout", "two\n")]  # it waited long enough
    log.feed(record("\x1b[A\x1b[2Ktwo!\n"))
    assert log.end_pass(False) == []  # a redraw alone would leave the log a blank line
    log.feed(record("three\n"))
    assert log.end_pass(True) == [("stdout", "\rtwo!\nthree\n")]


@given(st.lists(st.lists(st.sampled_from(["a", "bc", "\n", "\r", "\n\n", "\r\n"]), max_size=8)
                .map("".join), max_size=8))
@settings(max_examples=300, deadline=None)
def test_the_faster_output_log_writer_writes_what_wandbs_writes(batches) -> None:
    """Any batches: the same bytes as wandb's CRDedupedFile.write, closed."""
    import io

    from wandb.sdk.lib.filesystem import CRDedupedFile

    from safe_redirect.integrations.wandb_terminal import faster_log_writer

    class Kept(io.BytesIO):
        def close(self) -> None:
            self.kept = self.getvalue()

    files = [Kept(), Kept()]
    logs = [CRDedupedFile(f) for f in files]
    faster = faster_log_writer(logs[1].write)
    assert faster is not logs[1].write
    for batch in batches:
        logs[0].write(batch.encode())
        faster(batch.encode())
    for log in logs:
        log.close()
    assert files[1].kept == files[0].kept
