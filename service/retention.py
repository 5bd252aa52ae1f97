"""Audit retention, applied by the sweeper: ended audits that finished more than `audit_retention_days` ago are
deleted as `DELETE /v1/audits/{id}` deletes them (runs, report files, share link). Off by default. Models and
datasets are never deleted by age: an audit's inputs go when their owner deletes them."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from service import deletion
from service.db import session_scope
from service.errors import Conflict
from service.models import Audit, utcnow
from service.settings import Settings
from service.storage import get_store

log = logging.getLogger(__name__)
BATCH = 100  # audits per sweep: a first sweep over a long history does not hold the database for long


def delete_expired_audits(settings: Settings) -> list[str]:
    """The ids of the audits deleted by this sweep (none when retention is off)."""
    if settings.audit_retention_days is None:
        return []
    cutoff = utcnow() - timedelta(days=settings.audit_retention_days)
    store = get_store()
    deleted = []
    with session_scope() as session:
        expired = session.scalars(
            select(Audit.id)
            .where(Audit.status.in_(deletion.ENDED), Audit.finished_at < cutoff)
            .order_by(Audit.finished_at)
            .limit(BATCH)
        ).all()
        for audit_id in expired:
            if (audit := session.get(Audit, audit_id)) is None:
                continue  # another sweeper deleted it meanwhile
            try:
                blobs = deletion.delete_ended_audit(session, audit)
            except Conflict:
                continue  # the same race, seen at the conditional DELETE
            session.commit()
            deletion.remove_unreferenced(session, store, blobs)
            store.remove_work(audit_id)
            deleted.append(audit_id)
    if deleted:
        log.info("retention: deleted %d audit(s) past %g days", len(deleted), settings.audit_retention_days)
    return deleted
