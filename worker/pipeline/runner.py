"""The pipeline's steps: the dense baseline once, then every planned run measured like the baseline. Each run is
an explicit step (a `RunPlan` in, a `RunResult` and its weights file out) over the shared `Baseline`.

Two ways to drive them: `measure_baseline` + `compute_run` (the worker's tasks: the baseline stored in the work
directory, each run a task of its own on any worker), and `run_audit_pipeline` (everything in one process, for
`make reproduce`)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from arch.registry import architecture_adapter, input_shape
from results.runs import RunResult
from worker.engine.architectures import build_model, load_weights
from worker.engine.outcomes import evaluate
from worker.engine.pruning import sparsity
from worker.engine.structured import model_cost, multiply_accumulates
from worker.inputs import AuditInputs, RunPlan
from worker.pipeline.data import load_evaluation, load_train
from worker.pipeline.diagnose import curvature_decision, diagnose_model
from worker.pipeline.imported import check_against_reference
from worker.pipeline.measure import Baseline, Candidate, measure
from worker.pipeline.methods import PruningJob, prune_model
from worker.pipeline.mitigations import SavedRun, mitigated_model
from worker.pipeline.work_files import load_baseline, save_baseline

SINGLE_THREAD_MAX_BATCH_MACS = 1_000_000_000

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class RunOutput:
    result: RunResult
    weights_path: Path | None  # the run's safetensors under inputs.output_dir; None for the dense baseline


@dataclass(frozen=True)
class AuditOutput:
    runs: list[RunOutput]  # the dense baseline first, then the plans in order
    environment: dict


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@contextmanager
def intra_op_threads(
    model: torch.nn.Module, input_shape: list[int], batch_size: int, device: torch.device
) -> Iterator[None]:
    """One CPU thread when a batch is little work: its matrix products are too small to split, and a second
    thread only spins. The work of a batch (multiply-accumulates), not the parameter count, decides: a CNN
    with few parameters does much work per example. Measured on this 2-core machine, forward + backward of a
    512 batch: MLPs of 3.4M and 49M MACs per batch ran 250× and 30× faster on one thread under load (and an
    arrests audit of a 3-layer MLP 17× faster, 195 s → 11.7 s); ResNet-20 (21G MACs per batch) ran a forward
    pass 2.6× faster on two threads than on one on an idle machine."""
    if device.type != "cpu" or multiply_accumulates(model, input_shape) * batch_size > SINGLE_THREAD_MAX_BATCH_MACS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def dense_baseline(inputs: AuditInputs, model: torch.nn.Module, device: torch.device) -> Baseline:
    """The dense model's outcomes on both splits, its diagnostics and cost: measured once per audit."""
    spec = inputs.spec
    evaluation = load_evaluation(inputs)
    train = load_train(inputs, evaluation)
    if spec.mitigations:
        assert train is not None, "spec validation requires train_dataset_id with mitigations"
        train = replace(train, dense=evaluate(model, train.x, train.y, batch_size=spec.batch_size, device=device))
    parameter_count = sum(p.numel() for p in model.parameters())
    with_curvature, curvature_note = curvature_decision(spec.diagnostics, parameter_count)
    if inputs.is_onnx:
        check_against_reference(inputs, model, evaluation.x)
    outcomes = evaluate(model, evaluation.x, evaluation.y, batch_size=spec.batch_size, device=device)
    evaluation = replace(evaluation, dense=outcomes)
    diagnostics = diagnose_model(
        model, evaluation, spec.diagnostics, seed=spec.seed, device=device, with_curvature=with_curvature
    )
    return Baseline(
        inputs,
        device,
        model,
        evaluation,
        train,
        diagnostics,
        model_cost(model, list(evaluation.x.shape[1:])),
        with_curvature,
        {"curvature": curvature_note} if curvature_note else {},
    )


def dense_result(baseline: Baseline, started: float) -> RunResult:
    """The dense baseline's own run (position 0), measured like every other run."""
    dense = Candidate(baseline.model, {}, "dense", "dense", None, 0.0, {}, sparsity(baseline.model, {}))
    return measure(baseline, dense, started, None)


