"""The module boundaries written in pyproject.toml hold: a change that breaks one fails here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_importable_package_shadows_the_standard_library_operator_module() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter")


def test_no_import_cycles() -> None:
    """No module imports, directly or through others, a module that imports it back, counting
    imports under TYPE_CHECKING too (cli <-> cli_coordination, client consumer <-> groups <->
    sync, server connection <-> listener, broker <-> coordination_handlers and replication
    node <-> forward/topics were such pairs; the last three now meet through protocols)."""
    import grimp

    for package in ("rustmq", "rustmq_operator"):
        graph = grimp.build_graph(package, exclude_type_checking_imports=False)
        cycles = sorted({
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.chain_exists(importer=imported, imported=module)
        })
        assert cycles == [], f"import cycles in {package}: {cycles}"
