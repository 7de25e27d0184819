"""Validated reads of a run directory's files: a run directory may come from someone else.

Sizes, JSON depth, field types and ranges, file names named by a file, sizes a checkpoint recorded
and safetensors headers are checked before use; a violation is a :class:`RunDirError` naming the
file and the problem, never a bare ``TypeError``, ``KeyError`` or ``OSError``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any, TypeVar, cast

from reprokit.errors import RunDirError

T = TypeVar("T")

MAX_JSON_BYTES = 64 << 20  # a manifest with a large config is ~100 KB; a bigger file is not ours
MAX_JSON_DEPTH = 64  # a config nests a few levels; json's own limit is the interpreter's stack
MAX_LEN = 1 << 16  # the longest string, list or object a typed field may hold by default
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (HeaderTooLarge)
_NAME_MAX = 255  # bytes in one file name (Linux NAME_MAX)
# bytes per element of each safetensors dtype reprokit reads (safetensors.torch._TYPES)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "C64": 8,
               "U64": 8, "U32": 4, "U16": 2}
_TYPE_NAMES = {int: "an int", float: "a finite float", str: "a str", dict: "an object", list: "a list"}
_POWERS = {sign * 2**k: f"{'-' if sign < 0 else ''}2**{k}" for k in (31, 32, 63, 64) for sign in (1, -1)}


def read_json(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value in ``path``, refused (RunDirError) if it is missing, not a plain file, larger
    than ``max_bytes``, not UTF-8, not JSON, or nested deeper than ``max_depth``."""
    text = _read_text(Path(path), max_bytes)
    too_deep = f"{path}: JSON nested deeper than {max_depth} levels; the file is not reprokit's"
    try:
        value = json.loads(text)
    except RecursionError:
        raise RunDirError(too_deep) from None
    except ValueError as e:  # JSONDecodeError, and ints of more than 4300 digits
        raise RunDirError(f"{path}: not JSON ({e}); the file is damaged or not reprokit's") from None
    if _depth(value, max_depth) > max_depth:
        raise RunDirError(too_deep)
    return value


def open_plain(path: str | Path) -> tuple[int, int]:
    """A read-only descriptor of ``path`` and its size; a symlink, a missing file or anything but a
    plain file is a RunDirError. The caller closes the descriptor."""
    return _open_plain(Path(path), os.O_RDONLY)


