"""docker/: the compose file gives every service a healthcheck and starts each after those it needs are healthy,
sets every variable the configs need, keeps Redis data, runs and models on volumes, logs on the console, and the image has what
the Dask dashboard needs. No Docker engine runs here: the files are parsed."""

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
    assert "--dir" in SERVICES["redis"]["command"] and "--appendonly" in SERVICES["redis"]["command"]
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
