"""Import rules: pure logic knows nothing of hopeit, Redis or settings; stores know nothing of events."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fraud_poc"
PURE = [
    "schema",
    "features",
    "serving_state",
    "row_predictor",
    "sample_data",
    "validation",
    "training_data",
    "train",
    "report",
    "masking",
    "scored_orders",
    "quality",
]
STORES = [
    "datasets",
    "feature_store",
    "registry",
    "data_steps",
    "training_steps",
    "run_status",
    "step_runner",
    "delivery",
    "redis_store",
    "redis_pipe",
    "redis_server",
    "dask_client",
    "scoring",
    "carry_over",
    "live_models",
]
FORBIDDEN_IN_PURE = (
    "hopeit",
    "redis",
    "fraud_poc.settings",
    "fraud_poc.payloads",
    "fraud_poc.redis_store",
    "fraud_poc.datasets",
    "fraud_poc.feature_store",
    "fraud_poc.registry",
    "fraud_poc.training",
    "fraud_poc.service",
)
FORBIDDEN_IN_STORES = ("hopeit.app", "hopeit.server", "fraud_poc.training", "fraud_poc.service.")


def imported_modules(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            # nbdev exports `from fraud_poc.x import y` as `from .x import y`
            names.add(f"fraud_poc.{node.module}" if node.level else node.module)
    return names


def violations(module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        n
        for n in imported_modules(module)
        if any(n == f or n.startswith(f + ".") or (f.endswith(".") and n.startswith(f)) for f in forbidden)
    )


@pytest.mark.parametrize("module", PURE)
def test_pure_logic_imports_no_service_or_store(module):
    assert violations(module, FORBIDDEN_IN_PURE) == []


@pytest.mark.parametrize("module", STORES)
def test_stores_import_no_events(module):
    assert violations(module, FORBIDDEN_IN_STORES) == []


def test_every_module_is_classified():
    modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    contracts = {"settings", "payloads", "service_payloads", "launcher"}
    contracts |= {"auth"}  # the events' token check and log masking: hopeit, aiohttp, no stores
    contracts |= {"request_errors"}  # strict request parsing and the error schema's 400: aiohttp, no stores
    assert modules - set(PURE) - set(STORES) - contracts == set()


def test_violations_are_detected():
    assert violations("step_runner", ("fraud_poc.run_status",)) == ["fraud_poc.run_status"]
