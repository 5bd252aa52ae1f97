"""The HTML report (worker/report_html/) from a realistic report, validated into `AuditReport`: three groups
(one small), two methods at two ratios with one run failing the policy. Checks that the page refers to nothing
outside itself, that every number in its tables is the JSON value formatted the documented way (the formats are
written out again here, not imported, so a change on either side shows), that the plots are real SVG, that nulls
show as "—", and that the plain-language paragraph explains the right run with the right numbers."""

from __future__ import annotations

import copy
import html
import re
from html.parser import HTMLParser

import pytest

from service.schemas.reports import AuditReport
from worker.report_html import render_report_html

DASH = "—"


# ------------------------------------------------------------------------------------ the documented formats


def _fmt(spec):
    def format_value(value):
        if value is None:
            return DASH
        text = spec(value)
        return text[1:] if re.fullmatch(r"-0(\.0*)?%?", text) else text

    return format_value


PCT = _fmt(lambda v: f"{v * 100:.1f}%")  # accuracy, share, sparsity, rates
PTS = _fmt(lambda v: f"{v * 100:.1f}")  # percentage points: Δa, ψ, violations, policy values
RATIO = _fmt(lambda v: f"{v * 100:g}%")  # requested pruning ratio
NUM = _fmt(lambda v: f"{v:.4g}")  # losses, R(a), gradient norms, curvature, boundary proxies
RHO = _fmt(lambda v: f"{v:+.2f}")
COUNT = _fmt(lambda v: f"{v:,}")
TIMES = _fmt(lambda v: f"{v:.2f}×")
MS = _fmt(lambda v: f"{v * 1000:.3g} ms")


def CI(value, fmt):
    return DASH if value is None else f"[{fmt(value[0])}, {fmt(value[1])}]"


# ------------------------------------------------------------------------------------------- the fixture

GROUPS = {  # n, dense accuracy, dense loss, dense gradient norm, dense Hessian trace, boundary proximity
    "female": (120, 0.9166666666666666, 0.2512, 0.41237, 18.2519, 0.061234),
    "male": (160, 0.9437500000000000, 0.1893, 0.18765, 9.87001, 0.038761),
    "nonbinary": (20, 0.85, 0.4021, 0.90123, None, 0.102345),
}
# (method label, ratio) → per group pruned accuracy, and overall pruned accuracy
RUNS = {
    ("magnitude-global", 0.5): ({"female": 0.9083333333333333, "male": 0.9375, "nonbinary": 0.85}, 0.92),
    ("magnitude-global", 0.9): ({"female": 0.7416666666666667, "male": 0.9125, "nonbinary": 0.6}, 0.8233333333333334),
    ("channel-layerwise-l1", 0.5): ({"female": 0.9166666666666666, "male": 0.94375, "nonbinary": 0.85}, 0.93),
    ("channel-layerwise-l1", 0.9): ({"female": 0.9, "male": 0.9312500000000000, "nonbinary": 0.8}, 0.9133333333333333),
}
DENSE_OVERALL = 0.9266666666666666
POLICY = {
    "max_excess_accuracy_gap": 0.01,
    "max_worst_group_drop": 0.05,
    "max_accuracy_fairness_violation": None,
    "min_group_size": 30,
}


