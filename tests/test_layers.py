"""Import rules by package: `fraud_poc` is built of domain packages in layers, and a module imports only its own
package, packages of lower layers, and the third-party libraries its layer allows.

Layers, lowest first (each package's `__init__` says what it owns):
0. `core`: contracts (schema, settings, payloads, masking);
1. `features`: the orders and their features, pure;
2. `model`: models and their quality, pure;
3. `store`: what is kept, on disk and in Redis;
4. `pipeline` and `serving`: the work of the two services, without hopeit;
5. `web`: what the events of both services share;
6. the events (`stream_pool`, `training`, `service`): one module per event (a module hopeit runs declares
   `__steps__`), none importing another event: what two events share goes down to `web`;
7. `launcher`, which runs the services.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fraud_poc"
LAYERS = {
    "core": 0,
    "features": 1,
    "model": 2,
    "store": 3,
    "pipeline": 4,
    "serving": 4,
    "web": 5,
    "stream_pool": 6,
    "training": 6,
    "service": 6,
    "launcher": 7,
}
EVENT_PACKAGES = ("stream_pool", "training", "service")
PURE = ("hopeit", "redis", "aiohttp")
# Third-party packages a package may not import (a prefix matches the package and its submodules).
FORBIDDEN = {
    "core": ("redis", "aiohttp", "distributed", "xgboost", "hopeit.app", "hopeit.server"),
    "features": PURE,
    "model": PURE,
    "store": ("hopeit.app", "hopeit.server", "aiohttp"),
    "pipeline": ("hopeit.app", "hopeit.server", "aiohttp"),
    "serving": ("hopeit.app", "hopeit.server", "aiohttp"),
}


def package_of(module: str) -> str:
    """The package of a module given as `fraud_poc.package.module` (or `fraud_poc.launcher`)."""
    top = module.split(".")[1]
    assert top in LAYERS, (
        f"{module} is in no package of the layers: add its package to LAYERS in tests/test_layers.py"
    )
    return top


def package_modules() -> list[str]:
    """Every module of the library, recursively, as dotted names (`__init__` files as their package)."""
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
    if module.split(".")[1] not in EVENT_PACKAGES or not source.is_file():
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
    own = package_of(module)
    found = []
    for name in sorted(imports(module)):
        if name == "fraud_poc":
            found.append(f"{name} (import the module, not the package)")
        elif name.startswith("fraud_poc."):
            other = package_of(name)
            if LAYERS[other] > LAYERS[own] or (LAYERS[other] == LAYERS[own] and other != own):
                found.append(f"{name} ({other}, layer {LAYERS[other]}, not below {own}, layer {LAYERS[own]})")
            elif is_event(module) and is_event(name):
                found.append(f"{name} (an event importing another event: move what they share to web)")
        elif any(name == f or name.startswith(f + ".") for f in FORBIDDEN.get(own, ())):
            found.append(f"{name} (not allowed in {own})")
    return found


@pytest.mark.parametrize("module", package_modules())
def test_imports_go_to_the_same_package_or_below(module):
    assert violations(module) == []


def test_every_package_has_a_layer_and_says_what_it_owns():
    tops = {m.split(".")[1] for m in package_modules()}
    assert tops == set(LAYERS)
    for name in set(LAYERS) - {"launcher"}:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"fraud_poc/{name}/__init__.py says nothing of what the package owns"


def test_violations_are_detected(tmp_path, monkeypatch):
    # a pure module importing the store, `from .. import x` (a form an older check missed), a forbidden library,
    # and an event importing another event are all caught
    fake = tmp_path / "fraud_poc"
    (fake / "features").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "features" / "definitions.py").write_text(
        "from ..store import redis_store\nfrom fraud_poc.pipeline.step_runner import run_step\nimport redis\n"
    )
    (fake / "training" / "prepare_db.py").write_text('__steps__ = ["prepare"]\n')
    (fake / "training" / "helpers.py").write_text("HELP = 1\n")  # a module of the package, not an event
    (fake / "training" / "rollback.py").write_text(
        'from .prepare_db import x\nfrom . import helpers\nfrom ..web import auth\n__steps__ = ["roll"]\n'
    )
    (fake / "training" / "not_an_event.py").write_text("from .prepare_db import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations("fraud_poc.features.definitions") == [
        "fraud_poc.pipeline.step_runner (pipeline, layer 4, not below features, layer 1)",
        "fraud_poc.store (store, layer 3, not below features, layer 1)",
        "redis (not allowed in features)",
    ]
    assert violations("fraud_poc.training.rollback") == [
        "fraud_poc.training.prepare_db (an event importing another event: move what they share to web)"
    ]
    assert violations("fraud_poc.training.not_an_event") == []
    assert (is_event("fraud_poc.training.prepare_db"), is_event("fraud_poc.training.helpers")) == (
        True,
        False,
    )
