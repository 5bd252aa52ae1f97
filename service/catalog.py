"""Models and datasets: validate an upload as data (never code), store it, record it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError
from sqlalchemy.orm import Session

from arch.registry import REGISTRY, AnySpec, architecture_adapter, expected_state_dict, input_shape, parameter_count
from arch.specs import OnnxReference, OnnxSpec, OnnxUpload
from service.errors import InvalidInput
from service.ingest.csv import csv_decoded_bytes, read_csv_dataset
from service.ingest.dataset import ParsedDataset, save_dataset
from service.ingest.limits import DecodeBudget, IngestLimits
from service.ingest.npz import read_npz_dataset
from service.ingest.npz_archive import decoded_bytes as npz_decoded_bytes
from service.ingest.onnx_files import import_onnx
from service.ingest.parquet import is_parquet, parquet_decoded_bytes, read_parquet_dataset
from service.ingest.safetensors import check_weights_fit, read_safetensors_header
from service.ingest.torch_files import convert_torch_checkpoint, identify_model_file
from service.models import Dataset, Model
from service.storage import BlobStore, StagedUpload
from service.tenancy import owned


def _names_onnx(raw: str) -> bool:
    try:
        value = json.loads(raw)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("name") == "onnx"


def parse_architecture(raw: str):
    try:
        if _names_onnx(raw):
            # The client names the format only; everything else is read from the graph by the server.
            return OnnxUpload.model_validate_json(raw)
        return architecture_adapter.validate_json(raw)
    except ValidationError as exc:
        if _names_onnx(raw):
            raise InvalidInput(
                'an ONNX model is uploaded as its .onnx file with architecture {"name": "onnx"} alone: the server '
                "reads everything else from the graph (a run's pruned model downloads as ONNX from its weights_url "
                "+ .onnx)",
                errors=json.loads(exc.json(include_url=False, include_input=False)),
            ) from None
        names = ", ".join(sorted([*REGISTRY, "onnx"]))
        raise InvalidInput(
            f"architecture is not a valid spec (known architectures: {names}); see GET /v1/architectures",
            errors=json.loads(exc.json(include_url=False, include_input=False)),
        ) from None


def register_model(
    session: Session,
    tenant_id: str,
    store: BlobStore,
    weights: BinaryIO,
    architecture_json: str,
    name: str | None,
    *,
    max_bytes: int,
    max_parameters: int,
    limits: IngestLimits,
) -> Model:
    spec = parse_architecture(architecture_json)
    if isinstance(spec, OnnxUpload):
        return _register_onnx_model(
            session, tenant_id, store, weights, name, max_bytes=max_bytes, max_parameters=max_parameters
        )
    # Checked before anything is stored or built: a worker allocates the whole architecture.
    if (count := parameter_count(spec)) > max_parameters:
        raise InvalidInput(f"architecture has {count} parameters; this server accepts at most {max_parameters}")
    staged = store.stage(weights, max_bytes)
    try:
        if identify_model_file(staged.path, limits) == "torch-checkpoint":
            # What is stored is the safetensors written from the loaded tensors, never the pickle.
            converted = store.temp_path(".safetensors")
            try:
                convert_torch_checkpoint(staged.path, converted, max_output_bytes=max_bytes)
            except BaseException:
                converted.unlink(missing_ok=True)
                raise
            store.discard(staged)
            staged = store.stage_file(converted)
        tensors = read_safetensors_header(staged.path, limits)
        check_weights_fit(tensors, expected_state_dict(spec), spec.name)
    except BaseException:
        store.discard(staged)
        raise
    store.commit(staged)
    return _add_model(session, tenant_id, name, spec, staged.sha256, staged.size_bytes)


def _add_model(session: Session, tenant_id: str, name: str | None, spec: AnySpec, sha256: str, size: int) -> Model:
    model = Model(
        tenant_id=tenant_id,
        name=name,
        sha256=sha256,
        size_bytes=size,
        architecture=spec.model_dump(),
        architecture_name=spec.name,
        parameter_count=parameter_count(spec),
        input_shape=input_shape(spec),
        num_classes=spec.num_classes,
    )
    session.add(model)
    session.flush()
    return model


def _register_onnx_model(
    session: Session,
    tenant_id: str,
    store: BlobStore,
    upload: BinaryIO,
    name: str | None,
    *,
    max_bytes: int,
    max_parameters: int,
) -> Model:
    """An ONNX upload: the child validates and converts it; the graph (as uploaded) and the weights it wrote
    (safetensors under the module's parameter names) are stored, nothing when it is refused."""
    staged = store.stage(upload, max_bytes)
    converted = store.temp_path(".safetensors")
    try:
        summary = import_onnx(staged.path, converted, max_output_bytes=max_bytes)
        if summary["parameter_count"] > max_parameters:
            raise InvalidInput(
                f"the ONNX model has {summary['parameter_count']} parameters; this server accepts at most "
                f"{max_parameters}"
            )
        spec = OnnxSpec(
            name="onnx",
            graph_sha256=staged.sha256,
            input_shape=summary["input_shape"],
            num_classes=summary["num_classes"],
            opset=summary["opset"],
            ops=summary["ops"],
            parameter_count=summary["parameter_count"],
            prunable_layers=summary["prunable_layers"],
            reference=OnnxReference(**summary["reference"]),
        )
        weights = store.stage_file(converted)
    except BaseException:
        converted.unlink(missing_ok=True)
        store.discard(staged)
        raise
    store.commit(staged)
    store.commit(weights)
    return _add_model(session, tenant_id, name, spec, weights.sha256, staged.size_bytes)


def _split_columns(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    return [column.strip() for column in value.split(",") if column.strip()]


def dataset_format(filename: str | None, path: Path) -> str:
    if is_parquet(path):  # by content: a Parquet file is Parquet whatever its name
        return "parquet"
    suffix = Path(filename or "").suffix.lower()
    if suffix in (".npz", ".csv"):
        return suffix[1:]
    with path.open("rb") as handle:
        return "npz" if handle.read(2) == b"PK" else "csv"


def register_dataset(
    session: Session,
    tenant_id: str,
    store: BlobStore,
    upload: BinaryIO,
    filename: str | None,
    *,
    name: str | None,
    label: str | None,
    features: str | None,
    groups: str | None,
    max_bytes: int,
    limits: IngestLimits,
    budget: DecodeBudget,
) -> Dataset:
    staged = store.stage(upload, max_bytes)
    try:
        fmt = dataset_format(filename, staged.path)
        decoded, read = _dataset_reader(fmt, staged.path, label, features, groups, limits)
        # Twice the decoded bytes: the arrays as read and the copies converting them makes (float32 features,
        # coded labels and groups, a CSV's blocks joined). Held until the files are written.
        with budget.reserve(2 * decoded):
            return _add_dataset(session, tenant_id, store, read(), name, fmt, staged)
    finally:
        store.discard(staged)


def _dataset_reader(
    fmt: str, path: Path, label: str | None, features: str | None, groups: str | None, limits: IngestLimits
) -> tuple[int, Callable[[], ParsedDataset]]:
    """The bytes reading the upload will take (checked against the caps first), and the reader."""
    if fmt == "npz":
        return npz_decoded_bytes(path, limits.max_decoded_bytes), lambda: read_npz_dataset(
            path, max_decoded_bytes=limits.max_decoded_bytes
        )
    group_columns = _split_columns(groups)
    if not label or not group_columns:
        raise InvalidInput(
            f"a {fmt.upper()} dataset needs the form fields 'label' (the label column) and 'groups' "
            "(comma-separated group attribute columns); 'features' is optional"
        )
    feature_columns = _split_columns(features)
    if fmt == "parquet":
        return parquet_decoded_bytes(path, limits.max_decoded_bytes), lambda: read_parquet_dataset(
            path, label=label, features=feature_columns, groups=group_columns, max_columns=limits.max_columns
        )
    decoded = csv_decoded_bytes(path, limits.max_decoded_bytes)
    return decoded, lambda: read_csv_dataset(
        path, label=label, features=feature_columns, groups=group_columns, max_columns=limits.max_columns
    )


def _add_dataset(
    session: Session,
    tenant_id: str,
    store: BlobStore,
    parsed: ParsedDataset,
    name: str | None,
    fmt: str,
    staged: StagedUpload,
) -> Dataset:
    dataset = Dataset(
        tenant_id=tenant_id,
        name=name,
        sha256=staged.sha256,
        format=fmt,
        size_bytes=staged.size_bytes,
        rows=0,
        feature_shape=[],
        classes=[],
        groups={},
    )
    session.add(dataset)
    session.flush()
    # Written under tmp/ in a directory named after this process, then renamed into place: a crash while
    # writing leaves only what the janitor removes once this process is gone (service/janitor.py).
    with store.staged_dataset_dir(dataset.id) as directory:
        summary = save_dataset(parsed, directory)
    dataset.rows = summary["rows"]
    dataset.feature_shape = summary["feature_shape"]
    dataset.classes = summary["classes"]
    dataset.groups = summary["groups"]
    return dataset


def get_model(session: Session, tenant_id: str, model_id: str) -> Model:
    return owned(session, Model, model_id, tenant_id)


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    return owned(session, Dataset, dataset_id, tenant_id)