def group_row(group: str, accuracy: float, overall_drop: float, dense: bool, ratio: float, method: str) -> dict:
    n, dense_accuracy, dense_loss, gradient, trace, proximity = GROUPS[group]
    drop = dense_accuracy - accuracy
    loss = dense_loss + (0 if dense else 2.5 * drop + 0.01 * ratio)
    wrong = round(drop * n) if drop > 0 else 0
    channel = method.startswith("channel")
    return {
        "group": group,
        "n": n,
        "share": n / 300,
        "dense_accuracy": dense_accuracy,
        "accuracy": accuracy,
        "dense_loss": dense_loss,
        "loss": loss,
        "accuracy_drop": drop,
        "excess_accuracy_gap": drop - overall_drop,
        "excessive_loss": loss - dense_loss,
        "small_group": n < POLICY["min_group_size"],
        "confidence_intervals": {
            "dense_accuracy_ci": [dense_accuracy - 0.05, min(1.0, dense_accuracy + 0.04)],
            "accuracy_ci": None if n < 30 else [accuracy - 0.0512, min(1.0, accuracy + 0.0433)],
            "accuracy_drop_ci": None if n < 30 else [drop - 0.02, drop + 0.03],
            "excess_accuracy_gap_ci": None if n < 30 else [drop - overall_drop - 0.021, drop - overall_drop + 0.034],
            "excessive_loss_ci": None,
        },
        "boundary": {
            "dense_error_proxy": 1 - dense_accuracy,
            "error_proxy": 1 - accuracy,
            "dense_boundary_proximity": proximity,
            "boundary_proximity": proximity * 1.5,
            "dense_gini_impurity": 0.1,
            "gini_impurity": 0.2,
            "dense_logit_margin": 4.21 - 10 * proximity,
            "logit_margin": 3.0,
        },
        "flips": {
            "flips_correct_to_wrong": wrong + 1,
            "flips_wrong_to_correct": 1,
            "flips_any": wrong + 3,
            "flips_correct_to_wrong_rate": (wrong + 1) / n,
            "flips_wrong_to_correct_rate": 1 / n,
            "flips_any_rate": (wrong + 3) / n,
        },
        "confusion": {"dense_confusion": [[50, 3], [4, 63]], "confusion": [[48, 5], [6, 61]]},
        "binary": {},
        "diagnostics": {
            "dense_gradient_norm": gradient,
            "gradient_norm": None if dense else gradient * 1.3,
            "dense_hessian_trace": trace,
            "dense_hessian_trace_se": None if trace is None else trace / 20,
            "dense_hessian_top_eigenvalue": None if trace is None else trace / 3,
            "curvature_examples": n,
            "gradient_dot_delta": None if dense or channel else 0.01 * drop,
            "delta_hessian_delta": None if dense or channel else 0.5,
            "predicted_excessive_loss": None if dense or channel else 0.0123456 + drop,
        },
        "undefined": {} if trace is not None else {"dense_hessian_trace": "curvature skipped for this group"},
    }


