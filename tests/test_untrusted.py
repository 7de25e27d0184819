"""Validated reads of run-directory files: each bad case is a RunDirError naming the file and the problem."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprokit import tensorfile
from reprokit.errors import RunDirError
from reprokit.untrusted import (
    DTYPE_BYTES,
    check_safetensors_header,
    expect,
    read_json,
    safe_member,
    safe_truncate,
)


def test_read_json_reads_a_good_file(tmp_path: Path) -> None:
    """A small, shallow, UTF-8 JSON file comes back as its value (NaN as reprokit writes it, too)."""
    (tmp_path / "meta.json").write_text(json.dumps({"step": 3, "config": {"lr": 0.1}, "loss": math.nan}))
    value = read_json(tmp_path / "meta.json")
    assert value["step"] == 3 and value["config"] == {"lr": 0.1} and math.isnan(value["loss"])


@pytest.mark.parametrize(("content", "kwargs", "match"), [
    (b"x" * 101, {"max_bytes": 100}, r"meta.json: 101 bytes, more than the 100 allowed"),
    (b"[" * 10 + b"]" * 10, {"max_depth": 9}, r"meta.json: JSON nested deeper than 9 levels"),
    (b"[" * 100_000 + b"]" * 100_000, {}, r"meta.json: JSON nested deeper than 64 levels"),
    (b'{"step": 1', {}, r"meta.json: not JSON \(Expecting"),
    (b"1" * 5000, {}, r"meta.json: not JSON"),
    (b'{"name": "\xff"}', {}, r"meta.json: not UTF-8 \(byte 0xff at offset 10\)"),
])
def test_read_json_refuses_a_bad_file(tmp_path: Path, content: bytes, kwargs: dict[str, int],
                                      match: str) -> None:
    """Too large, too deep (even past the interpreter's stack), not JSON, not UTF-8: each named."""
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(RunDirError, match=match):
        read_json(tmp_path / "meta.json", **kwargs)


def test_read_json_refuses_what_is_not_a_plain_file(tmp_path: Path) -> None:
    """A missing file, a directory, a FIFO (which would hang a reader) and a symlink are refused."""
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "secret").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "secret")
    with pytest.raises(RunDirError, match=r"missing.json: cannot be opened \(No such file"):
        read_json(tmp_path / "missing.json")
    for name in ("dir.json", "fifo.json"):
        with pytest.raises(RunDirError, match=rf"{name}: not a plain file"):
            read_json(tmp_path / name)
    with pytest.raises(RunDirError, match=r"link.json: cannot be opened \(a symbolic link\)"):
        read_json(tmp_path / "link.json")


def test_expect_returns_good_fields() -> None:
    """Each type within its bounds comes back as itself (a float written as an int, as a float)."""
    record = {"step": 7, "lr": 1, "name": "cnn", "config": {"a": 1}, "files": ["x"]}
    assert expect(record, "step", int, path="meta.json", lo=0) == 7
    assert expect(record, "lr", float, path="meta.json") == 1.0 and type(expect(record, "lr", float,
                                                                              path="m")) is float
    assert expect(record, "name", str, path="meta.json", max_len=3) == "cnn"
    assert expect(record, "config", dict, path="meta.json") == {"a": 1}
    assert expect(expect(record, "files", list, path="m"), 0, str, path="m") == "x"


