"""Fine-tuning with masks kept, the cubic sparsity schedule against the formula worked by hand, and
gradual magnitude pruning reaching its final ratio exactly."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from worker.engine.architectures import build_model
from worker.engine.errors import EngineError
from worker.engine.finetune import cubic_sparsity_schedule, finetune, gradual_magnitude_prune
from worker.engine.pruning import MagnitudePruner, MaskKeeper, prunable_weights, sparsity

MLP_SPEC = {"name": "mlp", "in_features": 8, "hidden": [16, 12], "num_classes": 3}
CNN_SPEC = {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [4, 6], "num_classes": 3}


def _data(n: int = 96, features: tuple[int, ...] = (8,), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable task: the label is the argmax of three fixed projections of x."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *features)).astype(np.float32)
    y = (x.reshape(n, -1) @ rng.standard_normal((int(np.prod(features)), 3))).argmax(1)
    return x, y


def _model(spec: dict = MLP_SPEC, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec)


def _removed_are_zero(model: torch.nn.Module, masks: dict) -> bool:
    weights = prunable_weights(model)
    return all(not bool(weights[name][~mask].any()) for name, mask in masks.items())


# --- the cubic schedule -----------------------------------------------------------------------


def test_cubic_schedule_matches_the_formula_by_hand() -> None:
    # s_t = 0.9 + (0 − 0.9)(1 − t/3)³: t=1 → 0.9 − 0.9·8/27, t=2 → 0.9 − 0.9/27.
    assert cubic_sparsity_schedule(0.0, 0.9, 3) == pytest.approx([0.0, 0.9 * 19 / 27, 0.9 * 26 / 27, 0.9], abs=1e-12)
    # From s_i = 0.5 to s_f = 0.98 in 4 steps: 0.98 − 0.48·(3/4)³, … .
    expected = [0.5, 0.98 - 0.48 * 27 / 64, 0.98 - 0.48 * 8 / 64, 0.98 - 0.48 / 64, 0.98]
    assert cubic_sparsity_schedule(0.5, 0.98, 4) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("initial", "final", "steps"), [(0.0, 0.9, 15), (0.3, 0.99, 7), (0.5, 0.5, 3), (0.0, 0.7, 1)])
def test_cubic_schedule_is_monotone_and_hits_both_ends_exactly(initial: float, final: float, steps: int) -> None:
    schedule = cubic_sparsity_schedule(initial, final, steps)
    assert len(schedule) == steps + 1
    assert schedule[0] == initial and schedule[-1] == final
    assert all(a <= b for a, b in pairwise(schedule))
    increments = [b - a for a, b in pairwise(schedule)]
    assert all(a >= b - 1e-12 for a, b in pairwise(increments))  # prunes most early


def test_cubic_schedule_with_no_steps_is_one_shot() -> None:
    assert cubic_sparsity_schedule(0.0, 0.8, 0) == [0.8]


@pytest.mark.parametrize(("initial", "final", "steps"), [(0.0, 1.0, 3), (-0.1, 0.5, 3), (0.0, 0.5, -1)])
def test_cubic_schedule_rejects_bad_arguments(initial: float, final: float, steps: int) -> None:
    with pytest.raises(EngineError):
        cubic_sparsity_schedule(initial, final, steps)


# --- fine-tuning ------------------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adam", 0.01)])
def test_masks_survive_finetuning(optimizer: str, lr: float) -> None:
    x, y = _data()
    model = _model()
    masks = MagnitudePruner(scope="layerwise").compute_masks(model, 0.7)
    before = {name: w.detach().clone() for name, w in prunable_weights(model).items()}
    losses = finetune(
        model, x, y, epochs=4, lr=lr, batch_size=16, optimizer=optimizer, momentum=0.9, weight_decay=0.01, masks=masks
    )
    assert _removed_are_zero(model, masks)
    assert sparsity(model, masks)["per_layer"]["layers.2.weight"]["zeros"] == round(0.7 * 16 * 12)
    assert all(not torch.equal(w, before[name]) for name, w in prunable_weights(model).items())  # it trained
    assert losses[-1] < losses[0]
    assert not model.training


def test_finetune_takes_a_mask_keeper_and_a_batchnorm_model() -> None:
    x, y = _data(features=(1, 8, 8))
    model = _model(CNN_SPEC)
    masks = MagnitudePruner(scope="global").compute_masks(model, 0.5)
    finetune(model, x, y, epochs=2, lr=0.05, batch_size=32, masks=MaskKeeper(model, masks))
    assert _removed_are_zero(model, masks)


def test_finetune_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone() -> None:
    x, y = _data()
    runs = []
    for _ in range(2):
        model = _model()
        state = torch.get_rng_state()
        finetune(model, x, y, epochs=2, lr=0.1, batch_size=16, seed=5)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][key], runs[1][key]) for key in runs[0])
    other = _model()
    finetune(other, x, y, epochs=2, lr=0.1, batch_size=16, seed=6)  # another shuffling order
    assert not torch.equal(other.state_dict()["layers.0.weight"], runs[0]["layers.0.weight"])


def test_finetune_reads_a_memory_mapped_array(tmp_path) -> None:
    x, y = _data(n=50)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    in_memory, from_disk = _model(), _model()
    finetune(in_memory, x, y, epochs=1, lr=0.1, batch_size=7)
    finetune(from_disk, mapped, y, epochs=1, lr=0.1, batch_size=7)
    assert all(
        torch.equal(a, b) for a, b in zip(in_memory.state_dict().values(), from_disk.state_dict().values(), strict=True)
    )


def test_on_epoch_reports_and_can_stop_training() -> None:
    x, y = _data()
    seen: list[tuple[int, float]] = []

    class Cancelled(Exception):
        pass

    def on_epoch(epoch: int, loss: float) -> None:
        seen.append((epoch, loss))
        if epoch == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        finetune(_model(), x, y, epochs=5, lr=0.1, batch_size=32, on_epoch=on_epoch)
    assert [epoch for epoch, _ in seen] == [1, 2] and all(loss > 0 for _, loss in seen)


def test_finetune_rejects_bad_settings_and_reports_divergence() -> None:
    x, y = _data()
    with pytest.raises(EngineError, match="96 rows of x but 95 labels"):
        finetune(_model(), x, y[:-1], epochs=1, lr=0.1)
    with pytest.raises(EngineError, match="optimizer must be 'sgd' or 'adam'"):
        finetune(_model(), x, y, epochs=1, lr=0.1, optimizer="rmsprop")
    with pytest.raises(EngineError, match="learning rate must be a positive number"):
        finetune(_model(), x, y, epochs=1, lr=0.0)
    with pytest.raises(EngineError, match="fine-tuning diverged"):
        finetune(_model(), x * 1e30, y, epochs=3, lr=1e30, batch_size=16)


# --- gradual magnitude pruning ----------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_gradual_pruning_reaches_the_final_ratio_exactly_with_nested_masks(scope: str) -> None:
    x, y = _data()
    model = _model()
    ignored = ["layers.0"]
    zero_sets: list[dict[str, torch.Tensor]] = []

    def on_epoch(epoch: int, loss: float) -> None:
        zero_sets.append({name: w.detach() == 0 for name, w in prunable_weights(model, ignored).items()})

    masks = gradual_magnitude_prune(
        model,
        x,
        y,
        final_ratio=0.8,
        pruning_steps=3,
        epochs_per_step=1,
        scope=scope,
        ignored_layers=ignored,
        lr=0.05,
        batch_size=16,
        on_epoch=on_epoch,
    )
    weights = prunable_weights(model, ignored)
    assert set(masks) == set(weights)
    removed = {name: int((~mask).sum()) for name, mask in masks.items()}
    if scope == "layerwise":
        assert removed == {name: round(0.8 * w.numel()) for name, w in weights.items()}
    else:
        assert sum(removed.values()) == round(0.8 * sum(w.numel() for w in weights.values()))
    assert _removed_are_zero(model, masks)
    assert len(zero_sets) == 4  # (pruning_steps + 1) · epochs_per_step
    overall = [sum(int(z.sum()) for z in zeros.values()) for zeros in zero_sets]
    schedule = cubic_sparsity_schedule(0.0, 0.8, 3)
    total = sum(w.numel() for w in weights.values())
    assert overall == pytest.approx([s * total for s in schedule], abs=len(weights))
    for earlier, later in pairwise(zero_sets):  # removed weights stay removed
        assert all(bool((later[name] | ~earlier[name]).all()) for name in earlier)


def test_gradual_pruning_with_layer_ratios_and_one_shot() -> None:
    x, y = _data()
    model = _model()
    masks = gradual_magnitude_prune(
        model,
        x,
        y,
        final_ratio=0.6,
        pruning_steps=2,
        epochs_per_step=1,
        scope="layerwise",
        layer_ratios={"layers.2": 0.9},
        lr=0.05,
        batch_size=32,
    )
    assert int((~masks["layers.2.weight"]).sum()) == round(0.9 * 16 * 12)
    assert int((~masks["layers.0.weight"]).sum()) == round(0.6 * 8 * 16)
    one_shot = _model()
    epochs: list[int] = []
    masks = gradual_magnitude_prune(
        one_shot,
        x,
        y,
        final_ratio=0.5,
        pruning_steps=0,
        epochs_per_step=2,
        scope="global",
        lr=0.05,
        on_epoch=lambda epoch, loss: epochs.append(epoch),
    )
    assert epochs == [1, 2]
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * sum(m.numel() for m in masks.values()))
    with pytest.raises(EngineError, match="initial sparsity 0.5 is above the final 0.3"):
        gradual_magnitude_prune(
            _model(),
            x,
            y,
            final_ratio=0.3,
            initial_ratio=0.5,
            pruning_steps=2,
            epochs_per_step=1,
            scope="global",
            lr=0.05,
        )
