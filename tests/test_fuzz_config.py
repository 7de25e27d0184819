"""Fuzzed configs (issue 17): any mapping given to ``reprokit.Run(config=...)`` is recorded faithfully
in manifest.json (NaN and ±inf as the strings ``'nan'``, ``'inf'``, ``'-inf'``, keys as ``str(key)``,
tuples as lists) or refused with a one-line ConfigError naming the key; any mapping or file given to
``TrainConfig`` is a config or a one-line ConfigError naming the field. Never another exception."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import reprokit
from reprokit.config import TrainConfig
from reprokit.differences import recipe_differences
from reprokit.errors import ConfigError
from reprokit.ledger import runs
from reprokit.provenance import check_recordable
from reprokit.rundir import read_json

_FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# unicode that breaks naive code: a lone surrogate (JSON can spell it, UTF-8 cannot), NUL, a newline,
# a combining accent, right-to-left text, an emoji
_ODD_TEXT = st.sampled_from(["\ud800", "a\x00b", "line\nbreak", "e\u0301", "\u05e9\u05dc\u05d5\u05dd",
                             "\U0001f600", "", " ", "nan", "inf"])
_TEXT = st.text(max_size=8) | _ODD_TEXT
_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80)
            | st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**300])
            | st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.797e308])
            | _TEXT)
# keys a user's dict may hold: str(key) is recorded; keys whose str collide are the xfail below
_KEYS = st.sampled_from(["seed", "model", "dataset", "lr"]) | _TEXT | st.integers(-3, 3) | st.booleans() \
    | st.none() | st.floats(allow_nan=False)


def _no_collision(d: dict[Any, Any]) -> bool:
    return len({str(k) for k in d}) == len(d)


_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(_KEYS, inner, max_size=3).filter(_no_collision),
    max_leaves=12,
)
_CONFIGS = st.dictionaries(_KEYS, _VALUES, max_size=5).filter(_no_collision)
# values a manifest cannot hold: each a ConfigError naming its key
_UNRECORDABLE = st.sampled_from([b"bytes", {1, 2}, 1j, object(), torch.ones(2), frozenset(), 10**5000,
                                 json.loads("[" * 70 + "]" * 70)])


def _recorded(value: Any) -> Any:
    """What the manifest holds for ``value``, as reprokit's config recording documents it."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, list | tuple):
        return [_recorded(v) for v in value]
    return {str(k): _recorded(v) for k, v in value.items()}


def _same(a: Any, b: Any) -> bool:
    """Equal with types: JSON text tells 1, 1.0 and true apart."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _run(run_dir: Path, config: Any, steps: int) -> None:
    """A user's loop of ``steps`` optimizer steps on a 2-weight model, recorded with ``config``."""
    run = reprokit.Run(run_dir, seed=0, config=config, progress=False)
    try:
        model = nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        run.track(model=model, optimizer=optimizer)
        for _ in range(steps):
            loss = model(torch.ones(1, 1)).sum()
            loss.backward()
            optimizer.step()
            run.step(loss=loss)
        run.finish()
    finally:
        run.close()


def _one_line_naming(error: BaseException, *names: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)


@_FUZZ
@given(config=_CONFIGS, steps=st.integers(0, 2))
def test_any_config_is_recorded_faithfully(tmp_path_factory: pytest.TempPathFactory, config: dict[Any, Any],
                                           steps: int) -> None:
    """Any JSON-like mapping (NaN, ±inf, huge ints, unicode and odd keys, nesting) is accepted and
    reads back from manifest.json as documented; an int SQLite cannot hold as a seed leaves the
    ledger's seed empty instead of failing the run."""
    run_dir = tmp_path_factory.mktemp("cfg") / "run"
    try:
        _run(run_dir, config, steps)
    except ConfigError as e:  # only an int of more digits than JSON readers take
        _one_line_naming(e, "digits JSON readers convert")
        return
    assert _same(read_json(run_dir, "manifest.json")["config"], _recorded(config))
    seed = runs(run_dir.parent / "ledger.sqlite")["seed"].iloc[0]
    recorded_seed = _recorded(config).get("seed")
    wanted = recorded_seed if type(recorded_seed) is int and -(2**63) <= recorded_seed < 2**63 else None
    assert (None if pd.isna(seed) else int(seed)) == wanted


