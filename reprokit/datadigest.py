"""Content digests of whatever a user's script trains on.

Tensors and arrays are hashed by dtype, shape and bytes; files and directories by content (names
and bytes, in sorted order); map-style Datasets by the tensors, arrays and files among their
attributes (``TensorDataset``, ``Subset``, ``ConcatDataset`` and the usual ``self.data`` /
``self.targets`` classes, torchvision's included), and failing that sample by sample, each sample
drawn with the RNGs seeded so that a random transform gives the same bytes every time. What none
of these covers is refused with the way out.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from reprokit.digests import tensor_digest
from reprokit.errors import DataError

MAX_SAMPLES = 200_000  # the sample-by-sample fallback reads every sample; beyond this it refuses
_SCALARS = (bool, int, float, str, bytes, type(None))


def digest_data(obj: Any) -> str:
    """xxh3-128 of ``obj``'s content; :class:`DataError` naming the type and the way out if it
    holds nothing reprokit can read."""
    h = xxhash.xxh3_128()
    _feed(h, obj, "data", depth=0)
    return h.hexdigest()


def _feed(h: xxhash.xxh3_128, obj: Any, path: str, depth: int) -> None:
    if depth > 6:
        raise DataError(f"{path}: nested too deeply to digest; pass Run(data=...) the tensors or files")
    if isinstance(obj, torch.Tensor | np.ndarray):
        _feed_array(h, obj, path)
    elif isinstance(obj, os.PathLike) or (isinstance(obj, str) and depth == 0):
        _feed_path(h, Path(obj), path)
    elif isinstance(obj, _SCALARS):
        h.update(f"{path}={obj!r}\n".encode())
    elif isinstance(obj, Mapping | list | tuple):
        _feed_container(h, obj, path, depth)
    else:
        _feed_dataset(h, obj, path, depth)


def _feed_array(h: xxhash.xxh3_128, obj: torch.Tensor | np.ndarray, path: str) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise DataError(f"{path}: a numpy array of Python objects cannot be digested; pass its "
                            "values as a numeric array, or the files they come from")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    h.update(tensor_digest(path, obj).encode())


def _feed_container(h: xxhash.xxh3_128, obj: Mapping[Any, Any] | Sequence[Any], path: str,
                    depth: int) -> None:
    """A mapping by its sorted keys; a list or tuple of scalars as one value, else item by item."""
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = ((key, obj[key]) for key in sorted(obj, key=str))
    elif _plain(obj):
        h.update(f"{path}={obj!r}\n".encode())
        return
    else:
        items = enumerate(obj)
    for key, item in items:
        _feed(h, item, f"{path}.{key}", depth + 1)


def _plain(items: Sequence[Any]) -> bool:
    return all(isinstance(v, _SCALARS) for v in items)


def _feed_path(h: xxhash.xxh3_128, root: Path, path: str) -> None:
    if not root.exists():
        raise DataError(f"{path}: {str(root)!r} does not exist; pass an existing file or directory")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(f"{path}:{f.relative_to(root).as_posix() if f != root else f.name}\0".encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 24):
                h.update(chunk)


def _feed_dataset(h: xxhash.xxh3_128, obj: Any, path: str, depth: int) -> None:
    h.update(f"{path}:{type(obj).__module__}.{type(obj).__qualname__}\0".encode())
    if isinstance(obj, torch.utils.data.IterableDataset):
        raise DataError(
            f"{path}: an IterableDataset ({type(obj).__name__}) cannot be digested (it has no indexed "
            "content); pass Run(data=...) the files or tensors it reads"
        )
    content = {k: v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and _is_content(v)} \
        if hasattr(obj, "__dict__") else {}
    if content:
        for key, value in content.items():
            _feed(h, value, f"{path}.{key}", depth + 1)
        return
    if not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        raise DataError(
            f"{path}: cannot digest a {type(obj).__name__}: it holds no tensors, arrays or files among its "
            "attributes and is not indexable; pass Run(data=...) the tensors or files it reads"
        )
    n = len(obj)
    if n > MAX_SAMPLES:
        raise DataError(
            f"{path}: {type(obj).__name__} holds no tensors, arrays or files among its attributes, and "
            f"reading its {n} samples one by one (limit {MAX_SAMPLES}) would be slow; pass Run(data=...) "
            "the files or tensors it reads"
        )
    with _seeded_rngs():
        for i in range(n):
            torch.default_generator.manual_seed(i)
            np.random.seed(i)
            random.seed(i)
            _feed(h, obj[i], f"{path}[{i}]", depth + 1)


def _is_content(value: Any) -> bool:
    """Attributes that are data: tensors, arrays, files, datasets, and lists of those or numbers."""
    if isinstance(value, torch.Tensor | np.ndarray | os.PathLike | torch.utils.data.Dataset):
        return True
    if isinstance(value, str):
        return os.path.exists(value) and len(value) < 4096
    if isinstance(value, list | tuple) and value:
        return _plain(value) or all(isinstance(v, torch.Tensor | np.ndarray) for v in value)
    return False


class _seeded_rngs:
    """Save the global RNGs on entry and put them back on exit: digesting draws nothing."""

    def __enter__(self) -> None:
        self._state = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def __exit__(self, *exc: object) -> None:
        py, npy, pt = self._state
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)
