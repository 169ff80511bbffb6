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


def test_no_import_cycles_at_run_time() -> None:
    """No module imports, directly or through others, a module that imports it back (cli <->
    cli_coordination and client consumer <-> groups <-> sync were such pairs). Imports under
    TYPE_CHECKING are left out: they name a type for the checker and never run."""
    import grimp

    for package in ("rustmq", "rustmq_operator"):
        graph = grimp.build_graph(package, exclude_type_checking_imports=True)
        cycles = sorted({
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.chain_exists(importer=imported, imported=module)
        })
        assert cycles == [], f"import cycles in {package}: {cycles}"


def test_no_import_cycles_in_the_server_even_for_type_names() -> None:
    """The server layer has no cycles even counting imports under TYPE_CHECKING (connection <->
    listener and broker <-> coordination_handlers were such pairs): a connection sees its
    listener through the ConnectionRegistry protocol, the broker holds the coordination service
    without naming its type."""
    import grimp

    graph = grimp.build_graph("rustmq", exclude_type_checking_imports=False)
    server = {m for m in graph.modules if m.startswith("rustmq.server.")}
    cycles = sorted({
        tuple(sorted((module, imported)))
        for module in server
        for imported in graph.find_modules_directly_imported_by(module)
        if imported in server and graph.chain_exists(importer=imported, imported=module)
    })
    assert cycles == [], f"import cycles in rustmq.server: {cycles}"
