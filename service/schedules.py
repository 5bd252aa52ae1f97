"""Schedules: create, change, pause, list; and fire the due ones (called by every sweeper).

Firing is exactly once per tick however many sweepers run: a firing moves the schedule's `next_run_at` from the
tick it read with a conditional UPDATE, and creates the tick's audit (Idempotency-Key `schedule:<id>:<tick>`) and
its history row (unique per schedule and tick) in the same transaction; a sweeper whose UPDATE matches nothing
fires nothing. After downtime the tick that was due fires once, late, and `next_run_at` jumps to the first tick
after now: missed ticks are counted, not replayed. Pure database + Celery client, no torch."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service import events
from service.audits import checked_spec, create_audit, spec_digest
from service.db import rows_matched, session_scope
from service.errors import InvalidInput, NotFound
from service.models import Audit, Schedule, ScheduleFiring, as_utc, utcnow
from service.queue import enqueue_audit, enqueue_delivery
from service.schemas.audits import AuditSpec
from service.schemas.schedules import ScheduleIn, SchedulePatch
from service.settings import Settings

log = logging.getLogger(__name__)
MAX_COUNTED_TICKS = 10_000  # missed ticks are counted up to this (a per-second cron down for days stops there)


def next_tick(cron: str | None, timezone: str, interval_s: float | None, after: datetime, anchor: datetime) -> datetime:
    """The first tick strictly after `after`: of the cron expression in its zone, or of anchor + k · interval_s."""
    if cron is not None:
        local = after.astimezone(ZoneInfo(timezone))
        return as_utc(croniter(cron, local).get_next(datetime))
    assert interval_s is not None, "a schedule has a cron expression or an interval"
    elapsed = (after - anchor).total_seconds()
    steps = max(int(elapsed // interval_s) + 1, 1)
    return anchor + timedelta(seconds=steps * interval_s)


def check_timing(cron: str | None, timezone: str, interval_s: float | None, settings: Settings) -> None:
    """422 for an unknown zone, a malformed cron expression, or a period below min_schedule_interval_s."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown time zone {timezone!r}; use an IANA name such as UTC or Europe/Berlin") from None
    if cron is not None:
        if not croniter.is_valid(cron):
            raise InvalidInput(f"{cron!r} is not a valid cron expression (minute hour day month weekday)")
        first = next_tick(cron, timezone, None, utcnow(), utcnow())
        period = (next_tick(cron, timezone, None, first, first) - first).total_seconds()
    else:
        assert interval_s is not None
        period = interval_s
    if period < settings.min_schedule_interval_s:
        raise InvalidInput(
            f"this schedule fires every {period:g} s; this server allows at least {settings.min_schedule_interval_s:g}"
        )


def create_schedule(session: Session, tenant_id: str, body: ScheduleIn, settings: Settings) -> Schedule:
    check_timing(body.cron, body.timezone, body.interval_s, settings)
    checked_spec(session, tenant_id, body.spec, settings.max_runs)  # its references must resolve now
    now = utcnow()
    schedule = Schedule(
        tenant_id=tenant_id,
        name=body.name,
        spec=body.spec.model_dump(mode="json", exclude_none=False),
        cron=body.cron,
        timezone=body.timezone,
        interval_s=body.interval_s,
        paused=body.paused,
        skip_if_unchanged=body.skip_if_unchanged,
        change_threshold=body.change_threshold,
        created_at=now,
        next_run_at=None if body.paused else next_tick(body.cron, body.timezone, body.interval_s, now, now),
    )
    session.add(schedule)
    session.flush()
    return schedule


def get_schedule(session: Session, tenant_id: str, schedule_id: str) -> Schedule:
    schedule = session.get(Schedule, schedule_id)
    if schedule is None or schedule.tenant_id != tenant_id:
        raise NotFound(f"schedule {schedule_id} does not exist")
    return schedule


def update_schedule(
    session: Session, tenant_id: str, schedule_id: str, patch: SchedulePatch, settings: Settings
) -> Schedule:
    """Change fields; pausing clears next_run_at, resuming (or new timing) sets it to the next tick after now, so
    ticks that passed while paused never fire."""
    schedule = get_schedule(session, tenant_id, schedule_id)
    changes = patch.model_dump(exclude_unset=True)
    if changes.get("cron") is not None:
        changes["interval_s"] = None
    elif changes.get("interval_s") is not None:
        changes["cron"] = None
    cron, interval_s = changes.get("cron", schedule.cron), changes.get("interval_s", schedule.interval_s)
    timezone = changes.get("timezone") or schedule.timezone
    if cron is None and interval_s is None:
        raise InvalidInput("a schedule needs cron or interval_s")
    check_timing(cron, timezone, interval_s, settings)
    if patch.spec is not None:
        checked_spec(session, tenant_id, patch.spec, settings.max_runs)
        changes["spec"] = patch.spec.model_dump(mode="json")
    for name, value in changes.items():
        if value is not None or name in ("cron", "interval_s", "name"):
            setattr(schedule, name, value)
    now = utcnow()
    schedule.next_run_at = None if schedule.paused else next_tick(cron, timezone, interval_s, now, now)
    session.flush()
    return schedule


