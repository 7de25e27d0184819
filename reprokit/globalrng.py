"""Snapshots of the three global RNG streams (python's ``random``, numpy's legacy ``np.random``,
torch's CPU generator) cheap enough to take around every batch a loader fetches.

``random.getstate()`` and ``np.random.get_state()`` copy their Mersenne Twister state into 625
Python ints or a freshly filled array: 6 and 30 µs, plus as much again to set it back, a few per
cent of a small training step when done per batch. The states themselves are 2,500 bytes of C
memory each, so here a snapshot is a copy of that memory and a restore a ``memmove`` back. A
*fingerprint* is a handful of words of it (the position, four key words, the normal cache): any
draw moves the position, and a run of draws that brings it back round regenerates the whole key,
so two states with one fingerprint differ with odds of about 2**-128. ``FetchGuard`` uses it to
copy a stream only when it changed since its last copy, which in a training loop that draws
from neither between batches is never.

Where the memory lies: numpy publishes its bit generator's state address
(``MT19937.ctypes.state_address``); its legacy normal cache (``has_gauss``/``gauss``, which
``get_state`` includes) lives inside the ``RandomState`` object, and python's state inside the
``random.Random`` object. Those two offsets are found once, by probing a private instance set to
a distinctive state, and every offset is checked on the live global object by a round trip
against ``getstate``/``get_state`` before it is used. If any probe or check fails (another Python
or numpy lays its objects out differently), that stream falls back to its own
``getstate``/``setstate``: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import random
import struct
from typing import Any

import numpy as np
import torch

_MT_WORDS = 624
_STATE_BYTES = _MT_WORDS * 4 + 4  # the key and the position, in either order
_Words = ctypes.c_uint32 * (_MT_WORDS + 1)


def _object_bytes(obj: object) -> bytes:
    return ctypes.string_at(id(obj), type(obj).__basicsize__)


class _Python:
    """``random``'s module-level stream: the C state (index and key) and ``gauss_next``."""

    def __init__(self) -> None:
        self.inst: Any = random._inst
        offset = self._find()
        # struct RandomObject {PyObject_HEAD; int index; uint32_t state[624];}: word 0 is the index
        self.words = _Words.from_address(id(self.inst) + offset) if offset is not None else None

    def _find(self) -> int | None:
        try:
            probe = type(self.inst)()
            key = tuple((0x9E3779B9 * (i + 1)) & 0xFFFFFFFF for i in range(_MT_WORDS))
            probe.setstate((3, (*key, 17), None))
            where = _object_bytes(probe).find(struct.pack(f"<{_MT_WORDS}I", *key))
            if where < 4 or struct.unpack_from("<i", _object_bytes(probe), where - 4)[0] != 17:
                return None
            return where - 4 if self._round_trip(where - 4) else None
        except Exception:  # any surprise: the slow exact path
            return None

    def _round_trip(self, offset: int) -> bool:
        before = self.inst.getstate()
        saved = ctypes.string_at(id(self.inst) + offset, _STATE_BYTES)
        self.inst.random()
        ctypes.memmove(id(self.inst) + offset, saved, _STATE_BYTES)
        ok = bool(self.inst.getstate() == before)
        self.inst.setstate(before)
        return ok

    @property
    def fast(self) -> bool:
        return self.words is not None

    def fingerprint(self) -> Any:
        w = self.words
        if w is None:
            return self.inst.getstate()
        return w[0], w[1], w[2], w[313], w[624], self.inst.gauss_next

    def extra(self) -> Any:
        """What the state holds besides the words: the normal cache."""
        return self.inst.gauss_next

    def snapshot(self, reuse: Any = None) -> Any:
        if self.words is None:
            return self.inst.getstate()
        return _copy(ctypes.addressof(self.words), reuse), self.inst.gauss_next

    def same(self, snap: Any) -> bool:
        if self.words is None:
            return bool(self.inst.getstate() == snap)
        return _equal(ctypes.addressof(self.words), snap[0]) and self.inst.gauss_next == snap[1]

    def restore(self, snap: Any) -> None:
        if self.words is None:
            self.inst.setstate(snap)
            return
        ctypes.memmove(ctypes.addressof(self.words), snap[0], _STATE_BYTES)
        self.inst.gauss_next = snap[1]