def run_report(method: str, ratio: float, accuracies: dict, overall: float) -> dict:
    dense = method == "dense"
    overall_drop = DENSE_OVERALL - overall
    rows = [group_row(g, accuracies[g], overall_drop, dense, ratio, method) for g in GROUPS]
    eligible = [r for r in rows if not r["small_group"]]
    gaps = [r["excess_accuracy_gap"] for r in rows]
    checks = [
        {
            "name": "max_excess_accuracy_gap",
            "attribute": "sex",
            "threshold": POLICY["max_excess_accuracy_gap"],
            "value": max(r["excess_accuracy_gap"] for r in eligible),
        },
        {
            "name": "max_worst_group_drop",
            "attribute": "sex",
            "threshold": POLICY["max_worst_group_drop"],
            "value": max(r["accuracy_drop"] for r in eligible),
        },
    ]
    for check in checks:
        check["passed"] = check["value"] <= check["threshold"]
    reasons = [
        f"sex: {c['name']} {c['value'] * 100:.1f} points exceeds the limit of {c['threshold'] * 100:.1f} points"
        for c in checks
        if not c["passed"]
    ]
    worst = min(rows, key=lambda r: r["accuracy"])
    scope = "layerwise" if method.startswith("channel") else "global"
    cost = {
        "parameters": 6570,
        "nonzero_parameters": round(6570 * (1 - ratio)),
        "macs": 6432,
        "file_bytes": 27311,
        "input_shape": [64],
    }
    if dense:
        compression = {"dense": cost}
    elif method.startswith("channel"):
        pruned = {
            "parameters": round(6570 * (1 - ratio)),
            "nonzero_parameters": round(6570 * (1 - ratio)),
            "macs": round(6432 * (1 - ratio)),
            "file_bytes": round(27311 * (1 - ratio)),
            "input_shape": [64],
            "latency_s_batch_1": 0.0000412 * (1 - ratio / 2),
            "latency_s_batch_64": 0.000231 * (1 - ratio / 2),
        }
        dense_cost = dict(cost, latency_s_batch_1=0.0000412, latency_s_batch_64=0.000231)
        compression = {
            "dense": dense_cost,
            "pruned": pruned,
            "threads": 1,
            "ratios": {k: dense_cost[k] / pruned[k] for k in pruned if k != "input_shape"},
        }
    else:
        compression = {
            "dense": cost,
            "pruned": cost | {"nonzero_parameters": round(6570 * (1 - ratio))},
            "ratios": {"parameters": 1.0, "nonzero_parameters": 1 / (1 - ratio), "macs": 1.0, "file_bytes": 1.0},
        }
    run_id = "dense" if dense else f"{method}-{ratio}"
    return {
        "id": f"run-{run_id}",
        "worker": "celery@host:4242",
        "label": method,
        "method": method.split("-")[0],
        "scope": None if dense else scope,
        "ratio": 0.0 if dense else ratio,
        "achieved_sparsity": 0.0 if dense else ratio * 0.98765,
        "layer_sparsity": {},
        "seconds": 1.25,
        "delta_norm": None if dense else 3.2 * ratio,
        "compression": compression,
        "recipe": {"method": method, "ratio": ratio},
        "weights_url": None,
        "notes": {}
        if not method.startswith("channel")
        else {"predicted_excessive_loss": "not computed when channels are removed (θs and θd differ in shape)"},
        "overall": {
            "n": 300,
            "dense_accuracy": DENSE_OVERALL,
            "accuracy": overall,
            "dense_loss": 0.25,
            "loss": 0.25 + overall_drop,
            "accuracy_drop": overall_drop,
            "excessive_loss": overall_drop,
        },
        "verdict": None if dense else {"passed": not reasons, "reasons": reasons, "checks": checks},
        "attributes": [
            {
                "attribute": "sex",
                "n_missing": 7,
                "groups": rows,
                "aggregates": {
                    "loss_fairness_violation": (
                        max(r["excessive_loss"] for r in rows) - min(r["excessive_loss"] for r in rows)
                    ),
                    "accuracy_fairness_violation": max(r["accuracy"] for r in rows) - min(r["accuracy"] for r in rows),
                    "dense_accuracy_fairness_violation": 0.0937,
                    "max_excess_accuracy_gap": max(gaps),
                    "pairwise_disparity": max(gaps) - min(gaps),
                    "accuracy_drop_std": 0.01,
                    "worst_group_accuracy": worst["accuracy"],
                    "worst_group": worst["group"],
                    "max_accuracy_drop": max(r["accuracy_drop"] for r in rows),
                    "max_excess_accuracy_gap_ci": None,
                    "min_group_size": 30,
                    "small_groups": ["nonbinary"],
                    "bootstrap_resamples": 1000,
                    "bootstrap_seed": 0,
                    "num_classes": 2,
                },
                "undefined": {"demographic_parity_difference": "not a binary task"},
                "caveats": {},
                "diagnostics": {
                    "size_vs_dense_gradient_norm": {"rho": -1.0, "reason": None},
                    "dense_gradient_norm_vs_dense_hessian_trace": {
                        "rho": None,
                        "reason": "fewer than 3 groups with a Hessian trace",
                    },
                    "dense_accuracy_vs_accuracy_drop": {
                        "rho": 0.5 if not dense else None,
                        "reason": "no drop in the dense model" if dense else None,
                    },
                    "predicted_vs_excessive_loss": {
                        "rho": 0.8660254 if not dense else None,
                        "reason": "dense" if dense else None,
                    },
                },
            }
        ],
    }


