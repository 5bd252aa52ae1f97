"""The report does not drift: two audits of fixed inputs (the demo audit, and one that exercises every section:
channel pruning, fine-tuning, mitigations with the train split, two attributes and their intersection) are run
through the real stack and their JSON, CSV and HTML compared with stored copies (tests/golden/; last rewritten
for the diagnostics of issue #12: Lanczos, adaptive Hutchinson, Gauss–Newton trace, subsampled R̂ with errors).
Only what differs between two runs of the same code is masked: ids, share tokens, timestamps, wall times, CPU
latencies, package versions and which worker computed each run. Numbers compare within float32 noise across CPUs
(relative 1e-5, absolute 1e-7: another machine's BLAS kernels move the last bits of the float32 forward pass,
measured ~1e-7 relative in losses); the HTML compares its text exactly and its printed numbers to their printed
precision.

`PRUNEAUDIT_WRITE_GOLDEN=1 pytest tests/integration/test_report_golden.py` rewrites the stored copies (do that
only for a deliberate change of the report, and say so in the commit)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from results.groups import GroupDiagnostics
from tests.integration.stack import start_stack, wait_for_audit

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
WRITE = os.environ.get("PRUNEAUDIT_WRITE_GOLDEN") == "1"

DEMO_SPEC = {
    "group_by": ["digit"],
    "pruning": {
        "ratios": [0.3, 0.5, 0.7, 0.8, 0.9, 0.95],
        "methods": [{"method": "magnitude", "scope": "global", "ignored_layers": []}],
    },
    "seed": 0,
}
FULL_SPEC = {
    "group_by": ["digit", "parity"],
    "pruning": {
        "ratios": [0.5, 0.9],
        "methods": [
            {"method": "magnitude", "scope": "global"},
            {"method": "channel", "norm": "l1", "scope": "layerwise"},
            {"method": "random", "scope": "layerwise", "fine_tuning": {"epochs": 1}},
        ],
    },
    "mitigations": [{"name": "equalized_loss", "placement": "both", "epochs": 1}, {"name": "ceag", "epochs": 1}],
    "diagnostics": {"hutchinson_probes": 4, "power_iterations": 4, "max_examples_per_group": 64},
    "statistics": {"bootstrap_resamples": 50},
    "policy": {"max_excess_accuracy_gap": 0.05, "max_worst_group_drop": 0.2, "min_group_size": 20},
    "seed": 3,
}
# Keys whose values change from one run of the same code to the next (`worker`: which worker computed a run).
VOLATILE_KEYS = {"created_at", "finished_at", "seconds", "environment", "latency_ms", "latency_speedup", "worker"}
VOLATILE_KEY_PATTERN = re.compile(r"latency")


def golden_inputs(digits_case) -> dict[str, bytes]:
    """Model and datasets as bytes, made once and stored: the comparison must not hinge on retraining (which
    differs in the last bits between machines), so rewriting the golden reports keeps the stored inputs."""
    names = ("model.safetensors", "eval.npz", "train.npz")
    if WRITE and not all((GOLDEN / name).exists() for name in names):
        GOLDEN.mkdir(exist_ok=True)
        parity = {"group_parity": np.array(["even", "odd"])[digits_case.y % 2]}
        train_parity = {"group_parity": np.array(["even", "odd"])[digits_case.y_train % 2]}
        (GOLDEN / "model.safetensors").write_bytes(digits_case.weights)
        (GOLDEN / "eval.npz").write_bytes(digits_case.npz(**parity))
        (GOLDEN / "train.npz").write_bytes(
            digits_case.npz(
                x=digits_case.x_train, y=digits_case.y_train, group_digit=digits_case.y_train, **train_parity
            )
        )
    return {name: (GOLDEN / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def reports(tmp_path_factory, digits_case):
    """Each audit's JSON, CSV and HTML as served, with the ids they contain."""
    inputs = golden_inputs(digits_case)
    stack = start_stack(tmp_path_factory.mktemp("golden"))
    try:
        with stack.client() as client:
            model = client.post(
                "/v1/models",
                files={"weights": ("model.safetensors", inputs["model.safetensors"])},
                data={"architecture": json.dumps(digits_case.architecture)},
            ).json()
            eval_set = client.post("/v1/datasets", files={"file": ("eval.npz", inputs["eval.npz"])}).json()
            train_set = client.post("/v1/datasets", files={"file": ("train.npz", inputs["train.npz"])}).json()
            served = {}
            for name, spec in {"demo": DEMO_SPEC, "full": FULL_SPEC}.items():
                body = {"model_id": model["id"], "dataset_id": eval_set["id"], **spec}
                if name == "full":
                    body["train_dataset_id"] = train_set["id"]
                created = client.post("/v1/audits", json=body)
                assert created.status_code == 202, created.text
                audit = wait_for_audit(client, created.json()["id"], timeout_s=600)
                assert audit["status"] == "succeeded", (audit, stack.log("worker"))
                base = f"/v1/audits/{audit['id']}/report"
                report = client.get(base).json()
                ids = {
                    stack.url: "URL",
                    audit["id"]: "AUDIT",
                    model["id"]: "MODEL",
                    eval_set["id"]: "EVAL",
                    train_set["id"]: "TRAIN",
                    report["dense"]["id"]: "RUN-0",
                }
                ids |= {run["id"]: f"RUN-{k}" for k, run in enumerate(report["runs"], start=1)}
                served[name] = {
                    "json": report,
                    "csv": client.get(base + ".csv").text,
                    "html": client.get(base + ".html").text,
                    "ids": ids,
                }
    finally:
        stack.stop()
    return served


