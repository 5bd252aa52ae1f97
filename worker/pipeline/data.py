"""The audit's datasets as the pipeline uses them: memory-mapped arrays and their groupings (each attribute,
plus the intersection when there are several), checked against the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.dataset_files import open_dataset_files
from worker.engine.errors import EngineError
from worker.engine.groupings import intersect
from worker.engine.outcomes import Outcomes
from worker.inputs import AuditInputs, DatasetInput


@dataclass(frozen=True)
class Grouping:
    """One attribute (or the intersection of several) as integer codes (−1 = missing) and names."""

    attribute: str
    codes: np.ndarray
    names: list[str]


@dataclass(frozen=True)
class Split:
    """A dataset's arrays (memory-mapped: the worker holds one copy, the page cache's) and its groupings."""

    x: np.ndarray
    y: np.ndarray
    groupings: list[Grouping]
    dense: Outcomes | None = None  # the dense model's outcomes, where a baseline on this split is needed

    @property
    def dense_outcomes(self) -> Outcomes:
        """`dense`, on a split the dense baseline measured: the evaluation split always, the train split with
        mitigations (`dense_baseline`)."""
        assert self.dense is not None, "the dense baseline was not measured on this split"
        return self.dense


def _groupings(dataset: DatasetInput, group_by: list[str]) -> tuple[np.ndarray, np.ndarray, list[Grouping]]:
    files = open_dataset_files(dataset.directory, group_by)
    groupings = [Grouping(a, np.asarray(files.groups[a]), dataset.group_names[a]) for a in group_by]
    if len(groupings) > 1:
        groupings.append(Grouping(*intersect([(g.attribute, g.codes, g.names) for g in groupings])))
    return files.x, files.y, groupings


def load_evaluation(inputs: AuditInputs) -> Split:
    x, y, groupings = _groupings(inputs.evaluation, inputs.spec.group_by)
    check_fits(inputs.architecture, x, y)
    return Split(x, y, groupings)


def aligned_codes(codes: np.ndarray, names: list[str], target_names: list[str]) -> np.ndarray:
    """Codes over `names` renumbered to `target_names` (matched by name); a name not there becomes −1."""
    index = {name: code for code, name in enumerate(target_names)}
    lookup = np.array([index.get(name, -1) for name in names] + [-1], dtype=np.int64)  # the last entry maps −1
    return lookup[codes]


def load_train(inputs: AuditInputs, evaluation: Split) -> Split | None:
    """The train arrays; with mitigations also their groups under the evaluation split's names (a train group
    the evaluation split lacks counts as missing there)."""
    if inputs.train is None:
        return None
    if not inputs.spec.mitigations:
        files = open_dataset_files(inputs.train.directory, [])
        check_fits(inputs.architecture, files.x, files.y)
        return Split(files.x, files.y, [])
    x, y, own = _groupings(inputs.train, inputs.spec.group_by)
    check_fits(inputs.architecture, x, y)
    groupings = [
        Grouping(target.attribute, aligned_codes(grouping.codes, grouping.names, target.names), target.names)
        for grouping, target in zip(own, evaluation.groupings, strict=True)
    ]
    return Split(x, y, groupings)


def check_fits(architecture: dict, x: np.ndarray, y: np.ndarray) -> None:
    num_classes = architecture["num_classes"]
    if y.size and int(y.max()) >= num_classes:
        raise EngineError(f"labels go up to {int(y.max())} but the model has {num_classes} outputs")
    if architecture.get("name") == "onnx":  # an imported graph takes exactly its declared input shape
        if list(x.shape[1:]) != list(architecture["input_shape"]):
            raise EngineError(
                f"model expects input {architecture['input_shape']} per example; dataset x has {list(x.shape[1:])}"
            )
    elif "in_features" in architecture:  # an MLP, or a channel-pruned one: inputs are flattened
        features = int(np.prod(x.shape[1:]))
        if features != architecture["in_features"]:
            raise EngineError(f"model expects {architecture['in_features']} input features, dataset x has {features}")
    elif list(x.shape[1:]) != [architecture["in_channels"], architecture["image_size"], architecture["image_size"]]:
        raise EngineError(
            f"model expects input [{architecture['in_channels']}, {architecture['image_size']}, "
            f"{architecture['image_size']}] per example; dataset x has {list(x.shape[1:])}"
        )
