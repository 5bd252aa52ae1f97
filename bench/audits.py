"""What the audit figures share: seeded models saved as safetensors, the sweep of issue #12, and one audit
through the HTTP API timed against the time to evaluate its models once (bench/reference.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from bench.common import smoke
from bench.reference import reference_seconds
from bench.stack import (
    BenchStack,
    download_models,
    report_of,
    run_audit,
    run_seconds,
    upload_model,
    upload_npz,
)
from service.schemas.audits import AuditSpec
from worker.engine.architectures import build_model

SWEEP = {
    "ratios": [0.5, 0.7, 0.9],
    "methods": [{"method": "magnitude", "scope": "global"}, {"method": "channel", "norm": "l1", "scope": "layerwise"}],
}
# Smoke size only: curvature on every group of every model is most of an audit's time today.
SMOKE_SPEC = {"diagnostics": {"curvature": "off"}}
BATCH_SIZE = AuditSpec.model_fields["batch_size"].default


def seeded_model(architecture: dict, path: Path, seed: int = 0) -> int:
    """A seeded random initialisation of `architecture` saved as safetensors; returns its parameter count."""
    torch.manual_seed(seed)
    model = build_model(architecture)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return sum(p.numel() for p in model.parameters())


def audit_spec(group_by: list[str], **extra: object) -> dict:
    """The sweep, otherwise the default spec (curvature off at smoke size)."""
    return {"group_by": group_by, "pruning": SWEEP, "seed": 0, **(SMOKE_SPEC if smoke() else {}), **extra}


def audit_against_reference(
    stack: BenchStack,
    architecture: dict,
    arrays: dict[str, np.ndarray],
    group_by: list[str],
    workdir: Path,
    *,
    timeout_s: float,
    reference_repeats: int,
) -> tuple[float, dict]:
    """Upload, run one audit (submit → succeeded), download its runs' weights and time the reference in a
    child with the worker's environment. Returns (wall / reference, details)."""
    dense = workdir / "dense.safetensors"
    parameters = seeded_model(architecture, dense)
    np.save(workdir / "x.npy", arrays["x"])
    spec = audit_spec(group_by)
    with stack.client() as client:
        model_id, dataset_id = upload_model(client, dense, architecture), upload_npz(client, arrays)
        followed = run_audit(client, {"model_id": model_id, "dataset_id": dataset_id, **spec}, timeout_s)
        succeeded = followed.audit["status"] == "succeeded"
        if followed.timed_out:
            client.post(f"/v1/audits/{followed.audit['id']}/cancel")  # 409 when it ended meanwhile: fine
            stack.restart_workers()  # the reference must not share the machine with a run going on
        if succeeded:
            report = report_of(client, followed.audit["id"])
            models = download_models(client, report, dense, architecture, workdir)
        else:  # a lower bound: the dense model stands in for the pruned ones
            models = [{"label": f"dense#{i}", "architecture": architecture, "weights": str(dense)} for i in range(7)]
    reference = reference_seconds(
        {"models": models, "x": str(workdir / "x.npy"), "batch_size": BATCH_SIZE, "repeats": reference_repeats},
        stack.env,
        workdir,
    )
    reference_s = statistics.median(reference["seconds_per_repeat"])
    details = {
        "value_is": "audit wall time / reference_s"
        if succeeded
        else "a lower bound: the audit did not succeed in time; the dense model timed 7 times is the reference",
        "audit_status": followed.audit["status"],
        "audit_error": followed.audit.get("error"),
        "timed_out": followed.timed_out,
        "architecture": architecture,
        "parameters": parameters,
        "rows": len(arrays["y"]),
        "x_shape": list(arrays["x"].shape),
        "groups": {a: int(len(np.unique(arrays[f"group_{a}"]))) for a in group_by},
        "groups_reported": {a["attribute"]: len(a["groups"]) for a in report["dense"]["attributes"]}
        if succeeded
        else None,
        "spec": spec,
        "audit_s": round(followed.wall_s, 2),
        "audit_min": round(followed.wall_s / 60, 2),
        "reference_s": round(reference_s, 3),
        "reference": reference,
        "phases": followed.phases(),
        "run_seconds": run_seconds(report) if succeeded else None,
        "smoke": smoke(),
    }
    return followed.wall_s / reference_s, details
