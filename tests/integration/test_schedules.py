"""Schedules fired by real `pruneaudit sweeper` processes: exactly one audit per tick however many sweepers run
(embedded SQLite, and PostgreSQL + Redis), one late audit after downtime, pausing. Counts come from the database
itself, not from the API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, text

from tests.integration.stack import REPO, Stack, assert_problem, start_process, start_stack

# Sub-second ticks and sweeps, so ten ticks take seconds.
SCHEDULE_SETTINGS = {
    "PRUNEAUDIT_SWEEP_INTERVAL_S": "0.1",
    "PRUNEAUDIT_MIN_SCHEDULE_INTERVAL_S": "0.1",
    "PRUNEAUDIT_SCHEDULE_LATE_AFTER_S": "1.5",
    "PRUNEAUDIT_WEBHOOK_REFUSE_PRIVATE_URLS": "false",
}
INTERVAL_S = 0.5


def tiny_spec(model: dict, dataset_id: str, **policy) -> dict:
    return {
        **model,
        "dataset_id": dataset_id,
        "group_by": ["digit"],
        "pruning": {"ratios": [0.9], "methods": [{"method": "magnitude", "scope": "global"}]},
        "diagnostics": {"curvature": "off"},
        "statistics": {"bootstrap_resamples": 0},
        "policy": {"min_group_size": 1, **policy},
    }


def database_url(stack: Stack) -> str:
    return stack.env.get("PRUNEAUDIT_DATABASE_URL") or f"sqlite:///{stack.var_dir / 'pruneaudit.sqlite'}"


def rows(stack: Stack, query: str, **params) -> list[tuple]:
    engine = create_engine(database_url(stack))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query), params)]
    finally:
        engine.dispose()


def moment(value) -> datetime:
    """Raw SQL gives SQLite's stored text, PostgreSQL's datetimes."""
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def firings(stack: Stack, schedule_id: str) -> list[tuple]:
    return [
        (moment(tick), *rest)
        for tick, *rest in rows(
            stack,
            "SELECT scheduled_for, audit_id, late, missed_ticks FROM schedule_firings WHERE schedule_id = :s "
            "ORDER BY scheduled_for",
            s=schedule_id,
        )
    ]


def audits_of(stack: Stack, schedule_id: str) -> list[tuple]:
    return rows(stack, "SELECT id, scheduled_for FROM audits WHERE schedule_id = :s", s=schedule_id)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def create_schedule(client, digits_case, **fields) -> dict:
    model_id = digits_case.upload_model(client).json()["id"]
    dataset_id = digits_case.upload_dataset(client).json()["id"]
    body = {"spec": tiny_spec({"model_id": model_id}, dataset_id), "interval_s": INTERVAL_S, **fields}
    created = client.post("/v1/schedules", json=body)
    assert created.status_code == 201, created.text
    return created.json()


def start_sweepers(stack: Stack, *names: str) -> None:
    """Started and past their imports (they log their settings first), so a test's first tick is not late."""
    for name in names:
        start_process(stack, name, ["sweeper"])
    wait_for(lambda: all("sweeper: every" in stack.log(name) for name in names), 60, "the sweepers to start")


def stop(stack: Stack, *names: str) -> None:
    for name in names:
        process = stack.processes.pop(name)
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory):
    """API only (no worker: counting firings needs none), embedded SQLite database and broker."""
    stack = start_stack(tmp_path_factory.mktemp("schedules"), with_worker=False, settings=SCHEDULE_SETTINGS)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def services_stack(tmp_path_factory, postgres_url, redis_broker):
    redis_url, prefix = redis_broker
    stack = start_stack(
        tmp_path_factory.mktemp("schedules-pg"),
        with_worker=False,
        settings=SCHEDULE_SETTINGS,
        database_url=postgres_url,
        broker_url=redis_url,
        key_prefix=prefix,
    )
    yield stack
    stack.stop()