@pytest.mark.parametrize(("record", "type_", "bounds", "match"), [
    ({"step": "abc"}, int, {"lo": 0},
     r"^meta.json: field 'step' is 'abc' \(str\); expected an int in \[0, 2\*\*63\)$"),
    ({"step": True}, int, {}, r"field 'step' is True \(bool\); expected an int in \[-2\*\*63, 2\*\*63\)"),
    ({"step": 2**63}, int, {}, r"field 'step' is 9223372036854775808 \(int\); expected an int"),
    ({"step": -1}, int, {"lo": 0, "hi": 10}, r"field 'step' is -1 \(int\); expected an int in \[0, 10\)"),
    ({"step": 1.0}, int, {}, r"field 'step' is 1.0 \(float\)"),
    ({}, int, {}, r"meta.json: field 'step' is missing; expected an int"),
    ({"step": math.nan}, float, {}, r"field 'step' is nan \(float\); expected a finite float$"),
    ({"step": math.inf}, float, {"lo": 0}, r"is inf \(float\); expected a finite float in \[0, inf\)"),
    ({"step": 10**400}, float, {}, r"\.\.\. \(int\); expected a finite float"),
    ({"step": "x" * 9}, str, {"max_len": 8}, r"'xxxxx.*' \(str\); expected a str of at most 8 characters"),
    ({"step": [1]}, dict, {}, r"field 'step' is \[1\] \(list\); expected an object"),
    ({"step": {}}, list, {}, r"field 'step' is \{\} \(dict\); expected a list"),
])
def test_expect_refuses_bad_fields(record: dict[str, Any], type_: type, bounds: dict[str, Any],
                                   match: str) -> None:
    """Wrong type (bool is not an int), out of range, NaN or inf, too long, missing: each named."""
    with pytest.raises(RunDirError, match=match):
        expect(record, "step", type_, path="meta.json", **bounds)


def test_expect_refuses_a_container_of_the_wrong_kind() -> None:
    """A field asked of a list, or an item of an object, says what the container was."""
    wanted = r"m.json: \['a'\] \(list\) holds no field 'step'; expected a JSON object"
    with pytest.raises(RunDirError, match=wanted):
        expect(["a"], "step", int, path="m.json")
    with pytest.raises(RunDirError, match=r"m.json: item 3 \(of 1\) is missing"):
        expect(["a"], 3, str, path="m.json")
    with pytest.raises(TypeError, match="checks int, float, str, dict or list"):
        expect({"a": 1}, "a", bytes, path="m.json")


def test_safe_member_accepts_plain_names_and_inner_links(tmp_path: Path) -> None:
    """A plain file name gives folder/name; a symlink to another file of the folder is allowed."""
    (tmp_path / "state.pt").write_bytes(b"x")
    (tmp_path / "alias.pt").symlink_to("state.pt")
    assert safe_member(tmp_path, "state.pt") == tmp_path / "state.pt"
    assert safe_member(tmp_path, "alias.pt") == tmp_path / "alias.pt"
    assert safe_member(tmp_path, "not-yet-there.pt") == tmp_path / "not-yet-there.pt"


@pytest.mark.parametrize(("name", "match"), [
    ("../state.pt", r"'\.\./state\.pt' \(str\) is a path or a name with a NUL byte"),
    ("/etc/passwd", r"is a path"), ("a\\b", r"is a path"), ("a\0b", r"NUL byte"),
    ("..", r"'\.\.' \(str\) is not a file name"), (".", r"not a file name"), ("", r"not a file name"),
    (5, r"5 \(int\) is not a file name"), ("é" * 200, r"longer than 255 bytes"),
    ("\ud800", r"not encodable as UTF-8"),
])
def test_safe_member_refuses_what_is_not_a_plain_name(tmp_path: Path, name: Any, match: str) -> None:
    """Separators, '.', '..', NUL, absolute paths, non-strings, overlong or unencodable names."""
    with pytest.raises(RunDirError, match=match):
        safe_member(tmp_path, name)


def test_safe_member_refuses_links_out_of_the_folder(tmp_path: Path) -> None:
    """A symlink to a file outside, to the folder itself, or in a loop is refused."""
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    (tmp_path / "secret").write_text("x")
    (folder / "out.pt").symlink_to(tmp_path / "secret")
    (folder / "self.pt").symlink_to(".")
    (folder / "loop.pt").symlink_to("loop.pt")
    with pytest.raises(RunDirError, match=r"'out.pt' \(str\) is a symbolic link to '.*secret', outside"):
        safe_member(folder, "out.pt")
    with pytest.raises(RunDirError, match="outside the folder"):
        safe_member(folder, "self.pt")
    with pytest.raises(RunDirError, match="a symbolic link that loops"):
        safe_member(folder, "loop.pt")


