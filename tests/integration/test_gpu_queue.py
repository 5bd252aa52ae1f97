"""The GPU queue on the embedded stack (SQLite database and broker): with PRUNEAUDIT_GPU_QUEUE set, heavy baselines and
runs are computed only by workers started with `pruneaudit worker --gpu` (here a CPU process standing in for one: the
queue, not the device, is under test), light ones by any worker; a worker without --gpu that receives a heavy task
forwards it unclaimed, so it waits for a GPU worker rather than running on the CPU."""

from __future__ import annotations

import time

from tests.integration.stack import start_process, start_stack, wait_for_audit
from tests.integration.test_fanout import run_rows, wait_ready

# Multiply-accumulates per example of the digits MLP 64-64-32-10, counted by hand: the three weight matrices and
# the biases (torch-pruning also counts the two ReLUs: 96 more, which the thresholds below leave room for).
DIGITS_MLP_MACS = 64 * 64 + 64 * 32 + 32 * 10 + 64 + 32 + 10


def start_gpu_routed_stack(tmp_path_factory, name: str, min_work_macs: float):
    return start_stack(
        tmp_path_factory.mktemp(name),
        settings={"PRUNEAUDIT_GPU_QUEUE": f"gpu-{name}", "PRUNEAUDIT_GPU_MIN_WORK_MACS": str(min_work_macs)},
    )


def start_gpu_worker(stack) -> None:
    start_process(stack, "worker-gpu", ["worker", "--concurrency", "1", "--gpu", "--name", "gpu@%h"])
    wait_ready(stack, "worker-gpu")


def upload(stack, digits_case) -> dict:
    with stack.client() as client:
        return {
            "model_id": digits_case.upload_model(client).json()["id"],
            "dataset_id": digits_case.upload_dataset(client).json()["id"],
            "train_dataset_id": digits_case.upload_train_dataset(client).json()["id"],
            "group_by": ["digit"],
            "diagnostics": {"curvature": "off"},
            "statistics": {"bootstrap_resamples": 0},
            "pruning": {"ratios": [0.5, 0.7, 0.9], "methods": [{"method": "magnitude", "scope": "global"}]},
            "mitigations": [{"name": "finetune", "epochs": 1}],
        }


def test_only_the_heavy_runs_go_to_the_gpu_worker(tmp_path_factory, digits_case):
    # Between one evaluation pass (the baseline, the unmitigated runs) and one evaluation plus one fine-tuning epoch
    # over the train split (the mitigated runs): only those are heavy.
    evaluation_rows, train_rows = len(digits_case.y), len(digits_case.y_train)
    threshold = (DIGITS_MLP_MACS + 96) * evaluation_rows + DIGITS_MLP_MACS * train_rows
    assert threshold < DIGITS_MLP_MACS * (evaluation_rows + 3 * train_rows)
    stack = start_gpu_routed_stack(tmp_path_factory, "some-heavy", threshold)
    try:
        start_gpu_worker(stack)
        wait_ready(stack, "worker")
        spec = upload(stack, digits_case)
        with stack.client() as client:
            created = client.post("/v1/audits", json=spec)
            assert created.status_code == 202, created.text
            audit = wait_for_audit(client, created.json()["id"], timeout_s=180)
        assert audit["status"] == "succeeded", (audit, stack.log("worker"), stack.log("worker-gpu"))
        rows = run_rows(stack, audit["id"])
        assert len(rows) == 7 and {row["status"] for row in rows} == {"succeeded"}
        heavy = [row for row in rows if row["label"].endswith("+finetune")]
        assert len(heavy) == 3
        assert all(row["worker"].startswith("gpu@") for row in heavy), rows
    finally:
        stack.stop()


def test_a_heavy_audit_waits_for_a_gpu_worker_then_runs_only_there(tmp_path_factory, digits_case):
    stack = start_gpu_routed_stack(tmp_path_factory, "all-heavy", min_work_macs=1)
    try:
        wait_ready(stack, "worker")
        spec = upload(stack, digits_case)
        with stack.client() as client:
            audit_id = client.post("/v1/audits", json=spec).json()["id"]
            # The CPU worker forwards the baseline instead of claiming it: nothing runs until a GPU worker starts.
            deadline = time.monotonic() + 60
            while "forwarded to the GPU queue" not in stack.log("worker"):
                assert time.monotonic() < deadline, stack.log("worker")
                time.sleep(0.2)
            time.sleep(2)
            waiting = client.get(f"/v1/audits/{audit_id}").json()
            assert waiting["status"] == "queued" and waiting["attempts"] == 0, waiting
            start_gpu_worker(stack)
            audit = wait_for_audit(client, audit_id, timeout_s=180)
        assert audit["status"] == "succeeded", (audit, stack.log("worker"), stack.log("worker-gpu"))
        rows = run_rows(stack, audit_id)
        assert len(rows) == 7
        assert all(row["worker"].startswith("gpu@") for row in rows), rows
    finally:
        stack.stop()