def make_report() -> dict:
    runs = [run_report(method, ratio, accuracies, overall) for (method, ratio), (accuracies, overall) in RUNS.items()]
    return {
        "report_version": "2",
        "audit_id": "a1b2c3d4e5f6",
        "created_at": "2026-11-24T10:00:00Z",
        "finished_at": "2026-11-24T10:01:30Z",
        "spec": {"group_by": ["sex"], "policy": POLICY},
        "model": {
            "id": "m1",
            "sha256": "ab" * 32,
            "architecture": {"name": "mlp", "in_features": 64},
            "parameter_count": 6570,
        },
        "dataset": {
            "id": "d1",
            "sha256": "cd" * 32,
            "rows": 307,
            "classes": ["no", "yes"],
            "groups": {"sex": {"values": list(GROUPS), "sizes": [g[0] for g in GROUPS.values()]}},
        },
        "environment": {"torch": "2.13.0", "pruneaudit": "0.1.0", "python": "3.11.2"},
        "policy": POLICY,
        "verdict": {
            "passed": True,
            "highest_passing_ratio": {"magnitude-global": 0.5, "channel-layerwise-l1": 0.9},
            "summary": "passes: channel-layerwise-l1 holds the policy up to 90% sparsity; magnitude-global up to 50%",
        },
        "dense": run_report("dense", 0.0, {g: v[1] for g, v in GROUPS.items()}, DENSE_OVERALL),
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------- a small DOM


class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag) and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "embed", "source", "track", "wbr"}


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.node = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, dict(attrs), self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


def cells(row: Node) -> dict[str, str]:
    """A table row's numbers by JSON field (the group's name is the row's data-group)."""
    return {
        td.attrs["data-field"]: " ".join(td.text().split())
        for td in row.find_all("td")
        if td.attrs.get("data-field", "group") != "group"
    }


def render(report: dict) -> str:
    return render_report_html(AuditReport.model_validate(report))


@pytest.fixture(scope="module")
def report() -> dict:
    return make_report()


@pytest.fixture(scope="module")
def page(report) -> str:
    return render(report)


@pytest.fixture(scope="module")
def dom(page) -> Node:
    return parse(page)


# ---------------------------------------------------------------------------------------------- the tests


def test_fixture_is_a_valid_report(report):
    AuditReport.model_validate(report)


def test_page_refers_to_nothing_outside_itself(page, dom):
    assert "http://" not in page.lower() and "https://" not in page.lower()
    assert re.search(r"(?i)<(script|link|img|iframe|object|embed|audio|video|base)\b", page) is None
    assert "@import" not in page and "@font-face" not in page
    assert set(re.findall(r"url\(([^)]*)\)", page)) <= {m for m in re.findall(r"url\((#[^)]*)\)", page)}
    references = [
        (n.tag, key, value)
        for n in dom.iter()
        for key, value in n.attrs.items()
        if key in ("src", "href", "xlink:href", "action", "srcset", "poster", "data")
    ]
    assert references, "the page has in-page anchors and /v1 links"
    for tag, key, value in references:
        assert value.startswith("#") or (value.startswith("/v1/") and not value.startswith("//")), (tag, key, value)
    assert re.search(r"\bsrc\s*=", page) is None


def test_svg_ids_are_unique_and_every_reference_resolves(dom):
    ids = [n.attrs["id"] for n in dom.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids))
    for node in dom.iter():
        for key in ("href", "xlink:href"):
            value = node.attrs.get(key, "")
            if value.startswith("#"):
                assert value[1:] in ids, value


