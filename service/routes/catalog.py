from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from pydantic import BaseModel, ValidationError

from arch.registry import REGISTRY, input_shape
from arch.specs import OnnxUpload
from service import catalog, deletion, lineage
from service.dependencies import SessionDep, SettingsDep, StoreDep, TenantDep, releases_connection
from service.ingest.limits import decode_budget
from service.models import Dataset, Model
from service.schemas.catalog import ArchitectureOut, DatasetOut, ModelOut
from service.schemas.common import PROBLEM_RESPONSES, PathId, Problem, Text
from service.schemas.lineage import DatasetPage, ModelPage

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)
# Starlette answers a body that is not valid multipart/form-data with 400 before a handler runs.
UPLOAD_RESPONSES: dict[int | str, dict] = {
    400: {"model": Problem, "content": {"application/problem+json": {}}, "description": "Malformed multipart body"},
}

ARCHITECTURE_HELP = (
    'Architecture spec as JSON, e.g. {"name": "mlp", "in_features": 64, "hidden": [128, 64], "num_classes": 10} '
    'or {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [16, 32], "num_classes": 10}, '
    'or a torchvision-compatible name such as {"name": "resnet18", "num_classes": 10} '
    "(upload safetensors.torch.save_model(torchvision_model, path) as is). "
    "The server builds the module from its own code; see GET /v1/architectures."
)


@router.post("/models", status_code=201, response_model=ModelOut, tags=["models"], responses=UPLOAD_RESPONSES)
@releases_connection
def upload_model(
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    weights: Annotated[
        UploadFile,
        File(
            description=(
                "safetensors file: safetensors.torch.save_file(model.state_dict(), path). A weights-only PyTorch state "
                "dict (torch.save(model.state_dict(), path)) is also accepted: it is read only with "
                "torch.load(weights_only=True) in a resource-limited child process and stored as safetensors. Whole "
                "pickled models, TorchScript and torch.export (.pt2) archives are refused."
            )
        ),
    ],
    architecture: Annotated[
        Text,
        Form(
            description=ARCHITECTURE_HELP,
            examples=['{"name": "mlp", "in_features": 64, "hidden": [128, 64], "num_classes": 10}'],
        ),
    ],
    name: Annotated[Text | None, Form(max_length=200)] = None,
    version: Annotated[Text | None, Form(max_length=100, description=VERSION_HELP)] = None,
    labels: Annotated[Text | None, Form(max_length=20000, description=LABELS_HELP)] = None,
) -> ModelOut:
    """Upload model weights for a registry architecture: safetensors, or a weights-only .pt state dict that is
    converted to safetensors. Uploads are data, never code."""
    parsed_labels = lineage.parse_labels(labels)  # refused before the upload is read
    model = catalog.register_model(
        session,
        tenant,
        store,
        weights.file,
        architecture,
        name,
        max_bytes=settings.max_upload_bytes,
        max_parameters=settings.max_parameters,
        limits=settings.ingest_limits(),
    )
    model.version, model.labels = version, parsed_labels
    return ModelOut.model_validate(model)


VERSION_HELP = 'Free version string; a spec may name this upload {"name": …, "version": …} ("latest": the newest).'
LABELS_HELP = 'JSON object of strings, e.g. {"git_commit": "3f2a9c1"}; filter lists with label=key:value.'
Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=2**62)]
LabelFilter = Annotated[Text | None, Query(max_length=700, description="key:value")]
NameFilter = Annotated[Text | None, Query(max_length=200)]
VersionFilter = Annotated[Text | None, Query(max_length=100, description='A version, or "latest" (the newest only).')]


@router.get("/models", response_model=ModelPage, tags=["models"])
@releases_connection
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    name: NameFilter = None,
    version: VersionFilter = None,
    label: LabelFilter = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> ModelPage:
    """The tenant's models, newest first, filtered by name, version and label."""
    filters = dict(name=name, version=version, label=lineage.parse_label_filter(label), limit=limit, offset=offset)
    items, total = lineage.list_catalogued(session, Model, tenant, **filters)  # type: ignore[arg-type]
    return ModelPage(items=[ModelOut.model_validate(m) for m in items], total=total, limit=limit, offset=offset)


