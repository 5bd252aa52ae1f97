"""Tenants and API keys, and the one place where every lookup by id is scoped to the caller's tenant.

A key reads `pa_<key id>_<secret>`: the id finds the row, and only the secret's SHA-256 is stored, compared in
constant time. The secret is 256 random bits, so a plain hash is enough (a slow password hash buys nothing
against a key that cannot be guessed, and would cost every request). Another tenant's resource answers 404,
exactly like a missing one, so ids leak nothing."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import InvalidInput, NotFound, Unauthorized
from service.models import ApiKey, Audit, Dataset, Model, Tenant, utcnow

KEY_PREFIX = "pa_"
KEY_ID_LENGTH = 16  # secrets.token_hex(8)
Owned = TypeVar("Owned", Model, Dataset, Audit)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _same_text(stored: str, presented: str) -> bool:
    """Constant-time equality of any two texts: hmac.compare_digest refuses str with non-ASCII characters
    (a TypeError, so a 500), bytes never."""
    return hmac.compare_digest(stored.encode(), presented.encode())


def create_key(session: Session, tenant_name: str, key_name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for `tenant_name` (the tenant is created if it does not exist); the plain key is returned once."""
    if not tenant_name.strip():
        raise InvalidInput("a tenant needs a name")
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key_id, secret = secrets.token_hex(KEY_ID_LENGTH // 2), secrets.token_urlsafe(32)
    key = ApiKey(id=key_id, tenant_id=tenant.id, name=key_name, secret_sha256=_digest(secret))
    session.add(key)
    session.flush()
    return key, f"{KEY_PREFIX}{key_id}_{secret}"


def revoke_key(session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id.removeprefix(KEY_PREFIX).split("_")[0])
    if key is None:
        raise NotFound(f"API key {key_id} does not exist")
    key.revoked_at = key.revoked_at or utcnow()
    return key


def _is_key_id(text: str) -> bool:
    """Only an id of the form keys are made with is looked up (a header can carry any Latin-1 text)."""
    return len(text) == KEY_ID_LENGTH and all(c in "0123456789abcdef" for c in text)


def authenticate(session: Session, presented: str | None) -> str:
    """The tenant id of a valid, unrevoked key; 401 otherwise (the same answer for every kind of bad key)."""
    if not presented:
        raise Unauthorized("send an API key in the X-API-Key header (create one with `pruneaudit keys create`)")
    key_id, _, secret = presented.removeprefix(KEY_PREFIX).partition("_")
    well_formed = presented.startswith(KEY_PREFIX) and secret and _is_key_id(key_id)
    key = session.get(ApiKey, key_id) if well_formed else None
    if key is None or not _same_text(key.secret_sha256, _digest(secret)) or key.revoked_at is not None:
        raise Unauthorized("the API key is not valid (unknown, malformed or revoked)")
    return key.tenant_id


def owned(session: Session, kind: type[Owned], entity_id: str, tenant_id: str) -> Owned:
    """The `kind` row with this id if the tenant owns it; 404 for a missing one and for another tenant's alike."""
    row = session.get(kind, entity_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"{kind.__name__.lower()} {entity_id} does not exist")
    return row


def shared_audit(session: Session, audit_id: str, token: str) -> Audit:
    """The audit whose HTML-report share token this is; 404 otherwise, as for a missing audit."""
    audit = session.get(Audit, audit_id)
    if audit is None or audit.report_token is None or not _same_text(audit.report_token, token):
        raise NotFound(f"audit {audit_id} does not exist")
    return audit