def run_step(
    baseline: Baseline, plan: RunPlan, job: PruningJob, unmitigated: SavedRun | None
) -> tuple[RunOutput, SavedRun]:
    """One planned run: prune (or, for a mitigated plan, train under the mitigation; placed 'after', from the
    unmitigated run's saved model), then measure. Returns what the mitigated runs of the same method and ratio
    start from."""
    started = time.perf_counter()
    if plan.mitigation is None:
        pruned = prune_model(baseline.model, plan.method, plan.ratio, job)
        details = None
    else:
        pruned, details = mitigated_model(baseline, plan, unmitigated, job)
    candidate = Candidate(
        pruned.model,
        pruned.masks,
        plan.label,
        plan.method.method,
        plan.method.scope,
        plan.ratio,
        pruned.recipe,
        pruned.layer_report,
        plan.mitigation.name if plan.mitigation else "none",
        details,
    )
    weights_path = baseline.inputs.weights_of(plan.position)
    output = RunOutput(measure(baseline, candidate, started, weights_path), weights_path)
    # The worker holds the dense model and one working copy at a time; mitigated runs reload the saved weights.
    return output, SavedRun(pruned.masks, output.result.recipe, pruned.layer_report, weights_path)


def dense_model(inputs: AuditInputs) -> tuple[torch.nn.Module, torch.device]:
    """The uploaded model on the worker's device, with the audit's seed set (every task starts from it)."""
    torch.manual_seed(inputs.spec.seed)
    device = select_device(inputs.device)
    model = build_model(inputs.architecture, inputs.graph_path)
    load_weights(model, inputs.weights_path)
    return model.to(device), device


def work_threads(inputs: AuditInputs, model: torch.nn.Module, device: torch.device):
    """`intra_op_threads` for this audit's model and batch size."""
    shape = input_shape(architecture_adapter.validate_python(inputs.architecture))
    return intra_op_threads(model, shape, inputs.spec.batch_size, device)


def measure_baseline(inputs: AuditInputs, work_dir: Path) -> RunResult:
    """The audit task's step: the dense baseline measured and stored in `work_dir` for the runs; returns its own
    run's result."""
    started = time.perf_counter()
    model, device = dense_model(inputs)
    with work_threads(inputs, model, device):
        baseline = dense_baseline(inputs, model, device)
        result = dense_result(baseline, started)
    save_baseline(baseline, work_dir)
    return result


def compute_run(
    inputs: AuditInputs,
    work_dir: Path,
    plan: RunPlan,
    unmitigated: Callable[[torch.device], SavedRun] | None,
    on_epoch: Callable[[int, float], None],
) -> tuple[RunOutput, SavedRun, dict]:
    """A run task's step: the stored baseline around the rebuilt dense model (the worker's first copy), then the
    run (its second); `unmitigated` loads what a mitigation placed 'after' pruning starts from. Returns the run,
    what its own dependents start from, and the environment it ran in."""
    model, device = dense_model(inputs)
    with work_threads(inputs, model, device):
        baseline = load_baseline(inputs, work_dir, model, device)
        job = PruningJob(inputs.architecture, inputs.spec.seed, baseline.train, device, on_epoch)
        output, kept = run_step(baseline, plan, job, unmitigated(device) if unmitigated else None)
    return output, kept, environment(device)


def run_audit_pipeline(inputs: AuditInputs, on_progress: Progress) -> AuditOutput:
    """Every step in this process, in plan order (the service fans the runs out instead; the results are the
    same: each run depends on the baseline and its seed alone, and 'after' mitigations on their unmitigated run)."""
    model, device = dense_model(inputs)
    with work_threads(inputs, model, device):
        return audit_runs(inputs, model, device, on_progress)


def audit_runs(inputs: AuditInputs, model: torch.nn.Module, device: torch.device, on_progress: Progress) -> AuditOutput:
    started = time.perf_counter()
    baseline = dense_baseline(inputs, model, device)
    plans = inputs.plans()
    total = len(plans) + 1
    runs = [RunOutput(dense_result(baseline, started), None)]
    on_progress(1 / total, "dense baseline evaluated")
    unmitigated: SavedRun | None = None
    for plan in plans:
        message = plan.description

        def on_epoch(epoch: int, _loss: float, step: int = plan.position, message: str = message) -> None:
            on_progress(step / total, f"{message}: epoch {epoch}")

        job = PruningJob(inputs.architecture, inputs.spec.seed, baseline.train, device, on_epoch)
        output, kept = run_step(baseline, plan, job, unmitigated)
        if plan.mitigation is None:
            unmitigated = kept
        runs.append(output)
        on_progress((plan.position + 1) / total, f"{message} evaluated")
    return AuditOutput(runs, environment(device))


def environment(device: torch.device) -> dict:
    return {
        "pruneaudit": version("pruneaudit"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
