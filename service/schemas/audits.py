from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.models import AuditStatus
from service.schemas.common import ResourceId
from service.schemas.lineage import ResourceRef


class FineTuningSpec(BaseModel):
    """Fine-tuning of the pruned model on the audit's train dataset (masks kept after every step)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, le=1000, description="Epochs after one-shot pruning; per pruning step when gradual.")
    lr: float = Field(0.01, gt=0, le=10)
    batch_size: int = Field(128, ge=1, le=65536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    weight_decay: float = Field(0.0, ge=0, le=1)


class MethodSpec(BaseModel):
    """One pruning method; every method runs at every ratio of the sweep."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "random", "channel"] = Field(
        "magnitude",
        description="magnitude / random: unstructured (masks); channel: filters and hidden units removed "
        "physically by L1/L2 norm with Torch-Pruning (real compression).",
    )
    scope: Literal["global", "layerwise"] = Field(
        "global", description="global: one threshold over all prunable weights; layerwise: the same ratio per layer."
    )
    norm: Literal["l1", "l2"] = Field("l1", description="channel only: the filter norm that ranks channels.")
    schedule: Literal["one_shot", "gradual"] = Field(
        "one_shot",
        description="gradual: cubic schedule (Zhu & Gupta 2017) interleaved with fine-tuning (magnitude only).",
    )
    pruning_steps: int = Field(4, ge=1, le=100, description="gradual only: mask updates before the final sparsity.")
    fine_tuning: FineTuningSpec | None = Field(None, description="Needs train_dataset_id; required for gradual.")
    ignored_layers: list[str] | None = Field(
        None,
        description="Module names kept dense. Default (null): the first conv (or first linear) and the last linear "
        "layer, as Balancing Act does; [] prunes every layer.",
    )
    layer_ratios: dict[str, float] = Field(default_factory=dict, description="Per-layer ratios overriding the sweep's.")

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
        if self.schedule == "gradual" and self.method != "magnitude":
            raise ValueError("gradual pruning is magnitude pruning on a schedule; use method 'magnitude'")
        if self.schedule == "gradual" and self.fine_tuning is None:
            raise ValueError("gradual pruning interleaves fine-tuning: give fine_tuning (and train_dataset_id)")
        for layer, ratio in self.layer_ratios.items():
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"layer_ratios[{layer!r}] must lie in [0, 1); got {ratio}")
        return self

    @property
    def label(self) -> str:
        parts: list[str] = [self.method, self.scope]
        if self.method == "channel":
            parts.append(self.norm)
        if self.schedule == "gradual":
            parts.append("gradual")
        elif self.fine_tuning is not None:
            parts.append("finetuned")
        return "-".join(parts)


# ceag: Balancing Act's CIFAR-100 value (classes as groups, per mini-batch); larger steps let the multipliers
# outgrow the loss and drive some groups' weight negative (seen on digits at 0.2). equalized_loss: Tran et al.
# do not state theirs; 0.2 per epoch moves the multipliers within the few epochs an audit affords.
DEFAULT_DUAL_LR = {"equalized_loss": 0.2, "ceag": 0.01}


