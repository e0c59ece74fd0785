"""How many reads a multiRead carries: sized by the answers seen, never over the budget."""

from __future__ import annotations

from bridge.zk import Node, Stat
from bridge.zk.sizing import FLOOR, READS_MAX, REPLY_BUDGET, ReplySizer, answer_size

STAT = Stat(0, 0, 0, False, 0, 0)


def data(n: int) -> list[tuple[str, str]]:
    return [("data", f"/z{i}") for i in range(n)]


def node(size: int) -> Node:
    return Node(b"x" * size, STAT)


def test_a_new_session_sends_two_reads_of_the_largest_znode_per_request() -> None:
    sizer = ReplySizer()
    assert sizer.take(data(1000), 0) == 2
    assert sizer.take(data(1000), 999) == 1  # what is left
    assert sizer.take([("children", "/")], 0) == 1


def test_small_answers_grow_requests_to_full_size_in_about_ten_replies() -> None:
    sizer = ReplySizer()
    ops = data(2000)
    sizes = []
    for _ in range(12):
        n = sizer.take(ops, 0)
        sizes.append(n)
        sizer.saw(ops[:n], [node(100)] * n)
    assert sizes[:4] == [2, 4, 8, 16]
    assert sizes[-1] == READS_MAX and sizes.index(READS_MAX) <= 11
    assert sizer.largest["data"] == FLOOR


def test_one_large_answer_makes_the_next_requests_small_at_once() -> None:
    sizer = ReplySizer()
    ops = data(2000)
    for _ in range(12):
        sizer.saw(ops[:2], [node(100), node(100)])
    assert sizer.take(ops, 0) == READS_MAX
    sizer.saw(ops[:3], [node(100), node(900_000), None])
    assert sizer.take(ops, 0) == 2
    assert sizer.take(ops, 0) * 900_000 <= REPLY_BUDGET


def test_listings_say_nothing_of_the_data_below_them() -> None:
    """A scan lists a level before it reads it: small listings must not make the
    data reads of large znodes big (three such requests in flight ran a server
    with a 256 MB heap out of memory)."""
    sizer = ReplySizer()
    for _ in range(10):
        sizer.saw([("children", "/a")], [["b", "c"]])
    assert sizer.take(data(100), 0) == 2
    assert sizer.take([("children", f"/d{i}") for i in range(1000)], 0) == READS_MAX


def test_a_request_of_both_kinds_adds_their_estimates() -> None:
    sizer = ReplySizer()
    sizer.largest = {"data": 600_000, "children": 1024}
    ops = [("children", "/a"), ("data", "/a"), ("data", "/b"), ("data", "/c"), ("data", "/d")]
    assert sizer.take(ops, 0) == 4  # 1 KB + 3 x 600 KB, and a fourth would pass 2 MB


def test_missing_znodes_and_refusals_count_as_small() -> None:
    """A receiver reads the paths it is about to create: all absent. Before, they
    left the estimate at 1 MB, and a catch-up's reads went two per request."""
    sizer = ReplySizer()
    sizer.saw(data(3), [None, None, PermissionError()])
    assert sizer.largest["data"] == 1 << 19


def test_answer_sizes() -> None:
    assert answer_size(node(7)) == 7
    assert answer_size(["ab", "c"]) == 2 + 4 + 1 + 4
    assert answer_size(None) == 0