def test_verdict_says_pass_and_the_highest_passing_ratio_per_method(report, dom):
    (verdict,) = dom.find_all(data_testid="verdict")
    assert verdict.attrs["data-passed"] == "true"
    text = " ".join(verdict.text().split())
    assert "PASS" in text and report["verdict"]["summary"] in text
    rows = {row.attrs["data-method"]: cells(row) for row in verdict.find_all("tr") if "data-method" in row.attrs}
    assert set(rows) == set(report["verdict"]["highest_passing_ratio"])
    for method, highest in report["verdict"]["highest_passing_ratio"].items():
        assert rows[method]["highest_passing_ratio"] == RATIO(highest)
    assert rows["magnitude-global"]["first_failing_ratio"] == RATIO(0.9)
    assert rows["channel-layerwise-l1"]["first_failing_ratio"] == DASH
    (failing,) = [r for r in report["runs"] if not r["verdict"]["passed"]]
    for reason in failing["verdict"]["reasons"]:
        assert reason in text
    policy = {n.attrs["data-field"]: n.text() for n in verdict.find_all("li") if "data-field" in n.attrs}
    assert PTS(POLICY["max_excess_accuracy_gap"]) in policy["policy.max_excess_accuracy_gap"]
    assert DASH in policy["policy.max_accuracy_fairness_violation"]
    assert COUNT(POLICY["min_group_size"]) in policy["policy.min_group_size"]


def test_a_failing_audit_says_fail_and_null_ratios_show_a_dash(report):
    failing = copy.deepcopy(report)
    failing["verdict"] = {
        "passed": False,
        "highest_passing_ratio": {"magnitude-global": None, "channel-layerwise-l1": None},
        "summary": "fails: no method meets the policy even at its lowest pruning ratio",
    }
    for run in failing["runs"]:
        run["verdict"] = {
            "passed": False,
            "reasons": [f"sex: made to fail at {run['ratio']}"],
            "checks": [
                {
                    "name": "max_excess_accuracy_gap",
                    "attribute": "sex",
                    "value": None,
                    "threshold": 0.01,
                    "passed": False,
                }
            ],
        }
    (verdict,) = parse(render(failing)).find_all(data_testid="verdict")
    assert verdict.attrs["data-passed"] == "false"
    text = " ".join(verdict.text().split())
    assert "FAIL" in text and failing["verdict"]["summary"] in text
    for row in verdict.find_all("tr"):
        if "data-method" in row.attrs:
            assert cells(row)["highest_passing_ratio"] == DASH
            assert cells(row)["first_failing_ratio"] == RATIO(0.5)


def expected_group_cells(row: dict) -> dict[str, str]:
    ci = row["confidence_intervals"]
    return {
        "n": COUNT(row["n"]),
        "share": PCT(row["share"]),
        "dense_accuracy": PCT(row["dense_accuracy"]),
        "accuracy": PCT(row["accuracy"]),
        "accuracy_ci": CI(ci["accuracy_ci"], PCT),
        "accuracy_drop": PTS(row["accuracy_drop"]),
        "excess_accuracy_gap": PTS(row["excess_accuracy_gap"]),
        "excess_accuracy_gap_ci": CI(ci["excess_accuracy_gap_ci"], PTS),
        "excessive_loss": NUM(row["excessive_loss"]),
        "predicted_excessive_loss": NUM(row["diagnostics"]["predicted_excessive_loss"]),
        "flips_correct_to_wrong": COUNT(row["flips"]["flips_correct_to_wrong"]),
        "flips_wrong_to_correct": COUNT(row["flips"]["flips_wrong_to_correct"]),
    }


def test_every_group_table_cell_is_the_json_value_formatted(report, dom):
    (table,) = dom.find_all("table", data_testid="group-table")
    assert table.attrs["data-attribute"] == "sex"
    blocks = {body.attrs["data-run"]: body for body in table.find_all("tbody")}
    assert list(blocks) == [
        run["id"]
        for method in ("magnitude-global", "channel-layerwise-l1")
        for run in report["runs"]
        if run["label"] == method
    ]
    checked = 0
    for run in report["runs"]:
        rows = {
            tr.attrs["data-group"]: cells(tr) for tr in blocks[run["id"]].find_all("tr") if "data-group" in tr.attrs
        }
        (attribute,) = run["attributes"]
        assert list(rows) == [g["group"] for g in attribute["groups"]]
        for group in attribute["groups"]:
            assert rows[group["group"]] == expected_group_cells(group), (run["id"], group["group"])
            checked += len(rows[group["group"]])
    assert checked == 4 * 3 * 12
    small = [tr for tr in table.find_all("tr") if tr.attrs.get("data-group") == "nonbinary"]
    assert small and all("small" in tr.attrs.get("class", "") for tr in small)