def test_safe_truncate_cuts_back_to_a_recorded_size(tmp_path: Path) -> None:
    """A size within the file cuts it there; the file's own size leaves it as it is."""
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"0123456789")
    safe_truncate(path, 10)
    safe_truncate(path, 4)
    safe_truncate(path, 0)
    safe_truncate(path, 0)
    assert path.read_bytes() == b""


@pytest.mark.parametrize(("size", "match"), [
    (11, r"metrics.csv: has 10 bytes, fewer than the 11 the checkpoint recorded"),
    (-1, r"the recorded size -1 \(int\) is not a byte count"),
    ("10", r"the recorded size '10' \(str\) is not a byte count"),
    (True, r"True \(bool\) is not a byte count"), (4.0, r"4.0 \(float\)"),
])
def test_safe_truncate_refuses_a_bad_size(tmp_path: Path, size: Any, match: str) -> None:
    """A recorded size beyond the file, negative or not an int is refused and the file left as it is."""
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"0123456789")
    with pytest.raises(RunDirError, match=match):
        safe_truncate(path, size)
    assert path.read_bytes() == b"0123456789"


def test_safe_truncate_follows_no_symlink(tmp_path: Path) -> None:
    """A metrics.csv linking out of the run directory is refused, its target untouched."""
    (tmp_path / "precious").write_bytes(b"keep")
    (tmp_path / "metrics.csv").symlink_to(tmp_path / "precious")
    with pytest.raises(RunDirError, match="a symbolic link"):
        safe_truncate(tmp_path / "metrics.csv", 0)
    assert (tmp_path / "precious").read_bytes() == b"keep"


def _tensor_file(path: Path) -> bytes:
    buffer = io.BytesIO()
    tensors = [torch.arange(12.0).reshape(3, 4), torch.zeros(0), torch.ones(5, dtype=torch.int64)]
    tensorfile.write(buffer, tensors)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_safetensors_header_of_reprokit_and_of_safetensors_files(tmp_path: Path) -> None:
    """The header of a checkpoint tensors file and of a safetensors.torch file passes and comes back."""
    _tensor_file(tmp_path / "tensors.safetensors")
    assert check_safetensors_header(tmp_path / "tensors.safetensors")["0"]["shape"] == [3, 4]
    safetensors.torch.save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, tmp_path / "model.safetensors",
                                metadata={"names": "[\"w\"]"})
    assert check_safetensors_header(tmp_path / "model.safetensors")["__metadata__"] == {"names": "[\"w\"]"}


def test_the_dtype_table_matches_safetensors() -> None:
    """DTYPE_BYTES lists exactly the dtypes safetensors.torch reads, with their sizes."""
    assert {name: torch.empty(0, dtype=dtype).element_size()
            for name, dtype in safetensors.torch._TYPES.items()} == DTYPE_BYTES


