"""Rebuilding lines from a lane's records: partial writes, \\r, UTF-8 across writes, bad bytes."""

from __future__ import annotations

import time
from dataclasses import replace

from safe_redirect.drain import Drain
from safe_redirect.lanereader import JOIN_GAP_NS, MAX_PARTIAL_CHARS, LaneReader
from safe_redirect.record import Interleaver, Record, render_tag
from safe_redirect.ring import Ring
from safe_redirect.stamp import Stamp

from .internals import FLAG_FLUSH, FLAG_GAP, end_pass, queue_for_pass

OUT, ERR = 0, 1


def reader() -> LaneReader:
    return LaneReader(pid=42, start_us=1, rank=3)


Raw = tuple[int, int, int, bytes, int, int]


def data(stream: int, payload: bytes, t: int = 1, thread: int = 1, rank: int = -1) -> Raw:
    return (stream, 0, t, payload, thread, rank)


def flush(stream: int, thread: int = 1) -> Raw:
    return (stream, FLAG_FLUSH, 9, b"", thread, -1)


def texts(records: list[Record]) -> list[tuple[str, str]]:
    return [(r.stream, r.text) for r in records]


def test_whole_lines_come_out_and_partial_lines_wait() -> None:
    r = reader()
    assert texts(r.feed([data(OUT, b"one\ntw")])) == [("stdout", "one\n")]
    assert r.feed([data(OUT, b"o")]) == []
    assert texts(r.feed([data(OUT, b"\nthree\n")])) == [("stdout", "two\nthree\n")]


def test_a_record_carries_who_wrote_it_and_when_its_line_began() -> None:
    r = reader()
    r.feed([data(OUT, b"sta", t=100)])
    (record,) = r.feed([data(OUT, b"rt\n", t=200)])
    assert record == Record("stdout", "start\n", "[rank3] ", 42, 3, 100)
    assert record.tagged() == "[rank3] start\n"


def test_streams_are_rebuilt_apart_and_keep_their_order() -> None:
    r = reader()
    out = r.feed([data(OUT, b"a"), data(ERR, b"E1\n"), data(OUT, b"b\n"), data(ERR, b"E2\n")])
    assert texts(out) == [("stderr", "E1\n"), ("stdout", "ab\n"), ("stderr", "E2\n")]


def test_a_flush_delivers_the_partial_line() -> None:
    r = reader()
    assert texts(r.feed([data(OUT, b"prompt> "), flush(OUT)])) == [("stdout", "prompt> ")]
    assert r.feed([flush(OUT)]) == []  # nothing pending: nothing delivered


def test_carriage_returns_end_progress_updates() -> None:
    r = reader()
    out = r.feed([data(OUT, b"\r10%"), data(OUT, b"\r20%"), data(OUT, b"\r30%")])
    assert texts(out) == [("stdout", "\r10%\r20%\r")]  # a record ends where a line ends
    assert texts(r.flush()) == [("stdout", "30%")]


def test_a_trailing_carriage_return_waits_for_a_possible_newline() -> None:
    r = reader()
    assert r.feed([data(OUT, b"dos line\r")]) == []
    assert texts(r.feed([data(OUT, b"\nnext\n")])) == [("stdout", "dos line\r\nnext\n")]


def test_utf8_split_across_writes_is_joined() -> None:
    r = reader()
    snowman = "☃".encode()
    assert r.feed([data(OUT, b"x" + snowman[:1])]) == []
    assert texts(r.feed([data(OUT, snowman[1:] + b"\n")])) == [("stdout", "x☃\n")]


def test_invalid_utf8_becomes_replacement_characters_never_an_error() -> None:
    r = reader()
    assert texts(r.feed([data(OUT, b"bad \xff\xfe bytes\n")])) == [
        ("stdout", "bad \ufffd\ufffd bytes\n")]
    r.feed([data(OUT, b"cut \xe2\x98")])
    assert texts(r.flush()) == [("stdout", "cut \ufffd")]


def test_an_endless_line_is_delivered_in_bounded_pieces() -> None:
    r = reader()
    out = r.feed([data(OUT, b"z" * (MAX_PARTIAL_CHARS + 10))])
    assert [len(x.text) for x in out] == [MAX_PARTIAL_CHARS + 10]
    assert r.flush() == []


def test_tags_fall_back_to_the_pid() -> None:
    assert render_tag("[rank{rank}] ", 2, 99) == "[rank2] "
    assert render_tag("<{rank}:{pid}> ", 2, 99) == "<2:99> "
    assert render_tag("[rank{rank}] ", None, 99) == "[pid99] "
    assert render_tag("[rank{rank}] ", None, 99, "SpawnProcess-2") == "[SpawnProcess-2] "
    assert render_tag("[{name}:{rank}] ", 1, 99, "w") == "[w:1] "


