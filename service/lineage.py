"""Model and dataset lineage: name, version and free labels on each upload; lists filtered by them; and the one
resolver from a (name, version) reference to the row an audit then records by id."""

from __future__ import annotations

import json
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import InvalidInput
from service.models import Dataset, Model
from service.schemas.lineage import LATEST, ResourceRef

Catalogued = TypeVar("Catalogued", Model, Dataset)
MAX_LABELS = 50


def parse_labels(raw: str | None) -> dict[str, str] | None:
    """The `labels` form field: a JSON object of strings (e.g. {"git_commit": "3f2a…"}); 422 otherwise."""
    if raw is None or not raw.strip():
        return None
    try:
        labels = json.loads(raw)
    except ValueError:
        raise InvalidInput('labels must be a JSON object of strings, e.g. {"git_commit": "3f2a9c1"}') from None
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise InvalidInput('labels must be a JSON object of strings, e.g. {"git_commit": "3f2a9c1"}')
    if len(labels) > MAX_LABELS or any(len(k) > 100 or len(v) > 500 for k, v in labels.items()):
        raise InvalidInput(f"at most {MAX_LABELS} labels, keys up to 100 and values up to 500 characters")
    return labels


def parse_label_filter(raw: str | None) -> tuple[str, str] | None:
    """`?label=key:value`; 422 without the colon."""
    if raw is None:
        return None
    key, sep, value = raw.partition(":")
    if not sep or not key:
        raise InvalidInput("label filters read key:value, e.g. label=git_commit:3f2a9c1")
    return key, value


def list_catalogued(
    session: Session,
    kind: type[Catalogued],
    tenant_id: str,
    *,
    name: str | None,
    version: str | None,
    label: tuple[str, str] | None,
    limit: int,
    offset: int,
) -> tuple[list[Catalogued], int]:
    """The tenant's models (or datasets), newest first, filtered by name, version and one label."""
    query = select(kind).where(kind.tenant_id == tenant_id)
    if name is not None:
        query = query.where(kind.name == name)
    if version is not None and version != LATEST:
        query = query.where(kind.version == version)
    rows = list(session.scalars(query.order_by(kind.created_at.desc(), kind.id)).all())
    if label is not None:
        # JSON containment differs between SQLite and PostgreSQL; the filter runs here on the tenant's rows.
        rows = [row for row in rows if (row.labels or {}).get(label[0]) == label[1]]
    if version == LATEST:
        rows = rows[:1]
    return rows[offset : offset + limit], len(rows)


def resolve(session: Session, kind: type[Catalogued], tenant_id: str, ref: ResourceRef) -> Catalogued:
    """The row a reference names now: that version, or the newest upload of the name for "latest"; 422 if none."""
    query = select(kind).where(kind.tenant_id == tenant_id, kind.name == ref.name)
    if ref.version != LATEST:
        query = query.where(kind.version == ref.version)
    row = session.scalars(query.order_by(kind.created_at.desc(), kind.id.desc()).limit(1)).first()
    if row is None:
        noun = kind.__name__.lower()
        raise InvalidInput(
            f"no {noun} named {ref.name!r} with version {ref.version!r}; upload one with name and version"
        )
    return row
