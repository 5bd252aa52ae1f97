"""Mitigated runs: the pruned model trained under a mitigation (finetune, equalized_loss, ceag) on the train
split with its masks kept, before and/or after pruning (docs/METHODS.md §16)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from results.runs import MitigationDetails, MitigationPhase
from service.schemas.audits import MitigationSpec
from worker.engine.architectures import build_model, load_weights
from worker.engine.mitigation import GroupBaseline, mitigate
from worker.engine.pruning import Masks, sparsity
from worker.inputs import RunPlan
from worker.pipeline.data import Grouping
from worker.pipeline.measure import Baseline
from worker.pipeline.methods import EpochCallback, PrunedModel, PruningJob, prune_model


@dataclass(frozen=True)
class SavedRun:
    """An unmitigated run once measured, without its model (its weights are on disk): what the mitigated runs
    placed 'after' pruning at the same method and ratio start from."""

    masks: Masks | None
    recipe: dict
    layer_report: dict
    weights_path: Path
    graph_path: Path | None = None  # an imported model's: the graph of the recipe's architecture


def constrained_grouping(baseline: Baseline, mitigation: MitigationSpec) -> Grouping:
    """The train-split grouping a mitigation constrains: its `attribute`, else the last reported one (the
    intersection when group_by has several attributes)."""
    groupings = baseline.train_split.groupings
    if mitigation.attribute is None:
        return groupings[-1]
    return next(g for g in groupings if g.attribute == mitigation.attribute)


def mitigation_phase(
    baseline: Baseline, model, masks: Masks | None, mitigation: MitigationSpec, when: str, on_epoch: EpochCallback
) -> MitigationPhase:
    """Train `model` in place under `mitigation`; what it did, with multipliers named by group."""
    grouping = constrained_grouping(baseline, mitigation)
    n_groups = len(grouping.names)
    group_baseline = (
        GroupBaseline.from_outcomes(baseline.train_split.dense_outcomes, grouping.codes, n_groups)
        if mitigation.name == "ceag"
        else None
    )
    result = mitigate(
        model,
        baseline.train_split.x,
        baseline.train_split.y,
        grouping.codes,
        n_groups,
        name=mitigation.name,
        epochs=mitigation.epochs,
        lr=mitigation.lr,
        batch_size=mitigation.batch_size,
        optimizer=mitigation.optimizer,
        momentum=mitigation.momentum,
        weight_decay=mitigation.weight_decay,
        dual_lr=mitigation.step_size,
        tolerance=mitigation.tolerance,
        buffer_size=mitigation.buffer_size,
        baseline=group_baseline,
        masks=masks,
        seed=baseline.inputs.spec.seed,
        device=baseline.device,
        on_epoch=on_epoch,
    )

    def named(values) -> dict[str, float] | None:
        return None if values is None else dict(zip(grouping.names, map(float, values), strict=True))

    return MitigationPhase(
        when=when,
        attribute=grouping.attribute,
        training_losses=result.losses,
        multipliers=named(result.multipliers),
        multiplier_history=[named(values) for values in result.multiplier_history],
        dual_steps=None
        if result.dual_steps is None
        else dict(zip(grouping.names, map(int, result.dual_steps), strict=True)),
        seconds=result.seconds,
    )


def mitigated_model(
    baseline: Baseline, plan: RunPlan, unmitigated: SavedRun | None, job: PruningJob
) -> tuple[PrunedModel, MitigationDetails]:
    """The pruned model trained under `plan.mitigation`. 'after' starts from the unmitigated run's saved weights
    and masks; 'before' trains a copy of the dense model under the constraints and prunes that; 'both' does
    both (its 'after' phase keeps its own masks), so only 'after' needs the unmitigated run."""
    mitigation = plan.mitigation
    assert mitigation is not None, "mitigated_model takes a mitigated plan"
    phases = []
    if mitigation.placement == "after":
        assert unmitigated is not None, "a mitigation placed 'after' starts from its unmitigated run (starts_from)"
        model = build_model(unmitigated.recipe["architecture"], unmitigated.graph_path)
        load_weights(model, unmitigated.weights_path)
        model.to(baseline.device)
        run = PrunedModel(model, unmitigated.masks, unmitigated.recipe, unmitigated.layer_report)
    else:
        fair_dense = copy.deepcopy(baseline.model)
        phases.append(mitigation_phase(baseline, fair_dense, None, mitigation, "before", job.on_epoch))
        run = prune_model(fair_dense, plan.method, plan.ratio, job, copy_model=False)
        del fair_dense
    if mitigation.placement in ("after", "both"):
        phases.append(mitigation_phase(baseline, run.model, run.masks, mitigation, "after", job.on_epoch))
    layer_report = sparsity(run.model, run.masks) if run.masks is not None else run.layer_report
    options = mitigation.model_dump(mode="json")
    details = MitigationDetails(
        **{
            **options,
            "dual_lr": mitigation.step_size if mitigation.name != "finetune" else None,
            "attribute": phases[-1].attribute,
            "multipliers": phases[-1].multipliers,
            "phases": phases,
            "seconds": sum(phase.seconds for phase in phases),
        }
    )
    return PrunedModel(run.model, run.masks, {**run.recipe, "mitigation": options}, layer_report), details