def test_tagged_prefixes_every_line() -> None:
    record = Record("stdout", "a\nb\n", "[rank1] ", 1, 1, 0)
    assert record.tagged() == "[rank1] a\n[rank1] b\n"
    assert Record("stdout", "a\n", "", 1, None, 0).tagged() == "a\n"


def test_lines_are_rebuilt_per_thread_so_threads_never_splice_a_line() -> None:
    r = reader()
    out = r.feed([data(OUT, b"xla: 2 start", thread=1), data(OUT, b"xla: 3 start", thread=2),
                  data(OUT, b"\n", thread=1), data(OUT, b"\n", thread=2)])
    assert texts(out) == [("stdout", "xla: 2 start\nxla: 3 start\n")]


def test_a_flush_delivers_the_flushing_threads_partial_line_only() -> None:
    """Rank threads that print(..., flush=True) at once must not cut each other's lines."""
    r = reader()
    out = r.feed([data(OUT, b"rank 1 line", thread=1), data(OUT, b"rank 2 line\n", thread=2),
                  flush(OUT, thread=2), data(OUT, b"\n", thread=1), flush(OUT, thread=1)])
    assert texts(out) == [("stdout", "rank 2 line\nrank 1 line\n")]
    assert r.feed([data(OUT, b"prompt> ", thread=3), flush(OUT, thread=3)]) != []


def test_threads_with_ranks_of_their_own_are_tagged_by_them() -> None:
    """torch_xla on the CPU: ranks are threads of one process."""
    r = LaneReader(pid=7, start_us=1, rank=None)
    out = r.feed([data(OUT, b"xla: 0 start\n", thread=1, rank=0),
                  data(OUT, b"xla: 1 start\n", thread=2, rank=1),
                  data(OUT, b"no rank\n", thread=3)])
    assert [(x.tag, x.rank, x.text) for x in out] == [
        ("[rank0] ", 0, "xla: 0 start\n"), ("[rank1] ", 1, "xla: 1 start\n"),
        ("[pid7] ", None, "no rank\n")]


def test_the_masters_own_lines_are_untagged_unless_a_thread_has_a_rank() -> None:
    r = LaneReader(pid=7, start_us=1, rank=None, master=True)
    out = r.feed([data(OUT, b"plain\n"), data(OUT, b"ranked\n", thread=2, rank=5)])
    assert [(x.tag, x.text) for x in out] == [("", "plain\n"), ("[rank5] ", "ranked\n")]


def test_the_rest_of_a_flushed_line_continues_it_untagged() -> None:
    r = reader()
    (head,) = r.feed([data(OUT, b"Epoch 1 |##"), flush(OUT)])
    (rest,) = r.feed([data(OUT, b"##| done\nnext\n")])
    assert (head.continued, rest.continued) == (False, True)
    assert head.tagged() + rest.tagged() == "[rank3] Epoch 1 |####| done\n[rank3] next\n"
    (after,) = r.feed([data(OUT, b"fresh\n")])
    assert not after.continued


def interleave(*records: Record) -> str:
    interleaver = Interleaver()
    return "".join(interleaver.render(record) for record in records)


def rec(text: str, rank: int, continued: bool = False, stream: str = "stdout") -> Record:
    return Record(stream, text, f"[rank{rank}] ", 100 + rank, rank, 0, continued)


def test_no_two_processes_share_a_line_in_the_merged_log() -> None:
    # rank 1 flushes half a progress line, rank 2 prints, rank 1 finishes its line
    merged = interleave(rec("50% |##", 1), rec("hello\n", 2), rec("##| 100%\n", 1, True))
    assert merged == "[rank1] 50% |##\n[rank2] hello\n[rank1] ##| 100%\n"


def test_a_line_left_for_overwriting_is_kept_when_another_process_writes() -> None:
    merged = interleave(rec("\r10%\r", 1), rec("hello\n", 2), rec("20%\r", 1), rec("20%\r", 1))
    assert merged == "[rank1] \r[rank1] 10%\r\n[rank2] hello\n[rank1] 20%\r[rank1] 20%\r"


def test_one_process_continuing_its_own_line_is_joined() -> None:
    assert interleave(rec("a", 1), rec("b", 1, True), rec("c\n", 1, True)) == "[rank1] abc\n"
    master = Record("stdout", "x", "", 1, None, 0)
    assert interleave(master, rec("y\n", 2), replace(master, text="z\n", continued=True)) == (
        "x\n[rank2] y\nz\n")


def test_streams_are_interleaved_apart() -> None:
    interleaver = Interleaver()
    records = [rec("a", 1), rec("E\n", 2, stream="stderr"), rec("b\n", 1, True)]
    assert [interleaver.render(r) for r in records] == ["[rank1] a", "[rank2] E\n", "b\n"]


def test_in_one_log_a_line_open_on_stdout_is_not_continued_by_stderr() -> None:
    interleaver = Interleaver(one_log=True)
    records = [rec("50%\r", 1), rec("warning\n", 1, stream="stderr"), rec("60%\r", 1)]
    assert [interleaver.render(r) for r in records] == [
        "[rank1] 50%\r", "\n[rank1] warning\n", "[rank1] 60%\r"]