@_FUZZ
@given(config=_CONFIGS, key=_TEXT, bad=_UNRECORDABLE)
def test_an_unrecordable_value_is_a_config_error_naming_its_key(tmp_path_factory: pytest.TempPathFactory,
                                                               config: dict[Any, Any], key: str,
                                                               bad: Any) -> None:
    """A value the manifest cannot hold (bytes, a set, a tensor, a 5000-digit int, nesting past the
    manifest's depth) is a one-line ConfigError naming its key, and no run directory is started."""
    config = {k: v for k, v in config.items() if str(k) != key}
    run_dir = tmp_path_factory.mktemp("bad") / "run"
    with pytest.raises(ConfigError) as refused:
        _run(run_dir, {**config, key: bad}, 0)
    _one_line_naming(refused.value, f"config[{key[:40]!r}]")
    assert not (run_dir / "manifest.json").exists()


def test_a_five_thousand_digit_int_is_refused_before_the_manifest() -> None:
    """Regression: an int JSON readers cannot convert back was a ValueError from the fingerprint's
    json.dumps; now a ConfigError naming it (the run directory would be unreadable otherwise)."""
    with pytest.raises(ConfigError, match=r"^config\['x'\] is an int of 16610 bits, more than the 4300 "):
        check_recordable({"x": 10**5000})


def test_a_config_nested_past_the_manifest_depth_is_refused(tmp_path: Path) -> None:
    """Regression: a config nested 70 levels was recorded, and then every reader refused the
    manifest ("nested deeper than 64 levels"): the run directory could not be verified or resumed."""
    deep = json.loads("[" * 70 + "]" * 70)
    with pytest.raises(ConfigError, match=r"^config\['a'\]\[0\]\[0\]\[0\]\.\.\. is nested 64 levels deep, "
                                          r"deeper than the 63 a manifest holds"):
        _run(tmp_path / "run", {"a": deep}, 0)
    assert not (tmp_path / "run" / "manifest.json").exists()
    _run(tmp_path / "ok", {"a": json.loads("[" * 62 + "]" * 62)}, 0)  # the deepest that reads back
    assert read_json(tmp_path / "ok", "manifest.json")["config"]["a"]


def test_a_seed_sqlite_cannot_hold_leaves_the_ledger_seed_empty(tmp_path: Path) -> None:
    """Regression: config={"seed": 2**64} was an OverflowError from the ledger's INSERT at run.finish;
    a model name with a lone surrogate was a UnicodeEncodeError. Both runs now finish, their
    ledger cells empty."""
    _run(tmp_path / "big", {"seed": 2**64}, 1)
    _run(tmp_path / "odd", {"model": "\ud800", "dataset": "\udfff"}, 0)
    table = runs(tmp_path / "ledger.sqlite")
    assert table["seed"].isna().all() and table["model"].isna().all() and len(table) == 2


@pytest.mark.xfail(strict=True, reason="bug in reprokit/runresume.py config_mapping: keys are recorded as "
                   "str(key), so {1: 'a', '1': 'b'} silently keeps only 'b' (should be a ConfigError)")
def test_keys_whose_str_collide_are_refused(tmp_path: Path) -> None:
    """Two keys recorded under one name would lose a value: that must be a ConfigError."""
    with pytest.raises(ConfigError):
        _run(tmp_path / "run", {1: "a", "1": "b"}, 0)


@pytest.mark.xfail(strict=True, reason="bug in reprokit/runresume.py _jsonable: a config that contains "
                   "itself recurses until RecursionError (should be a ConfigError naming the key)")
def test_a_config_that_contains_itself_is_a_config_error(tmp_path: Path) -> None:
    """A self-referencing config is refused by name, not by the interpreter's recursion limit."""
    config: dict[str, Any] = {}
    config["self"] = config
    with pytest.raises(ConfigError):
        _run(tmp_path / "run", config, 0)


def _setting_bug(setting: str, value: Any, where: str) -> Any:
    return pytest.param(setting, value, marks=pytest.mark.xfail(
        strict=True, raises=(TypeError, ValueError),
        reason=f"bug in reprokit/runsettings.py resolve_settings, which checks only the cadences and steps: "
        f"{setting}={value!r} reaches {where}"))