def _open_plain(path: Path, flags: int) -> tuple[int, int]:
    """A descriptor of ``path`` and its size, refusing a symlink (it may lead out of the run directory)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        problem = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise RunDirError(f"{path}: cannot be opened ({problem}); a run directory holds files") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise RunDirError(f"{path}: not a plain file; a run directory holds only plain files")
    return fd, info.st_size


def _read_text(path: Path, max_bytes: int) -> str:
    fd, size = _open_plain(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)  # the file may have grown since fstat
    if max(size, len(data)) > max_bytes:
        raise RunDirError(f"{path}: {max(size, len(data))} bytes, more than the {max_bytes} allowed; "
                          "the file is not reprokit's")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                          "the file is damaged or not reprokit's") from None


def _depth(value: Any, limit: int) -> int:  # a scalar: 0; iterative, and stops past limit
    deepest, stack = 0, [(value, 0)]
    while stack and deepest <= limit:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def expect(obj: Any, key: str | int, type_: type[T], *, path: str | Path, lo: float | None = None,
           hi: float | None = None, max_len: int = MAX_LEN) -> T:
    """``obj[key]`` if it is a ``type_`` (int, float, str, dict or list) within bounds, else RunDirError.

    An int is not a bool and lies in [lo, hi) (default [-2**63, 2**63)); a float is finite, in [lo, hi)
    when given, and may be written as an int; a str, list or dict has at most ``max_len`` items.
    ``obj`` must be a JSON object (``key`` a str) or a list (``key`` an int)."""
    if type_ not in _TYPE_NAMES:
        raise TypeError(f"expect() checks int, float, str, dict or list, not {type_!r}")
    if type_ is int:  # by default what torch, numpy and sqlite hold
        lo, hi = -(2**63) if lo is None else lo, 2**63 if hi is None else hi
    if isinstance(obj, dict) and isinstance(key, str):
        found, name = key in obj, f"field {key!r}"
    elif isinstance(obj, list) and type(key) is int:
        found, name = -len(obj) <= key < len(obj), f"item {key} (of {len(obj)})"
    else:
        raise RunDirError(f"{path}: {_shown(obj)} holds no field {key!r}; expected a JSON "
                          f"{'object' if isinstance(key, str) else 'list'}")
    wanted = _wanted(type_, lo, hi, max_len)
    if not found:
        raise RunDirError(f"{path}: {name} is missing; expected {wanted}")
    checked = _checked(obj[key], type_, lo, hi, max_len)
    if checked is None:
        raise RunDirError(f"{path}: {name} is {_shown(obj[key])}; expected {wanted}")
    return cast(T, checked)


def _checked(value: Any, type_: type, lo: float | None, hi: float | None, max_len: int) -> Any:
    # value as a type_ if it is one within bounds, else None
    if type_ is int:
        ok = type(value) is int and _within(value, lo, hi)
    elif type_ is float:
        try:
            ok = type(value) in (int, float) and math.isfinite(value) and _within(value, lo, hi)
        except OverflowError:  # an int too large for a float
            ok = False
        value = float(value) if ok else value
    else:
        ok = type(value) is type_ and isinstance(value, str | list | dict) and len(value) <= max_len
    return value if ok else None


def _within(value: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value < hi)


def _wanted(type_: type, lo: float | None, hi: float | None, max_len: int) -> str:
    if type_ not in (int, float):
        return f"{_TYPE_NAMES[type_]} of at most {max_len} {'characters' if type_ is str else 'items'}"
    if lo is None and hi is None:
        return _TYPE_NAMES[type_]
    shown = [_POWERS.get(b, repr(b)) if b is not None else inf for b, inf in ((lo, "-inf"), (hi, "inf"))]
    return f"{_TYPE_NAMES[type_]} in [{shown[0]}, {shown[1]})"


def _shown(value: Any) -> str:  # its repr, cut to 60 characters, and its type
    text = repr(value)
    text = text if len(text) <= 60 else f"{text[:57]}..."
    return f"{text} ({type(value).__name__})"


def safe_member(folder: str | Path, name: Any) -> Path:
    """``folder / name`` for a ``name`` read from a file (``contents.json``): a plain file name,
    which, if a symlink, stays inside ``folder``. Anything else is a RunDirError."""
    problem = _name_problem(name)
    if problem is None:
        path = Path(folder) / str(name)
        if not path.is_symlink():
            return path
        try:
            inside, target = Path(folder).resolve(), path.resolve()
            if target.is_relative_to(inside) and target != inside:
                return path
            problem = f"a symbolic link to {str(target)!r}, outside the folder"
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop
            problem = "a symbolic link that loops"
    raise RunDirError(f"{folder}: {_shown(name)} is {problem}; a file there may name only plain files "
                      "of the folder (the run directory is damaged or forged)")


def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or name in ("", ".", ".."):
        return "not a file name"
    if any(c in name for c in "/\\\0"):
        return "a path or a name with a NUL byte, not a plain file name"
    try:
        too_long = len(name.encode()) > _NAME_MAX
    except UnicodeEncodeError:  # a lone surrogate, which JSON can spell
        return "not encodable as UTF-8"
    return f"longer than {_NAME_MAX} bytes" if too_long else None


def safe_truncate(path: str | Path, size: Any) -> None:
    """Cut ``path`` back to the ``size`` bytes a checkpoint recorded; a size that is not an int in
    [0, the file's size] (the file was changed or the record forged) is a RunDirError."""
    if type(size) is not int or size < 0:
        raise RunDirError(f"{path}: the recorded size {_shown(size)} is not a byte count; "
                          "the checkpoint's record is damaged")
    fd, have = _open_plain(Path(path), os.O_WRONLY)
    try:
        if size > have:
            raise RunDirError(f"{path}: has {have} bytes, fewer than the {size} the checkpoint recorded; "
                              "the file was changed after the checkpoint was taken")
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def check_safetensors_header(path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """The header of the safetensors file ``path`` once it is checked against the file: its length
    fits the file and ``max_header_bytes``, it is a JSON object, and the tensors' dtypes, shapes and
    ``data_offsets`` tile the data section exactly, in order (what safetensors itself requires).
    Check before allocating: a forged shape would otherwise ask for terabytes."""
    path = Path(path)
    fd, size = _open_plain(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise RunDirError(f"{path}: {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, max_header_bytes):
            raise RunDirError(f"{path}: header length {length} exceeds the {size - 8} bytes after it (or "
                              f"the limit {max_header_bytes}); the file is truncated or forged")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunDirError(f"{path}: the safetensors header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise RunDirError(f"{path}: the safetensors header is {_shown(header)}; expected a JSON object")
    _check_tensors(path, header, size - 8 - length)
    return header


def _check_tensors(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise RunDirError(f"{path}: __metadata__ is {_shown(entry)}; expected an object of strings")
            continue
        where = f"{path}: tensor {name!r}"
        dtype = expect(entry, "dtype", str, path=where, max_len=16)
        shape = expect(entry, "shape", list, path=where, max_len=64)
        offsets = expect(entry, "data_offsets", list, path=where, max_len=2)
        if dtype not in DTYPE_BYTES:
            raise RunDirError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        dims = [expect(shape, i, int, path=f"{where} shape", lo=0, hi=2**63) for i in range(len(shape))]
        begin, end = (expect(offsets, i, int, path=f"{where} data_offsets", lo=0, hi=data_bytes + 1)
                      for i in range(2))
        if end - begin != math.prod(dims) * DTYPE_BYTES[dtype]:
            raise RunDirError(f"{where}: offsets {begin}..{end} do not fit its shape and dtype "
                              f"(shape {dims} of {dtype})")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise RunDirError(f"{path}: tensor {name!r} starts at {begin}, expected {position} "
                              "(tensors overlap or leave a gap)")
        position = end
    if position != data_bytes:
        raise RunDirError(f"{path}: the tensors cover {position} of the {data_bytes} data bytes")
