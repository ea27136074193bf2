"""scripts/bench_attention.py's timing method, on the CPU (its GPU rows need a GPU): every row of a T is timed in
interleaved rounds, rotated a round, warm-up rounds dropped, each row's settings set only around its own calls."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_attention as ba  # noqa: E402


def _cases(names, events):
    return [(n, (lambda n=n: events.append(("enter", n))), (lambda n=n: events.append(("leave", n))),
             (lambda n=n: ("fwd", n)), (lambda n=n: ("bwd", n))) for n in names]


def test_interleaved_rounds_rotate_drop_the_warm_up_and_scope_the_settings():
    events, calls, clock = [], [], iter(range(10 ** 6))

    def timer(fn):                      # ms = how many calls came before: a clock that drifts with every call
        calls.append(fn())
        events.append(calls[-1])
        return float(next(clock))

    got = ba.interleaved_medians(_cases("abc", events), timer, warmup=2, reps=3)
    assert len(calls) == 5 * 3 * 2
    assert [calls[6 * r][1] for r in range(5)] == ["a", "b", "c", "a", "b"]     # who goes first rotates
    for r in range(5):                                                          # each call inside its own settings
        for i in range(3):
            name = "abc"[(i + r) % 3]
            at = 12 * r + 4 * i
            assert events[at:at + 4] == [("enter", name), ("fwd", name), ("bwd", name), ("leave", name)]
    for c, name in enumerate("abc"):     # round r, place i = (c - r) % 3: fwd at clock 6 r + 2 i; rounds 0, 1 dropped
        fwd = sorted(6 * r + 2 * ((c - r) % 3) for r in (2, 3, 4))
        assert got[name] == (fwd[1], fwd[1] + 1)


def test_a_failing_call_still_restores_the_settings():
    events = []

    def timer(fn):
        if fn() == ("bwd", "b"):
            raise RuntimeError("launch failed")
        return 1.0

    with pytest.raises(RuntimeError, match="launch failed"):
        ba.interleaved_medians(_cases("ab", events), timer, warmup=0, reps=1)
    assert events == [("enter", "a"), ("leave", "a"), ("enter", "b"), ("leave", "b")]