class MitigationSpec(BaseModel):
    """Training after pruning that tries to undo the harm (docs/METHODS.md §16); each becomes its own runs, labelled
    '<method>+<mitigation>', next to the unmitigated ones. All train on train_dataset_id with the masks kept."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["finetune", "equalized_loss", "ceag"] = Field(
        description="finetune: plain fine-tuning (the baseline); equalized_loss: Tran et al.'s J_a = J constraints "
        "(Lagrangian dual, multipliers updated per epoch); ceag: Balancing Act's ψa ≤ tolerance constraints "
        "(loss surrogate, replay-buffer accuracies, multipliers updated per mini-batch)."
    )
    epochs: int = Field(5, ge=1, le=1000)
    lr: float = Field(0.01, gt=0, le=10)
    batch_size: int = Field(128, ge=2, le=65536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    weight_decay: float = Field(0.0, ge=0, le=1)
    dual_lr: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Step size of the multipliers (not for finetune). Default: 0.2 for equalized_loss (per epoch), "
        "0.01 for ceag (per mini-batch, as Balancing Act on CIFAR-100).",
    )
    tolerance: float = Field(0.01, ge=0, le=1, description="ceag only: ε in ψa ≤ ε (Balancing Act's default).")
    buffer_size: int = Field(40, ge=1, le=100_000, description="ceag only: replay buffer length k per group.")
    placement: Literal["after", "before", "both"] = Field(
        "after",
        description="equalized_loss only (Tran et al.'s Fair Aft / Fair Bf / Fair Both): train under the constraints "
        "after pruning, on the dense model before pruning, or both.",
    )
    attribute: str | None = Field(
        None,
        description="The group attribute whose groups are constrained: one of group_by, or their intersection "
        "('a&b'). Default: the intersection when group_by has several attributes, else the one.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MitigationSpec:
        if self.name == "finetune" and self.dual_lr is not None:
            raise ValueError("finetune has no multipliers: leave dual_lr out")
        if self.name != "equalized_loss" and self.placement != "after":
            raise ValueError("placement 'before' and 'both' are variants of equalized_loss (Tran et al.)")
        return self

    @property
    def label(self) -> str:
        return self.name if self.placement == "after" else f"{self.name}-{self.placement}"

    @property
    def step_size(self) -> float:
        return self.dual_lr if self.dual_lr is not None else DEFAULT_DUAL_LR.get(self.name, 0.0)


class PruningSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratios: list[float] = Field(
        default_factory=lambda: [0.5, 0.7, 0.9],
        min_length=1,
        max_length=64,
        description="Fractions of prunable weights (channels, for 'channel') to remove; each run is compared with "
        "the dense model.",
    )
    methods: list[MethodSpec] = Field(
        default_factory=lambda: [MethodSpec()],
        min_length=1,
        max_length=8,
        description="Methods to compare at the same ratios, e.g. global vs layer-wise magnitude vs channel L1.",
    )

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        for ratio in ratios:
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"every ratio must lie strictly between 0 and 1; got {ratio}")
        if len(set(ratios)) != len(ratios):
            raise ValueError("ratios must not repeat")
        return sorted(ratios)

    @model_validator(mode="after")
    def _distinct_methods(self) -> PruningSpec:
        labels = [method.label for method in self.methods]
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"methods must differ; these repeat: {repeated}")
        return self


class DiagnosticsSpec(BaseModel):
    """Why a group is hurt (Tran et al. 2022): gradient norms, curvature, predicted excessive loss. The dense
    model's figures are computed once per audit and shared by every run; each run adds R̂ along its δ."""

    model_config = ConfigDict(extra="forbid")

    gradient_norms: bool = Field(True, description="Exact per-group gradient norm of the mean loss.")
    curvature: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Per group: Hessian trace (Hutchinson, adaptive), top eigenvalue (Lanczos) and Gauss–Newton "
        "trace. 'auto' computes them for models up to 5M parameters and says so in the report when it skips them.",
    )
    pruned_models: bool = Field(
        False,
        description="Also each pruned model's gradient norms and curvature (a pass over the data per run, and the "
        "curvature again); off, those figures are null and the report says why.",
    )
    hutchinson_probes: int = Field(16, ge=2, le=1000, description="At most this many Rademacher probes per group.")
    trace_target_rse: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Hutchinson stops once its standard error is at most this share of the trace "
        "(after 6 probes; 0 = always draw hutchinson_probes).",
    )
    lanczos_steps: int = Field(
        default=20,
        ge=1,
        le=500,
        description="At most this many Lanczos steps (Hessian-vector products) for the top eigenvalue; it stops "
        "earlier once its residual bound is within 1e-3 of the estimate.",
    )
    max_examples_per_group: int = Field(
        64, ge=1, le=100_000, description="Seeded subsample cap per group for the Hessian trace and top eigenvalue."
    )
    sampled_examples_per_group: int = Field(
        256,
        ge=2,
        le=1_000_000,
        description="Seeded subsample cap per group for the per-example estimates: Gauss–Newton trace and R̂'s "
        "g_a·δ and δᵀH_aδ (every example when the group is smaller, and then R̂ is exact).",
    )

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, data: Any) -> Any:
        # Audits stored before Lanczos replaced power iteration name the step cap `power_iterations`.
        if isinstance(data, dict) and "power_iterations" in data and "lanczos_steps" not in data:
            data = {**data, "lanczos_steps": data["power_iterations"]}
            del data["power_iterations"]
        return data


class StatisticsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_resamples: int = Field(
        1000, ge=0, le=10_000, description="Paired, group-stratified bootstrap resamples for 95% CIs (0 = off)."
    )
    min_group_size: int = Field(30, ge=1, description="Groups smaller than this are flagged as unreliable.")


class PolicySpec(BaseModel):
    """Release thresholds; a run passes when every check holds on every reported attribute. Accuracies are
    fractions, so 0.01 is one percentage point."""

    model_config = ConfigDict(extra="forbid")

    max_excess_accuracy_gap: float = Field(
        0.01, ge=0, le=1, description="max ψa ≤ ε (Balancing Act's tolerance, default 0.01)."
    )
    max_worst_group_drop: float | None = Field(
        0.05, ge=0, le=1, description="max Δa ≤ this: no group loses more accuracy (null = no check)."
    )
    max_accuracy_fairness_violation: float | None = Field(
        None, ge=0, le=1, description="max − min group accuracy of the pruned model ≤ this (null = no check)."
    )
    min_group_size: int = Field(
        30, ge=1, description="Groups smaller than this are reported but do not decide the verdict."
    )


class AuditSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "0f6c0c3c5f3e4a0c9f51b0a1d2c3e4f5",
                    "dataset_id": "7a1b2c3d4e5f40718293a4b5c6d7e8f9",
                    "group_by": ["digit"],
                    "pruning": {
                        "ratios": [0.5, 0.7, 0.9],
                        "methods": [
                            {"method": "magnitude", "scope": "global"},
                            {"method": "magnitude", "scope": "layerwise"},
                            {"method": "channel", "norm": "l1", "scope": "layerwise"},
                        ],
                    },
                    "seed": 0,
                }
            ]
        },
    )

    model_id: ResourceId | None = Field(None, description="Id returned by POST /v1/models (or name it by `model`).")
    model: ResourceRef | None = Field(None, description="Instead of model_id: the model by name and version.")
    dataset_id: ResourceId | None = Field(None, description="Evaluation dataset id returned by POST /v1/datasets.")
    dataset: ResourceRef | None = Field(None, description="Instead of dataset_id: the dataset by name and version.")
    train_dataset_id: ResourceId | None = Field(
        None, description="Train dataset for fine-tuning and gradual pruning; without it only one-shot pruning runs."
    )
    group_by: list[str] = Field(
        min_length=1,
        max_length=4,
        description="Group attributes of the dataset to report on; with several, their intersection is reported too.",
    )
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    mitigations: list[MitigationSpec] = Field(
        default_factory=list,
        max_length=8,
        description='Mitigations to run after each method at each ratio, e.g. ["finetune", "equalized_loss", '
        '"ceag"] (a name, or an object with options). Needs train_dataset_id with the group_by attributes. '
        "The unmitigated runs ('none') are always there; with mitigations, every run also reports the train split.",
    )

    @field_validator("group_by")
    @classmethod
    def _distinct_attributes(cls, group_by: list[str]) -> list[str]:
        if len(set(group_by)) != len(group_by):
            raise ValueError("group_by must not repeat an attribute")
        return group_by

    @field_validator("mitigations", mode="before")
    @classmethod
    def _names_as_objects(cls, mitigations: object) -> object:
        """'ceag' is short for {"name": "ceag"}; 'none' (the unmitigated runs, always there) is dropped."""
        if not isinstance(mitigations, list):
            return mitigations
        return [{"name": m} if isinstance(m, str) else m for m in mitigations if m != "none"]

    @model_validator(mode="after")
    def _model_and_dataset_named(self) -> AuditSpec:
        # Both may be set on a stored spec: the reference, and the id it resolved to when the audit was created.
        if self.model_id is None and self.model is None:
            raise ValueError("name the model: model_id, or model {name, version}")
        if self.dataset_id is None and self.dataset is None:
            raise ValueError("name the evaluation dataset: dataset_id, or dataset {name, version}")
        return self

    @model_validator(mode="after")
    def _mitigations_consistent(self) -> AuditSpec:
        labels = [m.label for m in self.mitigations]
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"mitigations must differ; these repeat: {repeated}")
        if self.mitigations and self.train_dataset_id is None:
            raise ValueError("mitigations train the pruned model: set train_dataset_id")
        for mitigation in self.mitigations:
            if mitigation.attribute is not None and mitigation.attribute not in self.reported_attributes:
                raise ValueError(
                    f"mitigation {mitigation.label}: attribute {mitigation.attribute!r} is not one of "
                    f"{self.reported_attributes}"
                )
        return self

    @property
    def reported_attributes(self) -> list[str]:
        """group_by, and their intersection when there are several (as the report names it)."""
        return self.group_by + (["&".join(self.group_by)] if len(self.group_by) > 1 else [])

    @property
    def runs_requested(self) -> int:
        return len(self.pruning.ratios) * len(self.pruning.methods) * (1 + len(self.mitigations))

    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec)
    statistics: StatisticsSpec = Field(default_factory=StatisticsSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batch_size: int = Field(512, ge=1, le=65536, description="Evaluation batch size.")


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: AuditStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float = Field(description="Fraction of runs finished, 0 to 1.")
    progress_message: str | None
    attempts: int
    error: str | None = Field(description="Why the audit failed, in words.")
    cancel_requested: bool = Field(description="A cancel was asked while running; it stops at the next checkpoint.")
    spec: AuditSpec
    model_id: str = Field(description="The model audited (what a spec's model reference resolved to).")
    dataset_id: str
    schedule_id: str | None = Field(None, description="The schedule that fired this audit, if one did.")
    scheduled_for: datetime | None = None
    changes: dict | None = Field(
        None, description="What moved since the previous audit of its schedule (set once it has succeeded)."
    )
    report_url: str | None = None
    report_html_url: str | None = Field(
        None,
        description="The HTML report with its share token: a read-only link for people and browsers, which "
        "works without the API key; anyone holding it can read this one report.",
    )


class AuditPage(BaseModel):
    items: list[AuditOut]
    total: int
    limit: int
    offset: int