class _Numpy:
    """numpy's legacy global ``RandomState``: the MT19937 key and position, and the normal cache."""

    _GAUSS = 1.2345678912345679e-300  # a double no real state holds: the probe's marker

    def __init__(self) -> None:
        self.rs = np.random.mtrand._rand
        self.bitgen = self.rs._bit_generator
        # mt19937_state {uint32_t key[624]; int pos;}: word 624 is the position
        self.words = _Words.from_address(int(self.bitgen.ctypes.state_address))
        self.cache: Any = None  # aug_bitgen_t's {int has_gauss; (pad); double gauss;}, 16 bytes
        where = self._find()
        if where is not None:
            self.cache = (ctypes.c_char * 16).from_address(id(self.rs) + where - 8)
            self.has_gauss = ctypes.c_int.from_address(id(self.rs) + where - 8)
            self.gauss = ctypes.c_double.from_address(id(self.rs) + where)

    def _find(self) -> int | None:
        try:
            probe = np.random.RandomState(np.random.MT19937(0))
            state: Any = probe.get_state()
            key, pos = state[1], state[2]
            probe.set_state(("MT19937", key, pos, 1, self._GAUSS))
            raw = _object_bytes(probe)
            where = raw.find(struct.pack("<d", self._GAUSS))
            # aug_bitgen_t {bitgen_t *bit_generator; int has_gauss; double gauss;}
            if where < 8 or struct.unpack_from("<i", raw, where - 8)[0] != 1:
                return None
            probe.set_state(("MT19937", key, pos, 0, 0.0))
            if struct.unpack_from("<i", _object_bytes(probe), where - 8)[0] != 0:
                return None
            return where if self._round_trip(where) else None
        except Exception:
            return None

    def _round_trip(self, where: int) -> bool:
        before = self.rs.get_state()
        saved = (ctypes.string_at(ctypes.addressof(self.words), _STATE_BYTES),
                 ctypes.string_at(id(self.rs) + where - 8, 16))
        self.rs.standard_normal(3)  # moves the key, the position and the normal cache
        ctypes.memmove(ctypes.addressof(self.words), saved[0], _STATE_BYTES)
        ctypes.memmove(id(self.rs) + where - 8, saved[1], 16)
        after = self.rs.get_state()
        self.rs.set_state(before)
        return _numpy_equal(after, before)

    @property
    def fast(self) -> bool:
        """Probed, and the global still holds the same bit generator."""
        return self.cache is not None and self.rs._bit_generator is self.bitgen

    def fingerprint(self) -> Any:
        if not self.fast:
            return self.rs.get_state()
        w = self.words
        return w[624], w[0], w[1], w[312], w[623], self.has_gauss.value, self.gauss.value

    def extra(self) -> Any:
        """What the state holds besides the words: the normal cache (has_gauss, gauss)."""
        return self.cache.raw

    def snapshot(self, reuse: Any = None) -> Any:
        if not self.fast:
            return self.rs.get_state()
        return _copy(ctypes.addressof(self.words), reuse), self.cache.raw

    def same(self, snap: Any) -> bool:
        if not self.fast or not isinstance(snap[0], ctypes.Array):
            return _numpy_equal(self.rs.get_state(), snap)
        return _equal(ctypes.addressof(self.words), snap[0]) and self.cache.raw == snap[1]

    def restore(self, snap: Any) -> None:
        if not isinstance(snap[0], ctypes.Array):  # get_state()'s legacy tuple
            self.rs.set_state(snap)
            return
        ctypes.memmove(ctypes.addressof(self.words), snap[0], _STATE_BYTES)
        ctypes.memmove(self.cache, snap[1], 16)


def _numpy_equal(a: Any, b: Any) -> bool:
    """Whether two ``get_state()`` tuples are the same state."""
    if not (isinstance(b, tuple) and len(b) == 5):
        return False
    return a[0] == b[0] and bool(np.array_equal(a[1], b[1])) and a[2:] == b[2:]


def _load_memcmp() -> Any:
    try:
        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):  # no C library symbols to hand (Windows)
        return None
    memcmp.restype, memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _load_memcmp()


def _copy(address: int, reuse: Any) -> Any:
    """The state's bytes at ``address``, into ``reuse`` when it is a buffer of that size (a fresh
    2.5 KB buffer is a C ``malloc``, which right after a batch's freed tensors can cost tens of µs)."""
    fits = isinstance(reuse, ctypes.Array) and len(reuse) == _STATE_BYTES
    buffer = reuse if fits else ctypes.create_string_buffer(_STATE_BYTES)
    ctypes.memmove(buffer, address, _STATE_BYTES)
    return buffer