def test_diagnostics_aggregates_checks_and_compression_equal_the_json(report, dom):
    (diagnostics,) = dom.find_all("table", data_testid="diagnostics-table")
    dense_rows = {g["group"]: g for g in report["dense"]["attributes"][0]["groups"]}
    for tr in diagnostics.find_all("tr"):
        if "data-group" not in tr.attrs:
            continue
        g = dense_rows[tr.attrs["data-group"]]
        assert cells(tr) == {
            "n": COUNT(g["n"]),
            "share": PCT(g["share"]),
            "dense_accuracy": PCT(g["dense_accuracy"]),
            "dense_gradient_norm": NUM(g["diagnostics"]["dense_gradient_norm"]),
            "dense_hessian_trace": NUM(g["diagnostics"]["dense_hessian_trace"]),
            "dense_hessian_top_eigenvalue": NUM(g["diagnostics"]["dense_hessian_top_eigenvalue"]),
            "dense_boundary_proximity": NUM(g["boundary"]["dense_boundary_proximity"]),
            "dense_logit_margin": NUM(g["boundary"]["dense_logit_margin"]),
        }

    runs = {run["id"]: run for run in [report["dense"], *report["runs"]]}
    (aggregates,) = dom.find_all("table", data_testid="aggregates-table")
    seen = set()
    for tr in aggregates.find_all("tr"):
        if "data-run" not in tr.attrs:
            continue
        run = runs[tr.attrs["data-run"]]
        a = run["attributes"][0]["aggregates"]
        seen.add(run["id"])
        assert cells(tr) == {
            "ratio": RATIO(run["ratio"]),
            "achieved_sparsity": PCT(run["achieved_sparsity"]),
            "overall_accuracy": PCT(run["overall"]["accuracy"]),
            "overall_accuracy_drop": PTS(run["overall"]["accuracy_drop"]),
            "max_excess_accuracy_gap": PTS(a["max_excess_accuracy_gap"]),
            "pairwise_disparity": PTS(a["pairwise_disparity"]),
            "max_accuracy_drop": PTS(a["max_accuracy_drop"]),
            "accuracy_fairness_violation": PTS(a["accuracy_fairness_violation"]),
            "loss_fairness_violation": NUM(a["loss_fairness_violation"]),
            "worst_group": a["worst_group"],
            "worst_group_accuracy": PCT(a["worst_group_accuracy"]),
        }
    assert seen == set(runs)

    (checks,) = dom.find_all("table", data_testid="checks-table")
    for body in checks.find_all("tbody"):
        rows = [cells(tr) for tr in body.find_all("tr")]
        expected = runs[body.attrs["data-run"]]["verdict"]["checks"]
        assert rows == [{"value": PTS(c["value"]), "threshold": PTS(c["threshold"])} for c in expected]

    (compression,) = dom.find_all("table", data_testid="compression-table")
    for tr in compression.find_all("tr"):
        if "data-run" not in tr.attrs:
            continue
        run = runs[tr.attrs["data-run"]]
        got = cells(tr)
        side = "dense" if run["method"] == "dense" else "pruned"
        cost, ratios = run["compression"][side], run["compression"].get("ratios", {})
        for key, fmt in (
            ("parameters", COUNT),
            ("nonzero_parameters", COUNT),
            ("macs", COUNT),
            ("file_bytes", COUNT),
            ("latency_s_batch_1", MS),
            ("latency_s_batch_64", MS),
        ):
            expected = fmt(cost.get(key))
            if side == "pruned" and ratios.get(key) is not None:
                expected += f" ({TIMES(ratios[key])})"
            assert got[key] == expected, (run["id"], key)


