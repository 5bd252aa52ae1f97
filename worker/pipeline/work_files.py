"""What the runs of one audit attempt share through its work directory (`BlobStore.work_dir`), so that any worker
on any host can compute any run: the dense baseline, measured once, and the unmitigated runs' masks, which the
runs of a mitigation placed 'after' pruning start from. Data only (npz + JSON, safetensors), never a pickle.

The dense model is not stored: it is rebuilt from the uploaded model blob, and the splits are re-read
memory-mapped from the dataset files and given the stored dense outcomes."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worker.inputs import AuditInputs
from worker.pipeline.baseline_file import read_tree, write_tree
from worker.pipeline.data import load_evaluation, load_train
from worker.pipeline.measure import Baseline
from worker.pipeline.mitigations import SavedRun

BASELINE_FILE = "baseline.npz"


def save_baseline(baseline: Baseline, directory: Path) -> None:
    """Everything of the baseline but the model, the inputs and the split arrays, which every worker has."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tree(
        directory / BASELINE_FILE,
        {
            "evaluation_dense": baseline.evaluation.dense_outcomes,
            "train_dense": baseline.train.dense if baseline.train is not None else None,
            "diagnostics": baseline.diagnostics,
            "cost": baseline.cost,
            "with_curvature": baseline.with_curvature,
            "notes": baseline.notes,
        },
    )


def load_baseline(inputs: AuditInputs, directory: Path, model: torch.nn.Module, device: torch.device) -> Baseline:
    """The baseline `save_baseline` stored, around `model`: the dense model, rebuilt by the caller."""
    stored = read_tree(directory / BASELINE_FILE)
    evaluation = replace(load_evaluation(inputs), dense=stored["evaluation_dense"])
    train = load_train(inputs, evaluation)
    if train is not None:
        train = replace(train, dense=stored["train_dense"])
    return Baseline(
        inputs,
        device,
        model,
        evaluation,
        train,
        stored["diagnostics"],
        stored["cost"],
        stored["with_curvature"],
        stored["notes"],
    )


def _stem(directory: Path, position: int, attempt: int) -> Path:
    # Per run attempt: a stalled earlier attempt that wakes up never writes over the files dependents read.
    return directory / f"run-{position}-attempt-{attempt}"


def save_unmitigated(saved: SavedRun, directory: Path, position: int, attempt: int) -> None:
    """The masks (safetensors of bool) and how the run was made; its weights go to the blob store with its row."""
    stem = _stem(directory, position, attempt)
    if saved.masks is not None:
        partial = stem.with_name(f".{stem.name}.{os.getpid()}.partial")
        save_file({name: mask.detach().cpu().contiguous() for name, mask in saved.masks.items()}, partial)
        os.replace(partial, stem.with_suffix(".masks.safetensors"))
    tree = {"recipe": saved.recipe, "layer_report": saved.layer_report, "masked": saved.masks is not None}
    write_tree(stem.with_suffix(".npz"), tree)


def load_unmitigated(
    directory: Path, position: int, attempt: int, weights_path: Path, device: torch.device
) -> SavedRun:
    stem = _stem(directory, position, attempt)
    stored = read_tree(stem.with_suffix(".npz"))
    masks = load_file(stem.with_suffix(".masks.safetensors"), device=str(device)) if stored["masked"] else None
    return SavedRun(masks, stored["recipe"], stored["layer_report"], weights_path)