@router.get("/datasets", response_model=DatasetPage, tags=["datasets"])
@releases_connection
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    name: NameFilter = None,
    version: VersionFilter = None,
    label: LabelFilter = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> DatasetPage:
    """The tenant's datasets, newest first, filtered by name, version and label."""
    filters = dict(name=name, version=version, label=lineage.parse_label_filter(label), limit=limit, offset=offset)
    items, total = lineage.list_catalogued(session, Dataset, tenant, **filters)  # type: ignore[arg-type]
    return DatasetPage(items=[DatasetOut.model_validate(d) for d in items], total=total, limit=limit, offset=offset)


@router.get("/models/{model_id}", response_model=ModelOut, tags=["models"])
@releases_connection
def read_model(model_id: PathId, session: SessionDep, tenant: TenantDep) -> ModelOut:
    return ModelOut.model_validate(catalog.get_model(session, tenant, model_id))


@router.post("/datasets", status_code=201, response_model=DatasetOut, tags=["datasets"], responses=UPLOAD_RESPONSES)
@releases_connection
def upload_dataset(
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[
        UploadFile,
        File(
            description=".npz with arrays x, y and group_<attribute>; .csv with a header row; or Parquet (known by "
            "its PAR1 magic, whatever its name), read as the CSV is"
        ),
    ],
    label: Annotated[Text | None, Form(description="CSV, Parquet: the label column")] = None,
    features: Annotated[
        Text | None, Form(description="CSV, Parquet: comma-separated feature columns (default: all others)")
    ] = None,
    groups: Annotated[
        Text | None, Form(description="CSV, Parquet: comma-separated group attribute columns", examples=["race,sex"])
    ] = None,
    name: Annotated[Text | None, Form(max_length=200)] = None,
    version: Annotated[Text | None, Form(max_length=100, description=VERSION_HELP)] = None,
    labels: Annotated[Text | None, Form(max_length=20000, description=LABELS_HELP)] = None,
) -> DatasetOut:
    """Upload a labelled dataset with group attributes (npz, csv or Parquet)."""
    parsed_labels = lineage.parse_labels(labels)
    dataset = catalog.register_dataset(
        session,
        tenant,
        store,
        file.file,
        file.filename,
        name=name,
        label=label,
        features=features,
        groups=groups,
        max_bytes=settings.max_upload_bytes,
        limits=settings.ingest_limits(),
        budget=decode_budget(settings.max_decoding_bytes, settings.decode_wait_s),
    )
    dataset.version, dataset.labels = version, parsed_labels
    return DatasetOut.model_validate(dataset)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, tags=["datasets"])
@releases_connection
def read_dataset(dataset_id: PathId, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    return DatasetOut.model_validate(catalog.get_dataset(session, tenant, dataset_id))


# The registry's architectures, then the ONNX upload form (its input shape and classes come from each graph).
UPLOADABLE: dict[str, type[BaseModel]] = {**REGISTRY, "onnx": OnnxUpload}


@router.get("/architectures", response_model=list[ArchitectureOut], tags=["models"])
def list_architectures(_tenant: TenantDep) -> list[ArchitectureOut]:
    """The architectures the server can build, with the JSON schema of their spec."""
    return [
        ArchitectureOut(
            name=name,
            description=" ".join((spec.__doc__ or "").split()),
            json_schema=spec.model_json_schema(),
            default_input_shape=_default_input_shape(name, spec),
        )
        for name, spec in UPLOADABLE.items()
    ]


def _default_input_shape(name: str, spec) -> list[int] | None:
    if spec is OnnxUpload:
        return None  # read from each uploaded graph
    try:
        return input_shape(spec.model_validate({"name": name}))
    except ValidationError:
        return None


@router.delete("/models/{model_id}", status_code=204, response_class=Response, tags=["models"])
def delete_model(model_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> Response:
    """Delete a model no audit or schedule uses (409 naming them otherwise); its file goes once nothing else
    stored has the same bytes."""
    blobs = deletion.delete_model(session, tenant, model_id)
    session.commit()  # the row first: a blob is removed only once nothing committed references it
    deletion.remove_unreferenced(session, store, blobs)
    session.commit()
    return Response(status_code=204)


@router.delete("/datasets/{dataset_id}", status_code=204, response_class=Response, tags=["datasets"])
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> Response:
    """Delete a dataset no audit (as evaluation or train dataset) or schedule uses; 409 naming them otherwise."""
    deletion.delete_dataset(session, tenant, dataset_id)
    session.commit()
    store.remove_dataset_dir(dataset_id)
    return Response(status_code=204)
