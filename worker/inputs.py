"""What one audit needs, typed: the stored spec as `AuditSpec`, the model's files, the datasets' directories
and group names, and the runs to make. `worker.tasks` builds it from the database rows; `make reproduce`
builds it from files of its own. The pipeline reads nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.models import Audit, Dataset
from service.schemas.audits import AuditSpec, MethodSpec, MitigationSpec
from service.storage import BlobStore


@dataclass(frozen=True)
class DatasetInput:
    directory: Path  # the stored layout of service/dataset_files.py
    group_names: dict[str, list[str]]  # attribute → names of its codes


@dataclass(frozen=True)
class RunPlan:
    """One run of the sweep: a method at a ratio, unmitigated or under one mitigation. A mitigated run placed
    'after' pruning starts from the weights and masks of the unmitigated run `starts_from` (so it runs after that
    one); 'before' and 'both' prune a mitigated copy of the dense model and need no other run."""

    position: int  # 1, 2, … in report order (0 is the dense baseline)
    method: MethodSpec
    ratio: float
    mitigation: MitigationSpec | None = None
    starts_from: int | None = None

    @property
    def label(self) -> str:
        return self.method.label if self.mitigation is None else f"{self.method.label}+{self.mitigation.label}"

    @property
    def description(self) -> str:
        """For progress messages and errors: 'magnitude-global at ratio 0.5, ceag'."""
        mitigation = f", {self.mitigation.label}" if self.mitigation else ""
        return f"{self.method.label} at ratio {self.ratio:g}{mitigation}"


@dataclass(frozen=True)
class AuditInputs:
    spec: AuditSpec
    architecture: dict
    weights_path: Path
    evaluation: DatasetInput
    train: DatasetInput | None
    output_dir: Path  # every run's weights are written here, as run-<position>.safetensors
    device: str = "auto"
    graph_path: Path | None = None  # an imported ONNX model's stored graph

    @property
    def is_onnx(self) -> bool:
        return self.architecture.get("name") == "onnx"

    def plans(self) -> list[RunPlan]:
        return run_plans(self.spec)

    def weights_of(self, position: int) -> Path:
        return self.output_dir / f"run-{position}.safetensors"

    def onnx_of(self, position: int) -> Path:
        """Where an imported model's run writes its pruned graph (the original with the weights written back)."""
        return self.output_dir / f"run-{position}.onnx"

    def plan_at(self, position: int) -> RunPlan:
        """The plan of run `position` (1, 2, …): plans follow from the spec alone, so every worker finds the same."""
        return self.plans()[position - 1]


def run_plans(spec: AuditSpec) -> list[RunPlan]:
    """Per method, per ratio (increasing): the unmitigated run, then one run per mitigation."""
    plans: list[RunPlan] = []
    for method in spec.pruning.methods:
        for ratio in spec.pruning.ratios:
            unmitigated = RunPlan(len(plans) + 1, method, ratio)
            plans.append(unmitigated)
            plans.extend(
                RunPlan(
                    len(plans) + 1,
                    method,
                    ratio,
                    mitigation,
                    starts_from=unmitigated.position if mitigation.placement == "after" else None,
                )
                for mitigation in spec.mitigations
            )
    return plans


def _dataset_input(store: BlobStore, dataset: Dataset, attributes: list[str]) -> DatasetInput:
    return DatasetInput(
        store.dataset_dir(dataset.id), {a: dataset.groups[a]["names"] for a in attributes if a in dataset.groups}
    )


def audit_inputs(
    audit: Audit, train_dataset: Dataset | None, store: BlobStore, output_dir: Path, device: str
) -> AuditInputs:
    spec = AuditSpec.model_validate(audit.spec)
    return AuditInputs(
        spec=spec,
        architecture=audit.model.architecture,
        weights_path=store.blob_path(audit.model.sha256),
        evaluation=_dataset_input(store, audit.dataset, spec.group_by),
        train=_dataset_input(store, train_dataset, spec.group_by) if train_dataset is not None else None,
        output_dir=output_dir,
        device=device,
        graph_path=graph_path(store, audit.model.architecture),
    )


def graph_path(store: BlobStore, architecture: dict) -> Path | None:
    """The stored graph of an imported ONNX architecture (None for a registry one)."""
    digest = architecture.get("graph_sha256") if architecture.get("name") == "onnx" else None
    return store.blob_path(digest) if isinstance(digest, str) else None
