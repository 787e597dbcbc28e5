"""Checks of the running container stack, and the result file, for .ci/containers.sh.

    target-up URL --job NAME --timeout S   every target of the job is up (waits for a scrape)
    rules-loaded URL ALERTS_YML            Prometheus loaded every alert in ALERTS_YML
    write-result CHECKS_TSV RESULT_JSON    the checks' rows as JSON; exit 1 if one failed

URL is Prometheus on a loopback address; requests go there directly, never
through a proxy. tests/test_containers.py reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

# Loopback only: no proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _api(base_url: str, path: str) -> dict:
    with _OPENER.open(f"{base_url}{path}", timeout=10) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


def target_up(base_url: str, job: str, timeout: float) -> str:
    """Wait until Prometheus has scraped every target of `job` successfully."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            targets = [
                t for t in _api(base_url, "/api/v1/targets?state=active")["activeTargets"]
                if t["labels"].get("job") == job
            ]  # fmt: skip
            last = ", ".join(f"{t['scrapeUrl']} {t['health']} {t['lastError']}" for t in targets)
            if targets and all(t["health"] == "up" for t in targets):
                return f"{job}: {last.strip()}"
        except OSError as error:  # Prometheus still starting
            last = str(error)
        time.sleep(1)
    raise RuntimeError(f"job {job} not up after {timeout:.0f}s: {last or 'no targets'}")


def rules_loaded(base_url: str, alerts_file: Path) -> str:
    """Every alert in alerts_file is loaded, and Prometheus reports no rule errors."""
    import yaml  # in the dev extra of .venv, which .ci/containers.sh uses

    groups = yaml.safe_load(alerts_file.read_text())["groups"]
    wanted = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    loaded = {}
    for group in _api(base_url, "/api/v1/rules?type=alert")["groups"]:
        for rule in group["rules"]:
            loaded[rule["name"]] = rule["health"]
    missing = wanted - set(loaded)
    unhealthy = {name: health for name, health in loaded.items() if health not in {"ok", "unknown"}}
    if missing or unhealthy:
        raise RuntimeError(f"missing {sorted(missing)}, unhealthy {unhealthy}")
    return f"{len(wanted)} alerts loaded: {', '.join(sorted(wanted))}"


def write_result(
    checks_tsv: Path, result_json: Path, seconds: float, commit: str, tf_base_cached: bool
) -> bool:
    checks = []
    for line in checks_tsv.read_text().splitlines():
        name, passed, check_seconds, detail = line.split("\t")
        checks.append(
            {"name": name, "passed": passed == "true", "seconds": float(check_seconds),
             "detail": detail}
        )  # fmt: skip
    passed = bool(checks) and all(check["passed"] for check in checks)
    result = {
        "passed": passed,
        "seconds": seconds,
        "commit": commit,
        "tf_base_cached": tf_base_cached,
        "checks": checks,
    }
    result_json.write_text(json.dumps(result, indent=2) + "\n")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("target-up")
    up.add_argument("url")
    up.add_argument("--job", required=True)
    up.add_argument("--timeout", type=float, default=60)
    rules = commands.add_parser("rules-loaded")
    rules.add_argument("url")
    rules.add_argument("alerts", type=Path)
    result = commands.add_parser("write-result")
    result.add_argument("checks", type=Path)
    result.add_argument("result", type=Path)
    result.add_argument("--seconds", type=float, required=True)
    result.add_argument("--commit", default="")
    result.add_argument("--tf-base-cached", choices=["true", "false"], default="false")
    args = parser.parse_args(argv)

    if args.command == "write-result":
        ok = write_result(
            args.checks, args.result, args.seconds, args.commit, args.tf_base_cached == "true"
        )
        return 0 if ok else 1
    try:
        if args.command == "target-up":
            print(target_up(args.url, args.job, args.timeout))
        else:
            print(rules_loaded(args.url, args.alerts))
    except (RuntimeError, OSError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
