"""Import rules by allowlist: every module of the package has a layer, and imports go to its own layer or below.

Layers, lowest first: pure logic (pandas, numpy, Dask, XGBoost: no hopeit, Redis, aiohttp or settings);
contracts (settings and payloads); stores and steps (Redis, Dask, files: no hopeit app or server);
event support (the events' shared request handling); events (`fraud_poc.training`, `fraud_poc.service`);
the launcher, which runs the services.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fraud_poc"
PURE, CONTRACTS, STORES, EVENT_SUPPORT, EVENTS, LAUNCHER = range(6)
LAYERS = {
    PURE: {
        "schema",
        "masking",
        "features",
        "serving_state",
        "resp",  # Redis commands encoded in bulk (numpy, no connection)
        "row_predictor",
        "generator",
        "validation",
        "train",
        "report",
        "scored_orders",
        "quality",
        "health",
    },
    CONTRACTS: {"settings", "payloads", "service_payloads"},
    STORES: {
        "redis_store",
        "redis_pipe",
        "redis_server",
        "dask_client",
        "datasets",
        "exchange",  # rows sent between partitions as Arrow files (steps 2 and 3)
        "registry",
        "feature_store",
        "run_status",
        "delivery",
        "step_runner",
        "steps",  # the six pipeline steps' work, one module each
        "store_scripts",
        "serving_model",
        "batching",
        "scorer",
        "carry_over",
        "live_models",
        "health_log",
        "metrics",  # the metrics themselves (prometheus_client only)
    },
    EVENT_SUPPORT: {"auth", "request_errors", "overload", "http_metrics"},
    EVENTS: {
        "training",
        "service",
        "stream_pool",
    },  # the event packages (stream_pool: the plugin SETUP event)
    LAUNCHER: {"launcher"},
}
# Third-party packages a layer may not import (a prefix matches the package and its submodules).
FORBIDDEN = {
    PURE: ("hopeit", "redis", "aiohttp"),
    CONTRACTS: ("redis", "aiohttp", "distributed", "xgboost"),
    STORES: ("hopeit.app", "hopeit.server", "aiohttp"),
}


def layer_of(module: str) -> int:
    """The layer of a module given as `fraud_poc.x` or `fraud_poc.x.y` (an event package's module)."""
    top = module.split(".")[1]
    found = [layer for layer, names in LAYERS.items() if top in names]
    assert found, f"module {module} has no layer: add it to LAYERS in tests/test_layers.py"
    return found[0]


def package_modules() -> list[str]:
    """Every module of the package, recursively, as dotted names (`__init__` files as their package)."""
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1 and not parts[-1].startswith("_"):
            modules.append(".".join(parts))
    return modules


def imports(module: str) -> set[str]:
    """Absolute names of everything `module` imports; `from . import x` and `from .. import x` resolved."""
    path = PACKAGE.parent / Path(*module.split("."))
    is_package = path.is_dir()
    source = (path / "__init__.py") if is_package else path.with_suffix(".py")
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                names.add(target)
            else:  # `from . import x`: x is a module of that package
                names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def violations(module: str) -> list[str]:
    own = layer_of(module)
    found = []
    for name in sorted(imports(module)):
        if name == "fraud_poc":
            found.append(f"{name} (import the module, not the package)")
        elif name.startswith("fraud_poc."):
            if layer_of(name) > own:
                found.append(f"{name} (layer {layer_of(name)} above {own})")
        elif any(name == f or name.startswith(f + ".") for f in FORBIDDEN.get(own, ())):
            found.append(f"{name} (not allowed in layer {own})")
    return found


@pytest.mark.parametrize("module", package_modules())
def test_imports_go_to_the_same_layer_or_below(module):
    assert violations(module) == []


def test_every_module_has_a_layer_and_every_layer_entry_a_module():
    tops = {m.split(".")[1] for m in package_modules()}
    for module in package_modules():
        layer_of(module)
    assert set().union(*LAYERS.values()) == tops


def test_violations_are_detected(tmp_path, monkeypatch):
    assert "fraud_poc.step_runner (layer 2 above 0)" not in violations("fraud_poc.features")
    # a pure module importing a store, and `from . import x` (the form the old check missed), are both caught
    fake = tmp_path / "fraud_poc"
    fake.mkdir()
    (fake / "features.py").write_text(
        "from . import redis_store\nfrom .step_runner import run_step\nimport redis\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations("fraud_poc.features") == [
        "fraud_poc.redis_store (layer 2 above 0)",
        "fraud_poc.step_runner (layer 2 above 0)",
        "redis (not allowed in layer 0)",
    ]
