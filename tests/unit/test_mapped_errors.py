"""mapped_errors: the one place where errors of the OS and of storage backends become safepoint's."""

from __future__ import annotations

import errno

import pytest

from safepoint._errors import (
    CheckpointNotFoundError,
    StorageError,
    UnsafeCheckpointError,
    mapped_errors,
)


def test_an_os_error_becomes_a_storage_error_naming_the_operation_and_path() -> None:
    cause = PermissionError(errno.EACCES, "Permission denied", "/x/y")
    with pytest.raises(StorageError) as caught, mapped_errors("remove", "/x/y"):
        raise cause
    assert str(caught.value) == "cannot remove /x/y: Permission denied [EACCES]"
    assert caught.value.errno == errno.EACCES
    assert caught.value.path == "/x/y"
    assert caught.value.__cause__ is cause


def test_passthrough_and_safepoint_errors_go_through_unchanged() -> None:
    with pytest.raises(FileExistsError), mapped_errors("create", "/x", FileExistsError):
        raise FileExistsError(errno.EEXIST, "File exists")
    with pytest.raises(CheckpointNotFoundError), mapped_errors("read", "/x"):
        raise CheckpointNotFoundError("no committed checkpoint")
    mapped = StorageError("already mapped", errno=errno.EIO)
    with pytest.raises(StorageError) as caught, mapped_errors("read", "/x"):
        raise mapped
    assert caught.value is mapped


def test_only_os_errors_are_mapped_unless_the_backend_asks_for_more() -> None:
    with pytest.raises(KeyError), mapped_errors("read", "/x"):
        raise KeyError("a bug, not an I/O failure")
    with pytest.raises(StorageError) as caught, mapped_errors("list", "s3://b/run", catch=Exception):
        raise RuntimeError()
    assert str(caught.value) == "cannot list s3://b/run: RuntimeError"
    assert caught.value.errno is None


def test_a_backends_missing_file_without_errno_gets_enoent() -> None:
    with pytest.raises(StorageError) as caught, mapped_errors("stat", "s3://b/k", catch=Exception):
        raise FileNotFoundError("b/k")
    assert caught.value.errno == errno.ENOENT
    assert str(caught.value) == "cannot stat s3://b/k: b/k [ENOENT]"


def test_a_symlink_is_unsafe_only_where_refused() -> None:
    with pytest.raises(UnsafeCheckpointError) as caught, mapped_errors("open", "/x/l", refuse_symlinks=True):
        raise OSError(errno.ELOOP, "Too many levels of symbolic links")
    assert str(caught.value) == "refusing to follow a symlink at /x/l"
    with pytest.raises(StorageError) as plain, mapped_errors("open", "/x/l"):
        raise OSError(errno.ELOOP, "Too many levels of symbolic links")
    assert plain.value.errno == errno.ELOOP
