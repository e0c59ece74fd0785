"""Pure batch rules: order inside a batch, splitting without reordering, reassembly."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import codec
from bridge.batching import Assembler, order_key, size_estimate, split, stamp
from bridge.model import Event, Op, VectorClock


def ev(path: str, op: Op = Op.PUT) -> Event:
    return Event(origin="r1", subtree="s", path=path, op=op, vc=VectorClock.of({"r1": 1}),
                 ts=1, writer="r1", data=b"x" if op is Op.PUT else None)


def test_writes_in_zxid_order_then_deletes_deepest_first() -> None:
    keys = sorted([order_key(Op.DELETE, "/a", 0), order_key(Op.PUT, "/p", 9),
                   order_key(Op.DELETE, "/a/b", 0), order_key(Op.PUT, "/d", 3)])
    assert [k[-1] for k in keys] == ["/d", "/p", "/a/b", "/a"]


def test_split_keeps_order_and_bounds() -> None:
    assert split([10] * 5, max_bytes=25) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split([100, 1, 1], max_bytes=50) == [range(0, 1), range(1, 3)]  # too big: alone
    assert split([1] * 5, max_events=2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split([]) == []


def test_a_batch_is_released_only_whole() -> None:
    batch = stamp([ev("/a"), ev("/b"), ev("/c")], 7)
    asm = Assembler(10)
    assert asm.feed(10, batch[0]) == []
    assert asm.resume_offset == 10  # never inside an open batch
    asm.skip(11)  # a heartbeat between records does not break it
    assert asm.feed(12, batch[1]) == []
    [done] = asm.feed(13, batch[2])
    assert [e.path for e in done.events] == ["/a", "/b", "/c"]
    assert done.end_offset == 14 and asm.resume_offset == 14


def test_a_prefix_cut_by_a_crash_is_dropped_and_the_republished_batch_applies() -> None:
    first = stamp([ev("/a"), ev("/b")], 1)
    asm = Assembler()
    assert asm.feed(0, first[0]) == []
    assert asm.feed(1, first[0]) == []  # republished from the outbox: starts again
    assert asm.dropped == 1
    [done] = asm.feed(2, first[1])
    assert len(done.events) == 2


def test_a_stray_piece_without_its_start_is_dropped() -> None:
    batch = stamp([ev("/a"), ev("/b")], 1)
    asm = Assembler(5)
    [done] = asm.feed(5, batch[1])
    assert done.events == () and done.end_offset == 6 and asm.dropped == 1


def test_rejected_records_fill_their_slot_and_never_stall() -> None:
    batch = stamp([ev("/a"), ev("/b")], 1)
    asm = Assembler()
    assert asm.feed(0, batch[0]) == []
    [done] = asm.feed(1, None)
    assert done.rejected == 1 and [e.path for e in done.events] == ["/a"]
    [alone] = asm.feed(2, None)
    assert alone.events == () and alone.end_offset == 3


def test_unbatched_events_from_older_senders_are_batches_of_one() -> None:
    asm = Assembler()
    [done] = asm.feed(0, ev("/a"))
    assert len(done.events) == 1


def test_a_compacted_batch_missing_its_middle_is_released_with_what_is_left() -> None:
    batch = stamp([ev("/a"), ev("/b"), ev("/c")], 3)
    asm = Assembler(0)
    assert asm.feed(0, batch[0]) == []
    [done] = asm.feed(2, batch[2])  # offset 1 (/b) was compacted away
    assert [e.path for e in done.events] == ["/a", "/c"] and done.end_offset == 3
    assert asm.dropped == 0


def test_a_compacted_batch_missing_its_start_is_released_not_dropped() -> None:
    # Bootstrapping from offset 0 of a compacted topic: offsets 0-1 are gone.
    batch = stamp([ev("/a"), ev("/b"), ev("/c")], 3)
    asm = Assembler(0)
    [done] = asm.feed(2, batch[2])
    assert [e.path for e in done.events] == ["/c"] and asm.dropped == 0


def test_a_compacted_batch_missing_its_end_is_released_when_the_next_one_starts() -> None:
    old = stamp([ev("/a"), ev("/b"), ev("/c")], 3)
    new = stamp([ev("/c"), ev("/d")], 4)
    asm = Assembler(0)
    assert asm.feed(0, old[0]) == []
    assert asm.feed(1, old[1]) == []
    assert asm.resume_offset == 0
    # Offset 2 (old /c) was compacted away: /c is rewritten by the batch at 3.
    [first] = asm.feed(3, new[0])
    assert [e.path for e in first.events] == ["/a", "/b"] and first.end_offset == 3
    assert asm.resume_offset == 3  # the new batch is open
    [second] = asm.feed(4, new[1])
    assert [e.path for e in second.events] == ["/c", "/d"] and asm.dropped == 0


def test_a_gap_after_a_batch_releases_it_together_with_the_next_unbatched_event() -> None:
    old = stamp([ev("/a"), ev("/b")], 3)
    asm = Assembler(0)
    assert asm.feed(0, old[0]) == []
    done = asm.feed(5, ev("/z"))
    assert [[e.path for e in d.events] for d in done] == [["/a"], ["/z"]]
    assert [d.end_offset for d in done] == [5, 6]


def test_size_estimate_bounds_the_encoded_record() -> None:
    for data in (b"", b"x" * 10, b"y" * 300_000):
        e = stamp([Event(origin="region-one", subtree="s", path="/a/b/c", op=Op.PUT,
                         vc=VectorClock.of({"region-one": 7, "region-two": 123456}),
                         ts=2**60, writer="region-one", data=data)], 2**60)[0]
        assert len(codec.encode(e)) <= size_estimate(e)


def test_a_huge_change_set_splits_into_bounded_batches() -> None:
    events = [ev(f"/n{i}") for i in range(2500)]
    chunks = split([100] * len(events))
    assert max(len(c) for c in chunks) <= 1000
    assert [i for c in chunks for i in c] == list(range(2500))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True),
                min_size=1, max_size=12))
def test_a_compacted_stream_reassembles_to_the_same_end_state(
        batches: list[list[str]]) -> None:
    # Each batch writes its keys with the batch number; the cleaner keeps
    # only the last record per key, as Kafka's compaction does.
    log: list[tuple[int, Event]] = []
    for n, keys in enumerate(batches):
        for e in stamp([replace(ev(f"/{k}"), data=str(n).encode()) for k in keys], n):
            log.append((len(log), e))
    last = {e.path: off for off, e in log}
    compacted = [(off, e) for off, e in log if last[e.path] == off]
    for stream in (log, compacted):
        asm, state = Assembler(0), {}
        for off, e in stream:
            for done in asm.feed(off, e):
                state.update({x.path: x.data for x in done.events})
        assert asm.dropped == 0
        assert state == {p: log[o][1].data for p, o in last.items()}
