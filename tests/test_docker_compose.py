"""docker/: the compose file gives every service a healthcheck and starts each after those it needs are healthy,
sets every variable the configs need, keeps Redis data, runs and models on volumes, logs on the console, and the image has what
the Dask dashboard needs; Prometheus scrapes both services' /metrics and Grafana mounts a dashboard whose queries name
metrics the services export. No Docker engine runs here: the files are parsed."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
APPS = ("training", "prediction")


def config_variables(files: list[str]) -> set[str]:
    return {name for f in files for name in re.findall(r"\$\{([A-Z0-9_]+)\}", (ROOT / f).read_text())}


def option(command: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}="))


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck(name):
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] == "CMD" and len(test) > 1, test


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_wait_until_healthy(name):
    depends = SERVICES[name].get("depends_on", {})
    assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
    for other, how in depends.items():
        assert other in SERVICES and how == {"condition": "service_healthy"}, (name, other, how)


def test_services_wait_for_what_they_use():
    assert set(SERVICES["training"]["depends_on"]) == {"redis", "dask-scheduler", "dask-worker"}
    assert set(SERVICES["prediction"]["depends_on"]) == {"redis"}
    assert set(SERVICES["dask-worker"]["depends_on"]) == {"dask-scheduler"}


@pytest.mark.parametrize("name", APPS)
def test_every_config_variable_is_set(name):
    command = SERVICES[name]["command"]
    files = [*option(command, "config-files").split(","), option(command, "api-file")]
    assert all((ROOT / f).is_file() for f in files), files
    environment = SERVICES[name]["environment"]
    missing = config_variables(files) - set(environment)
    assert not missing, f"{name}: ${{VAR}}s of its configs not set: {sorted(missing)}"
    assert environment["FRAUD_REDIS_URL"].startswith("redis://redis:")
    assert environment["DASK_SCHEDULER_ADDRESS"] == "tcp://dask-scheduler:8786"


def test_workers_keep_the_app_environment():
    """A worker's `environment` is merged with the app's, not replacing it."""
    assert set(SERVICES["training"]["environment"]) <= set(SERVICES["dask-worker"]["environment"])


def test_data_logs_and_redis_on_volumes():
    declared = set(COMPOSE["volumes"])
    for name in (*APPS, "dask-scheduler", "dask-worker"):
        service = SERVICES[name]
        assert (
            "fraud-data:/data" in service["volumes"] and service["environment"]["FRAUD_DATA_ROOT"] == "/data"
        )
    assert "redis-data:/data" in SERVICES["redis"]["volumes"] and {"fraud-data", "redis-data"} <= declared
    redis_command = SERVICES["redis"]["command"]
    assert "--dir" in redis_command and "--appendonly" in redis_command
    assert redis_command[redis_command.index("--save") + 1] == ""  # no periodic snapshot: the AOF is durable
    for config in (
        "server.json",
        "server-prediction.json",
    ):  # one console log per service (docker compose logs)
        assert json.loads((ROOT / "config" / config).read_text())["logging"]["console_only"] is True
    assert (
        "WORKDIR /app" in DOCKERFILE and "ln -s /data /app/data" in DOCKERFILE
    )  # data/ under /app: the volume


def test_image_has_the_dashboard_and_the_variables():
    assert re.search(r"pip install .*\bbokeh\b", DOCKERFILE)
    assert "8787:8787" in SERVICES["dask-scheduler"]["ports"]
    variables = config_variables(
        [
            "config/server.json",
            "config/redis-streams.json",
            "config/training-pipeline.json",
            "config/fraud-service.json",
        ]
    )
    missing = {v for v in variables if f"{v}=" not in DOCKERFILE} - {"FRAUD_REDIS_URL"}  # set by compose
    assert not missing, missing


DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fraud-poc.json"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "without", "avg", "max", "min"}


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the services' `/metrics` can show (`fraud_poc.store.metrics` and prometheus_client's process
    collector), with its labels."""
    import fraud_poc.store.metrics  # the project's metrics, in its own registry

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: dict[str, set[str]] = {}
    for family in fraud_poc.store.metrics.METRICS.collect():
        collector = next(
            (c for c in vars(fraud_poc.store.metrics).values() if getattr(c, "_name", None) == family.name),
            None,
        )
        labels = set(getattr(collector, "_labelnames", ())) | (
            {"le"} if family.type == "histogram" else set()
        )
        for suffix in suffixes.get(family.type, ("",)):
            names[family.name + suffix] = labels
    return names


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_prometheus_and_grafana_mount_the_scrape_config_and_dashboard():
    prometheus, grafana = SERVICES["prometheus"], SERVICES["grafana"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/fraud-poc.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.is_file()
    source = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in prometheus["ports"]
    uids = {
        t["datasource"]["uid"]
        for p in json.loads(DASHBOARD.read_text())["panels"]
        for t in p.get("targets", [])
    }
    assert uids == {source["uid"]}
    assert "prometheus-data" in COMPOSE["volumes"]


def test_prometheus_scrapes_both_services_at_metrics():
    from fraud_poc.web.http_metrics import METRICS_PATH

    jobs = {
        j["job_name"]: j
        for j in yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())["scrape_configs"]
    }
    assert set(jobs) == set(APPS) and all(j["metrics_path"] == METRICS_PATH for j in jobs.values())
    assert jobs["training"]["static_configs"][0]["targets"] == [
        f"training:{option(SERVICES['training']['command'], 'port')}"
    ]
    dns = jobs["prediction"]["dns_sd_configs"][0]  # each replica a target
    assert dns["names"] == ["prediction"] and str(dns["port"]) == option(
        SERVICES["prediction"]["command"], "port"
    )


def test_dashboard_queries_name_metrics_the_services_export():
    exported = exported_metrics()
    queries = dashboard_queries()
    assert len(queries) >= 10
    used = set()
    for expr in queries:
        names = set(re.findall(r"\b((?:fraud|process)_[a-z_]+)\b", expr))
        assert names, expr
        unknown = names - set(exported)
        assert not unknown, f"{expr}: not exported: {sorted(unknown)}"
        used |= names
        labels = set().union(*(exported[n] for n in names)) | {"job", "instance"}
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            missing = {label.strip() for label in grouping.split(",")} - labels
            assert not missing, f"{expr}: no label {sorted(missing)}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    # every metric of fraud_poc.store.metrics is on the dashboard
    assert {
        "fraud_http_requests",
        "fraud_http_request_duration_seconds",
        "fraud_http_request_errors",
        "fraud_overload_refusals",
        "fraud_prediction_score",
        "fraud_predictions_flagged",
        "fraud_pipeline_step_duration_seconds",
    } <= families
