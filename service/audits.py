"""Audits: validate a spec against the stored model and dataset, record it, list it, and assemble the
report from the stored run results."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from arch.registry import architecture_adapter, expected_state_dict
from arch.specs import OnnxSpec
from results.groups import GroupDiagnostics, GroupResult
from service import catalog, lineage
from service.db import rows_matched
from service.errors import Conflict, InvalidInput, NotFound
from service.models import Audit, AuditStatus, Dataset, Model, Run, utcnow
from service.policy import audit_verdict, metric_items, run_verdict
from service.runs import settle_cancellation
from service.schemas.audits import AuditSpec, PolicySpec
from service.schemas.reports import REPORT_VERSION, AuditReport, DatasetRef, ModelRef, RunReport
from service.tenancy import owned


def prunable_layers(model: Model) -> list[str]:
    spec = architecture_adapter.validate_python(model.architecture)
    if isinstance(spec, OnnxSpec):
        return list(spec.prunable_layers)
    return [
        key.removesuffix(".weight")
        for key, (shape, _kind) in expected_state_dict(spec).items()
        if key.endswith(".weight") and len(shape) >= 2
    ]


def check_dataset_fits(model: Model, dataset: Dataset, role: str) -> None:
    expected = model.input_shape
    actual = dataset.feature_shape
    # An MLP (plain or channel-pruned) flattens each example, so only the number of features must match.
    # An imported ONNX graph takes exactly the input shape it declares.
    flattens = len(expected) == 1 and model.architecture_name != "onnx"
    fits = math.prod(actual) == math.prod(expected) if flattens else actual == expected
    if not fits:
        raise InvalidInput(f"model expects input {expected} per example; {role} dataset x has {actual}")
    if len(dataset.classes) > model.num_classes:
        raise InvalidInput(
            f"{role} dataset has {len(dataset.classes)} classes but the model has {model.num_classes} outputs"
        )


def check_methods(spec: AuditSpec, model: Model, train_dataset: Dataset | None) -> None:
    layers = prunable_layers(model)
    for method in spec.pruning.methods:
        named = [*(method.ignored_layers or []), *method.layer_ratios]
        unknown_layers = [layer for layer in named if layer not in layers]
        if unknown_layers:
            raise InvalidInput(
                f"method {method.label}: {unknown_layers} are not prunable layers of this model: {layers}"
            )
        if method.ignored_layers is not None and set(layers) <= set(method.ignored_layers):
            raise InvalidInput(f"method {method.label}: ignored_layers keeps every layer dense: nothing left to prune")
        if method.fine_tuning is not None and train_dataset is None:
            raise InvalidInput(
                f"method {method.label} fine-tunes the pruned model, which needs a train dataset: set "
                "train_dataset_id (without one, only one-shot pruning without fine-tuning runs)"
            )


def stored_spec(spec: AuditSpec) -> dict:
    """The spec as stored and served: references (model, dataset) only where the request used them."""
    data = spec.model_dump(mode="json")
    for ref in ("model", "dataset"):
        if data.get(ref) is None:
            data.pop(ref, None)
    return data


def spec_digest(spec: AuditSpec) -> str:
    return hashlib.sha256(json.dumps(stored_spec(spec), sort_keys=True).encode()).hexdigest()


def resolve_refs(session: Session, tenant_id: str, spec: AuditSpec) -> AuditSpec:
    """The spec with model_id and dataset_id set to what its (name, version) references name now."""
    updates = {}
    if spec.model is not None:
        updates["model_id"] = lineage.resolve(session, Model, tenant_id, spec.model).id
    if spec.dataset is not None:
        updates["dataset_id"] = lineage.resolve(session, Dataset, tenant_id, spec.dataset).id
    return spec.model_copy(update=updates) if updates else spec


def replayed_audit(session: Session, tenant_id: str, idempotency_key: str, spec: AuditSpec) -> Audit | None:
    """The audit an earlier POST of this tenant with this Idempotency-Key created; 422 if that POST had another
    body. Keys are per tenant: two teams may pick the same one."""
    audit = session.scalars(
        select(Audit).where(Audit.tenant_id == tenant_id, Audit.idempotency_key == idempotency_key)
    ).one_or_none()
    if audit is not None and audit.request_digest != spec_digest(spec):
        raise InvalidInput("this Idempotency-Key was used with a different request body; use a new key")
    return audit


def checked_spec(session: Session, tenant_id: str, spec: AuditSpec, max_runs: int) -> AuditSpec:
    """The spec with its references resolved, once it has been checked against the stored model and datasets;
    422 (nothing stored) otherwise."""
    runs = spec.runs_requested
    if runs > max_runs:
        raise InvalidInput(
            f"at most {max_runs} runs (ratios × methods × (1 + mitigations)) per audit; this spec asks for {runs}"
        )
    spec = resolve_refs(session, tenant_id, spec)
    assert spec.model_id is not None and spec.dataset_id is not None, "resolve_refs sets both"
    try:
        model = catalog.get_model(session, tenant_id, spec.model_id)
        dataset = catalog.get_dataset(session, tenant_id, spec.dataset_id)
        train_dataset = (
            catalog.get_dataset(session, tenant_id, spec.train_dataset_id) if spec.train_dataset_id else None
        )
    except NotFound as exc:
        raise InvalidInput(exc.detail) from None
    check_dataset_fits(model, dataset, "evaluation")
    if train_dataset is not None:
        check_dataset_fits(model, train_dataset, "train")
    unknown = [attribute for attribute in spec.group_by if attribute not in dataset.groups]
    if unknown:
        raise InvalidInput(f"group attribute(s) {unknown} not in dataset; it has {sorted(dataset.groups)}")
    check_methods(spec, model, train_dataset)
    if spec.mitigations and train_dataset is not None:
        missing = [attribute for attribute in spec.group_by if attribute not in train_dataset.groups]
        if missing:
            raise InvalidInput(
                f"mitigations constrain groups on the train dataset, which lacks group attribute(s) {missing}; "
                f"it has {sorted(train_dataset.groups)}"
            )
    return spec


def create_audit(
    session: Session,
    tenant_id: str,
    spec: AuditSpec,
    max_runs: int,
    idempotency_key: str | None = None,
    **fields,
) -> Audit:
    """Check and record an audit (flushed, not committed); `fields`: more columns (a schedule's audits)."""
    digest = spec_digest(spec)  # of the request as sent, before its references resolve: what a replay compares
    spec = checked_spec(session, tenant_id, spec, max_runs)
    audit = Audit(
        tenant_id=tenant_id,
        model_id=spec.model_id,
        dataset_id=spec.dataset_id,
        spec=stored_spec(spec),
        idempotency_key=idempotency_key,
        request_digest=digest if idempotency_key else None,
        **fields,
    )
    session.add(audit)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(
            "a request with this Idempotency-Key is in flight; retry it once that one has finished"
        ) from None
    return audit


def get_run(session: Session, tenant_id: str, audit_id: str, run_id: str) -> Run:
    get_audit(session, tenant_id, audit_id)
    run = session.get(Run, run_id)
    if run is None or run.audit_id != audit_id:
        raise NotFound(f"run {run_id} of audit {audit_id} does not exist")
    return run


def get_audit(session: Session, tenant_id: str, audit_id: str) -> Audit:
    return owned(session, Audit, audit_id, tenant_id)


def cancel_audit(session: Session, tenant_id: str, audit_id: str) -> Audit:
    """A queued audit ends `cancelled` at once; a running one is flagged: its queued runs are stopped at once
    (never computed), its running ones at their next checkpoint (between epochs), and it ends `cancelled` when none
    runs any more (at once when none does). Ended audits cannot be cancelled (409)."""
    audit = get_audit(session, tenant_id, audit_id)
    stopped = rows_matched(
        session,
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == AuditStatus.queued)
        .values(status=AuditStatus.cancelled, finished_at=utcnow(), progress_message="cancelled before it started"),
    )
    if stopped == 0:
        flagged = rows_matched(
            session,
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.running)
            .values(cancel_requested=True),
        )
        if flagged == 0:
            session.refresh(audit)
            raise Conflict(f"audit {audit_id} has already ended ({audit.status.value}); there is nothing to cancel")
        # The flag's UPDATE holds the audit's lock (service/runs.py); before its runs are queued, the worker
        # measuring the dense baseline sees the flag at its next checkpoint instead.
        if session.scalar(select(Audit.runs_queued_at).where(Audit.id == audit_id)) is not None:
            settle_cancellation(session, audit_id)
    session.refresh(audit)
    return audit