def _equal(address: int, buffer: Any) -> bool:
    if _MEMCMP is not None:
        return bool(_MEMCMP(address, buffer, _STATE_BYTES) == 0)
    return bool(ctypes.string_at(address, _STATE_BYTES) == buffer.raw)


class GlobalStreams:
    """Snapshot, restore and compare the global ``python``, ``numpy`` and ``torch`` streams."""

    NAMES = ("python", "numpy", "torch")

    def __init__(self) -> None:
        self.python, self.numpy = _Python(), _Numpy()

    @property
    def fast(self) -> dict[str, bool]:
        """Which streams take the memory path (the others use their own get/set state)."""
        return {"python": self.python.fast, "numpy": self.numpy.fast, "torch": True}

    def snapshot(self, reuse: tuple[Any, Any, torch.Tensor] | None = None) -> tuple[Any, Any, torch.Tensor]:
        """The three states; ``reuse``, an earlier snapshot no longer needed, lends its buffers."""
        return (self.python.snapshot(reuse[0][0] if reuse is not None else None),
                self.numpy.snapshot(reuse[1][0] if reuse is not None else None),
                torch.default_generator.get_state())

    def restore(self, snap: tuple[Any, Any, torch.Tensor], only: frozenset[str] | None = None) -> None:
        """Put the streams (``only`` those named, if given) back to ``snap``."""
        if only is None or "python" in only:
            self.python.restore(snap[0])
        if only is None or "numpy" in only:
            self.numpy.restore(snap[1])
        if only is None or "torch" in only:
            torch.default_generator.set_state(snap[2])

    def drawn(self, snap: tuple[Any, Any, torch.Tensor], among: frozenset[str]) -> frozenset[str]:
        """The streams in ``among`` whose state is no longer ``snap``'s: something drew from them."""
        found = set()
        if "python" in among and not self.python.same(snap[0]):
            found.add("python")
        if "numpy" in among and not self.numpy.same(snap[1]):
            found.add("numpy")
        if "torch" in among and not torch.equal(torch.default_generator.get_state(), snap[2]):
            found.add("torch")
        return frozenset(found)


class FetchGuard:
    """Around one fetch at a time: ``before()``, the fetch, ``drawn(among)``, ``restore(names)``.

    python's and numpy's states are copied only when their fingerprint changed since the last
    copy (the copy is then still the live state); torch's has no address, so it is read each time.
    """

    def __init__(self) -> None:
        self._copies: dict[str, tuple[Any, Any]] = {}  # stream -> (fingerprint, snapshot)
        self._marks: dict[str, Any] = {}
        self._torch: torch.Tensor | None = None

    def before(self) -> None:
        streams = global_streams()
        for name, stream in (("python", streams.python), ("numpy", streams.numpy)):
            mark = stream.fingerprint()
            copy = self._copies.get(name)
            if copy is None or copy[0] != mark:
                reuse = copy[1][0] if copy is not None and isinstance(copy[1], tuple) else None
                self._copies[name] = (mark, stream.snapshot(reuse))
            self._marks[name] = mark
        self._torch = torch.default_generator.get_state()

    def drawn(self, among: frozenset[str]) -> frozenset[str]:
        """The streams in ``among`` something drew from since ``before()``."""
        streams = global_streams()
        found = {name for name, stream in (("python", streams.python), ("numpy", streams.numpy))
                 if name in among and stream.fingerprint() != self._marks[name]}
        if "torch" in among:
            assert self._torch is not None
            if not torch.equal(torch.default_generator.get_state(), self._torch):
                found.add("torch")
        return frozenset(found)

    def restore(self, names: frozenset[str]) -> None:
        """Put the named streams back to their state at ``before()``."""
        streams = global_streams()
        if "python" in names:
            streams.python.restore(self._copies["python"][1])
        if "numpy" in names:
            streams.numpy.restore(self._copies["numpy"][1])
        if "torch" in names:
            assert self._torch is not None
            torch.default_generator.set_state(self._torch)


_STREAMS: GlobalStreams | None = None


def global_streams() -> GlobalStreams:
    """The process's one ``GlobalStreams`` (probed at first use; a forked worker inherits it, and
    the addresses it holds are the same in the child)."""
    global _STREAMS
    if _STREAMS is None:
        _STREAMS = GlobalStreams()
    return _STREAMS
