"""The demo audit: a client of the HTTP API like any other. It trains a small MLP on scikit-learn's
handwritten digits (shipped inside the scikit-learn wheel: no download), with the digit class as the group
(the paper's CIFAR-10/SVHN setting), uploads model and held-out data, runs a pruning sweep and prints the
per-group result and the report URL."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from worker.engine.architectures import build_model

ARCHITECTURE = {"name": "mlp", "in_features": 64, "hidden": [64, 32], "num_classes": 10}
RATIOS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]


@dataclass(frozen=True)
class DigitsSplits:
    model: torch.nn.Module
    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def train_digits_model(seed: int = 0) -> DigitsSplits:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, digits.target, test_size=0.4, random_state=seed, stratify=digits.target
    )
    torch.manual_seed(seed)
    model = build_model(ARCHITECTURE)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    model.train()
    for _epoch in range(30):
        for batch in torch.randperm(len(inputs)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    model.eval()
    return DigitsSplits(model, x_train, y_train.astype(np.int64), x_eval, y_eval.astype(np.int64))


def check(response: httpx.Response) -> dict:
    if response.is_error:
        raise SystemExit(f"{response.request.method} {response.request.url} → {response.status_code}: {response.text}")
    return response.json()


def run(url: str, timeout_s: float) -> int:
    started = time.perf_counter()
    splits = train_digits_model()
    model, x_eval, y_eval = splits.model, splits.x_eval, splits.y_eval
    print(f"demo: trained an MLP on scikit-learn digits in {time.perf_counter() - started:.1f} s", flush=True)
    headers = {"X-API-Key": os.environ.get("PRUNEAUDIT_API_KEY", "")}
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        weights = Path(tmp) / "digits-mlp.safetensors"
        save_file(model.state_dict(), weights)
        with weights.open("rb") as handle:
            uploaded_model = check(
                client.post(
                    "/v1/models",
                    files={"weights": ("digits-mlp.safetensors", handle, "application/octet-stream")},
                    data={"architecture": json.dumps(ARCHITECTURE), "name": "digits-mlp"},
                )
            )
        buffer = io.BytesIO()
        np.savez(buffer, x=x_eval, y=y_eval, group_digit=y_eval)
        dataset = check(
            client.post(
                "/v1/datasets",
                files={"file": ("digits-eval.npz", buffer.getvalue(), "application/octet-stream")},
                data={"name": "digits held-out split"},
            )
        )
        audit = check(
            client.post(
                "/v1/audits",
                json={
                    "model_id": uploaded_model["id"],
                    "dataset_id": dataset["id"],
                    "group_by": ["digit"],
                    "pruning": {
                        "ratios": RATIOS,
                        "methods": [{"method": "magnitude", "scope": "global", "ignored_layers": []}],
                    },
                    "seed": 0,
                },
            )
        )
        deadline = time.monotonic() + timeout_s
        while audit["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise SystemExit(f"demo audit {audit['id']} still {audit['status']} after {timeout_s:.0f} s")
            time.sleep(0.5)
            audit = check(client.get(f"/v1/audits/{audit['id']}"))
        if audit["status"] != "succeeded":
            print(f"demo audit {audit['id']} {audit['status']}: {audit['error']}", flush=True)
            return 1
        report = check(client.get(f"/v1/audits/{audit['id']}/report"))
    print_summary(report)
    print(f"demo: finished in {time.perf_counter() - started:.1f} s", flush=True)
    print(f"verdict (max ψ ≤ 1 point, no group loses > 5 points): {report['verdict']['summary']}", flush=True)
    print(f"report for people (a share link, opens in a browser): {audit['report_html_url']}", flush=True)
    print(f"demo audit succeeded; report: {audit['report_url']}", flush=True)
    return 0


def print_summary(report: dict) -> None:
    print(f"{'ratio':>6} {'sparsity':>8} {'accuracy':>8} {'drop':>7} {'max ψ':>7} {'ξ':>7}  worst group (accuracy)")
    for run in [report["dense"], *report["runs"]]:
        digit = run["attributes"][0]
        aggregates = digit["aggregates"]
        print(
            f"{run['ratio']:>6.2f} {run['achieved_sparsity']:>8.3f} {run['overall']['accuracy']:>8.3f} "
            f"{run['overall']['accuracy_drop']:>7.3f} {aggregates['max_excess_accuracy_gap']:>7.3f} "
            f"{aggregates['loss_fairness_violation']:>7.3f}  digit {aggregates['worst_group']} "
            f"({aggregates['worst_group_accuracy']:.3f})",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    return run(args.url, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
