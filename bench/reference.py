"""The reference of the audit figures: the time to evaluate an audit's models once over its data, measured
in a child process (`python -m bench.reference MANIFEST.json`) that runs with the worker's environment and
applies the worker's own device and thread rules by calling the worker's functions (`select_device` with
the worker's `PRUNEAUDIT_DEVICE` setting, `intra_op_threads` around all models, as `run_audit_pipeline`
puts it around a whole audit), so a change of those rules changes both sides alike.

Per repeat: every model (built with the same arch builder and weights loader as the worker) runs one
eval-mode forward pass, under `torch.inference_mode`, over the whole data in batches of the spec's batch
size. The data is read into memory first; weights are loaded before the clock starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def reference_seconds(manifest: dict, env: dict, workdir: Path) -> dict:
    """Run the reference in a child process with `env` (the worker's); returns its JSON."""
    path = workdir / "reference.json"
    path.write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, "-m", "bench.reference", str(path)], env=env, cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"reference child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_threads(architecture: dict, env: dict) -> int:
    """Torch threads a worker with `env` runs an audit of `architecture` with, by the worker's own rule
    (a child process: `python -m bench.reference --threads ARCHITECTURE_JSON`)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.reference", "--threads", json.dumps(architecture)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def under_worker_rule(dense, architecture: dict, batch_size: int, device):
    """The worker's thread rule for an audit of `dense` (multiply-accumulates per batch), called as the worker
    calls it: the one place the benchmarks name it."""
    from arch.registry import architecture_adapter, input_shape
    from worker.pipeline.runner import intra_op_threads

    shape = input_shape(architecture_adapter.validate_python(architecture))
    return intra_op_threads(dense, shape, batch_size, device)


def _print_threads(architecture: dict) -> None:
    import torch

    from service.schemas.audits import AuditSpec
    from service.settings import get_settings
    from worker.engine.architectures import build_model
    from worker.pipeline.runner import select_device

    device = select_device(get_settings().device)
    with under_worker_rule(
        build_model(architecture), architecture, AuditSpec.model_fields["batch_size"].default, device
    ):
        print(torch.get_num_threads())


def _forward_all(models: list, x, batch_size: int, device) -> dict[str, float]:
    import torch

    seconds = {}
    for label, model in models:
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                model(torch.from_numpy(x[start : start + batch_size]).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[label] = time.perf_counter() - started
    return seconds


def main(manifest_path: str) -> None:
    import numpy as np
    import torch

    from service.settings import get_settings
    from worker.engine.architectures import build_model, load_weights
    from worker.pipeline.runner import select_device

    manifest = json.loads(Path(manifest_path).read_text())
    device = select_device(get_settings().device)
    x = np.ascontiguousarray(np.load(manifest["x"]), dtype=np.float32)
    models = []
    for entry in manifest["models"]:
        model = build_model(entry["architecture"])
        load_weights(model, Path(entry["weights"]))
        models.append((entry["label"], model.to(device).eval()))
    repeats = []
    dense_architecture = manifest["models"][0]["architecture"]
    with under_worker_rule(models[0][1], dense_architecture, manifest["batch_size"], device):
        threads = torch.get_num_threads()
        _forward_all(models[:1], x[: manifest["batch_size"]], manifest["batch_size"], device)  # warm-up batch
        for _ in range(manifest.get("repeats", 1)):
            repeats.append(_forward_all(models, x, manifest["batch_size"], device))
    totals = [sum(r.values()) for r in repeats]
    best = repeats[int(np.argsort(totals)[len(totals) // 2])]  # the median repeat's per-model split
    print(
        json.dumps(
            {
                "seconds_per_repeat": [round(t, 3) for t in totals],
                "per_model_s": {label: round(s, 3) for label, s in best.items()},
                "threads": threads,
                "device": str(device),
                "rows": len(x),
                "batch_size": manifest["batch_size"],
                "models": len(models),
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "--threads":
        _print_threads(json.loads(sys.argv[2]))
    else:
        main(sys.argv[1])