def test_plots_are_inline_svg_with_drawn_paths(dom):
    figures = [n for n in dom.find_all("figure") if n.attrs.get("data-testid", "").startswith("plot-")]
    kinds = {f.attrs["data-testid"] for f in figures}
    assert kinds == {
        "plot-accuracy",
        "plot-excess-gap",
        "plot-excessive-loss",
        "plot-gradient-vs-size",
        "plot-curvature-vs-boundary",
        "plot-flips",
        "plot-group-sizes",
    }
    for figure in figures:
        (svg,) = figure.find_all("svg")
        assert float(re.match(r"[\d.]+", svg.attrs["width"]).group()) > 100
        assert float(re.match(r"[\d.]+", svg.attrs["height"]).group()) > 100
        assert "viewbox" in svg.attrs
        assert len(svg.find_all("path")) >= 10, figure.attrs["data-testid"]
    (accuracy,) = [f for f in figures if f.attrs["data-testid"] == "plot-accuracy"]
    legend_text = accuracy.text()
    assert all(group in legend_text for group in GROUPS) and "overall" in legend_text


def test_nulls_render_as_a_dash_never_as_none_or_nan(report, dom, page):
    visible = " ".join(n.text() for n in dom.find_all("main"))
    assert re.search(r"\b(None|nan|NaN|inf|null)\b", visible) is None
    (diagnostics,) = dom.find_all("table", data_testid="diagnostics-table")
    (nonbinary,) = [tr for tr in diagnostics.find_all("tr") if tr.attrs.get("data-group") == "nonbinary"]
    assert cells(nonbinary)["dense_hessian_trace"] == DASH
    (table,) = dom.find_all("table", data_testid="group-table")
    channel = [b for b in table.find_all("tbody") if b.attrs["data-method"] == "channel-layerwise-l1"]
    for body in channel:
        for tr in body.find_all("tr"):
            if "data-group" in tr.attrs:
                assert cells(tr)["predicted_excessive_loss"] == DASH
                if tr.attrs["data-group"] == "nonbinary":
                    assert cells(tr)["accuracy_ci"] == DASH and cells(tr)["excess_accuracy_gap_ci"] == DASH
    assert "curvature skipped for this group" in page  # the reason a null is null, in the notes


def test_the_paragraph_explains_the_failing_run_with_its_numbers(report, dom):
    (explanation,) = dom.find_all(data_testid="explanation")
    text = " ".join(explanation.text().split())
    run = next(r for r in report["runs"] if r["label"] == "magnitude-global" and r["ratio"] == 0.9)
    groups = {g["group"]: g for g in run["attributes"][0]["groups"]}
    worst = max(groups.values(), key=lambda g: g["excess_accuracy_gap"])
    assert worst["group"] == "nonbinary"
    assert (
        f"At {RATIO(0.9)} sparsity (magnitude-global) the sex group 'nonbinary' loses "
        f"{PTS(worst['accuracy_drop'])} points of accuracy ({PCT(worst['dense_accuracy'])} → "
        f"{PCT(worst['accuracy'])}) against {PTS(run['overall']['accuracy_drop'])} overall"
    ) in text
    assert f"ψ = {PTS(worst['excess_accuracy_gap'])} points is the largest of the 3 groups" in text
    assert f"only {COUNT(worst['n'])} examples" in text
    dense_norm = report["dense"]["attributes"][0]["groups"][2]["diagnostics"]["dense_gradient_norm"]
    assert f"dense gradient norm ({NUM(dense_norm)}) is the largest of all 3 groups" in text
    assert "dense Hessian trace was not computed" in text
    for reason in run["verdict"]["reasons"]:
        assert reason in text
    assert f"ρ = {RHO(-1.0)}, strong" in text and "Proposition 1 expects" in text
    assert "fewer than 3 groups with a Hessian trace" in text
    assert f"ρ = {RHO(0.8660254)}" in text


def test_without_a_failing_run_the_paragraph_takes_the_highest_ratio(report):
    passing = copy.deepcopy(report)
    for run in passing["runs"]:
        run["verdict"] = {"passed": True, "reasons": [], "checks": []}
    (explanation,) = parse(render(passing)).find_all(data_testid="explanation")
    text = " ".join(explanation.text().split())
    # At 90%: magnitude-global's max ψ is larger than channel's.
    assert text.startswith(f"At {RATIO(0.9)} sparsity (magnitude-global)") and "passes the policy" in text