@pytest.mark.parametrize(("setting", "value"), [
    _setting_bug("deterministic", None, "seeding.py: a TypeError from torch.use_deterministic_algorithms"),
    _setting_bug("deterministic", "yes", "seeding.py: a TypeError from torch.use_deterministic_algorithms"),
    _setting_bug("threads", 2**31, "seeding.py: ValueError 'Overflow when unpacking long' from "
                 "torch.set_num_threads"),
    _setting_bug("checkpoint_seconds", "1", "checkpointer.py: a TypeError comparing a float and a str"),
    _setting_bug("checkpoint_seconds", 1j, "rundir.py atomic_write_json: complex is not JSON serializable"),
    ("digest_every", 1.5), ("steps", 0), ("keep_last", True),  # checked: ConfigErrors
])
def test_a_run_setting_of_the_wrong_type_is_a_config_error(tmp_path: Path, setting: str, value: Any) -> None:
    """A Run setting not of its type or range (found fuzzing Run's arguments beside the config) is a
    ConfigError naming it, as digest_every's, keep_last's and steps' are."""
    with pytest.raises(ConfigError, match=setting):
        run = reprokit.Run(tmp_path / "run", progress=False, ledger=False, **{setting: value})
        try:
            run.track(model=nn.Linear(1, 1))
            for _ in run.epochs(1):
                run.step()
            run.finish()
        finally:
            run.close()


def test_recipe_differences_compares_types_at_every_level() -> None:
    """A recorded field of another type (True for 1, 1 for 1.0, nested too) is a difference; equal
    manifests have none."""
    base = {"config": {"flag": 1, "lr": 1.0, "nested": {"xs": [1, 2]}}, "seeding": {"seed": 0}}
    assert recipe_differences(base, json.loads(json.dumps(base))) == []
    assert recipe_differences(base, {**base, "config": {**base["config"], "flag": True}}) == \
        ["config.flag: 1 -> True"]
    assert recipe_differences(base, {**base, "config": {**base["config"], "lr": 1}}) == \
        ["config.lr: 1.0 -> 1"]
    assert recipe_differences(base, {**base, "config": {**base["config"], "nested": {"xs": [1, 2.0]}}}) == \
        ["config.nested.xs.1: 2 -> 2.0"]
    assert recipe_differences(base, {**base, "seeding": {"seed": False}}) == ["seeding.seed: 0 -> False"]


# --- TrainConfig -------------------------------------------------------------------------------------

_FIELDS = {f: type(v) for f, v in TrainConfig().to_dict().items()}
_FIELD_NAMES = st.sampled_from(sorted(_FIELDS))
_TRAIN_VALUES = _SCALARS | st.lists(_SCALARS, max_size=2) | st.dictionaries(_TEXT, _SCALARS, max_size=2) \
    | st.sampled_from(["cnn", "mlp", "digits", "adam", "cosine", "two_stage", "feature_extraction", "a:b"])
_OF_TYPE = {int: st.integers() | st.sampled_from([0, 1, -1, 2**32, 2**63 - 1, 2**63]),
            float: st.floats() | st.integers(),
            str: _TEXT | st.sampled_from(["cnn", "digits", "adam", "cosine", "two_stage", "a:b", "runs/x"]),
            bool: st.booleans(), type(None): st.none() | st.integers(-1, 3)}
# each field with a value of its own type (extremes included), or any value at all
_TRAIN_MAPPINGS = _FIELD_NAMES.flatmap(lambda name: st.fixed_dictionaries({name: _OF_TYPE[_FIELDS[name]]})) \
    | st.fixed_dictionaries({}, optional={name: _OF_TYPE[kind] for name, kind in _FIELDS.items()}) \
    | st.dictionaries(_FIELD_NAMES, _TRAIN_VALUES, max_size=4) \
    | st.dictionaries(_FIELD_NAMES | _KEYS, _TRAIN_VALUES, max_size=3)


def _field_named(message: str, data: dict[Any, Any]) -> bool:
    """The message names a key of ``data`` (a field, or an unknown key)."""
    return any(str(k)[:20] in message for k in data) or "init_from" in message or "finetune" in message