def test_a_line_cut_short_is_not_joined_by_its_writers_next_line() -> None:
    # a spill cut "abc" short (its rest went to the terminal only): the next line is a new one
    assert interleave(rec("abc", 1), rec("next\n", 1)) == "[rank1] abc\n[rank1] next\n"


def test_a_flag_gap_ends_the_line_its_writer_had_open() -> None:
    r = reader()
    gap = (OUT, FLAG_GAP, 5, b"next\n", 1, -1)
    records = r.feed([data(OUT, b"head of a line "), gap])
    assert [(x.text, x.continued) for x in records] == [("head of a line ", False),
                                                         ("next\n", False)]
    assert interleave(*records) == "[rank3] head of a line \n[rank3] next\n"


# -- one order across lanes: a pass merges its lanes' records by time_ns

def drain_of(nlanes: int = 4) -> tuple[Drain, list[Record], Ring]:
    """A Drain over a real segment whose thread is not started: passes run on the caller."""
    ring = Ring.create(Stamp.current(), nlanes=nlanes, lane_bytes=4096)
    delivered: list[Record] = []
    return Drain(ring, delivered.append, "[rank{rank}] ", master_lane=0), delivered, ring


def at(t: int, text: str, pid: int) -> Record:
    return Record("stdout", text, f"[pid{pid}] ", pid, None, t)


def test_a_pass_merges_lanes_by_time_and_never_reorders_a_lane() -> None:
    drain, delivered, ring = drain_of()
    try:
        a, b, c = object(), object(), object()  # three lanes' readers
        # lane a's own order is kept although its second record began first (another thread's
        # line that ended later): a merge, not a sort
        queue_for_pass(drain, [at(10, "a1\n", 1), at(5, "a2\n", 1), at(30, "a3\n", 1)], a)
        queue_for_pass(drain, [at(20, "b1\n", 2), at(40, "b2\n", 2)], b)
        queue_for_pass(drain, [at(10, "c1\n", 3)], c)  # a tie: lanes handed over first go first
        assert end_pass(drain, None) is False
        assert [r.text for r in delivered] == ["a1\n", "a2\n", "c1\n", "b1\n", "a3\n", "b2\n"]
        assert drain.records_delivered == 6
    finally:
        ring.close()
        ring.unlink()


def test_records_stamped_after_a_pass_began_wait_for_the_next_pass_in_lane_order() -> None:
    drain, delivered, ring = drain_of()
    try:
        a, b = object(), object()
        queue_for_pass(drain, [at(10, "a1\n", 1), at(50, "a2\n", 1), at(20, "a3\n", 1)], a)
        queue_for_pass(drain, [at(30, "b1\n", 2)], b)
        assert end_pass(drain, 40) is True  # a2 and all after it in lane a wait
        assert [r.text for r in delivered] == ["a1\n", "b1\n"]
        queue_for_pass(drain, [at(45, "b2\n", 2)], b)  # read by the next pass
        queue_for_pass(drain, [at(60, "a4\n", 1)], a)  # behind what lane a already holds
        assert end_pass(drain, 100) is False
        assert [r.text for r in delivered] == ["a1\n", "b1\n", "b2\n", "a2\n", "a3\n", "a4\n"]
    finally:
        ring.close()
        ring.unlink()


def test_a_pass_over_real_lanes_delivers_in_the_order_the_lines_were_written() -> None:
    drain, delivered, ring = drain_of()
    try:
        seg = ring.segment
        lanes = [seg.producer(seg.claim(pid, 1, rank)) for pid, rank in ((7, -1), (8, 1), (9, 2))]
        order = [0, 1, 2, 2, 0, 1, 0, 2]  # the pass reads lane 0, then 1, then 2
        for n, k in enumerate(order):
            lanes[k].append(0, 0, f"line {n}\n".encode())
            time.sleep(0.001)  # the behaviour: a pause, so the writer's next line starts a Record
        drain.sync(timeout=None)  # no thread: one final pass on this thread
        assert [r.text for r in delivered] == [f"line {n}\n" for n in range(len(order))]
        assert [r.pid for r in delivered] == [(7, 8, 9)[k] for k in order]
    finally:
        ring.close()
        ring.unlink()


def test_a_writer_printing_without_a_pause_keeps_few_records() -> None:
    r = reader()
    t0 = 1_000_000
    writes = [data(OUT, f"{i}\n".encode(), t=t0 + i * 1000) for i in range(100)]
    writes.append(data(OUT, b"after a pause\n", t=t0 + 99_000 + JOIN_GAP_NS + 1))
    out = r.feed(writes)
    assert [(x.time_ns, x.text.count("\n")) for x in out] == [
        (t0, 100), (t0 + 99_000 + JOIN_GAP_NS + 1, 1)]
