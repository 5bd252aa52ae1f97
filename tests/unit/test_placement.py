"""Which queue a task goes to (worker/placement.py) and which queues a worker takes (service/cli.py), by hand."""

from __future__ import annotations

import json

import pytest

from service.cli import worker_queues
from service.schemas.audits import FineTuningSpec, MethodSpec, MitigationSpec
from service.settings import Settings, get_settings
from worker.inputs import RunPlan
from worker.placement import AuditSize, Placement

SIZE = AuditSize(macs_per_example=1_000, evaluation_rows=200, train_rows=500)


def plan(method: MethodSpec, mitigation: MitigationSpec | None = None) -> RunPlan:
    return RunPlan(position=1, method=method, ratio=0.5, mitigation=mitigation)


def test_work_counts_one_evaluation_pass_and_three_forwards_per_training_example():
    assert SIZE.baseline_work() == 1_000 * 200
    assert SIZE.run_work(plan(MethodSpec())) == 1_000 * 200
    tuned = MethodSpec(fine_tuning=FineTuningSpec(epochs=2))
    assert SIZE.run_work(plan(tuned)) == 1_000 * (200 + 3 * 2 * 500)
    # gradual: the fine-tuning epochs come after each of its pruning steps
    gradual = MethodSpec(schedule="gradual", pruning_steps=4, fine_tuning=FineTuningSpec(epochs=2))
    assert SIZE.run_work(plan(gradual)) == 1_000 * (200 + 3 * 8 * 500)
    mitigated = plan(tuned, MitigationSpec(name="finetune", epochs=5))
    assert SIZE.run_work(mitigated) == 1_000 * (200 + 3 * 7 * 500)


def test_heavy_tasks_go_to_the_gpu_queue_and_the_rest_to_the_default_one():
    settings = Settings(queue_name="default", gpu_queue="gpu", gpu_min_work_macs=1_000 * 200 + 1)
    queues = Placement(settings, SIZE)
    assert queues.baseline_queue() == "default"
    assert queues.run_queue(plan(MethodSpec())) == "default"
    assert queues.run_queue(plan(MethodSpec(), MitigationSpec(name="finetune", epochs=1))) == "gpu"
    at_threshold = Placement(settings.model_copy(update={"gpu_min_work_macs": 1_000 * 200}), SIZE)
    assert at_threshold.baseline_queue() == "gpu"


def test_without_a_gpu_queue_everything_goes_to_the_default_queue():
    queues = Placement(Settings(queue_name="default", gpu_queue="", gpu_min_work_macs=0), None)
    assert queues.baseline_queue() == "default"
    assert queues.run_queue(plan(MethodSpec(), MitigationSpec(name="finetune", epochs=100))) == "default"


@pytest.mark.parametrize("gpu_queue", ["", "gpu"])
def test_a_gpu_worker_takes_the_gpu_queue_and_the_default_one(monkeypatch, gpu_queue):
    monkeypatch.setenv("PRUNEAUDIT_GPU_QUEUE", gpu_queue)
    monkeypatch.setenv("PRUNEAUDIT_QUEUE_NAME", "default")
    get_settings.cache_clear()
    try:
        if gpu_queue:
            assert worker_queues(gpu=True) == "gpu,default"
        else:
            with pytest.raises(SystemExit, match="PRUNEAUDIT_GPU_QUEUE"):
                worker_queues(gpu=True)
        assert worker_queues(gpu=False) == "default"
    finally:
        get_settings.cache_clear()


def test_an_imported_graph_is_weighed_from_its_stored_graph_once_per_model(monkeypatch, tmp_path):
    """An ONNX model is built from its blob to count its MACs (independently: Torch-Pruning's counter on the module
    built straight from the graph), and the count is kept: the same model is not built again for its next task."""
    import hashlib

    import onnx

    from service.storage import get_store
    from tests.onnx_models import exported
    from worker.engine.onnx_graph import build_onnx_module
    from worker.engine.structured import multiply_accumulates
    from worker.placement import macs_per_example

    graph = exported("resnet_style", 17)
    monkeypatch.setenv("PRUNEAUDIT_VAR_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        source = tmp_path / "graph.onnx"
        source.write_bytes(graph)
        digest = get_store().add_file(source)
        assert digest == hashlib.sha256(graph).hexdigest()
        architecture = {
            "name": "onnx",
            "graph_sha256": digest,
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            "opset": 17,
            "ops": [],
            "parameter_count": 0,
            "prunable_layers": [],
            "reference": {"max_abs_difference": 0.0, "tolerance": 1e-4},
        }
        macs_per_example.cache_clear()
        counted = macs_per_example("model-1", json.dumps(architecture), (1, 8, 8))
        expected = multiply_accumulates(build_onnx_module(onnx.load_model_from_string(graph)), [1, 8, 8])
        assert counted == expected > 0
        get_store().blob_path(digest).unlink()  # gone from the store: only the kept count can answer now
        assert macs_per_example("model-1", json.dumps(architecture), (1, 8, 8)) == expected
    finally:
        macs_per_example.cache_clear()
        get_settings.cache_clear()