def test_missing_diagnostics_policy_and_run_verdicts_still_render(report):
    bare = copy.deepcopy(report)
    bare["policy"] = {}
    for run in [bare["dense"], *bare["runs"]]:
        run["verdict"] = None
        run["compression"] = {}
        for attribute in run["attributes"]:
            attribute["diagnostics"] = {key: {"rho": None} for key in attribute["diagnostics"]}
            for group in attribute["groups"]:
                group["diagnostics"] = {}
                group["boundary"] = {}
    page = render(bare)
    dom = parse(page)
    (verdict,) = dom.find_all(data_testid="verdict")
    assert verdict.attrs["data-passed"] == "true" and bare["verdict"]["summary"] in verdict.text()
    policy = [n.text() for n in verdict.find_all("li") if "data-field" in n.attrs]
    assert len(policy) == 4 and all(f"{DASH} (not checked)" in item for item in policy)
    (checks,) = dom.find_all("table", data_testid="checks-table")
    assert " ".join(checks.text().split()).count(f"{DASH} no checks") == len(bare["runs"])
    (explanation,) = dom.find_all(data_testid="explanation")
    assert "size vs dense gradient norm is not available (not computed)" in " ".join(explanation.text().split())
    empty = [f for f in dom.find_all("figure") if not f.find_all("svg")]
    assert {f.attrs["data-testid"] for f in empty} == {"plot-gradient-vs-size", "plot-curvature-vs-boundary"}
    assert all("Not available" in f.text() for f in empty)
    assert len([f for f in dom.find_all("figure") if f.find_all("svg")]) == 5
    (diagnostics,) = dom.find_all("table", data_testid="diagnostics-table")
    for tr in diagnostics.find_all("tr"):
        if "data-group" in tr.attrs:
            assert cells(tr)["dense_gradient_norm"] == DASH


def test_group_names_are_data_escaped_in_html_and_plots(report):
    hostile = copy.deepcopy(report)
    name = "<script>alert('x')</script> $\\alpha$ & co"
    for run in [hostile["dense"], *hostile["runs"]]:
        run["attributes"][0]["groups"][0]["group"] = name
    page = render(hostile)
    assert "<script>" not in page
    assert html.escape(name, quote=False) in page
    assert len(parse(page).find_all(data_testid="plot-accuracy")) == 1


def test_rendering_is_deterministic(report, page):
    assert render(copy.deepcopy(report)) == page


def test_page_is_print_friendly_and_sized_for_a_laptop(page):
    assert "@media print" in page and "break-inside: avoid" in page
    assert '<meta name="viewport"' in page and "max-width: 1240px" in page


def test_every_attribute_gets_its_section_plots_and_table(report):
    several = copy.deepcopy(report)
    for run in [several["dense"], *several["runs"]]:
        extra = copy.deepcopy(run["attributes"][0])
        extra["attribute"] = "sex&age"
        for group in extra["groups"]:
            group["group"] = f"{group['group']}&old"
        run["attributes"].append(extra)
    dom = parse(render(several))
    tables = dom.find_all("table", data_testid="group-table")
    assert [t.attrs["data-attribute"] for t in tables] == ["sex", "sex&age"]
    figures = [f for f in dom.find_all("figure") if f.attrs.get("data-testid", "").startswith("plot-")]
    assert len(figures) == 14 and {f.attrs["data-attribute"] for f in figures} == {"sex", "sex&age"}
    ids = [n.attrs["id"] for n in dom.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids))


def test_the_templates_ship_in_the_package():
    """The Docker image installs the package non-editable: every template must be package data."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["worker"]
    templates = [
        p.relative_to(root / "worker").as_posix() for p in (root / "worker" / "templates").rglob("*") if p.is_file()
    ]
    assert templates
    for template in templates:
        assert any(fnmatch.fnmatch(template, pattern) for pattern in patterns), template
