"""Mitigations through the real stack (API process → SQLite broker → Celery worker process): an audit with
`mitigations: ["finetune", "equalized_loss", "ceag"]` yields runs for each, with train and eval figures,
multipliers and wall time; numbers checked against a numpy forward pass of the downloaded weights."""

from __future__ import annotations

import csv
import html
import io
import re

import jsonschema
import numpy as np
import pytest
from safetensors.numpy import load

from tests.integration.reference import per_group
from tests.integration.stack import start_stack, wait_for_audit


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("mitigations"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def uploaded(stack, digits_case):
    with stack.client() as client:
        return {
            "model_id": digits_case.upload_model(client).json()["id"],
            "dataset_id": digits_case.upload_dataset(client).json()["id"],
            "train_dataset_id": digits_case.upload_train_dataset(client).json()["id"],
        }


def test_each_mitigation_becomes_runs_with_train_and_eval_figures(stack, digits_case, uploaded):
    with stack.client() as client:
        created = client.post(
            "/v1/audits",
            json={
                **uploaded,
                "group_by": ["digit"],
                "pruning": {"ratios": [0.8], "methods": [{"method": "magnitude"}, {"method": "channel"}]},
                "mitigations": ["finetune", {"name": "equalized_loss", "placement": "both", "epochs": 2}, "ceag"],
                "diagnostics": {"curvature": "off"},
                "statistics": {"bootstrap_resamples": 0},
            },
        )
        assert created.status_code == 202, created.text
        audit = wait_for_audit(client, created.json()["id"], timeout_s=300)
        assert audit["status"] == "succeeded", (audit, stack.log("worker"))
        report = client.get(f"/v1/audits/{audit['id']}/report").json()
        weights = {run["label"]: load(client.get(run["weights_url"]).content) for run in report["runs"]}
        table = list(csv.DictReader(io.StringIO(client.get(f"/v1/audits/{audit['id']}/report.csv").text)))
        page = client.get(f"/v1/audits/{audit['id']}/report.html").text
        document = client.get("/openapi.json").json()

    assert report["report_version"] == "3"
    labels = [run["label"] for run in report["runs"]]
    assert labels == [
        f"{method}{suffix}"
        for method in ("magnitude-global", "channel-global-l1")
        for suffix in ("", "+finetune", "+equalized_loss-both", "+ceag")
    ]
    by_label = {run["label"]: run for run in report["runs"]}
    train_groups = {str(g): int((digits_case.y_train == g).sum()) for g in range(10)}
    dense_train = per_group(digits_case.state, digits_case.x_train, digits_case.y_train, digits_case.y_train)
    for run in [report["dense"], *report["runs"]]:
        # Every run reports the train split as well, against the dense model on that split.
        train = run["train"]["attributes"][0]
        assert {g["group"]: g["n"] for g in train["groups"]} == train_groups
        for group in train["groups"]:
            assert group["dense_accuracy"] == pytest.approx(dense_train[group["group"]][0], abs=1e-12)
            assert group["diagnostics"]["dense_gradient_norm"] is None  # diagnostics: evaluation split only
    for label, run in by_label.items():
        state = weights[label]
        if label.startswith("magnitude"):
            # The evaluated numbers are those of the stored weights, on both splits (numpy forward pass).
            for split, x, y in (
                ("eval", digits_case.x, digits_case.y),
                ("train", digits_case.x_train, digits_case.y_train),
            ):
                reference = per_group(state, x, y, y)
                attribute = (run["attributes"] if split == "eval" else run["train"]["attributes"])[0]
                overall = run["overall"] if split == "eval" else run["train"]["overall"]
                assert overall["accuracy"] == pytest.approx(reference["overall"][0], abs=1e-12)
                for group in attribute["groups"]:
                    assert group["accuracy"] == pytest.approx(reference[group["group"]][0], abs=1e-12)
                    assert group["loss"] == pytest.approx(reference[group["group"]][1], rel=1e-5)
        if run["mitigation"] == "none":
            assert run["mitigation_details"] is None
            continue
        details = run["mitigation_details"]
        assert details["name"] == run["mitigation"] and details["attribute"] == "digit"
        assert details["seconds"] > 0 and run["seconds"] >= details["seconds"]
        assert run["recipe"]["mitigation"]["name"] == run["mitigation"]
        if run["mitigation"] == "finetune":
            assert details["multipliers"] is None and details["dual_lr"] is None
        else:
            assert set(details["multipliers"]) == set(train_groups)
            assert all(value >= 0 for value in details["multipliers"].values())
        unmitigated = label.split("+")[0]
        if run["mitigation"] == "equalized_loss":
            assert [phase["when"] for phase in details["phases"]] == ["before", "after"]
            assert all(len(phase["multiplier_history"]) == 2 for phase in details["phases"])
        elif label.startswith("magnitude"):
            # Trained after pruning with the masks kept: exactly the unmitigated run's zeros.
            assert len(details["phases"]) == 1
            assert run["achieved_sparsity"] == by_label[unmitigated]["achieved_sparsity"]
            for key, value in weights[unmitigated].items():
                if value.ndim == 2 and key != "layers.0.weight" and key != "layers.4.weight":
                    assert np.array_equal(state[key] == 0, value == 0), key
        if label.startswith("channel"):  # the same number of channels removed, whichever model was pruned
            assert (
                run["compression"]["pruned"]["parameters"]
                == by_label[unmitigated]["compression"]["pruned"]["parameters"]
            )
    # Fine-tuning recovers accuracy that one-shot pruning at 80% lost, on the data it trained on.
    assert (
        by_label["magnitude-global+finetune"]["train"]["overall"]["accuracy"]
        > by_label["magnitude-global"]["train"]["overall"]["accuracy"]
    )
    # Highest passing ratio per method and mitigation; the CSV carries both splits.
    assert set(report["verdict"]["highest_passing_ratio"]) == set(labels)
    assert {row["split"] for row in table} == {"eval", "train"}
    ceag_rows = [row for row in table if row["label"] == "magnitude-global+ceag" and row["split"] == "train"]
    assert len(ceag_rows) == 10 and {row["mitigation"] for row in ceag_rows} == {"ceag"}
    ceag_groups = {g["group"]: g for g in by_label["magnitude-global+ceag"]["train"]["attributes"][0]["groups"]}
    for row in ceag_rows:
        assert float(row["excess_accuracy_gap"]) == ceag_groups[row["group"]]["excess_accuracy_gap"]
    # The report with mitigations validates against the published schema.
    schema = {**document["components"]["schemas"]["AuditReport"], "components": document["components"]}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(report))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    # HTML: the before/after section shows each run's numbers as the JSON has them, with a rendered plot.
    section = page[page.index('data-testid="mitigation"') :]
    section = section[: section.index("</section>")]
    assert "<svg" in section and "evaluation split" in html.unescape(section)
    for run in report["runs"]:
        row = section[section.index(f'data-run="{run["id"]}"') :]
        cells = dict(
            re.findall(r'<td (?:class="text" )?data-field="([a-z_]+)">([^<]*)</td>', row[: row.index("</tr>")])
        )
        assert cells["max_excess_accuracy_gap"] == points(run["attributes"][0]["aggregates"]["max_excess_accuracy_gap"])
        assert cells["train_max_excess_accuracy_gap"] == points(
            run["train"]["attributes"][0]["aggregates"]["max_excess_accuracy_gap"]
        )
        assert cells["train_accuracy"] == f"{run['train']['overall']['accuracy'] * 100:.1f}%"
        multipliers = (run["mitigation_details"] or {}).get("multipliers")
        if multipliers:
            largest = max(multipliers, key=multipliers.get)
            assert html.unescape(cells["largest_multiplier"]) == f"{largest}: {multipliers[largest]:.4g}"


