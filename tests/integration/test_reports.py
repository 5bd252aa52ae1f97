"""Reports people read and pipelines gate on: policy verdict in the JSON, CSV equal to the JSON, ETag/304,
comparison of two audits, `pruneaudit gate` exit codes, and MLflow runs (`pruneaudit mlflow-log`, and the workers'
own with PRUNEAUDIT_MLFLOW_TRACKING_URI) read back with MLflow's own client."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.stack import REPO, start_stack, wait_for_audit

RATIOS = [0.3, 0.6, 0.9]


# MLflow 3 refuses its file store unless asked (it wants a database); a file: URI is what the tests read back.
MLFLOW_ENV = {"MLFLOW_ALLOW_FILE_STORE": "true"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("reports")
    # Workers log every succeeded audit to MLflow (test_workers_log_every_succeeded_audit_to_mlflow).
    mlflow = {"PRUNEAUDIT_MLFLOW_TRACKING_URI": (var_dir / "mlruns").as_uri(), "PRUNEAUDIT_MLFLOW_EXPERIMENT": "auto"}
    stack = start_stack(var_dir, settings={**mlflow, **MLFLOW_ENV})
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def audits(stack, digits_case):
    """Two audits of one dataset: a strict policy (fails) and a lenient one (passes)."""
    with stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(client).json()
        ids = {}
        for name, policy in {
            "strict": {"max_excess_accuracy_gap": 0.0, "max_worst_group_drop": 0.0},
            "lenient": {"max_excess_accuracy_gap": 1.0, "max_worst_group_drop": None, "min_group_size": 1},
        }.items():
            created = client.post(
                "/v1/audits",
                json={
                    "model_id": model["id"],
                    "dataset_id": dataset["id"],
                    "group_by": ["digit"],
                    "pruning": {
                        "ratios": RATIOS,
                        "methods": [{"method": "magnitude", "scope": "global", "ignored_layers": []}],
                    },
                    "diagnostics": {"curvature": "off"},
                    "statistics": {"bootstrap_resamples": 0},
                    "policy": policy,
                },
            ).json()
            audit = wait_for_audit(client, created["id"])
            assert audit["status"] == "succeeded", (audit, stack.log("worker"))
            ids[name] = audit["id"]
    return ids


def test_verdict_follows_the_policy(stack, audits):
    with stack.client() as client:
        strict = client.get(f"/v1/audits/{audits['strict']}/report").json()
        lenient = client.get(f"/v1/audits/{audits['lenient']}/report").json()
    assert strict["policy"]["max_excess_accuracy_gap"] == 0.0
    assert not strict["verdict"]["passed"]
    assert strict["verdict"]["highest_passing_ratio"] == {"magnitude-global": None}
    for run in strict["runs"]:
        groups = [g for g in run["attributes"][0]["groups"] if g["n"] >= strict["policy"]["min_group_size"]]
        check = next(c for c in run["verdict"]["checks"] if c["name"] == "max_excess_accuracy_gap")
        assert check["value"] == max(g["excess_accuracy_gap"] for g in groups)
        assert run["verdict"]["passed"] is False and run["verdict"]["reasons"]
        items = {item["name"]: item for item in run["attributes"][0]["metrics"]}
        assert items["max_excess_accuracy_gap"]["value"] == check["value"]
        assert (
            items["max_excess_accuracy_gap"]["threshold"] == 0.0 and items["max_excess_accuracy_gap"]["passed"] is False
        )
        assert (
            items["loss_fairness_violation"]["value"] == run["attributes"][0]["aggregates"]["loss_fairness_violation"]
        )
        assert items["loss_fairness_violation"]["threshold"] is None
        assert items["max_worst_group_drop"]["n"] == sum(g["n"] for g in run["attributes"][0]["groups"])
    assert lenient["verdict"]["passed"] and lenient["verdict"]["highest_passing_ratio"] == {"magnitude-global": 0.9}
    assert all(run["verdict"]["passed"] and not run["verdict"]["reasons"] for run in lenient["runs"])


def test_csv_equals_the_json(stack, audits):
    with stack.client() as client:
        report = client.get(f"/v1/audits/{audits['strict']}/report").json()
        response = client.get(f"/v1/audits/{audits['strict']}/report.csv")
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    runs = [report["dense"], *report["runs"]]
    assert len(rows) == sum(len(a["groups"]) for run in runs for a in run["attributes"])
    by_key = {(row["run_id"], row["attribute"], row["group"]): row for row in rows}
    for run in runs:
        for attribute in run["attributes"]:
            for group in attribute["groups"]:
                row = by_key[(run["id"], attribute["attribute"], group["group"])]
                for field in ("accuracy", "accuracy_drop", "excess_accuracy_gap", "excessive_loss", "share"):
                    assert float(row[field]) == group[field]
                assert float(row["dense_gradient_norm"]) == group["diagnostics"]["dense_gradient_norm"]
                assert int(row["n"]) == group["n"] and row["label"] == run["label"]


def test_reports_are_immutable_with_etags(stack, audits):
    with stack.client() as client:
        for path in ("report", "report.csv", "report.html"):
            first = client.get(f"/v1/audits/{audits['strict']}/{path}")
            assert first.status_code == 200, (path, first.text)
            etag = first.headers["etag"]
            assert first.headers["cache-control"] == "private, max-age=31536000, immutable"
            again = client.get(f"/v1/audits/{audits['strict']}/{path}", headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
            # a list, and the weak form of the tag: both match (RFC 9110's weak comparison)
            listed = client.get(f"/v1/audits/{audits['strict']}/{path}", headers={"If-None-Match": f'"x", W/{etag}'})
            assert listed.status_code == 304 and listed.headers["cache-control"] == first.headers["cache-control"]
            assert (
                client.get(f"/v1/audits/{audits['strict']}/{path}", headers={"If-None-Match": '"other"'}).status_code
                == 200
            )
        assert (
            client.get(f"/v1/audits/{audits['strict']}/report").headers["etag"]
            != client.get(f"/v1/audits/{audits['lenient']}/report").headers["etag"]
        )


def test_compare_two_audits_of_one_dataset(stack, audits):
    with stack.client() as client:
        comparison = client.get("/v1/compare", params={"audits": f"{audits['strict']},{audits['lenient']}"})
        assert comparison.status_code == 200, comparison.text
        comparison = comparison.json()
        strict = client.get(f"/v1/audits/{audits['strict']}/report").json()
        bad = client.get("/v1/compare", params={"audits": audits["strict"]})
    assert bad.status_code == 422
    assert [(r["label"], r["ratio"]) for r in comparison["runs"]] == [("dense", 0.0)] + [
        ("magnitude-global", ratio) for ratio in RATIOS
    ]
    for compared, run in zip(comparison["runs"][1:], strict["runs"], strict=True):
        assert compared["first_passed"] is False and compared["second_passed"] is True
        for group, original in zip(compared["groups"], run["attributes"][0]["groups"], strict=True):
            assert group["first"]["accuracy"] == original["accuracy"]
            # Same model, data and pruning: only the policies differ, so every number agrees.
            assert group["accuracy_difference"] == 0.0


def test_gate_exit_codes(stack, audits):
    def gate(*args):
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "gate", *args, "--url", stack.url],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=stack.env,
        )

    assert gate(audits["lenient"]).returncode == 0
    failing = gate(audits["strict"])
    assert failing.returncode == 1 and "fails" in failing.stdout
    chosen = gate(audits["strict"], "--method", "magnitude-global", "--ratio", "0.6")
    assert chosen.returncode == 1 and "excess accuracy gap" in chosen.stdout
    assert gate(audits["lenient"], "--ratio", "0.6").returncode == 0
    assert gate("missing").returncode == 2
    assert gate(audits["lenient"], "--ratio", "0.5").returncode == 2


def test_json_report_validates_against_the_published_schema(stack, audits):
    import jsonschema

    with stack.client() as client:
        document = client.get("/openapi.json").json()
        report = client.get(f"/v1/audits/{audits['strict']}/report").json()
    # The schema as published in the OpenAPI document, its $refs resolved inside that document.
    schema = {**document["components"]["schemas"]["AuditReport"], "components": document["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    broken = dict(report, verdict={"passed": "maybe"})
    assert any(True for _ in validator.iter_errors(broken))


def test_html_numbers_equal_the_json(stack, audits):
    import html
    import re

    with stack.client() as client:
        report = client.get(f"/v1/audits/{audits['strict']}/report").json()
        page = client.get(f"/v1/audits/{audits['strict']}/report.html").text
    assert report["verdict"]["summary"] in html.unescape(page)
    for run in report["runs"]:
        block = page[page.index(f'data-run="{run["id"]}"') :]
        block = block[: block.index("</tbody>")]
        for group in run["attributes"][0]["groups"]:
            row = block[block.index(f'data-group="{group["group"]}"') :]
            cells = dict(re.findall(r'<td data-field="([a-z_]+)">([^<]*)</td>', row[: row.index("</tr>")]))
            # Documented formats: accuracies in % with one decimal, gaps in points with one decimal.
            assert cells["accuracy"] == f"{group['accuracy'] * 100:.1f}%"
            assert cells["excess_accuracy_gap"] == f"{group['excess_accuracy_gap'] * 100:.1f}".replace("-0.0", "0.0")
            assert cells["n"] == f"{group['n']:,}"


def assert_logged_as_in_the_api(mlflow, run, report: dict, csv_text: str) -> None:
    """The MLflow run holds the report's verdict, headline figures, spec and files, as the API serves them."""
    metrics, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and run.data.tags["pruneaudit.audit_id"] == report["audit_id"]
    assert metrics["verdict_passed"] == float(report["verdict"]["passed"])
    for pruned in report["runs"]:
        prefix = f"{pruned['label']}.ratio_{pruned['ratio']:g}"
        aggregates = pruned["attributes"][0]["aggregates"]
        assert metrics[f"{prefix}.max_psi"] == aggregates["max_excess_accuracy_gap"]
        assert metrics[f"{prefix}.worst_group_drop"] == aggregates["max_accuracy_drop"]
        assert metrics[f"{prefix}.passed"] == float(pruned["verdict"]["passed"])
    assert json.loads(params["pruning.ratios"]) == RATIOS and json.loads(params["group_by"]) == ["digit"]
    folder = Path(mlflow.download_artifacts(run.info.run_id, ""))
    assert sorted(p.name for p in folder.iterdir()) == ["report.csv", "report.html", "report.json"]
    assert (folder / "report.csv").read_text() == csv_text
    logged = json.loads((folder / "report.json").read_text())
    assert {k: v for k, v in logged.items() if k != "runs"} == {k: v for k, v in report.items() if k != "runs"}


