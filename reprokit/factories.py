"""A model or dataset of the user's own, named in a TrainConfig by import path: ``"pkg.module:factory"``.

    model = "mypkg.nets:make_net"      make_net(input_shape, outputs) -> nn.Module
    dataset = "mypkg.data:load"        load() -> (x, y): tensors or arrays; y integer = classes

The factory's module source is digested into the manifest (``code.factories``) and into the code
version a checkpoint records, so a resume refuses a factory whose code changed.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from reprokit.errors import ConfigError

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory(name: str) -> bool:
    """Whether a config's model/dataset value is an import path rather than a registry name."""
    return ":" in name


def check_reference(field: str, ref: str) -> None:
    """Refuse a malformed ``module:attribute`` reference, naming the field and the form."""
    if not _REF.match(ref):
        raise ConfigError(f"{field} {ref!r} is not an import path of the form 'package.module:factory'")


def resolve(field: str, ref: str) -> Callable[..., Any]:
    """The callable ``ref`` names; :class:`ConfigError` naming what is missing."""
    check_reference(field, ref)
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field} {ref!r}: cannot import {module_name!r} ({e}); put it on PYTHONPATH "
                          "or install its package") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{field} {ref!r}: {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def source_digest_of(field: str, ref: str) -> str:
    """xxh3-128 of the source file of the module that defines ``ref``."""
    resolve(field, ref)  # the reference works: module and callable exist
    try:
        path = inspect.getsourcefile(importlib.import_module(ref.split(":")[0]))
    except TypeError:  # a built-in module
        path = None
    if path is None:
        raise ConfigError(f"{field} {ref!r}: its module has no source file to digest")
    return xxhash.xxh3_128_hexdigest(Path(path).read_bytes())


def factory_digests(model: str, dataset: str) -> dict[str, dict[str, str]]:
    """``{"model": {"ref": ..., "source_digest": ...}, ...}`` for the fields that name a factory."""
    return {field: {"ref": ref, "source_digest": source_digest_of(field, ref)}
            for field, ref in (("model", model), ("dataset", dataset)) if is_factory(ref)}


def code_version(reprokit_source: str, model: str, dataset: str) -> str:
    """reprokit's source digest, combined with the factories' when the config names any."""
    digests = factory_digests(model, dataset)
    if not digests:
        return reprokit_source
    h = xxhash.xxh3_128(reprokit_source.encode())
    for field in sorted(digests):
        h.update(f"\0{field}={digests[field]['source_digest']}".encode())
    return h.hexdigest()