def two_sweepers_fire_each_tick_once(stack: Stack, digits_case) -> None:
    with stack.client() as client:
        start_sweepers(stack, "sweeper-a", "sweeper-b")
        schedule = create_schedule(client, digits_case)
        started = time.monotonic()
        try:
            wait_for(lambda: len(firings(stack, schedule["id"])) >= 12, 60, "12 ticks")
        finally:
            client.patch(f"/v1/schedules/{schedule['id']}", json={"paused": True})
            stop(stack, "sweeper-a", "sweeper-b")
        elapsed = time.monotonic() - started
        fired = firings(stack, schedule["id"])
        audits = audits_of(stack, schedule["id"])
        history = client.get(f"/v1/schedules/{schedule['id']}/audits", params={"limit": 200}).json()
    ticks = [tick for tick, *_ in fired]
    assert len(ticks) == len(set(ticks)) >= 12
    # One audit per tick, each tick one interval after the one before: none fired twice, none skipped.
    assert len(audits) == len(fired) and {a for _, a, *_ in fired} == {a for a, _ in audits}
    # Each gap is one interval, or more when a slow sweep let ticks pass: then the firing counted them as missed.
    for (tick, _, _, missed), following in zip(fired, ticks[1:], strict=False):
        assert abs((following - tick).total_seconds() - INTERVAL_S * (1 + missed)) < 1e-3, fired
    assert history["total"] == len(fired) and all(item["audit_id"] for item in history["items"])
    print(f"{len(fired)} ticks fired by two sweepers in {elapsed:.1f} s, one audit each")


def test_two_sweepers_fire_each_tick_exactly_once_on_sqlite(sqlite_stack, digits_case):
    two_sweepers_fire_each_tick_once(sqlite_stack, digits_case)


@pytest.mark.services
def test_two_sweepers_fire_each_tick_exactly_once_on_postgres_and_redis(services_stack, digits_case):
    two_sweepers_fire_each_tick_once(services_stack, digits_case)


def test_a_sweeper_down_across_three_ticks_fires_one_late_audit(sqlite_stack, digits_case):
    with sqlite_stack.client() as client:
        start_sweepers(sqlite_stack, "sweeper")
        schedule = create_schedule(client, digits_case, interval_s=1.0)
        wait_for(lambda: firings(sqlite_stack, schedule["id"]), 30, "the first tick")
        stop(sqlite_stack, "sweeper")
        before = firings(sqlite_stack, schedule["id"])
        time.sleep(3.6)  # three ticks pass with no sweeper
        start_sweepers(sqlite_stack, "sweeper")
        wait_for(lambda: len(firings(sqlite_stack, schedule["id"])) > len(before), 30, "the late firing")
        stop(sqlite_stack, "sweeper")
        client.patch(f"/v1/schedules/{schedule['id']}", json={"paused": True})
        history = client.get(f"/v1/schedules/{schedule['id']}/audits").json()["items"]
    after = firings(sqlite_stack, schedule["id"])[len(before) :]
    late = [firing for firing in after if firing[2]]
    assert len(late) == 1, after  # one late audit, not one per missed tick
    _, audit_id, _, missed = late[0]
    assert audit_id is not None and missed >= 2
    assert len(audits_of(sqlite_stack, schedule["id"])) == len(before) + len(after)
    assert any(item["late"] and item["missed_ticks"] == missed for item in history)


