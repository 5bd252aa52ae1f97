"""Which queue a task belongs on. With a GPU queue configured (PRUNEAUDIT_GPU_QUEUE), a heavy task — a dense
baseline or a run whose work reaches PRUNEAUDIT_GPU_MIN_WORK_MACS — belongs to the workers started with
`pruneaudit worker --gpu`, which take the default queue's tasks too when idle; the rest stay on the default queue.

The API and the sweeper know no model's cost and send every task to the default queue; a worker that does not
take the GPU queue and receives a heavy task forwards it there unclaimed (`forwarded`), and a baseline sends each
heavy run straight to the GPU queue. Without a GPU queue nothing is weighed (no model is built for it)."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.models import Audit, AuditStatus, Dataset, Run, RunStatus
from service.queue import RUN_AUDIT_TASK, enqueue_audit, enqueue_run
from service.schemas.audits import AuditSpec
from service.settings import Settings, get_settings
from service.storage import get_store
from worker.inputs import RunPlan, graph_path, run_plans

log = logging.getLogger(__name__)

# A training example costs a forward and a backward pass: about three forwards.
TRAINING_EXAMPLE_FORWARDS = 3


@dataclass(frozen=True)
class AuditSize:
    """What an audit's tasks cost, in multiply-accumulates: its model's per example, times the examples passed."""

    macs_per_example: int
    evaluation_rows: int
    train_rows: int

    def baseline_work(self) -> float:
        """One forward pass over the evaluation data (its diagnostics cost more, on the same model and data)."""
        return float(self.macs_per_example * self.evaluation_rows)

    def run_work(self, plan: RunPlan) -> float:
        """A run's evaluation pass plus its fine-tuning epochs (the method's, per pruning step when gradual, and
        its mitigation's) over the training data."""
        epochs = plan.mitigation.epochs if plan.mitigation else 0
        tuning = plan.method.fine_tuning
        if tuning is not None:
            epochs += tuning.epochs * (plan.method.pruning_steps if plan.method.schedule == "gradual" else 1)
        training = TRAINING_EXAMPLE_FORWARDS * epochs * self.train_rows
        return float(self.macs_per_example * (self.evaluation_rows + training))


@dataclass(frozen=True)
class Placement:
    """The queue of each of one audit's tasks; `size` is None when no GPU queue is configured."""

    settings: Settings
    size: AuditSize | None

    def _queue_for(self, work: float) -> str:
        heavy = self.settings.gpu_queue and work >= self.settings.gpu_min_work_macs
        return self.settings.gpu_queue if heavy else self.settings.queue_name

    def baseline_queue(self) -> str:
        return self._queue_for(self.size.baseline_work()) if self.size else self.settings.queue_name

    def run_queue(self, plan: RunPlan) -> str:
        return self._queue_for(self.size.run_work(plan)) if self.size else self.settings.queue_name


def audit_size(session: Session, audit: Audit) -> AuditSize:
    """The model's multiply-accumulates per example and the rows of the audit's datasets."""
    train_id = audit.spec.get("train_dataset_id")
    train = session.get(Dataset, train_id) if train_id else None
    macs = macs_per_example(audit.model.id, json.dumps(audit.model.architecture), tuple(audit.model.input_shape))
    return AuditSize(macs, audit.dataset.rows, train.rows if train is not None else 0)


@functools.lru_cache(maxsize=64)
def macs_per_example(model_id: str, architecture: str, shape: tuple[int, ...]) -> int:
    """Counted on a freshly built module (the architecture alone decides them; an imported graph is built from its
    stored graph), once per model in this process: a task is weighed when forwarded and again when it runs."""
    from worker.engine.architectures import build_model
    from worker.engine.structured import multiply_accumulates

    spec = json.loads(architecture)
    return multiply_accumulates(build_model(spec, graph_path(get_store(), spec)), list(shape))


def placement(session: Session, audit: Audit) -> Placement:
    settings = get_settings()
    return Placement(settings, audit_size(session, audit) if settings.gpu_queue else None)


def forwarded(session: Session, task_name: str, row_id: str) -> bool:
    """On a worker that does not take the GPU queue: send a queued heavy task there, unclaimed, and say so (the
    caller then does nothing). A task not queued any more is left to its claim, which finds nothing to do."""
    settings = get_settings()
    if not settings.gpu_queue or settings.worker_gpu:
        return False
    if _queue_of_queued(session, task_name, row_id) != settings.gpu_queue:
        return False
    (enqueue_audit if task_name == RUN_AUDIT_TASK else enqueue_run)(row_id, settings.gpu_queue)
    log.info("%s %s is heavy: forwarded to the GPU queue %s", task_name, row_id, settings.gpu_queue)
    return True


def _queue_of_queued(session: Session, task_name: str, row_id: str) -> str | None:
    """The queue of a still queued audit's baseline (RUN_AUDIT_TASK) or run; None when the row is not queued."""
    if task_name == RUN_AUDIT_TASK:
        audit = session.get(Audit, row_id)
        return placement(session, audit).baseline_queue() if audit and audit.status == AuditStatus.queued else None
    run = session.get(Run, row_id)
    if run is None or run.status != RunStatus.queued:
        return None
    plan = run_plans(AuditSpec.model_validate(run.audit.spec))[run.position - 1]
    return placement(session, run.audit).run_queue(plan)
