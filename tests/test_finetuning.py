"""Fine-tuning: strategies freeze what they should, lineage is recorded and verified, resume is exact."""

from __future__ import annotations

import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from reprokit import TrainConfig, load_dataset, model_digest, train
from reprokit.callbacks import Callback, TrainState
from reprokit.checkpointreader import list_checkpoints
from reprokit.cli import main
from reprokit.errors import ConfigError, DataError
from reprokit.finetuning import LineageError, lineage, load_parent
from reprokit.ledger import runs
from reprokit.models import build_model, count_parameters
from reprokit.resumer import resume
from reprokit.rundir import read_json
from reprokit.trainer import RunResult, build_session, finetune, pretrain

UPSTREAM = TrainConfig(dataset="digits_0_4", model="cnn", steps=150, batch_size=32, threads=1)
# low-data downstream: 100 training images of digits 5-9, 30 steps (measured: scratch 0.53-0.67,
# full fine-tune 0.83-0.94 over seeds 0-4)
DOWNSTREAM = TrainConfig(dataset="digits_5_9", model="cnn", steps=30, batch_size=16, threads=1,
                         train_limit=100)
CNN_HEAD = 64 * 5 + 5  # the cnn's last Linear, sized for 5 classes


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return pretrain(UPSTREAM, tmp_path_factory.mktemp("parent") / "run", progress=False)


class _Trainable(Callback):
    """Records the trainable parameter count in effect for each optimizer step."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_step_end(self, state: TrainState) -> None:
        self.counts.append(count_parameters(state.model, trainable_only=True))


def _backbone(state: dict[str, torch.Tensor], head: str = "8.") -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if not n.startswith(head)}


@pytest.mark.parametrize("strategy", ["full", "feature_extraction", "two_stage"])
def test_strategies_freeze_exactly_what_they_should(strategy: str, parent: RunResult) -> None:
    """Trainable count per step: full all, feature extraction the head, two-stage the head then all."""
    assert parent.run_dir is not None
    config = DOWNSTREAM.replace(steps=8, **({"unfreeze_at": 3} if strategy == "two_stage" else {}))
    counter = _Trainable()
    result = finetune(config, parent.run_dir, strategy, callbacks=(counter,), progress=False)
    total = count_parameters(build_model("cnn", (1, 8, 8), 5))
    expected = {"full": [total] * 8, "feature_extraction": [CNN_HEAD] * 8,
                "two_stage": [CNN_HEAD] * 3 + [total] * 5}[strategy]
    assert counter.counts == expected
    history = dict(result.tensor_digests)
    moved = [step for step in range(1, 9) if _backbone(history[step]) != _backbone(history[step - 1])]
    assert moved == {"full": [*range(1, 9)], "feature_extraction": [], "two_stage": [*range(4, 9)]}[strategy]
    if strategy == "feature_extraction":
        assert model_digest(_backbone(result.final_state)) == model_digest(_backbone(parent.final_state))


def test_two_stage_backbone_learns_at_the_reduced_rate(parent: RunResult) -> None:
    """The optimizer has a head group at lr and a backbone group at lr x backbone_lr_factor."""
    config = DOWNSTREAM.replace(init_from=str(parent.run_dir), finetune="two_stage", backbone_lr_factor=0.25)
    groups = build_session(config).optimizer.param_groups
    assert [g["lr"] for g in groups] == [config.lr, config.lr * 0.25]
    assert sum(p.numel() for p in groups[0]["params"]) == CNN_HEAD


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_head_is_replaced_with_one_for_the_new_classes(name: str, tmp_path: Path) -> None:
    """A 10-class torchvision-style .pth loads into a 5-class model: new head, same backbone."""
    torch.manual_seed(7)
    source = build_model(name, (1, 8, 8), 10).state_dict()
    torch.save(source, tmp_path / "parent.pth")
    config = TrainConfig(dataset="digits_5_9", model=name, steps=2, threads=1,
                         init_from=str(tmp_path / "parent.pth"), finetune="feature_extraction")
    session = build_session(config)
    head = {"mlp": "3", "cnn": "8", "resnet18": "fc"}[name]
    layer = session.model.get_submodule(head)
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 5
    state = session.model.state_dict()
    assert model_digest(_backbone(state, head + ".")) == model_digest(_backbone(source, head + "."))
    assert count_parameters(session.model, trainable_only=True) == layer.weight.numel() + 5
    assert session.parent is not None and session.parent["digest"] == model_digest(source)
    assert session.parent["run_id"] is None
    again = build_session(config).model.get_submodule(head)  # the new head's init is seeded
    assert torch.equal(again.weight, layer.weight)


def test_lineage_is_recorded_in_manifest_ledger_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The child's manifest names the parent's digest and run id; the ledger, `runs` and `lineage`
    show the chain; `lineage` flags a parent whose bytes changed."""
    monkeypatch.delenv("REPROKIT_LEDGER", raising=False)
    up = pretrain(UPSTREAM.replace(steps=5), tmp_path / "up", progress=False)
    child = finetune(DOWNSTREAM.replace(steps=5), tmp_path / "up", "full", tmp_path / "down", progress=False)
    parent_id = read_json(tmp_path / "up", "manifest.json")["run_id"]
    recorded = read_json(tmp_path / "down", "manifest.json")["lineage"]["parent"]
    assert recorded == {"digest": up.final_digest, "run_id": parent_id,
                        "path": str((tmp_path / "up" / "model.safetensors").resolve())}
    ledger = runs(tmp_path / "ledger.sqlite")
    assert ledger.set_index("final_digest").loc[child.final_digest, "parent"] == parent_id
    chain = lineage(tmp_path / "down")
    assert chain["run_id"].tolist() == [read_json(tmp_path / "down", "manifest.json")["run_id"], parent_id]
    assert chain["dataset"].tolist() == ["digits_5_9", "digits_0_4"]
    assert chain["verified"].tolist() == [None, True]
    assert main(["runs", "--ledger", str(tmp_path / "ledger.sqlite"), "--where", "dataset=digits_5_9"]) == 0
    assert parent_id in capsys.readouterr().out
    weights = tmp_path / "up" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the parent's bytes change after the child was trained
    weights.write_bytes(bytes(data))
    assert lineage(tmp_path / "down")["verified"].tolist() == [None, False]
    assert main(["lineage", str(tmp_path / "down")]) == 1
    assert parent_id in capsys.readouterr().out


