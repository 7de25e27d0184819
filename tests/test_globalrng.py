"""The fast snapshots of the global RNG streams: exact round trips, draws seen, the slow fallback."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from reprokit.globalrng import GlobalStreams, global_streams


def _states() -> tuple[object, object, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _equal(a: tuple[object, object, torch.Tensor], b: tuple[object, object, torch.Tensor]) -> bool:
    na, nb = a[1], b[1]
    assert isinstance(na, tuple) and isinstance(nb, tuple)
    return (a[0] == b[0] and bool(np.array_equal(na[1], nb[1])) and na[2:] == nb[2:]
            and torch.equal(a[2], b[2]))


def _draw_everything() -> None:
    random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(2)


@pytest.mark.parametrize("fast", [True, False])
def test_restore_puts_back_every_stream_with_the_normal_caches(fast: bool) -> None:
    streams = GlobalStreams()
    if not fast:  # the fallback: getstate/get_state
        streams.python.words, streams.numpy.cache = None, None
    assert (streams.fast["python"], streams.fast["numpy"]) == (fast, fast)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both normal caches are now full
    before, snap = _states(), streams.snapshot()
    _draw_everything()
    assert not _equal(_states(), before)
    streams.restore(snap)
    assert _equal(_states(), before)
    after = (random.gauss(0, 1), float(np.random.standard_normal()), float(torch.rand(())))
    random.setstate(before[0]), np.random.set_state(before[1]), torch.set_rng_state(before[2])
    assert after == (random.gauss(0, 1), float(np.random.standard_normal()), float(torch.rand(())))


def test_the_memory_path_is_found_here() -> None:
    """On this Python and numpy the probes find both objects' layouts (else every batch pays
    getstate/get_state: still exact, slower)."""
    assert global_streams().fast == {"python": True, "numpy": True, "torch": True}


@pytest.mark.parametrize("stream", GlobalStreams.NAMES)
def test_a_draw_from_one_stream_is_seen_and_named(stream: str) -> None:
    streams = global_streams()
    snap = streams.snapshot()
    assert streams.drawn(snap, frozenset(GlobalStreams.NAMES)) == frozenset()
    draw = {"python": random.random, "numpy": np.random.rand, "torch": lambda: torch.rand(1)}[stream]
    draw()
    assert streams.drawn(snap, frozenset(GlobalStreams.NAMES)) == {stream}
    assert streams.drawn(snap, frozenset(GlobalStreams.NAMES) - {stream}) == frozenset()
    streams.restore(snap)


def test_a_normal_served_from_the_cache_is_a_draw() -> None:
    """numpy's legacy normal cache moves without the key moving: it is in the snapshot too."""
    streams = global_streams()
    np.random.seed(5)
    np.random.standard_normal()  # fills the cache
    snap = streams.snapshot()
    np.random.standard_normal()  # served from the cache: the Mersenne Twister does not move
    assert streams.drawn(snap, frozenset({"numpy"})) == {"numpy"}
    streams.restore(snap)


def test_fetch_guard_puts_back_the_state_of_each_before_even_after_the_loop_drew() -> None:
    """The guard copies a stream only when its fingerprint moved since the last copy; a draw by the
    training loop between two fetches moves it, so the second restore is to the new state."""
    from reprokit.globalrng import FetchGuard

    guard, every = FetchGuard(), frozenset(GlobalStreams.NAMES)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    for _ in range(3):
        guard.before()
        before = _states()
        assert guard.drawn(every) == frozenset()
        _draw_everything()  # the fetch
        assert guard.drawn(every) == every
        guard.restore(every)
        assert _equal(_states(), before)
        _draw_everything()  # the training loop, between two fetches
    guard.before()
    np.random.standard_normal()  # a cache-only draw after an odd count is still seen
    assert "numpy" in guard.drawn(every)
    guard.restore(every)
