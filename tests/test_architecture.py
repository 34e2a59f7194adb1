"""The folder layout is the architecture: these tests keep it honest."""

from __future__ import annotations

import ast
from pathlib import Path

import providers

ROOT = Path(__file__).resolve().parent.parent
SPECIFIC_PROVIDERS = ("providers.livechat", "providers.local")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, and every name imported from one
    (``from providers import livechat`` is ``providers.livechat`` too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def within(name: str, modules: set[str]) -> bool:
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def test_imports_of_sees_a_provider_imported_by_name(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from providers import livechat\nimport providers.local.console\n")
    names = imports_of(source)
    assert "providers.livechat" in names
    assert "providers.local.console" in names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_core_never_imports_a_specific_provider() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in python_files("hitl_service")
        for name in imports_of(path)
        if name.startswith(SPECIFIC_PROVIDERS)
    ]
    assert offenders == []


def test_providers_never_touch_the_store_or_generated_code() -> None:
    allowed = {"hitl_service.clock", "hitl_service.secret"}
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in python_files("providers")
        for name in imports_of(path)
        if name.startswith("hitl_service") and not within(name, allowed)
    ]
    assert offenders == []


def test_the_registry_names_builtins_by_string_only() -> None:
    registry = ROOT / "providers" / "registry.py"
    assert not any(name.startswith(SPECIFIC_PROVIDERS) for name in imports_of(registry))


def test_providers_exports_are_sorted_and_importable() -> None:
    exported = providers.__all__
    assert exported == sorted(exported)
    for name in exported:
        assert hasattr(providers, name), name