def test_modified_parent_weights_are_refused_naming_the_file(parent: RunResult, tmp_path: Path) -> None:
    """A flipped byte in a parent's model.safetensors (run dir or copied file) is an error naming it."""
    assert parent.run_dir is not None
    copy = tmp_path / "parent"
    shutil.copytree(parent.run_dir, copy)
    weights = copy / "model.safetensors"
    shutil.copy(weights, tmp_path / "alone.safetensors")
    for path in (weights, tmp_path / "alone.safetensors"):
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF  # inside the last tensor's bytes; the header still parses
        path.write_bytes(bytes(data))
    named = rf"{re.escape(str(weights))}' hash to [0-9a-f]{{32}} but .*result\.json recorded"
    with pytest.raises(LineageError, match=named):
        finetune(DOWNSTREAM.replace(steps=2), copy, "full", progress=False)
    with pytest.raises(LineageError, match=r"alone\.safetensors' hash to .* its safetensors header recorded"):
        load_parent(tmp_path / "alone.safetensors")
    with pytest.raises(LineageError, match=r"'.*nowhere' does not exist.*nothing is downloaded"):
        load_parent(tmp_path / "nowhere")


def test_mismatched_state_dict_is_refused_listing_the_tensors(tmp_path: Path) -> None:
    """Weights of another model, or of another input shape, are refused with what does not fit."""
    torch.save(build_model("mlp", (1, 8, 8), 10).state_dict(), tmp_path / "mlp.pth")
    torch.save(build_model("cnn", (3, 8, 8), 10).state_dict(), tmp_path / "rgb.pth")
    config = TrainConfig(dataset="digits_5_9", model="cnn", steps=2, threads=1)
    with pytest.raises(LineageError, match=r"mlp.pth' do not fit model 'cnn' \(head '8' aside\): 6 missing "
                                           r"from the parent: 0.weight, 0.bias, 2.weight, 2.bias \.\.\.; "
                                           r"4 unexpected: 1.weight, 1.bias, 3.weight, 3.bias; pass"):
        build_session(config.replace(init_from=str(tmp_path / "mlp.pth")))
    with pytest.raises(LineageError, match=r"1 of another shape or dtype: 0.weight \(parent torch.float32 "
                                           r"\[16, 3, 3, 3\], model torch.float32 \[16, 1, 3, 3\]\)"):
        build_session(config.replace(init_from=str(tmp_path / "rgb.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(LineageError, match=r"junk\.pth' cannot be read"):
        build_session(config.replace(init_from=str(tmp_path / "junk.pth")))


def test_two_stage_resume_before_and_after_unfreeze_is_bitwise_identical(tmp_path: Path) -> None:
    """Killed (checkpoint at 4 or at 8, unfreezing at 6) and resumed: the uninterrupted run's bits;
    a parent changed since the run started is refused on resume."""
    torch.manual_seed(3)
    torch.save(build_model("cnn", (1, 8, 8), 5).state_dict(), tmp_path / "parent.pt")
    config = DOWNSTREAM.replace(steps=12, optimizer="adam", lr=0.003, lr_schedule="cosine",
                                init_from=str(tmp_path / "parent.pt"), finetune="two_stage", unfreeze_at=6)
    reference = train(config, progress=False)
    run = tmp_path / "run"
    checkpointed = train(config.replace(checkpoint_every=4), run, progress=False)
    assert checkpointed.final_digest == reference.final_digest
    for name, keep in (("before", 1), ("after", 2)):
        killed = tmp_path / name
        shutil.copytree(run, killed)
        for f in ("result.json", "model.pt", "model.safetensors"):
            (killed / f).unlink()  # a run killed after its last checkpoint leaves none of these
        for newer in list_checkpoints(killed)[: 2 - keep]:
            shutil.rmtree(newer)
        result = resume(killed, progress=False)
        assert result.resume is not None and result.resume.from_step == 4 * keep
        assert result.final_digest == reference.final_digest
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "before", changed)
    (changed / "result.json").unlink()
    state = torch.load(tmp_path / "parent.pt", weights_only=True)
    state["0.bias"][0] += 1
    torch.save(state, tmp_path / "parent.pt")
    with pytest.raises(LineageError, match=r"parent\.pt' hashes to [0-9a-f]{32} but the run started from"):
        resume(changed, progress=False)


def test_finetuning_beats_training_from_scratch_on_the_low_data_task(parent: RunResult) -> None:
    """Same 30-step budget on 100 images: full fine-tune >> scratch; two-stage > scratch."""
    assert parent.run_dir is not None
    scores: dict[str, list[float]] = {"scratch": [], "full": [], "two_stage": []}
    for seed in (0, 1):
        config = DOWNSTREAM.replace(seed=seed)
        scores["scratch"].append(train(config, progress=False).final_metric)
        for strategy in ("full", "two_stage"):
            scores[strategy].append(finetune(config, parent.run_dir, strategy, progress=False).final_metric)
    mean = {k: statistics.mean(v) for k, v in scores.items()}
    assert mean["full"] > mean["scratch"] + 0.15, scores  # measured: +0.29
    assert mean["two_stage"] > mean["scratch"], scores  # measured: +0.10


def test_digit_halves_are_disjoint_five_class_tasks() -> None:
    """digits_0_4 and digits_5_9 split the digits, both labelled 0-4; train_limit cuts the train split."""
    up, down = load_dataset("digits_0_4"), load_dataset("digits_5_9")
    assert (up.num_outputs, down.num_outputs) == (5, 5)
    assert sorted(set(down.y_train.tolist())) == [0, 1, 2, 3, 4]
    assert len(up.x_train) + len(up.x_val) + len(down.x_train) + len(down.x_val) == 1797
    small = load_dataset("digits_5_9", train_limit=100)
    assert len(small.x_train) == 100 and torch.equal(small.x_val, down.x_val)
    assert small.digest != down.digest
    with pytest.raises(DataError, match=r"train_limit 5000 is outside \[1, \d+\].*pass at most"):
        load_dataset("digits_5_9", train_limit=5000)


def test_finetune_fields_are_validated() -> None:
    """Freezing without a parent, or unfreezing before the first or at the last step, is refused."""
    with pytest.raises(ConfigError, match=r"finetune 'two_stage' .* init_from is None"):
        TrainConfig(finetune="two_stage")
    with pytest.raises(ConfigError, match=r"unfreeze_at 0 must be >= 1"):
        TrainConfig(init_from="p", finetune="two_stage", unfreeze_at=0)
    with pytest.raises(ConfigError, match=r"unfreeze_at 10 is not before the last step 10"):
        TrainConfig(init_from="p", finetune="two_stage", unfreeze_at=10, steps=10)
    with pytest.raises(ConfigError, match="finetune 'partial' is not available"):
        TrainConfig(finetune="partial")


def test_torchvision_imagenet_layout_resnet18_loads_with_an_adapted_stem(tmp_path: Path) -> None:
    """A state_dict in torchvision's own resnet18 layout (3x7x7 stem, 1000-class fc: what
    resnet18-f37072fd.pth holds) loads from disk: the stem is summed over RGB and centre-cropped,
    every other backbone tensor is copied as is; a tensor of another shape elsewhere is an error."""
    from torchvision.models import resnet18

    torch.manual_seed(3)
    source = resnet18(weights=None).state_dict()
    torch.save(source, tmp_path / "resnet18-imagenet.pth")
    config = TrainConfig(dataset="digits_5_9", model="resnet18", steps=2, threads=1,
                         init_from=str(tmp_path / "resnet18-imagenet.pth"), finetune="feature_extraction")
    state = build_session(config).model.state_dict()
    expected_stem = source["conv1.weight"].sum(dim=1, keepdim=True)[:, :, 2:5, 2:5]
    assert torch.equal(state["conv1.weight"], expected_stem)
    for name in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.weight"):
        assert torch.equal(state[name], source[name])
    assert state["fc.weight"].shape == (5, 512)
    source["layer2.0.conv1.weight"] = source["layer2.0.conv1.weight"][:, :32]
    torch.save(source, tmp_path / "bad.pth")
    with pytest.raises(LineageError, match=r"layer2\.0\.conv1\.weight \(parent \S+ \[128, 32, 3, 3\]"):
        build_session(config.replace(init_from=str(tmp_path / "bad.pth")))


def test_resnet18_two_stage_fine_tune_trains_the_head_then_everything(tmp_path: Path) -> None:
    """resnet18 from a torchvision-layout file: a real two-stage run moves only the head before the
    unfreeze step and the backbone after it, and records the file's digest as its parent."""
    from torchvision.models import resnet18

    torch.manual_seed(5)
    source = resnet18(weights=None).state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    config = TrainConfig(dataset="digits_5_9", model="resnet18", steps=4, batch_size=8, threads=1,
                         init_from=str(tmp_path / "resnet18.pth"), finetune="two_stage", unfreeze_at=2)
    start = build_session(config).model.state_dict()

    class AtStep2(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 2:  # steps 1 and 2 trained the head alone
                self.state = {k: v.clone() for k, v in state.model.state_dict().items()}

    seen = AtStep2()
    result = train(config, tmp_path / "run", callbacks=(seen,), progress=False)
    assert torch.equal(seen.state["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])
    assert not torch.equal(seen.state["fc.weight"], start["fc.weight"])
    assert not torch.equal(result.final_state["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])
    parent = read_json(tmp_path / "run", "manifest.json")["lineage"]["parent"]
    assert parent["digest"] == model_digest(source)
