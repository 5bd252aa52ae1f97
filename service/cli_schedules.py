"""`pruneaudit schedules list | create | pause | resume`: the schedules API from a shell, as the tenant of
$PRUNEAUDIT_API_KEY (or --key)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

API_KEY_ENV = "PRUNEAUDIT_API_KEY"


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict | None:
    """The JSON answer; None (the problem's detail on stderr) for an error."""
    try:
        response = httpx.request(
            method, f"{args.url}{path}", json=body, headers={"X-API-Key": args.key or ""}, timeout=60
        )
    except httpx.HTTPError as exc:
        print(f"schedules: cannot reach {args.url}: {exc}", file=sys.stderr)
        return None
    if response.is_error:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        print(f"schedules: {response.status_code}: {detail}", file=sys.stderr)
        return None
    return response.json()


def line(schedule: dict) -> str:
    timing = (
        f"cron {schedule['cron']!r} {schedule['timezone']}"
        if schedule["cron"]
        else f"every {schedule['interval_s']:g} s"
    )
    state = "paused" if schedule["paused"] else f"next {schedule['next_run_at']}"
    return f"{schedule['id']}  {schedule['name'] or '-'}  {timing}  {state}"


def cmd_schedules(args: argparse.Namespace) -> int:
    if args.action == "list":
        page = call(args, "GET", "/v1/schedules?limit=200")
        if page is None:
            return 1
        for schedule in page["items"]:
            print(line(schedule))
        return 0
    if args.action == "create":
        try:
            spec = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as exc:
            print(f"schedules: cannot read the spec {args.spec}: {exc}", file=sys.stderr)
            return 1
        body = {
            "name": args.name,
            "spec": spec,
            "cron": args.cron,
            "timezone": args.timezone,
            "interval_s": args.interval_s,
            "skip_if_unchanged": args.skip_if_unchanged,
            "change_threshold": args.change_threshold,
        }
        created = call(args, "POST", "/v1/schedules", body)
    else:
        created = call(args, "PATCH", f"/v1/schedules/{args.schedule_id}", {"paused": args.action == "pause"})
    if created is None:
        return 1
    print(line(created))
    return 0


def add_schedule_commands(commands, default_url: str) -> None:
    schedules = commands.add_parser("schedules", help="list, create, pause or resume scheduled audits")
    schedules.add_argument("--url", default=default_url)
    schedules.add_argument("--key", default=os.environ.get(API_KEY_ENV), help=f"API key (default: ${API_KEY_ENV})")
    actions = schedules.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="the tenant's schedules, with their next tick")
    create = actions.add_parser("create", help="a schedule of the audit spec in a JSON file")
    create.add_argument(
        "--spec", required=True, help='JSON file: an audit spec; {"model": {"name": …, "version": "latest"}}'
    )
    timing = create.add_mutually_exclusive_group(required=True)
    timing.add_argument("--cron", help='cron expression, e.g. "0 2 * * *" (02:00 every night)')
    timing.add_argument("--interval-s", type=float, help="instead of --cron: every this many seconds")
    create.add_argument("--timezone", default="UTC", help="IANA zone of --cron, e.g. Europe/Berlin")
    create.add_argument("--name")
    create.add_argument(
        "--skip-if-unchanged", action="store_true", help="no audit when model, dataset and spec are the same"
    )
    create.add_argument("--change-threshold", type=float, default=0.02, help="growth of worst ψ or drop that counts")
    for action in ("pause", "resume"):
        actions.add_parser(action, help=f"{action} a schedule").add_argument("schedule_id")
    schedules.set_defaults(func=cmd_schedules)
