"""Pure batch rules: order inside a batch, splitting without reordering, reassembly."""

from __future__ import annotations

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
    assert asm.feed(10, batch[0]) is None
    assert asm.resume_offset == 10  # never inside an open batch
    asm.skip(11)  # a heartbeat between records does not break it
    assert asm.feed(12, batch[1]) is None
    done = asm.feed(13, batch[2])
    assert done is not None and [e.path for e in done.events] == ["/a", "/b", "/c"]
    assert done.end_offset == 14 and asm.resume_offset == 14


def test_a_prefix_cut_by_a_crash_is_dropped_and_the_republished_batch_applies() -> None:
    first = stamp([ev("/a"), ev("/b")], 1)
    asm = Assembler()
    assert asm.feed(0, first[0]) is None
    done = asm.feed(1, first[0])  # republished from the outbox: starts again
    assert done is None and asm.dropped == 1
    done = asm.feed(2, first[1])
    assert done is not None and len(done.events) == 2


def test_rejected_records_fill_their_slot_and_never_stall() -> None:
    batch = stamp([ev("/a"), ev("/b")], 1)
    asm = Assembler()
    assert asm.feed(0, batch[0]) is None
    done = asm.feed(1, None)
    assert done is not None and done.rejected == 1 and [e.path for e in done.events] == ["/a"]
    alone = asm.feed(2, None)
    assert alone is not None and alone.events == () and alone.end_offset == 3


def test_unbatched_events_from_older_senders_are_batches_of_one() -> None:
    asm = Assembler()
    done = asm.feed(0, ev("/a"))
    assert done is not None and len(done.events) == 1


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
