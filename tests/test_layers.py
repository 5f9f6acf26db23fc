"""Import rules by allowlist: every module of the package has a layer, and imports go to its own layer or below.

Layers, lowest first: pure logic (pandas, numpy, Dask, XGBoost: no hopeit, Redis, aiohttp or settings);
contracts (settings and payloads); stores and steps (Redis, Dask, files: no hopeit app or server);
event support (the events' shared request handling, answers and pipeline chain); events (`fraud_poc.training`,
`fraud_poc.service`); the launcher, which runs the services. Within the events' layer, an event module (one that
declares `__steps__`) imports no other event module: what two events share goes down to event support.
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
    EVENT_SUPPORT: {
        "auth",
        "request_errors",
        "overload",
        "http_metrics",
        "event_kit",  # both services' __preprocess__/__postprocess__ and the registry's refusals
        "pipeline_events",  # the training chain checked against the config, steps run, runs registered
        "event_trial",  # an event run through hopeit's test harness on an example (the event notebooks)
    },
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


def source_of(module: str) -> Path:
    """The file of a module given as a dotted name (a package's `__init__.py`)."""
    path = PACKAGE.parent / Path(*module.split("."))
    return (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")


def is_event(module: str) -> bool:
    """Whether a module of an event package is an event: hopeit runs it, so it declares `__steps__`."""
    source = source_of(module)
    if module.split(".")[1] not in LAYERS[EVENTS] or not source.is_file():
        return False
    for node in ast.parse(source.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__steps__" for t in targets):
            return True
    return False


def imports(module: str) -> set[str]:
    """Absolute names of everything `module` imports; `from . import x` and `from .. import x` resolved."""
    source = source_of(module)
    is_package = source.name == "__init__.py"
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
            elif own == EVENTS and is_event(module) and is_event(name):
                found.append(
                    f"{name} (an event importing another event: move what they share to event support)"
                )
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


def test_an_event_importing_another_event_is_detected(tmp_path, monkeypatch):
    fake = tmp_path / "fraud_poc"
    (fake / "training").mkdir(parents=True)
    (fake / "training" / "__init__.py").write_text("")
    (fake / "training" / "clean_runs.py").write_text('__steps__ = ["clean"]\n')
    (fake / "training" / "helpers.py").write_text("HELP = 1\n")  # a module of the package, not an event
    (fake / "training" / "train_model.py").write_text(
        'from .clean_runs import clean\nfrom . import helpers\nfrom ..event_kit import answer\n__steps__ = ["train"]\n'
    )
    (fake / "training" / "not_an_event.py").write_text("from .clean_runs import clean\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations("fraud_poc.training.train_model") == [
        "fraud_poc.training.clean_runs (an event importing another event: move what they share to event support)"
    ]
    assert violations("fraud_poc.training.not_an_event") == []
    assert (is_event("fraud_poc.training.clean_runs"), is_event("fraud_poc.training.helpers")) == (
        True,
        False,
    )