def _with_header(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


_T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(("header", "data", "length", "match"), [
    ({"t": _T}, b"\0" * 8, 10**6, r"header length 1000000 exceeds the \d+ bytes after it"),
    ({"t": _T}, b"\0" * 8, 2**64 - 1, r"header length 18446744073709551615 exceeds"),
    (b"\xff\xfe", b"", None, r"the safetensors header is not UTF-8 JSON"),
    (b"{not json", b"", None, r"the safetensors header is not UTF-8 JSON"),
    ([1, 2], b"", None, r"the safetensors header is \[1, 2\] \(list\); expected a JSON object"),
    ({"t": {**_T, "data_offsets": [0, 80]}}, b"\0" * 8, None,
     r"tensor 't' data_offsets: item 1 \(of 2\) is 80 \(int\); expected an int in \[0, 9\)"),
    ({"t": {**_T, "data_offsets": [0, 4]}}, b"\0" * 8, None,
     r"offsets 0..4 do not fit its shape and dtype \(shape \[2\] of F32\)"),
    ({"t": {**_T, "shape": [10**6, 10**6]}}, b"\0" * 8, None,
     r"do not fit its shape and dtype \(shape \[1000000, 1000000\]"),
    ({"t": {**_T, "shape": [-2]}}, b"\0" * 8, None, r"tensor 't' shape: item 0 \(of 1\) is -2 \(int\)"),
    ({"t": {**_T, "dtype": "F128"}}, b"\0" * 8, None, r"tensor 't': dtype 'F128' is not one of"),
    ({"t": {**_T, "dtype": 4}}, b"\0" * 8, None, r"tensor 't': field 'dtype' is 4 \(int\); expected a str"),
    ({"t": "F32"}, b"\0" * 8, None, r"tensor 't': 'F32' \(str\) holds no field 'dtype'"),
    ({"t": _T, "u": _T}, b"\0" * 16, None, r"tensor 'u' starts at 0, expected 8 \(tensors overlap"),
    ({"t": _T}, b"\0" * 12, None, r"the tensors cover 8 of the 12 data bytes"),
    ({"__metadata__": {"k": 1}}, b"", None,
     r"__metadata__ is \{'k': 1\} \(dict\); expected an object of strings"),
])
def test_safetensors_header_refuses_a_forged_header(tmp_path: Path, header: Any, data: bytes,
                                                    length: int | None, match: str) -> None:
    """A header length past the file, a header that is not a JSON object, offsets out of the data
    section, a shape that does not fit its bytes, unknown dtypes, overlaps and gaps: each named."""
    path = _with_header(tmp_path / "tensors.safetensors", header, data, length)
    with pytest.raises(RunDirError, match=rf"tensors.safetensors: .*{match}"):
        check_safetensors_header(path)


def test_safetensors_header_refuses_a_truncated_file(tmp_path: Path) -> None:
    """Cut anywhere, a real tensors file is refused with a RunDirError (never a struct or JSON error)."""
    data = _tensor_file(tmp_path / "good.safetensors")
    for cut in range(len(data)):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(RunDirError, match=r"cut\.safetensors: "):
            check_safetensors_header(tmp_path / "cut.safetensors")


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
_FIELD_TYPES = st.sampled_from([int, float, str, dict, list])
_HYPOTHESIS = settings(max_examples=200, deadline=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture])


def _never_anything_but_run_dir_error(path: Path, key: str | int, type_: type) -> None:
    with contextlib.suppress(RunDirError):
        value = read_json(path, max_depth=4)
        expect(value, key, type_, path=path, lo=0, hi=1000)
        safe_member(path.parent, value)


@_HYPOTHESIS
@given(value=_JSONISH, key=st.text(max_size=3) | st.integers(-3, 3), type_=_FIELD_TYPES)
def test_any_json_value_reads_or_is_refused(tmp_path: Path, value: Any, key: str | int, type_: type) -> None:
    """For any JSON-ish value (NaN, inf, huge ints, unicode, nesting), read_json, expect and
    safe_member return or raise RunDirError, never anything else."""
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(value))
    _never_anything_but_run_dir_error(path, key, type_)


@_HYPOTHESIS
@given(data=st.binary(max_size=200), key=st.text(max_size=3), type_=_FIELD_TYPES)
def test_any_bytes_read_or_are_refused(tmp_path: Path, data: bytes, key: str, type_: type) -> None:
    """For any byte string as a JSON or a safetensors file, the readers return or raise RunDirError."""
    path = tmp_path / "meta.json"
    path.write_bytes(data)
    _never_anything_but_run_dir_error(path, key, type_)
    with contextlib.suppress(RunDirError):
        check_safetensors_header(path)


@_HYPOTHESIS
@given(position=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_any_flipped_byte_in_a_tensors_file_passes_or_is_refused(tmp_path: Path, position: int,
                                                                 byte: int) -> None:
    """A real tensors file with one byte replaced anywhere: the header check returns or raises RunDirError."""
    data = bytearray(_tensor_file(tmp_path / "t.safetensors"))
    data[position % len(data)] = byte
    (tmp_path / "t.safetensors").write_bytes(bytes(data))
    with contextlib.suppress(RunDirError):
        check_safetensors_header(tmp_path / "t.safetensors")
