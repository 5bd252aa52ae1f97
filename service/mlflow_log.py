"""A succeeded audit as an MLflow run: the report (JSON, HTML, CSV) as artifacts, the verdict and headline figures
as metrics, the spec as params, in an experiment of a tracking server (any MLflow tracking URI).

Metrics: `verdict_passed` (1 or 0); per pruned run `<label>.ratio_<r>.max_psi` (max ψ over the attributes: the
largest excess accuracy gap), `<label>.ratio_<r>.worst_group_drop` (the largest group accuracy drop) and
`<label>.ratio_<r>.passed`; per method `<label>.highest_passing_ratio` where one passes. Params: the spec flattened
to dotted keys (JSON values). Tags: `pruneaudit.audit_id`, `.model_id`, `.dataset_id`, `.report_version`.

`pruneaudit mlflow-log AUDIT_ID` reads the report over HTTP (service/client.py), as `pruneaudit gate` does; with
PRUNEAUDIT_MLFLOW_TRACKING_URI set, workers log every audit that succeeds (worker/mlflow_task.py). mlflow is an
optional extra (`pip install pruneaudit[mlflow]`), imported only when a run is logged."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass

from service.client import ApiClient, ClientError

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params in one log_batch
UNSAFE_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /:]")


@dataclass(frozen=True)
class ReportFiles:
    report: dict
    csv: str
    html: str | None  # none when the worker did not render it


def metrics_of(report: dict) -> dict[str, float]:
    figures = {"verdict_passed": float(report["verdict"]["passed"])}
    for run in report["runs"]:
        prefix = f"{run['label']}.ratio_{run['ratio']:g}"
        aggregates = [attribute["aggregates"] for attribute in run["attributes"]]
        psi = [a["max_excess_accuracy_gap"] for a in aggregates if a.get("max_excess_accuracy_gap") is not None]
        drops = [a["max_accuracy_drop"] for a in aggregates if a.get("max_accuracy_drop") is not None]
        if psi:
            figures[f"{prefix}.max_psi"] = max(psi)
        if drops:
            figures[f"{prefix}.worst_group_drop"] = max(drops)
        if run.get("verdict") is not None:
            figures[f"{prefix}.passed"] = float(run["verdict"]["passed"])
    for label, ratio in report["verdict"]["highest_passing_ratio"].items():
        if ratio is not None:
            figures[f"{label}.highest_passing_ratio"] = ratio
    return {_key(name): value for name, value in figures.items()}


def params_of(spec: dict, prefix: str = "") -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in spec.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            params.update(params_of(value, f"{key}."))
        else:
            params[_key(key)] = json.dumps(value, sort_keys=True)[:MAX_PARAM_CHARS]
    return params


def _key(name: str) -> str:
    return UNSAFE_KEY_CHARS.sub("_", name)


def log_report(tracking_uri: str, experiment: str, files: ReportFiles, run_name: str | None = None) -> str:
    """Log one audit's report as a new run of `experiment` (created if missing); the MLflow run id."""
    quiet_telemetry()
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    report = files.report
    tags = {
        "pruneaudit.audit_id": report["audit_id"],
        "pruneaudit.model_id": report["model"]["id"],
        "pruneaudit.dataset_id": report["dataset"]["id"],
        "pruneaudit.report_version": str(report.get("report_version", "")),
    }
    run_id = client.create_run(experiment_id, run_name=run_name or f"audit-{report['audit_id']}", tags=tags).info.run_id
    try:
        params = [Param(key, value) for key, value in params_of(report["spec"]).items()]
        for start in range(0, len(params), BATCH):
            client.log_batch(run_id, params=params[start : start + BATCH])
        metrics = [Metric(key, value, 0, 0) for key, value in metrics_of(report).items()]
        client.log_batch(run_id, metrics=metrics)
        client.log_dict(run_id, report, "report.json")
        client.log_text(run_id, files.csv, "report.csv")
        if files.html is not None:
            client.log_text(run_id, files.html, "report.html")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def quiet_telemetry() -> None:
    """Before mlflow is imported: MLflow 3 reports usage to its makers unless told not to; a service logging its
    users' audits does not, unless MLFLOW_DISABLE_TELEMETRY=false says otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def add_command(commands, default_url: str, default_key: str | None) -> None:
    """`pruneaudit mlflow-log` on the CLI's subcommands (an argparse subparsers action)."""
    parser = commands.add_parser(
        "mlflow-log", help="log a succeeded audit's report, verdict, figures and spec as an MLflow run"
    )
    parser.add_argument("audit_id", help="a succeeded audit's id")
    parser.add_argument("--url", default=default_url)
    parser.add_argument("--key", default=default_key, help="API key (default: $PRUNEAUDIT_API_KEY)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--experiment", default="pruneaudit", help="experiment name (created if missing)")
    parser.add_argument("--run-name", help="default: audit-<id>")
    parser.set_defaults(func=run_mlflow_log)


def fetch_report(client: ApiClient, audit_id: str) -> ReportFiles:
    report = client.report(audit_id)  # 409 (a ClientError) until the audit has succeeded
    try:
        html = client.text(f"/v1/audits/{audit_id}/report.html")
    except ClientError:
        html = None  # not rendered: the JSON and CSV are complete
    return ReportFiles(report=report, csv=client.text(f"/v1/audits/{audit_id}/report.csv"), html=html)


def run_mlflow_log(args: argparse.Namespace) -> int:
    """Exit 0 with the MLflow run id printed; 2 when nothing was logged (the reason on stderr)."""
    if not args.tracking_uri:
        print("mlflow-log: error: give --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    if importlib.util.find_spec("mlflow") is None:  # a missing extra is a sentence, not a traceback
        print("mlflow-log: error: mlflow is not installed: pip install 'pruneaudit[mlflow]'", file=sys.stderr)
        return 2
    try:
        files = fetch_report(ApiClient(args.url, args.key), args.audit_id)
    except ClientError as exc:
        print(f"mlflow-log: error: {exc}", file=sys.stderr)
        return 2
    try:
        run_id = log_report(args.tracking_uri, args.experiment, files, args.run_name)
    except Exception as exc:  # MLflow's own errors (bad URI, server refusing): a sentence, exit 2
        print(f"mlflow-log: error: MLflow refused the run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"mlflow-log: audit {args.audit_id} logged as run {run_id} of experiment {args.experiment!r}")
    return 0