def test_mlflow_log_cli_logs_an_audit_as_a_run(stack, audits, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking_uri = (tmp_path / "cli-mlruns").as_uri()

    def mlflow_log(audit_id: str):
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "mlflow-log", audit_id, "--url", stack.url],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**stack.env, "MLFLOW_TRACKING_URI": tracking_uri, **MLFLOW_ENV},
        )

    logged = mlflow_log(audits["strict"])
    assert logged.returncode == 0, logged.stderr
    missing = mlflow_log("0" * 32)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    with stack.client() as client:
        report = client.get(f"/v1/audits/{audits['strict']}/report").json()
        csv_text = client.get(f"/v1/audits/{audits['strict']}/report.csv").text
    mlflow = MlflowClient(tracking_uri=tracking_uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("pruneaudit").experiment_id])
    assert run.info.run_id in logged.stdout and run.data.metrics["verdict_passed"] == 0.0
    assert_logged_as_in_the_api(mlflow, run, report, csv_text)


def test_workers_log_every_succeeded_audit_to_mlflow(stack, audits, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow = MlflowClient(tracking_uri=stack.env["PRUNEAUDIT_MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 60
    while (experiment := mlflow.get_experiment_by_name("auto")) is None or len(
        runs := mlflow.search_runs([experiment.experiment_id])
    ) < len(audits):
        assert time.monotonic() < deadline, stack.log("worker")
        time.sleep(0.5)
    by_audit = {run.data.tags["pruneaudit.audit_id"]: run for run in runs}
    assert set(by_audit) == set(audits.values())  # each once
    with stack.client() as client:
        lenient = client.get(f"/v1/audits/{audits['lenient']}/report").json()
        csv_text = client.get(f"/v1/audits/{audits['lenient']}/report.csv").text
    # The worker's report names run weights by path, the API's by absolute URL: everything else is equal.
    assert_logged_as_in_the_api(mlflow, by_audit[audits["lenient"]], lenient, csv_text)