def masked(value, ids: dict[str, str]):
    """The JSON with ids replaced by their role and volatile figures dropped."""
    if isinstance(value, dict):
        return {
            key: masked(item, ids)
            for key, item in value.items()
            if key not in VOLATILE_KEYS and not VOLATILE_KEY_PATTERN.search(key)
        }
    if isinstance(value, list):
        return [masked(item, ids) for item in value]
    if isinstance(value, str):
        for raw, role in ids.items():
            value = value.replace(raw, role)
        return re.sub(r"token=[A-Za-z0-9_\-]+", "token=TOKEN", value)
    return value


def masked_html(html: str, ids: dict[str, str]) -> str:
    for raw, role in ids.items():
        html = html.replace(raw, role)
    html = re.sub(r"token=[A-Za-z0-9_\-]+", "token=TOKEN", html)
    # matplotlib names clip paths by a hash of the plotted coordinates, which move in the last bits between CPUs.
    html = re.sub(r"(fig\d+-p)[0-9a-f]{10}\b", r"\1CLIP", html)
    html = re.sub(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(\+00:00| UTC|Z)?", "TIME", html)
    html = re.sub(r'(data-field="[a-z_]*(seconds|latency)[a-z_0-9]*">).*?</td>', r"\1N</td>", html)
    # Wall times and CPU latencies: digits before an 's' or 'ms' unit.
    return re.sub(r"\d+(\.\d+)?( ?)(ms|s)\b", r"N\2\3", html)


# float32 evaluation differs in the last bits between CPUs (summation order in their BLAS kernels).
REL_TOL, ABS_TOL = 1e-5, 1e-7
# Diagnostics are iterative or differences of close numbers (Lanczos stops at a 1e-3 bound, R̂ = g·δ + ½δᵀHδ),
# which amplify that noise: measured up to 3e-4 relative between two CPUs. Their accuracy is tested against
# exact Hessians (tests/unit/test_diagnostics.py); here they must only not drift.
DIAGNOSTICS_REL_TOL = 1e-2


def close(a, b, path: str) -> list[str]:
    """Where `b` differs from `a`; floats within float32 noise (REL_TOL, ABS_TOL)."""
    if isinstance(a, dict) and isinstance(b, dict):
        differences = [f"{path}.{k}: missing in the new report" for k in a.keys() - b.keys()]
        differences += [f"{path}.{k}: new in the new report" for k in b.keys() - a.keys()]
        for key in a.keys() & b.keys():
            differences += close(a[key], b[key], f"{path}.{key}")
        return differences
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items before, {len(b)} now"]
        return [d for k, (x, y) in enumerate(zip(a, b, strict=True)) for d in close(x, y, f"{path}[{k}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        rel_tol = DIAGNOSTICS_REL_TOL if ".diagnostics." in path else REL_TOL
        return [] if math.isclose(a, b, rel_tol=rel_tol, abs_tol=ABS_TOL) else [f"{path}: {a!r} before, {b!r} now"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} before, {b!r} now"]


def stored(name: str, kind: str, content: str) -> str:
    path = GOLDEN / f"{name}-report.{kind}"
    if WRITE:
        path.write_text(content, encoding="utf-8")
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["demo", "full"])
def test_json_report_unchanged(reports, name):
    served = reports[name]
    now = masked(served["json"], served["ids"])
    before = json.loads(stored(name, "json", json.dumps(now, sort_keys=True, ensure_ascii=False)))
    differences = close(before, now, "report")
    assert not differences, "\n".join(differences[:40])


@pytest.mark.parametrize("name", ["demo", "full"])
def test_csv_report_unchanged(reports, name):
    served = reports[name]
    now = masked(served["csv"], served["ids"])
    before = list(csv.reader(io.StringIO(stored(name, "csv", now))))
    rows = list(csv.reader(io.StringIO(now)))
    assert rows[0] == before[0]
    assert len(rows) == len(before)
    for old, new in zip(before[1:], rows[1:], strict=True):
        for column, a, b in zip(before[0], old, new, strict=True):
            rel_tol = DIAGNOSTICS_REL_TOL if column in GroupDiagnostics.model_fields else REL_TOL
            same = a == b or (
                _number(a) is not None
                and _number(b) is not None
                and math.isclose(_number(a), _number(b), rel_tol=rel_tol, abs_tol=ABS_TOL)
            )
            assert same, (column, a, b, new)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# A number as the page prints it (4 significant digits at most): equal up to the last printed digit.
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")


def html_differences(before: str, now: str) -> list[str]:
    """The text between numbers must be identical; each number equal to its printed precision (a float32
    difference in the last bits can flip a 4th significant digit)."""
    old_text, new_text = NUMBER.split(before), NUMBER.split(now)
    if old_text != new_text:
        first = next((k for k, (a, b) in enumerate(zip(old_text, new_text, strict=False)) if a != b), 0)
        return [f"text differs: before {old_text[first][:200]!r}, now {new_text[first][:200]!r}"]
    return [
        f"number {a} before, {b} now (near {old_text[k][-80:]!r})"
        for k, (a, b) in enumerate(zip(NUMBER.findall(before), NUMBER.findall(now), strict=True))
        if a != b and not math.isclose(float(a), float(b), rel_tol=2e-3, abs_tol=2e-3 * 10 ** -_decimals(a))
    ]


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


@pytest.mark.parametrize("name", ["demo", "full"])
def test_html_report_unchanged(reports, name):
    served = reports[name]
    now = masked_html(served["html"], served["ids"])
    before = masked_html(stored(name, "html", now), {})  # copies stored before a mask was added get it too
    differences = html_differences(before, now)
    assert not differences, "\n".join(differences[:20])
