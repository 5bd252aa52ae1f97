"""200 concurrent POST /v1/audits against a real API and a real Celery worker on real Redis + PostgreSQL, many
of them repeating an Idempotency-Key: exactly one audit per key (and one per key-less request), every request
ends 202 (a duplicate that overlaps the first gets 409 and retries until it gets the replay), and every audit
completes once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict

import httpx
import pytest

from tests.integration.stack import start_stack

KEYS = 45  # Idempotency-Keys, each sent COPIES times at once
COPIES = 4
KEYLESS = 20  # plus this many requests without a key: 200 requests, 65 audits
RETRY_409_FOR_S = 60


@pytest.fixture(scope="module")
def services_stack(tmp_path_factory, postgres_url, redis_broker):
    broker_url, prefix = redis_broker
    # 200 requests of one key at once are the point here: the rate limit (tested on its own) stays off, as in
    # every test stack.
    stack = start_stack(
        tmp_path_factory.mktemp("concurrent"), database_url=postgres_url, broker_url=broker_url, key_prefix=prefix
    )
    yield stack
    stack.stop()


def audit_spec(model_id: str, dataset_id: str, seed: int) -> dict:
    """The smallest real audit: one ratio, one method, no diagnostics, no bootstrap; the seed tells them apart."""
    return {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "group_by": ["digit"],
        "pruning": {"ratios": [0.5], "methods": [{"method": "magnitude", "scope": "global"}]},
        "diagnostics": {"curvature": "off", "gradient_norms": False},
        "statistics": {"bootstrap_resamples": 0},
        "seed": seed,
    }


async def submit(
    client: httpx.AsyncClient, start: asyncio.Event, body: dict, key: str | None
) -> list[httpx.Response | httpx.HTTPError]:
    """POST once everyone is ready; on 409 (the same key in flight) retry until the replay. All answers, in order
    (a transport error, e.g. a request the API never answered, ends the list)."""
    headers = {"Idempotency-Key": key} if key else {}
    await start.wait()
    answers: list[httpx.Response | httpx.HTTPError] = []
    deadline = time.monotonic() + RETRY_409_FOR_S
    while not answers or (answers[-1].status_code == 409 and key and time.monotonic() < deadline):
        if answers:
            await asyncio.sleep(0.05)
        try:
            answers.append(await client.post("/v1/audits", json=body, headers=headers))
        except httpx.HTTPError as exc:
            answers.append(exc)
            break
    return answers


def outcome(answer: httpx.Response | httpx.HTTPError) -> int | str:
    return answer.status_code if isinstance(answer, httpx.Response) else type(answer).__name__


async def submit_all(url: str, headers: dict, requests: list[tuple[dict, str | None]]) -> list[list[httpx.Response]]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=90, limits=limits) as client:
        start = asyncio.Event()
        tasks = [asyncio.create_task(submit(client, start, body, key)) for body, key in requests]
        await asyncio.sleep(0.1)  # every task is waiting on the event: release them together
        start.set()
        return await asyncio.gather(*tasks)


async def read_all(url: str, headers: dict, audit_ids: list[str]) -> list[httpx.Response | httpx.HTTPError]:
    limits = httpx.Limits(max_connections=len(audit_ids), max_keepalive_connections=len(audit_ids))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=90, limits=limits) as client:
        return await asyncio.gather(
            *(client.get(f"/v1/audits/{audit_id}") for audit_id in audit_ids), return_exceptions=True
        )


def test_200_concurrent_submissions_make_one_audit_per_key_and_all_complete(services_stack, digits_case):
    # A tenant of its own, so the audit list holds exactly this test's audits (the database is shared).
    api_key = services_stack.new_key(f"concurrent-{uuid.uuid4().hex[:8]}")
    with services_stack.client(api_key) as client:
        headers = dict(client.headers)
        model = digits_case.upload_model(client)
        assert model.status_code == 201, model.text
        dataset = digits_case.upload_dataset(client)
        assert dataset.status_code == 201, dataset.text
    model_id, dataset_id = model.json()["id"], dataset.json()["id"]

    run = uuid.uuid4().hex[:8]
    keyed = [(audit_spec(model_id, dataset_id, seed=k), f"concurrent-{run}-{k}") for k in range(KEYS)]
    keyless = [(audit_spec(model_id, dataset_id, seed=KEYS + i), None) for i in range(KEYLESS)]
    # Copies of a key interleaved with other requests, not back to back.
    requests = [request for k in range(COPIES) for request in keyed] + keyless
    requests = [requests[i] for i in sorted(range(len(requests)), key=lambda i: (i * 7919) % len(requests))]
    assert len(requests) == KEYS * COPIES + KEYLESS == 200

    started = time.monotonic()
    answers = asyncio.run(submit_all(services_stack.url, headers, requests))
    submitted_s = time.monotonic() - started

    firsts = Counter(outcome(a[0]) for a in answers)
    odd = [a[0] for a in answers if outcome(a[0]) not in (202, 409)]
    assert set(firsts) <= {202, 409}, (
        firsts,
        [getattr(a, "text", repr(a)) for a in odd[:3]],
        services_stack.log("api")[-3000:],
    )
    finals = [a[-1] for a in answers]
    assert all(outcome(r) == 202 for r in finals), [getattr(r, "text", repr(r)) for r in finals if outcome(r) != 202][
        :3
    ]
    assert all(outcome(a) == 409 for attempts in answers for a in attempts[:-1])
    # Only a repeated key is ever 409; a key-less request never conflicts.
    assert all(len(a) == 1 for a, (_, key) in zip(answers, requests, strict=True) if key is None)

    by_key: dict[str, list[httpx.Response]] = defaultdict(list)
    for response, (_, key) in zip(finals, requests, strict=True):
        if key is not None:
            by_key[key].append(response)
    assert len(by_key) == KEYS
    keyed_ids = set()
    for key, responses in by_key.items():
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1, (key, ids)  # every copy got the same audit ...
        created = [r for r in responses if r.headers.get("idempotent-replayed") != "true"]
        assert len(created) == 1, key  # ... created by exactly one of them, replayed to the others
        assert {r.headers["location"] for r in responses} == {created[0].headers["location"]}
        keyed_ids |= ids
    keyless_ids = {r.json()["id"] for r, (_, key) in zip(finals, requests, strict=True) if key is None}
    assert len(keyed_ids) == KEYS and len(keyless_ids) == KEYLESS and not keyed_ids & keyless_ids
    # Each audit has the body its key was sent with.
    seeds = {r.json()["id"]: r.json()["spec"]["seed"] for r in finals}
    for (body, key), response in zip(requests, finals, strict=True):
        assert seeds[response.json()["id"]] == body["seed"], key

    # The database holds exactly these audits, and the worker finishes every one of them.
    expected = keyed_ids | keyless_ids
    deadline = time.monotonic() + 240
    with services_stack.client(api_key) as client:
        while True:
            page = client.get("/v1/audits", params={"limit": 200})
            assert page.status_code == 200, page.text
            page = page.json()
            assert page["total"] == len(expected) == KEYS + KEYLESS
            assert {item["id"] for item in page["items"]} == expected
            statuses = Counter(item["status"] for item in page["items"])
            if set(statuses) <= {"succeeded", "failed", "cancelled"}:
                break
            assert time.monotonic() < deadline, (statuses, services_stack.log("worker")[-3000:])
            time.sleep(1)
    finished_s = time.monotonic() - started
    failed = [(item["id"], item["error"]) for item in page["items"] if item["status"] != "succeeded"]
    assert not failed, (failed[:3], services_stack.log("worker")[-3000:])
    assert all(item["attempts"] == 1 for item in page["items"])  # each ran once: no duplicate claims, no retries
    # 200 concurrent reads (each holds a connection only while it runs on a thread) all answer.
    reads = asyncio.run(read_all(services_stack.url, headers, sorted(expected) * 4))
    assert Counter(outcome(r) for r in reads) == {200: len(reads)}, [getattr(r, "text", r) for r in reads][:3]
    assert "Traceback" not in services_stack.log("api"), services_stack.log("api")[-4000:]
    print(
        f"200 submissions ({firsts[409]} first answered 409) in {submitted_s:.1f} s; "
        f"{len(expected)} audits done after {finished_s:.1f} s"
    )
