"""Scheduled audits on a real worker and sweeper, with webhooks to a real receiver on 127.0.0.1 that verifies every
signature with the `standardwebhooks` library: `version: latest` resolves at firing time, `skip_if_unchanged`
skips, a stricter policy flips the verdict and the change is detected; a receiver answering 500 twice gets the
event on the third attempt; a delivery whose worker is killed -9 mid-attempt is sent again with the same
webhook-id; another tenant's webhooks receive nothing."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.integration.receiver import Receiver
from tests.integration.stack import Stack, start_process, start_stack, wait_for_audit
from tests.integration.test_crash_safety import kill_hard
from tests.integration.test_schedules import SCHEDULE_SETTINGS, start_sweepers, tiny_spec, wait_for

WEBHOOK_SETTINGS = {
    **SCHEDULE_SETTINGS,
    "PRUNEAUDIT_WEBHOOK_BACKOFF_BASE_S": "0.3",
    "PRUNEAUDIT_WEBHOOK_TIMEOUT_S": "3",
    "PRUNEAUDIT_WEBHOOK_RESEND_AFTER_S": "2",
}
LENIENT = {"max_excess_accuracy_gap": 1.0, "max_worst_group_drop": 1.0}
STRICT = {"max_excess_accuracy_gap": 0.0, "max_worst_group_drop": 0.0}  # 90 % sparsity always costs a group


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    receiver.url = receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def hook_stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("webhooks"), settings=WEBHOOK_SETTINGS)
    start_sweepers(stack, "sweeper")
    yield stack
    stack.stop()


def register(client, receiver: Receiver, path: str, events: list[str]) -> dict:
    created = client.post("/v1/webhooks", json={"url": receiver.url + path, "events": events})
    assert created.status_code == 201, created.text
    hook = created.json()
    receiver.secrets[path] = hook["secret"]
    return hook


def upload_version(client, digits_case, version: str) -> str:
    uploaded = client.post(
        "/v1/models",
        files={"weights": ("model.safetensors", digits_case.weights)},
        data={
            "architecture": json.dumps(digits_case.architecture),
            "name": "scorer",
            "version": version,
            "labels": json.dumps({"git_commit": f"c0ffee{version}"}),
        },
    )
    assert uploaded.status_code == 201, uploaded.text
    return uploaded.json()["id"]


def scheduled_audits(client, schedule_id: str) -> list[dict]:
    return client.get("/v1/audits", params={"schedule_id": schedule_id}).json()["items"]


def events_at(receiver: Receiver, path: str, event: str) -> list:
    return [r for r in receiver.at(path) if r.body["type"] == event]


@pytest.mark.slow
def test_scheduled_audits_resolve_latest_skip_unchanged_detect_a_verdict_flip_and_call_webhooks(
    hook_stack: Stack, digits_case, receiver: Receiver
):
    client = hook_stack.client()
    register(client, receiver, "/a", ["audit.succeeded", "audit.verdict_changed", "schedule.fired"])
    flaky = register(client, receiver, "/flaky", ["audit.succeeded"])
    receiver.failures["/flaky"] = 2
    with hook_stack.client(hook_stack.new_key("another-team")) as stranger:
        register(stranger, receiver, "/b", ["audit.succeeded", "audit.verdict_changed", "schedule.fired"])
    first_model = upload_version(client, digits_case, "1")
    assert [
        m["id"] for m in client.get("/v1/models", params={"name": "scorer", "version": "latest"}).json()["items"]
    ] == [first_model]
    dataset_id = digits_case.upload_dataset(client).json()["id"]
    spec = tiny_spec({"model": {"name": "scorer", "version": "latest"}}, dataset_id, **LENIENT)
    created = client.post("/v1/schedules", json={"spec": spec, "interval_s": 1.0, "skip_if_unchanged": True})
    assert created.status_code == 201, created.text
    schedule_id = created.json()["id"]

    first = wait_for(lambda: scheduled_audits(client, schedule_id), 60, "the first scheduled audit")[0]
    assert first["model_id"] == first_model
    assert wait_for_audit(client, first["id"])["status"] == "succeeded"
    history = wait_for(
        lambda: [f for f in client.get(f"/v1/schedules/{schedule_id}/audits").json()["items"] if f["skipped_reason"]],
        30,
        "a tick skipped as unchanged",
    )
    assert history[0]["audit_id"] is None and history[0]["skipped_reason"].startswith("unchanged")

    # Paused while the next version arrives and the policy gets stricter, so the next tick sees both.
    assert client.patch(f"/v1/schedules/{schedule_id}", json={"paused": True}).json()["next_run_at"] is None
    second_model = upload_version(client, digits_case, "2")  # the newest upload of "scorer" from now on
    strict_spec = tiny_spec(spec_model(spec), dataset_id, **STRICT)
    patched = client.patch(f"/v1/schedules/{schedule_id}", json={"spec": strict_spec, "paused": False})
    assert patched.status_code == 200, patched.text
    second = wait_for(lambda: [a for a in scheduled_audits(client, schedule_id) if a["id"] != first["id"]], 60, "a 2nd")
    client.patch(f"/v1/schedules/{schedule_id}", json={"paused": True})
    second = wait_for_audit(client, second[-1]["id"])
    assert second["status"] == "succeeded" and second["model_id"] == second_model
    report = client.get(f"/v1/audits/{second['id']}/report").json()
    changes = report["changes"]
    assert changes["verdict_changed"] and changes["verdict"] == {"before": True, "now": False}
    assert changes["previous_audit_id"] == first["id"] and report["verdict"]["passed"] is False
    assert 'data-testid="changes"' in client.get(f"/v1/audits/{second['id']}/report.html").text

    wait_for(lambda: events_at(receiver, "/a", "audit.verdict_changed"), 60, "the verdict_changed event")
    wait_for(lambda: len(events_at(receiver, "/flaky", "audit.succeeded")) >= 4, 60, "flaky's retries")
    ours = [r for path in ("/a", "/flaky") for r in receiver.at(path)]
    assert ours and all(r.verified for r in ours)  # every signature checks out with the library
    assert not receiver.at("/b")  # the other tenant's webhook heard nothing
    assert all(hook_stack.api_key not in json.dumps(r.body) for r in ours)
    succeeded = {r.body["data"]["audit"]["id"] for r in events_at(receiver, "/a", "audit.succeeded")}
    assert {first["id"], second["id"]} <= succeeded
    verdict_event = events_at(receiver, "/a", "audit.verdict_changed")[0].body["data"]
    assert verdict_event["audit"]["id"] == second["id"] and verdict_event["verdict"]["passed"] is False
    assert all(r.body["data"]["tenant"]["name"] == "tests" for r in ours)
    # The flaky receiver: the first event arrived three times under one webhook-id, accepted the third time.
    by_id: dict[str, int] = {}
    for r in receiver.at("/flaky"):
        by_id[r.webhook_id] = by_id.get(r.webhook_id, 0) + 1
    assert sorted(by_id.values()) == [1, 3], by_id
    log = client.get(f"/v1/webhooks/{flaky['id']}/deliveries").json()["items"]
    assert sorted((d["attempts"], d["status"], d["last_status_code"]) for d in log) == [
        (1, "delivered", 200),
        (3, "delivered", 200),
    ]
    client.close()


def spec_model(spec: dict) -> dict:
    return {"model": spec["model"]}


@pytest.mark.slow
def test_a_delivery_whose_worker_is_killed_is_sent_again_with_the_same_webhook_id(hook_stack: Stack, receiver):
    client = hook_stack.client()
    hook = register(client, receiver, "/hang", ["audit.failed"])
    release = threading.Event()
    receiver.hang["/hang"] = release
    delivery = client.post(f"/v1/webhooks/{hook['id']}/test")
    assert delivery.status_code == 202, delivery.text
    wait_for(lambda: receiver.at("/hang"), 60, "the first attempt to arrive")
    kill_hard(hook_stack.processes.pop("worker"))  # mid-attempt: its outcome is never written
    release.set()
    start_process(hook_stack, "worker-2", ["worker"])
    started = time.monotonic()
    wait_for(lambda: len(receiver.at("/hang")) >= 2, 90, "the delivery sent again")
    first, again = receiver.at("/hang")[:2]
    assert first.webhook_id == again.webhook_id == delivery.json()["id"] and again.verified
    log = wait_for(
        lambda: [
            d for d in client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"] if d["status"] == "delivered"
        ],
        30,
        "the delivery log to say delivered",
    )
    assert log[0]["attempts"] == 2 and log[0]["last_status_code"] == 200
    print(f"re-sent {time.monotonic() - started:.1f} s after the new worker started")
    client.close()