def points(value: float) -> str:
    """The page's documented format for points: one decimal, no sign on zero."""
    return f"{value * 100:.1f}".replace("-0.0", "0.0")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train_dataset_id": None}, "train_dataset_id"),
        ({"mitigations": [{"name": "finetune", "dual_lr": 0.1}]}, "no multipliers"),
        ({"mitigations": [{"name": "ceag", "placement": "before"}]}, "variants of equalized_loss"),
        ({"mitigations": [{"name": "ceag", "attribute": "age"}]}, "not one of"),
        ({"mitigations": ["ceag", {"name": "ceag", "tolerance": 0.05}]}, "must differ"),
        ({"mitigations": ["reweigh"]}, "finetune"),
        (
            {
                "pruning": {"ratios": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]},
                "mitigations": [
                    "finetune",
                    "equalized_loss",
                    "ceag",
                    {"name": "equalized_loss", "placement": "both"},
                    {"name": "equalized_loss", "placement": "before"},
                ],
            },
            "at most 50 runs",
        ),
    ],
)
def test_bad_mitigation_specs_are_422(stack, uploaded, change, message):
    with stack.client() as client:
        response = client.post(
            "/v1/audits", json={**uploaded, "group_by": ["digit"], "mitigations": ["ceag"], **change}
        )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert message in response.text


def test_mitigation_needs_the_groups_on_the_train_dataset(stack, digits_case, uploaded):
    with stack.client() as client:
        other = digits_case.upload_dataset(
            client,
            digits_case.npz(
                x=digits_case.x_train, y=digits_case.y_train, group_digit=None, group_parity=digits_case.y_train % 2
            ),
        )
        assert other.status_code == 201, other.text
        response = client.post(
            "/v1/audits",
            json={**uploaded, "train_dataset_id": other.json()["id"], "group_by": ["digit"], "mitigations": ["ceag"]},
        )
    assert response.status_code == 422 and "lacks group attribute(s) ['digit']" in response.json()["detail"]
