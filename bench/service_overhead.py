"""`service_overhead`: what the service adds around the audit pipeline. One audit through the HTTP API on
the embedded stack (one real worker process; POST /v1/audits → succeeded seen, so queueing, the claim,
loading the stored inputs, storing runs and rendering the HTML report count) against the same runs
in-process: `run_audit_pipeline` on `AuditInputs` built from files (as `reproduce/` builds them), same
spec, same data, same seeded model. Interleaved repeats (after one warm-up round each), value = median
per-repeat ratio API / in-process. Target ≤ 1.15.

Sizes: an MLP 50 → 64 → 32 → 2 on a seeded synthetic table of 20,000 rows × 50 features, race (5 groups) ×
sex (2): 17 groups reported; sweep: ratios 0.5, 0.7, 0.9 × magnitude-global and channel-l1-layerwise,
otherwise the default spec; 3 repeats. Smoke size (BENCH_SMOKE=1): 2,000 rows, curvature off, 1 repeat."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.audit_tabular import table
from bench.audits import audit_spec, seeded_model
from bench.common import emit, interleaved_seconds, median_ratio, smoke
from bench.stack import BenchStack, report_of, run_audit, upload_model, upload_npz
from service.dataset_files import write_dataset_files
from service.schemas.audits import AuditSpec
from worker.inputs import AuditInputs, DatasetInput
from worker.pipeline.runner import run_audit_pipeline

ROWS, SMOKE_ROWS = 20_000, 2_000
FEATURES = 50
ARCHITECTURE = {"name": "mlp", "in_features": FEATURES, "hidden": [64, 32], "num_classes": 2}
REPEATS, SMOKE_REPEATS = 3, 1
TARGET = 1.15
GROUP_BY = ["race", "sex"]

# What explains a miss (measured 2026-12-01: 3.67, API 7.2–8.0 s against 2.1 s in-process).
WHY_MISSED = (
    "the HTML report, rendered by the API path only (details.html_render_s: most of the difference); each task "
    "hand-off (claim, stored inputs and baseline, SQLite commits, 0.1 s broker polling) adds 0.2–0.4 s"
)


def in_process_inputs(workdir: Path, arrays: dict, spec: dict, weights: Path) -> AuditInputs:
    """AuditInputs without the service: the stored dataset layout written from the arrays, group codes
    named as the npz upload names integer groups ("0", "1", …)."""
    groups = {a: arrays[f"group_{a}"] for a in GROUP_BY}
    write_dataset_files(workdir / "eval", arrays["x"], arrays["y"], groups)
    names = {a: [str(v) for v in range(int(codes.max()) + 1)] for a, codes in groups.items()}
    return AuditInputs(
        spec=AuditSpec(model_id="0" * 32, dataset_id="0" * 32, **spec),
        architecture=ARCHITECTURE,
        weights_path=weights,
        evaluation=DatasetInput(workdir / "eval", names),
        train=None,
        output_dir=workdir / "runs",
        device="auto",  # the worker's default setting
    )


def html_render_seconds(report: dict) -> float:
    """The time to render the HTML page of a served report in this process, as the last run's worker does."""
    from service.schemas.reports import AuditReport
    from worker.report_html import render_report_html

    typed = AuditReport.model_validate(report)
    started = time.perf_counter()
    render_report_html(typed)
    return time.perf_counter() - started


def main() -> None:
    arrays = table(SMOKE_ROWS if smoke() else ROWS, FEATURES)
    spec = audit_spec(GROUP_BY)
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    statuses: list[str] = []
    phases: list[list[dict]] = []
    last_audit_id: list[str] = []
    try:
        weights = workdir / "dense.safetensors"
        parameters = seeded_model(ARCHITECTURE, weights)
        inputs = in_process_inputs(workdir, arrays, spec, weights)
        inputs.output_dir.mkdir()
        with BenchStack() as stack, stack.client() as client:
            ids = {"model_id": upload_model(client, weights, ARCHITECTURE), "dataset_id": upload_npz(client, arrays)}

            def via_api() -> None:
                followed = run_audit(client, {**ids, **spec}, timeout_s=600)
                last_audit_id.append(followed.audit["id"])
                statuses.append(followed.audit["status"])
                phases.append(followed.phases())

            api, local = interleaved_seconds(
                [via_api, lambda: run_audit_pipeline(inputs, lambda _f, _m: None)],
                SMOKE_REPEATS if smoke() else REPEATS,
            )
            peaks = stack.peaks_mb()
            html_s = html_render_seconds(report_of(client, last_audit_id[-1]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = median_ratio(api, local)
    details = {
        "meaning": "audit wall time via the API (submit → succeeded) / the same runs in-process (run_audit_pipeline)",
        "architecture": ARCHITECTURE,
        "parameters": parameters,
        "rows": len(arrays["y"]),
        "features": FEATURES,
        "groups": {"race": 5, "sex": 2, "race&sex": 10},
        "spec": spec,
        "repeats": len(api),
        "value_is": "median over repeats of the per-repeat ratio, the two interleaved (after a warm-up round)",
        "api_s": [round(s, 2) for s in api],
        "in_process_s": [round(s, 2) for s in local],
        "api_median_s": round(statistics.median(api), 2),
        "in_process_median_s": round(statistics.median(local), 2),
        "api_audit_statuses": statuses,
        "api_phases_last_repeat": phases[-1],
        # The HTML report is rendered (matplotlib) by the API path only: its share of the difference.
        "html_render_s": round(html_s, 2),
        "smoke": smoke(),
        **peaks,
    }
    ok = all(s == "succeeded" for s in statuses) and ratio <= TARGET
    if not ok:
        details["why_missed"] = WHY_MISSED
    emit("service_overhead", ratio, "ratio", f"<= {TARGET:g}", ok, details)
