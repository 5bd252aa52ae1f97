"""One audit, start to finish, on plain values: load → dense baseline → for each ratio: prune → evaluate
per group. No database, no Celery: `worker.tasks` feeds it and stores what it returns."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from worker.engine.architectures import build_model, load_weights
from worker.engine.errors import EngineError
from worker.engine.metrics import AttributeMetrics, OverallMetrics, Outcomes, attribute_metrics, evaluate, overall_metrics
from worker.engine.pruning import MagnitudePruner, apply_masks, sparsity


@dataclass(frozen=True)
class AuditInputs:
    architecture: dict
    weights_path: Path
    dataset_dir: Path
    group_by: list[str]
    group_names: dict[str, list[str]]
    scope: str
    ratios: list[float]
    ignored_layers: list[str]
    seed: int
    batch_size: int
    device: str = "auto"


@dataclass(frozen=True)
class RunResult:
    method: str
    scope: str | None
    ratio: float
    achieved_sparsity: float
    layer_sparsity: dict
    seconds: float
    overall: OverallMetrics
    attributes: list[AttributeMetrics]


@dataclass(frozen=True)
class AuditResult:
    runs: list[RunResult]
    environment: dict


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_arrays(inputs: AuditInputs) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    # Memory-mapped: the worker holds one copy of the dataset, the page cache's.
    x = np.load(inputs.dataset_dir / "x.npy", mmap_mode="r")
    y = np.load(inputs.dataset_dir / "y.npy", mmap_mode="r")
    codes = {a: np.load(inputs.dataset_dir / f"group_{a}.npy", mmap_mode="r") for a in inputs.group_by}
    return x, y, codes


def check_inputs_fit(model: torch.nn.Module, architecture: dict, x: np.ndarray, y: np.ndarray) -> None:
    num_classes = architecture["num_classes"]
    if y.size and int(y.max()) >= num_classes:
        raise EngineError(f"labels go up to {int(y.max())} but the model has {num_classes} outputs")
    if architecture["name"] == "mlp":
        features = int(np.prod(x.shape[1:]))
        if features != architecture["in_features"]:
            raise EngineError(f"model expects {architecture['in_features']} input features, dataset x has {features}")
    elif list(x.shape[1:]) != [architecture["in_channels"], architecture["image_size"], architecture["image_size"]]:
        raise EngineError(
            f"model expects input [{architecture['in_channels']}, {architecture['image_size']}, "
            f"{architecture['image_size']}] per example; dataset x has {list(x.shape[1:])}"
        )


def measure(
    method: str, scope: str | None, ratio: float, started: float, dense: Outcomes, pruned: Outcomes,
    codes: dict[str, np.ndarray], inputs: AuditInputs, layer_report: dict,
) -> RunResult:
    return RunResult(
        method=method,
        scope=scope,
        ratio=ratio,
        achieved_sparsity=layer_report["overall"],
        layer_sparsity=layer_report["per_layer"],
        seconds=time.perf_counter() - started,
        overall=overall_metrics(dense, pruned),
        attributes=[
            attribute_metrics(a, dense, pruned, np.asarray(codes[a]), inputs.group_names[a]) for a in inputs.group_by
        ],
    )


def run_audit_pipeline(inputs: AuditInputs, on_progress: Callable[[float, str], None]) -> AuditResult:
    torch.manual_seed(inputs.seed)
    device = select_device(inputs.device)
    model = build_model(inputs.architecture)
    load_weights(model, inputs.weights_path)
    model.to(device)
    x, y, codes = load_arrays(inputs)
    check_inputs_fit(model, inputs.architecture, x, y)
    # Kept once to restore between ratios: the worker holds the dense copy and the pruned working model.
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pruner = MagnitudePruner(scope=inputs.scope, ignored_layers=inputs.ignored_layers)
    total_steps = len(inputs.ratios) + 1

    started = time.perf_counter()
    dense = evaluate(model, x, y, batch_size=inputs.batch_size, device=device)
    no_masks = pruner.compute_masks(model, 0.0)
    runs = [measure("dense", None, 0.0, started, dense, dense, codes, inputs, sparsity(model, no_masks))]
    on_progress(1 / total_steps, "dense baseline evaluated")

    for step, ratio in enumerate(inputs.ratios, start=2):
        started = time.perf_counter()
        model.load_state_dict(dense_state)
        masks = pruner.compute_masks(model, ratio)
        apply_masks(model, masks)
        pruned = evaluate(model, x, y, batch_size=inputs.batch_size, device=device)
        runs.append(measure("magnitude", inputs.scope, ratio, started, dense, pruned, codes, inputs,
                            sparsity(model, masks)))
        on_progress(step / total_steps, f"ratio {ratio:g} evaluated")

    environment = {
        "pruneaudit": version("pruneaudit"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    return AuditResult(runs=runs, environment=environment)
