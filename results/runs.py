"""One run (the dense baseline, or a method at a ratio, maybe mitigated): the typed result a worker computes
and the database stores."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from results.attributes import AttributeMetrics, AttributeResult
from results.base import Result


class OverallMetrics(Result):
    n: int
    dense_accuracy: float
    accuracy: float
    dense_loss: float
    loss: float
    accuracy_drop: float = Field(description="Δ = dense accuracy − pruned accuracy over all examples.")
    excessive_loss: float = Field(description="J(θs) − J(θd) over all examples.")


class SplitResult(Result):
    """The same figures on the train split (no diagnostics there); its attributes count as missing the train
    rows in no group of the evaluation split."""

    overall: OverallMetrics
    attributes: list[AttributeMetrics]


class MitigationPhase(Result):
    when: str = Field(description="'before' pruning (on the dense model) or 'after' it.")
    attribute: str = Field(description="The attribute whose groups were constrained.")
    training_losses: list[float] = Field(description="Each epoch's mean training objective (the Lagrangian).")
    multipliers: dict[str, float] | None = Field(description="Final λ per group; null for finetune.")
    multiplier_history: list[dict[str, float] | None] = Field(description="λ per group after each epoch.")
    dual_steps: dict[str, int] | None = Field(
        description="Multiplier updates per group (ceag: mini-batches with the group's replay buffer full)."
    )
    seconds: float


class MitigationDetails(Result):
    """The mitigation as run: its options, the final multipliers (dual variables) and the wall time."""

    name: str = Field(description="finetune, equalized_loss or ceag.")
    placement: str
    attribute: str = Field(description="The attribute whose groups were constrained.")
    epochs: int
    lr: float
    batch_size: int
    optimizer: str
    momentum: float
    weight_decay: float
    dual_lr: float | None = Field(description="The multipliers' step size; null for finetune.")
    tolerance: float = Field(description="ceag's ε.")
    buffer_size: int = Field(description="ceag's replay buffer length k.")
    multipliers: dict[str, float] | None = Field(description="Final λ per group (last phase); null for finetune.")
    phases: list[MitigationPhase]
    seconds: float = Field(description="Wall time spent training under the mitigation.")


class RunResult(Result):
    label: str = Field(
        description="The method as configured, e.g. 'magnitude-global' or 'channel-layerwise-l1'; "
        "mitigated runs add '+<mitigation>', e.g. 'magnitude-global+ceag'."
    )
    method: str = Field(description="'dense' for the baseline, else the pruning method.")
    scope: str | None
    ratio: float = Field(description="Requested fraction of prunable weights removed.")
    achieved_sparsity: float
    layer_sparsity: dict[str, dict]
    seconds: float
    delta_norm: float | None = Field(description="‖θs − θd‖ over trainable parameters; null for the dense baseline.")
    compression: dict = Field(
        description="'dense' and 'pruned': parameters, nonzero_parameters, MACs, safetensors file_bytes (and CPU "
        "latency at batch 1 and 64 for channel-pruned runs); 'ratios' = dense / pruned."
    )
    recipe: dict = Field(description="How the run was made: method, ratio, dense layers, seed, architecture.")
    notes: dict[str, str] = Field(description="What was not computed for this run, and why.")
    estimators: dict[str, str] = Field(
        default_factory=dict, description="How each diagnostic figure of this run was computed, by figure family."
    )
    overall: OverallMetrics
    # Sequence, not list: RunReport narrows the items to AttributeReport, and a list field could not be narrowed.
    attributes: Sequence[AttributeResult] = Field(
        description="One per group_by attribute, plus their intersection (named 'a&b') when there are several."
    )
    mitigation: str = Field("none", description="'none', or the mitigation trained on the pruned model.")
    mitigation_details: MitigationDetails | None = Field(None, description="Null for unmitigated runs.")
    train: SplitResult | None = Field(
        None,
        description="The same figures on the train split, for audits with mitigations (Balancing Act reports "
        "that gains on the train split do not reliably carry over to unseen data: compare with `attributes`).",
    )