def list_schedules(session: Session, tenant_id: str, limit: int, offset: int) -> tuple[list[Schedule], int]:
    query = select(Schedule).where(Schedule.tenant_id == tenant_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(query.order_by(Schedule.created_at.desc(), Schedule.id).limit(limit).offset(offset))
    return list(items), total


def delete_schedule(session: Session, tenant_id: str, schedule_id: str) -> None:
    """The schedule and its history go; its audits stay (their schedule_id becomes null)."""
    schedule = get_schedule(session, tenant_id, schedule_id)
    session.execute(
        update(Audit)
        .where(Audit.schedule_id == schedule_id)
        .values(schedule_id=None)
        .execution_options(synchronize_session=False)
    )
    session.delete(schedule)


def history(
    session: Session, tenant_id: str, schedule_id: str, limit: int, offset: int
) -> tuple[list[tuple[ScheduleFiring, str | None]], int]:
    """The firings, newest first, each with its audit's status."""
    get_schedule(session, tenant_id, schedule_id)
    query = select(ScheduleFiring).where(ScheduleFiring.schedule_id == schedule_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        select(ScheduleFiring, Audit.status)
        .outerjoin(Audit, Audit.id == ScheduleFiring.audit_id)
        .where(ScheduleFiring.schedule_id == schedule_id)
        .order_by(ScheduleFiring.scheduled_for.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [(firing, status.value if status else None) for firing, status in rows], total


def count_missed(schedule: Schedule, tick: datetime, now: datetime) -> int:
    """Ticks after `tick` up to `now`: they passed while no sweeper ran, and are fired once, as `tick`."""
    missed, moment = 0, tick
    while missed < MAX_COUNTED_TICKS:
        moment = next_tick(schedule.cron, schedule.timezone, schedule.interval_s, moment, tick)
        if moment > now:
            return missed
        missed += 1
    return missed


def unchanged_since(session: Session, schedule: Schedule, spec: AuditSpec, digest: str) -> ScheduleFiring | None:
    """The last firing that created an audit, if it resolved to the same model, dataset and spec."""
    last = session.scalars(
        select(ScheduleFiring)
        .where(ScheduleFiring.schedule_id == schedule.id, ScheduleFiring.audit_id.is_not(None))
        .order_by(ScheduleFiring.scheduled_for.desc())
        .limit(1)
    ).first()
    same = last is not None and (last.model_id, last.dataset_id, last.spec_sha256) == (
        spec.model_id,
        spec.dataset_id,
        digest,
    )
    return last if same else None


def fire(session: Session, schedule: Schedule, tick: datetime, now: datetime, settings: Settings) -> ScheduleFiring:
    """The tick's history row, and its audit unless skipped (unchanged) or refused (the spec no longer fits: its
    model was deleted, no upload has the name any more, ...). The caller has claimed the tick."""
    late_by_s = (now - tick).total_seconds()
    firing = ScheduleFiring(
        schedule_id=schedule.id,
        scheduled_for=tick,
        fired_at=now,
        late_by_s=late_by_s,
        late=late_by_s > settings.schedule_late_after_s,
        missed_ticks=count_missed(schedule, tick, now),
    )
    try:
        spec = checked_spec(session, schedule.tenant_id, AuditSpec.model_validate(schedule.spec), settings.max_runs)
    except (InvalidInput, ValidationError) as exc:
        firing.skipped_reason = f"not fired: {getattr(exc, 'detail', exc)}"
        session.add(firing)
        return firing
    # The digest of the spec without its resolved ids: the ids are compared on their own.
    digest = spec_digest(spec.model_copy(update={"model_id": None, "dataset_id": None}))
    firing.model_id, firing.dataset_id, firing.spec_sha256 = spec.model_id, spec.dataset_id, digest
    if schedule.skip_if_unchanged and (last := unchanged_since(session, schedule, spec, digest)) is not None:
        firing.skipped_reason = (
            f"unchanged: model {spec.model_id}, dataset {spec.dataset_id} and spec equal the firing of "
            f"{as_utc(last.scheduled_for).isoformat()} (audit {last.audit_id})"
        )
    else:
        audit = create_audit(
            session,
            schedule.tenant_id,
            spec,
            settings.max_runs,
            idempotency_key=f"schedule:{schedule.id}:{tick.isoformat()}",
            schedule_id=schedule.id,
            scheduled_for=tick,
        )
        firing.audit_id = audit.id
    session.add(firing)
    return firing


def fire_due_schedules(settings: Settings) -> list[str]:
    """Fire every due, unpaused schedule once; the ids of the audits created (already enqueued)."""
    now = utcnow()
    with session_scope() as session:
        due = session.execute(
            select(Schedule.id, Schedule.next_run_at).where(Schedule.paused.is_(False), Schedule.next_run_at <= now)
        ).all()
    created = []
    for schedule_id, stored_tick in due:
        assert stored_tick is not None, "only schedules with a next tick are due"
        with session_scope() as session:
            schedule = session.get_one(Schedule, schedule_id)
            tick = as_utc(stored_tick)
            following = next_tick(schedule.cron, schedule.timezone, schedule.interval_s, now, tick)
            claim = (
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.next_run_at == stored_tick, Schedule.paused.is_(False))
                .values(next_run_at=following)
                .execution_options(synchronize_session=False)
            )
            if rows_matched(session, claim) != 1:
                continue  # another sweeper fired this tick, or the schedule changed meanwhile
            firing = fire(session, schedule, tick, now, settings)
            session.flush()
            deliveries = events.record_schedule_fired(session, schedule, firing, settings)
            audit_id = firing.audit_id
        log.info("schedule %s fired its tick %s: %s", schedule_id, tick, audit_id or firing.skipped_reason)
        if audit_id is not None:
            created.append(audit_id)
            send_after_commit(enqueue_audit, audit_id)
        for delivery_id in deliveries:
            send_after_commit(enqueue_delivery, delivery_id)
    return created


def send_after_commit(send, row_id: str) -> None:
    try:
        send(row_id)
    except Exception:
        # The row is committed; the sweeper sends it again once it looks lost.
        log.exception("could not enqueue %s; the sweeper will send it again", row_id)
