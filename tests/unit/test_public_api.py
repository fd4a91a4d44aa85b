"""The public surface is a contract: pinned here, so a change to it is a deliberate one."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import safepoint
import safepoint.integrations

EXPECTED = [
    "FORMAT_VERSION",
    "AmbiguousCommitError",
    "BackgroundSaveError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "ConfigError",
    "ConversionError",
    "CoordinationError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "GcReport",
    "ImportReport",
    "InvalidStateError",
    "KeyPathError",
    "ManagerClosedError",
    "MigrationError",
    "Migrations",
    "PerRank",
    "Pickled",
    "RNGState",
    "Replace",
    "RestoreError",
    "RestoreReport",
    "SafepointError",
    "SaveHandle",
    "SkippedCheckpoint",
    "StateVersionError",
    "StorageError",
    "UnsafeCheckpointError",
    "VerifyReport",
    "export_checkpoint",
    "import_checkpoint",
    "load",
    "move_key",
    "remove_key",
    "rename_key",
    "restore",
    "save",
    "set_default",
    "verify",
]


def test_all_is_pinned_and_sorted() -> None:
    assert safepoint.__all__ == EXPECTED


def test_every_public_name_exists() -> None:
    missing = [name for name in EXPECTED if not hasattr(safepoint, name)]
    assert missing == []


def test_every_error_is_under_one_root() -> None:
    errors = [getattr(safepoint, n) for n in EXPECTED if n.endswith("Error")]
    assert len(errors) == 18  # the root and its seventeen subclasses
    for error in errors:
        assert issubclass(error, safepoint.SafepointError), error
    assert issubclass(safepoint.ConfigError, ValueError)
    assert issubclass(safepoint.StorageError, OSError)
    assert issubclass(safepoint.AmbiguousCommitError, safepoint.StorageError)
    assert issubclass(safepoint.UnsafeCheckpointError, safepoint.CorruptCheckpointError)
    assert issubclass(safepoint.StateVersionError, safepoint.MigrationError)
    assert issubclass(safepoint.KeyPathError, safepoint.MigrationError)


def test_format_version_is_a_positive_int() -> None:
    assert isinstance(safepoint.FORMAT_VERSION, int)
    assert safepoint.FORMAT_VERSION >= 1


def test_package_ships_py_typed() -> None:
    from importlib.resources import files

    assert files("safepoint").joinpath("py.typed").is_file()


def test_restore_options_and_manager_load_are_keyword_only() -> None:
    import inspect

    load = inspect.signature(safepoint.CheckpointManager.load).parameters
    assert list(load) == ["self", "step", "mmap", "allow_pickle"]
    assert load["step"].default is None
    assert [load[name].kind for name in ("mmap", "allow_pickle")] == [inspect.Parameter.KEYWORD_ONLY] * 2
    for restore in (safepoint.restore, safepoint.CheckpointManager.restore):
        cast = inspect.signature(restore).parameters["cast_dtypes"]
        assert cast.kind is inspect.Parameter.KEYWORD_ONLY
        assert cast.default is False
    assert safepoint.Replace.__module__ == "safepoint"  # the name a manifest records for it


# -- every public name is importable, documented, and the README uses nothing else ------------------------------
#: Public subpackages: importable as modules, outside ``__all__`` (integrations import their framework lazily).
PUBLIC_SUBPACKAGES = ("safepoint.integrations",)
README = Path(__file__).resolve().parents[2] / "README.md"


def _own_doc(value: object) -> str:
    """The docstring written for ``value``; a dataclass's generated ``Name(field: type, ...)`` does not count."""
    if inspect.isclass(value):
        doc = value.__dict__.get("__doc__") or ""
        return "" if doc.startswith(f"{value.__name__}(") else doc
    return getattr(value, "__doc__", None) or ""


@pytest.mark.parametrize("name", EXPECTED)
def test_every_public_name_is_importable_and_documented(name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from safepoint import {name}", namespace)
    value = namespace[name]
    assert value is getattr(safepoint, name)
    if inspect.isclass(value) or callable(value):
        assert _own_doc(value).strip(), f"safepoint.{name} has no docstring"
    else:  # a constant has no docstring of its own: the README says what it is
        assert f"safepoint.{name}" in README.read_text(encoding="utf-8")


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _non_public_uses(code: str) -> list[str]:
    """Imports of safepoint's modules other than the public ones, and ``safepoint.X`` for X not in ``__all__``."""
    public = set(safepoint.__all__)
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "safepoint":
            module = node.module or ""
            if module == "safepoint":
                found += [f"from safepoint import {a.name}" for a in node.names if a.name not in public]
            elif not module.startswith(PUBLIC_SUBPACKAGES):
                found.append(f"from {module} import ...")
        elif isinstance(node, ast.Import):
            found += [
                f"import {a.name}"
                for a in node.names
                if a.name.startswith("safepoint.") and not a.name.startswith(PUBLIC_SUBPACKAGES)
            ]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "safepoint":
            subpackage = f"safepoint.{node.attr}"
            if node.attr not in public and subpackage not in PUBLIC_SUBPACKAGES:
                found.append(subpackage)
    return found


def test_readme_code_uses_only_the_public_surface() -> None:
    blocks = _python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 5  # the parser found the examples: an empty list would make this test pass vacuously
    offending = {index: uses for index, code in enumerate(blocks) if (uses := _non_public_uses(code))}
    assert offending == {}


def test_the_readme_check_catches_private_imports() -> None:
    code = (
        "import safepoint\nfrom safepoint import save, step_dir\nfrom safepoint.manager import save_to\n"
        "import safepoint.gc\nsafepoint.resolve.resolve(x)\nsafepoint.CheckpointManager('d')\n"
        "from safepoint.integrations.lightning import SafepointCheckpoint\nsafepoint.integrations.x\n"
    )
    assert _non_public_uses(code) == [
        "from safepoint import step_dir",
        "from safepoint.manager import ...",
        "import safepoint.gc",
        "safepoint.resolve",
    ]


def test_every_module_but_the_public_surface_is_private() -> None:
    """Users and the integrations import from ``safepoint`` and ``safepoint.integrations`` only: every other
    module's name starts with an underscore, so nothing else reads as supported API."""
    import pkgutil

    public = {info.name for info in pkgutil.iter_modules(safepoint.__path__) if not info.name.startswith("_")}
    assert public == {"integrations"}
    integrations = {
        info.name
        for info in pkgutil.iter_modules(safepoint.integrations.__path__)  # type: ignore[attr-defined]
    }
    assert integrations == {"accelerate", "lightning", "transformers"}