def list_audits(
    session: Session,
    tenant_id: str,
    *,
    status: AuditStatus | None,
    limit: int,
    offset: int,
    model_id: str | None = None,
    dataset_id: str | None = None,
    schedule_id: str | None = None,
    model_name: str | None = None,
) -> tuple[list[Audit], int]:
    query = select(Audit).where(Audit.tenant_id == tenant_id)
    for column, value in (
        (Audit.status, status),
        (Audit.model_id, model_id),
        (Audit.dataset_id, dataset_id),
        (Audit.schedule_id, schedule_id),
    ):
        if value is not None:
            query = query.where(column == value)
    if model_name is not None:
        query = query.where(Audit.model_id.in_(select(Model.id).where(Model.name == model_name)))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(query.order_by(Audit.created_at.desc(), Audit.id).limit(limit).offset(offset)).all()
    return list(items), total


def _run_report(run: Run, weights_url) -> RunReport:
    """The stored result with the run's id, weights link and worker; `verdict` is left null here, assemble_report
    applies the policy."""
    assert run.result is not None, "a report is assembled once every run has succeeded, with its result"
    return RunReport.model_validate(
        {
            **run.result,
            "id": run.id,
            "worker": run.worker,
            "verdict": None,
            "weights_url": weights_url(run) if run.weights_sha256 else None,
        }
    )