@_FUZZ
@given(data=_TRAIN_MAPPINGS)
def test_any_mapping_is_a_train_config_or_a_config_error(data: dict[Any, Any]) -> None:
    """from_dict gives a config holding exactly the given values (ints as floats where the field is
    a float, every float finite except checkpoint_seconds) or a one-line ConfigError naming a key."""
    try:
        config = TrainConfig.from_dict(data)
    except ConfigError as e:
        assert "\n" not in str(e) and _field_named(str(e), data), str(e)
        event("refused")
        return
    event("accepted")
    recorded = config.to_dict()
    for key, value in data.items():
        assert recorded[key] == value and (value is None or isinstance(recorded[key], type(value))
                                           or (type(value) is int and _FIELDS[key] is float))
    numbers = [v for k, v in recorded.items() if isinstance(v, float) and k != "checkpoint_seconds"]
    assert all(math.isfinite(v) for v in numbers)
    assert all(-(2**63) <= v < 2**63 for v in recorded.values() if type(v) is int)
    assert TrainConfig.from_dict(json.loads(json.dumps(recorded))) == config


@_FUZZ
@given(data=_TRAIN_MAPPINGS, suffix=st.sampled_from([".json", ".yaml"]))
def test_any_config_file_loads_or_is_a_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                    data: dict[Any, Any], suffix: str) -> None:
    """A --config file written from any mapping loads or is a one-line ConfigError."""
    import yaml

    path = tmp_path_factory.mktemp("file") / f"config{suffix}"
    try:
        path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    except (TypeError, ValueError, UnicodeEncodeError, yaml.YAMLError):  # the mapping has no such file
        return
    try:
        TrainConfig.from_file(path)
    except ConfigError as e:
        assert "\n" not in str(e)


@_FUZZ
@given(data=st.binary(max_size=120), suffix=st.sampled_from([".json", ".yaml", ".yml", ".toml"]))
def test_any_bytes_as_a_config_file_are_a_config_error_or_a_config(tmp_path_factory: pytest.TempPathFactory,
                                                                   data: bytes, suffix: str) -> None:
    """Any bytes in a --config file: a TrainConfig or a one-line ConfigError (never a decode error)."""
    path = tmp_path_factory.mktemp("bytes") / f"config{suffix}"
    path.write_bytes(data)
    try:
        TrainConfig.from_file(path)
    except ConfigError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize(("text", "suffix", "match"), [
    (b"\xff\xfe lr: 1", ".yaml", r"config\.yaml' does not parse \('utf-8' codec can't decode byte 0xff"),
    (b'{"seed": 1' + b"0" * 5000 + b"}", ".json", r"does not parse \(Exceeds the limit \(4300 digits\)"),
    (b"seed: 1" + b"0" * 5000, ".yaml", r"does not parse \(Exceeds the limit"),
    (b"1: 2\nx: 3\n", ".yaml", r"unknown config key\(s\) \['x', 1\]"),
    (b"[" * 100_000, ".json", r"does not parse"),
    (b"{lr: [\n", ".yaml", r"does not parse \(while parsing a flow node .*, line 2, column 1"),
])
def test_config_files_that_crashed_are_config_errors(tmp_path: Path, text: bytes, suffix: str,
                                                     match: str) -> None:
    """Regressions: a non-UTF-8 file was a UnicodeDecodeError; a 5000-digit int a ValueError; an int
    key and a str key a TypeError from sorting them; a YAML error spanned several lines."""
    path = tmp_path / f"config{suffix}"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=match) as refused:
        TrainConfig.from_file(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("data", "match"), [
    ({"lr": math.inf}, r"lr inf must be > 0 and finite"),
    ({"momentum": math.inf}, r"momentum inf must be a number >= 0 and finite"),
    ({"weight_decay": math.inf}, r"weight_decay inf must be"),
    ({"backbone_lr_factor": math.inf}, r"backbone_lr_factor inf must be > 0 and finite"),
    ({"batch_size": 2**63}, r"'batch_size' = 9223372036854775808 is out of range \[-2\*\*63, 2\*\*63\)"),
    ({"dataset": 10**5000}, r"config field 'dataset' = an int of 16610 bits is a int; pass str"),
    ({"model": "x" * 1000}, r"model 'xxxx"),
    ({1: 2, "x": 3}, r"unknown config key\(s\) \['x', 1\]"),
])
def test_train_config_values_that_slipped_through_or_crashed(data: dict[Any, Any], match: str) -> None:
    """Regressions: an infinite lr, momentum or weight decay was accepted (every weight NaN after
    one step); an int past int64 was accepted; a 5000-digit int crashed the message's repr; int and
    str keys together were a TypeError."""
    with pytest.raises(ConfigError, match=match) as refused:
        TrainConfig.from_dict(data)
    assert "\n" not in str(refused.value)