def test_paused_schedules_do_not_fire_and_bad_schedules_are_refused(sqlite_stack, digits_case):
    with sqlite_stack.client() as client:
        schedule = create_schedule(client, digits_case, paused=True)
        assert schedule["next_run_at"] is None
        start_sweepers(sqlite_stack, "sweeper")
        time.sleep(1.5)
        stop(sqlite_stack, "sweeper")
        assert firings(sqlite_stack, schedule["id"]) == []
        spec = schedule["spec"]
        for body, fragment in (
            ({"spec": spec, "cron": "not a cron"}, "cron"),
            ({"spec": spec, "cron": "0 2 * * *", "timezone": "Mars/Olympus"}, "time zone"),
            (
                {"spec": {**spec, "model_id": None, "model": {"name": "nothing-by-this-name"}}, "interval_s": 1},
                "no model",
            ),
        ):
            assert_problem(client.post("/v1/schedules", json=body), 422, fragment)
        assert_problem(client.post("/v1/schedules", json={"spec": spec, "cron": "* * * * *", "interval_s": 5}), 422)
        other = sqlite_stack.new_key("someone-else")
        with sqlite_stack.client(other) as stranger:
            assert_problem(stranger.get(f"/v1/schedules/{schedule['id']}"), 404)
            assert stranger.get("/v1/schedules").json()["total"] == 0


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "schedules", *args],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_schedules_cli_creates_lists_pauses_and_resumes(sqlite_stack, digits_case, tmp_path):
    with sqlite_stack.client() as client:
        model_id = digits_case.upload_model(client).json()["id"]
        dataset_id = digits_case.upload_dataset(client).json()["id"]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec({"model_id": model_id}, dataset_id)))
    created = cli(
        sqlite_stack, "create", "--spec", str(spec_file), "--cron", "0 2 * * *", "--timezone", "Europe/Berlin"
    )
    assert created.returncode == 0, created.stderr
    schedule_id = created.stdout.split()[0]
    assert "cron '0 2 * * *' Europe/Berlin" in created.stdout
    assert schedule_id in cli(sqlite_stack, "list").stdout
    assert "paused" in cli(sqlite_stack, "pause", schedule_id).stdout
    resumed = cli(sqlite_stack, "resume", schedule_id)
    assert resumed.returncode == 0 and "next " in resumed.stdout
    with sqlite_stack.client() as client:
        next_run = datetime.fromisoformat(client.get(f"/v1/schedules/{schedule_id}").json()["next_run_at"])
    assert next_run.astimezone(ZoneInfo("Europe/Berlin")).hour == 2  # 02:00 Berlin time, whatever UTC says
    refused = cli(sqlite_stack, "create", "--spec", str(spec_file), "--cron", "61 * * * *")
    assert refused.returncode == 1 and "not a valid cron expression" in refused.stderr


def test_models_and_datasets_list_by_name_version_and_label(sqlite_stack, digits_case):
    def upload(version: str, commit: str) -> str:
        form = {"architecture": json.dumps(digits_case.architecture), "name": "lineage", "version": version}
        form["labels"] = json.dumps({"git_commit": commit})
        uploaded = client.post("/v1/models", files={"weights": ("m.safetensors", digits_case.weights)}, data=form)
        assert uploaded.status_code == 201, uploaded.text
        return uploaded.json()["id"]

    with sqlite_stack.client() as client:
        older, newer = upload("1.0", "aaa111"), upload("1.1", "bbb222")
        listed = client.get("/v1/models", params={"name": "lineage"}).json()
        assert [m["id"] for m in listed["items"]] == [newer, older] and listed["total"] == 2
        assert [
            m["id"] for m in client.get("/v1/models", params={"name": "lineage", "version": "latest"}).json()["items"]
        ] == [newer]
        assert [m["id"] for m in client.get("/v1/models", params={"label": "git_commit:aaa111"}).json()["items"]] == [
            older
        ]
        assert (
            client.get("/v1/models", params={"name": "lineage", "limit": 1, "offset": 1}).json()["items"][0]["id"]
            == older
        )
        assert_problem(client.get("/v1/models", params={"label": "no-colon"}), 422, "key:value")
        refused = client.post(
            "/v1/models",
            files={"weights": ("m.safetensors", digits_case.weights)},
            data={"architecture": json.dumps(digits_case.architecture), "name": "lineage", "labels": "[1, 2]"},
        )
        assert_problem(refused, 422, "labels")
        assert client.get("/v1/models", params={"name": "lineage"}).json()["total"] == 2  # nothing stored
        dataset = digits_case.upload_dataset(client, name="eval", version="v1").json()
        assert (
            client.get("/v1/datasets", params={"name": "eval", "version": "v1"}).json()["items"][0]["id"]
            == dataset["id"]
        )
        spec = tiny_spec({"model": {"name": "lineage", "version": "1.0"}}, dataset["id"])
        created = client.post("/v1/audits", json={**spec, "dataset_id": None, "dataset": {"name": "eval"}})
        assert created.status_code == 202, created.text
        assert (created.json()["model_id"], created.json()["dataset_id"]) == (older, dataset["id"])
        assert client.get("/v1/audits", params={"model_name": "lineage"}).json()["total"] == 1