def succeeded_audit(session: Session, tenant_id: str, audit_id: str) -> Audit:
    """The audit with its runs and group rows loaded; 409 unless it has succeeded (reports are final then)."""
    get_audit(session, tenant_id, audit_id)
    audit = session.scalars(
        select(Audit)
        .where(Audit.id == audit_id)
        .options(selectinload(Audit.runs))
        .execution_options(populate_existing=True)
    ).one()
    if audit.status != AuditStatus.succeeded:
        reason = f": {audit.error}" if audit.error else f" (progress {audit.progress:.0%})"
        raise Conflict(
            f"the report exists once the audit has succeeded; audit {audit.id} is {audit.status.value}{reason}"
        )
    return audit


def report_etag(audit: Audit) -> str:
    """Reports never change once written, so the audit id, its finish time and the report version identify one."""
    digest = hashlib.sha256(f"{audit.id}|{audit.finished_at}|{REPORT_VERSION}".encode()).hexdigest()[:32]
    return f'"{digest}"'


def weights_path_url(run: Run) -> str:
    return f"/v1/audits/{run.audit_id}/runs/{run.id}/weights"


def assemble_report(audit: Audit, weights_url=weights_path_url) -> AuditReport:
    """The report of an audit whose runs are stored; `weights_url(run)` gives a run's weights address."""
    policy = PolicySpec(**audit.spec.get("policy", {}))
    dense, *pruned = (_run_report(run, weights_url) for run in audit.runs)
    for run in pruned:
        run.verdict = run_verdict(run, policy)
        for attribute in run.attributes:
            attribute.metrics = metric_items(attribute, run.verdict.checks)
    model, dataset = audit.model, audit.dataset
    return AuditReport(
        audit_id=audit.id,
        created_at=audit.created_at,
        finished_at=audit.finished_at,
        spec=audit.spec,
        model=ModelRef(
            id=model.id, sha256=model.sha256, architecture=model.architecture, parameter_count=model.parameter_count
        ),
        dataset=DatasetRef(
            id=dataset.id, sha256=dataset.sha256, rows=dataset.rows, classes=dataset.classes, groups=dataset.groups
        ),
        environment=audit.environment or {},
        policy=policy.model_dump(),
        verdict=audit_verdict(pruned),
        changes=audit.changes,
        dense=dense,
        runs=pruned,
    )


CSV_COLUMNS = (
    "run_id",
    "label",
    "method",
    "scope",
    "ratio",
    "mitigation",
    "achieved_sparsity",
    "run_passed",
    "split",
    "attribute",
    "group",
    "n",
    "share",
    "small_group",
    "dense_accuracy",
    "accuracy",
    "accuracy_drop",
    "excess_accuracy_gap",
    "dense_loss",
    "loss",
    "excessive_loss",
    "dense_gradient_norm",
    "gradient_norm",
    "dense_hessian_trace",
    "predicted_excessive_loss",
)


# The CSV's per-group figures, each named once: by its field in results.groups.
GROUP_COLUMNS = set(CSV_COLUMNS) & set(GroupResult.model_fields)
DIAGNOSTIC_COLUMNS = set(CSV_COLUMNS) & set(GroupDiagnostics.model_fields)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: object) -> object:
    """A cell as written: floats by repr; text that a spreadsheet would run as a formula (a group value such as
    `=cmd|' /C calc'!A0`) prefixed with ' (OWASP CSV injection). Numbers stay numbers, negative ones too."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def report_csv(report: AuditReport) -> str:
    """One row per run × split × attribute × group (split 'train' for audits with mitigations), every number
    exactly as in the JSON report (repr of floats)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for run in [report.dense, *report.runs]:
        splits = [("eval", run.attributes)] + ([("train", run.train.attributes)] if run.train else [])
        for split, attribute in ((split, a) for split, attributes in splits for a in attributes):
            for group in attribute.groups:
                values = {
                    **group.model_dump(include=GROUP_COLUMNS),
                    **group.diagnostics.model_dump(include=DIAGNOSTIC_COLUMNS),
                    "run_id": run.id,
                    "label": run.label,
                    "method": run.method,
                    "scope": run.scope,
                    "ratio": run.ratio,
                    "achieved_sparsity": run.achieved_sparsity,
                    "mitigation": run.mitigation,
                    "split": split,
                    "run_passed": None if run.verdict is None else run.verdict.passed,
                    "attribute": attribute.attribute,
                }
                writer.writerow([_csv_cell(values[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()
