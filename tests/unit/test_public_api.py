"""The public surface is a contract: pinned here, so a change to it is a deliberate one."""

from __future__ import annotations

import safepoint

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
