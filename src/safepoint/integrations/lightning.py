"""Lightning: safe checkpoints for ``Trainer`` and ``Fabric`` with one line, and a verified ``load_from_checkpoint``.

>>> trainer = Trainer(plugins=[SafepointCheckpointIO()])                       # doctest: +SKIP
>>> fabric = Fabric(plugins=[SafepointCheckpointIO()])                         # doctest: +SKIP
>>> model = load_from_checkpoint(MyModule, "checkpoints/last.ckpt")            # doctest: +SKIP

What Lightning does (2.6): ``ModelCheckpoint`` and ``fabric.save`` hand a dict to ``CheckpointIO.save_checkpoint``
on global rank 0; ``last.ckpt`` is overwritten in place; ``ckpt_path="last"`` picks the ``last*.ckpt`` with the
newest modification time without reading it; ``LightningModule.load_from_checkpoint`` calls ``torch.load``
itself, bypassing the plugin.

What this module owns. Every path Lightning names (``epoch=0-step=4.ckpt``, ``last.ckpt``, ``fabric.save``'s path)
is a directory holding a :class:`safepoint.CheckpointManager` with one committed step:

- A new path is written as a manager under a hidden sibling name (``.last.ckpt.safepoint-tmp-...``) and renamed
  to its Lightning name once committed (then the parent directory is fsynced): the path is absent until complete.
- Saving to a path that exists commits the next step inside it; the manager's retention (``keep_last=1``)
  removes the previous step only once the new one is durable. So ``last.ckpt`` is always complete.
- ``remove_checkpoint`` renames the directory to a hidden name before deleting it (on object stores: deletes
  the manifests first), so a path is never seen half-deleted.
- ``load_checkpoint`` verifies every byte before it returns. A damaged or empty ``last*.ckpt`` (what
  ``ckpt_path="last"`` resolves to) falls back to the newest checkpoint next to it that verifies, with a warning
  naming what it skipped and why; any other damaged path raises: nothing is ever silently started from scratch.
- Nothing is pickled: Lightning's dict goes through safepoint's codec, which stores hyper-parameters (numbers,
  strings, lists, dicts, None, paths, ``Namespace``, ``AttributeDict``) exactly. A value it cannot store exactly
  is refused at save time, naming its key path and the opt-in ``pickle_keys=[key]``.

On object stores (``s3://``, through ``storage_options``) there is no rename: a new path's prefix appears with
its first object, and readers treat it as absent until its manifest is committed. Lightning's own
``ckpt_path="last"`` asks the store for the modification time of a prefix, which S3 does not have: resume from
an explicit path there.

It must never: import safepoint's private modules, write or read a pickle unless ``pickle_keys`` names the key,
or delete a checkpoint before its replacement is durable.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import shutil
import socket
import threading
import uuid
import warnings
from collections.abc import Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

try:
    import fsspec
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as err:  # pragma: no cover - tested in a subprocess where lightning cannot be imported
    raise ImportError(
        f"safepoint.integrations.lightning needs Lightning (>= 2.6): pip install 'safepoint[lightning]' ({err})"
    ) from err

import safepoint

__all__ = ["SafepointCheckpointIO", "load_from_checkpoint"]

_LAST_NAME = re.compile(r"^last.*\.ckpt$")  # ModelCheckpoint's CHECKPOINT_NAME_LAST, with its -vN versions
_HIDDEN_TEMP = ".safepoint-tmp-"
_HIDDEN_TRASH = ".safepoint-trash-"
_HOST = socket.gethostname().replace("-", "_")  # a temp name says which process may still be writing it
_LEFTOVER = re.compile(
    rf"^\..+?(?:{re.escape(_HIDDEN_TEMP)}(?P<host>[^-]+)-(?P<pid>\d+)-|{re.escape(_HIDDEN_TRASH)})[0-9a-f]{{32}}$"
)
_MAX_OPEN_MANAGERS = 2  # e.g. last.ckpt and one more: each keeps its staging buffers for the next save
_ModuleT = TypeVar("_ModuleT", bound=LightningModule)


@dataclass(frozen=True)
class _Location:
    """One Lightning path: a local path or a URL, with the fsspec file system that reaches it."""

    url: str  # a local path (never file://), or a URL
    options: Mapping[str, Any]  # fsspec's, for URLs; always empty for a local path

    @classmethod
    def of(cls, path: Any, options: Mapping[str, Any]) -> _Location:
        url = _url(path).removeprefix("file://")
        return cls(url, {} if "://" not in url else dict(options))

    @property
    def local(self) -> bool:
        return "://" not in self.url

    def fs(self) -> tuple[Any, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        return fs, str(root)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def parent(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[0] if "/" in self.url.rstrip("/") else "."

    def sibling(self, name: str) -> _Location:
        return _Location(f"{self.parent()}/{name}", self.options)

    def exists(self) -> bool:
        if self.local:
            return os.path.lexists(self.url)
        fs, root = self.fs()
        return bool(fs.exists(root))

    def is_real_dir(self) -> bool:
        """A directory, not a link to one (save_last="link" links; a link is replaced, never written through)."""
        if self.local:
            return os.path.isdir(self.url) and not os.path.islink(self.url)
        fs, root = self.fs()
        return bool(fs.isdir(root))


class SafepointCheckpointIO(CheckpointIO):
    """Lightning's ``CheckpointIO`` through safepoint: atomic, durable, verified, pickle-free checkpoints.

    ``Trainer(plugins=[SafepointCheckpointIO()])`` or ``Fabric(plugins=[SafepointCheckpointIO()])``; nothing
    else changes. See the module docstring for what a path on disk is and what each operation guarantees.

    ``blocking=False`` saves in the background: ``save_checkpoint`` returns once the tensors are copied into host
    staging buffers (safepoint's async save); writing, checksums, the commit, the rename to the Lightning name
    and retention run on a thread. The next save, ``remove_checkpoint``, ``load_checkpoint``, :meth:`wait` and
    ``teardown`` (the end of ``fit``) first wait for it; a background failure is raised once, by the first of
    them, as :class:`safepoint.BackgroundSaveError` (its ``__cause__`` is the original error).
    ``max_staging_bytes`` bounds those buffers (default: one copy of the state).

    ``storage_options`` go to fsspec for URLs (``{"client_kwargs": {"endpoint_url": ...}}`` for S3);
    ``trainer.save_checkpoint(path, storage_options=...)`` adds to them for one call.

    ``pickle_keys`` is the explicit opt-in for values safepoint cannot store exactly (e.g. a loss module in the
    hyper-parameters): key paths such as ``"hyper_parameters/loss"`` are stored with :class:`safepoint.Pickled`
    and unpickled when loaded. Use it only for checkpoints whose readers trust their writer.

    With DDP, Lightning saves on global rank 0 only and every rank loads: the managers here are opened with
    ``distributed=False``, so a save never waits for ranks that do not call it, and each rank verifies what it
    loads on its own (a file system every rank sees is assumed, as Lightning assumes it).
    """

    def __init__(
        self,
        *,
        blocking: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        pickle_keys: Collection[str] = (),
        max_staging_bytes: int | None = None,
    ) -> None:
        if not isinstance(blocking, bool):
            raise safepoint.ConfigError(f"blocking must be True or False, not {blocking!r}")
        if isinstance(pickle_keys, str) or not all(isinstance(key, str) and key for key in pickle_keys):
            raise safepoint.ConfigError(f"pickle_keys must be a collection of key paths, not {pickle_keys!r}")
        self._blocking = blocking
        self._options = _check_options(storage_options, "storage_options")
        self._pickle_keys = tuple(pickle_keys)
        self._max_staging_bytes = max_staging_bytes
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, int, Future[None]]] = []
        self._managers: dict[str, safepoint.CheckpointManager] = {}  # paths saved to more than once, oldest first
        # removals put off while a link (save_last="link") still names the directory: done once none does
        self._deferred: set[str] = set()
        # one call at a time: Lightning's AsyncCheckpointIO calls save on its thread and remove on the caller's
        self._lock = threading.RLock()

    # -- CheckpointIO --------------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Commit ``checkpoint`` at ``path``: complete there, or nothing new there (see the module docstring)."""
        with self._lock:
            self._wait()
            self._remove_deferred()
            if not isinstance(checkpoint, Mapping):
                raise safepoint.ConfigError(f"a checkpoint is a dict, not {type(checkpoint).__name__}")
            extra = _check_options(storage_options, "storage_options of this save")
            where = _Location.of(path, {**self._options, **extra})
            state = _with_pickled(dict(checkpoint), self._pickle_keys)
            if where.is_real_dir():
                self._save_next_step(where, state)
            elif where.local:
                self._save_new_local(where, state)
            else:
                self._save_new_remote(where, state)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path``, every byte verified; ``weights_only`` is accepted and has nothing to do:
        nothing is unpickled unless ``pickle_keys`` names it. ``map_location``: None (CPU tensors), a device or
        its name."""
        device = _check_map_location(map_location)
        with self._lock:
            self._wait()
            checkpoint = self._read(_Location.of(path, self._options))
        return _moved(checkpoint, device) if device is not None else checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint at ``path`` (nothing if it does not exist); it is never seen half-removed."""
        with self._lock:
            self._wait()
            where = _Location.of(path, self._options)
            self._forget(where.url)
            if not where.local:
                _remove_remote(where)
            elif _linked(where.url):
                # Lightning removes the previous top-k before it re-links last.ckpt: removing it now would leave
                # last.ckpt dangling, and Lightning would then resume from scratch
                self._deferred.add(os.path.abspath(where.url))
            else:
                _remove_local(where.url)
            self._remove_deferred()

    def teardown(self) -> None:
        """Wait for a background save, close what is open, and raise a background failure not raised yet."""
        with self._lock:
            try:
                self._wait()
                self._remove_deferred()
            finally:
                managers, self._managers = list(self._managers.values()), {}
                for manager in managers:
                    manager.close()
                if self._executor is not None:
                    self._executor.shutdown(wait=True)
                    self._executor = None

    def wait(self) -> None:
        """Wait until every background save is durable (or failed); raise a failure not raised yet, once."""
        with self._lock:
            self._wait()

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        failure: tuple[str, int, BaseException] | None = None
        for path, step, future in pending:
            error = future.exception()
            if error is not None and failure is None:
                failure = (path, step, error)
        if failure is not None:
            path, step, error = failure
            raise safepoint.BackgroundSaveError(
                f"the background save of {path} failed: {error}", step=step, errno=getattr(error, "errno", None)
            ) from error

    def _remove_deferred(self) -> None:
        for path in sorted(self._deferred):
            if not _linked(path):
                self._deferred.discard(path)
                _remove_local(path)

    # -- saving --------------------------------------------------------------------------------------------------
    def _save_next_step(self, where: _Location, state: dict[str, Any]) -> None:
        manager = self._manager(where)
        latest = manager.latest_step()
        step = 0 if latest is None else latest + 1
        if self._blocking:
            _saved(where, lambda: manager.save(step, state))
            return
        handle = _saved(where, lambda: manager.save(step, state, blocking=False))
        self._submit(where.url, step, lambda: _discard(handle.result()))

    def _save_new_local(self, where: _Location, state: dict[str, Any]) -> None:
        os.makedirs(where.parent(), exist_ok=True)
        _collect_leftovers(where.parent())
        temp = where.sibling(f".{where.name}{_HIDDEN_TEMP}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")
        manager = self._open(temp)

        def publish() -> None:
            manager.close()
            _publish_local(temp.url, where.url)

        try:
            if self._blocking:
                _saved(where, lambda: manager.save(0, state))
                publish()
                return
            handle = _saved(where, lambda: manager.save(0, state, blocking=False))
        except BaseException:
            _abandon(manager, temp.url)
            raise

        def finish() -> None:
            try:
                handle.result()
                publish()
            except BaseException:
                _abandon(manager, temp.url)
                raise

        self._submit(where.url, 0, finish)

    def _save_new_remote(self, where: _Location, state: dict[str, Any]) -> None:
        manager = self._open(where)  # no rename on object stores: visible to readers only once committed
        try:
            if self._blocking:
                _saved(where, lambda: manager.save(0, state))
                manager.close()
                return
            handle = _saved(where, lambda: manager.save(0, state, blocking=False))
        except BaseException:
            manager.close()
            raise

        def finish() -> None:
            try:
                handle.result()
            finally:
                manager.close()

        self._submit(where.url, 0, finish)

    def _open(self, where: _Location) -> safepoint.CheckpointManager:
        return safepoint.CheckpointManager(
            where.url,
            keep_last=1,
            storage_options=dict(where.options),
            max_staging_bytes=self._max_staging_bytes,
            distributed=False,  # Lightning saves on global rank 0 only: the others never call
        )

    def _manager(self, where: _Location) -> safepoint.CheckpointManager:
        """The open manager of an existing path (kept open so that background saves reuse its buffers)."""
        manager = self._managers.pop(where.url, None)
        if manager is None:
            manager = self._open(where)
        self._managers[where.url] = manager  # now the newest
        while len(self._managers) > _MAX_OPEN_MANAGERS:
            self._forget(next(iter(self._managers)))
        return manager

    def _forget(self, url: str) -> None:
        manager = self._managers.pop(url, None)
        if manager is not None:
            manager.close()

    def _submit(self, path: str, step: int, job: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safepoint-lightning")
        self._pending.append((path, step, self._executor.submit(job)))

    # -- loading -------------------------------------------------------------------------------------------------
    def _read(self, where: _Location) -> dict[str, Any]:
        try:
            return self._read_one(where)
        except (safepoint.CorruptCheckpointError, safepoint.CheckpointNotFoundError) as err:
            if not (_LAST_NAME.match(where.name) and where.exists()):
                raise
            failure = err
        for candidate in self._neighbours(where):
            try:
                checkpoint = self._read_one(candidate)
            except (safepoint.CorruptCheckpointError, safepoint.CheckpointNotFoundError) as err:
                warnings.warn(f"safepoint: skipping {candidate.url}: {err}", stacklevel=3)
                continue
            warnings.warn(
                f"safepoint: {where.url} cannot be used ({failure}); resuming from {candidate.url} instead, the "
                "newest checkpoint next to it that verifies",
                stacklevel=3,
            )
            return checkpoint
        raise safepoint.CorruptCheckpointError(
            f"{where.url} cannot be used ({failure}), and no checkpoint next to it verifies: refusing to start "
            "from scratch; pass an explicit ckpt_path, or ckpt_path=None to start over",
            path=where.url,
        ) from failure

    def _read_one(self, where: _Location) -> dict[str, Any]:
        if where.local and os.path.islink(where.url):  # save_last="link": read what Lightning linked to
            where = _Location(os.path.realpath(where.url), where.options)
        if not where.exists():
            raise safepoint.CheckpointNotFoundError(f"{where.url} does not exist")
        if where.local and not os.path.isdir(where.url):  # a link to a directory is read through
            raise safepoint.CheckpointNotFoundError(
                f"{where.url} is a file, not a checkpoint written by SafepointCheckpointIO (a torch.save file from "
                "Lightning's default CheckpointIO?); safepoint never unpickles it"
            )
        with safepoint.CheckpointManager(where.url, storage_options=dict(where.options), distributed=False) as manager:
            checkpoint, report = manager.load(allow_pickle=list(self._pickle_keys))
        for skipped in report.skipped:
            warnings.warn(f"safepoint: {where.url}: skipped {skipped.path}: {skipped.reason}", stacklevel=4)
        return checkpoint

    def _neighbours(self, where: _Location) -> list[_Location]:
        """The other checkpoints in ``where``'s directory, newest commit first."""
        fs, root = where.fs()
        parent = root.rstrip("/").rsplit("/", 1)[0]
        found: list[tuple[float, _Location]] = []
        for entry in fs.ls(parent, detail=True):
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "directory" or name.startswith(".") or not name.endswith(".ckpt"):
                continue
            if name == where.name:
                continue
            candidate = where.sibling(name)
            try:
                with safepoint.CheckpointManager(
                    candidate.url, storage_options=dict(where.options), distributed=False
                ) as manager:
                    infos = manager.checkpoints()
            except safepoint.SafepointError as err:  # not one of ours (e.g. a safepoint.save directory)
                warnings.warn(f"safepoint: skipping {candidate.url}: {err}", stacklevel=4)
                continue
            if infos:
                found.append((infos[-1].created, candidate))
        return [candidate for _, candidate in sorted(found, key=lambda item: item[0], reverse=True)]


def load_from_checkpoint(
    cls: type[_ModuleT],
    checkpoint_path: Any,
    *,
    map_location: Any | None = None,
    strict: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
    pickle_keys: Collection[str] = (),
    **kwargs: Any,
) -> _ModuleT:
    """``cls.load_from_checkpoint(checkpoint_path, **kwargs)`` for checkpoints written by SafepointCheckpointIO.

    Mirrors ``LightningModule.load_from_checkpoint`` of Lightning 2.6 (``lightning.pytorch.core.saving``),
    which calls ``torch.load`` itself and so cannot read these checkpoints: the module is built from the saved
    ``hyper_parameters`` updated with ``kwargs`` (passed whole as ``hparams_name`` when ``__init__`` takes
    them under that name; otherwise only the names ``__init__`` accepts, unless it takes ``**kwargs``), then
    ``configure_model()`` if overridden, ``on_load_checkpoint(checkpoint)``, and ``load_state_dict`` (strict
    unless ``strict=False`` or the module's ``strict_loading`` says otherwise; missing and unexpected keys are
    warned about when not strict). ``map_location`` (a device or its name) moves the module there; by default it
    stays on the CPU. Every byte is verified before the module is built. Lightning's ``hparams_file`` and
    the ``_instantiator`` of LightningCLI are not supported.
    """
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise safepoint.ConfigError(f"cls must be a LightningModule subclass, not {cls!r}")
    device = _check_map_location(map_location)
    reader = SafepointCheckpointIO(storage_options=storage_options, pickle_keys=pickle_keys)
    checkpoint = reader.load_checkpoint(checkpoint_path)
    model = cls(**_init_arguments(cls, checkpoint, kwargs))
    if is_overridden("configure_model", model):
        model.configure_model()
    model.on_load_checkpoint(checkpoint)
    if strict is not None and model._strict_loading is not None and strict != model.strict_loading:
        raise safepoint.ConfigError(
            f"strict={strict!r} conflicts with {cls.__name__}.strict_loading={model.strict_loading!r}"
        )
    keys = model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading if strict is None else strict)
    if keys.missing_keys:
        warnings.warn(f"keys in the model but not in {checkpoint_path}: {keys.missing_keys}", stacklevel=2)
    if keys.unexpected_keys:
        warnings.warn(f"keys in {checkpoint_path} but not in the model: {keys.unexpected_keys}", stacklevel=2)
    return model.to(device) if device is not None else model


def _init_arguments(
    cls: type[LightningModule], checkpoint: Mapping[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    saved = checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    if not isinstance(saved, Mapping):
        raise safepoint.ConfigError(f"the checkpoint's hyper_parameters are a {type(saved).__name__}, not a dict")
    hparams = {**saved, **overrides}
    signature = inspect.signature(cls.__init__)
    parameters = [p for name, p in signature.parameters.items() if name != "self"]
    names = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    name = checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_NAME)
    if isinstance(name, str) and name in names:
        return {name: hparams}
    return hparams if takes_any else {key: value for key, value in hparams.items() if key in names}


# -- helpers ---------------------------------------------------------------------------------------------------
def _url(path: Any) -> str:
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    raise safepoint.ConfigError(f"a checkpoint path is a str or os.PathLike, not {type(path).__name__}")


def _check_options(options: Any, what: str) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise safepoint.ConfigError(f"{what} must be a dict of fsspec options, not {options!r}")
    return dict(options)


def _check_map_location(value: Any) -> torch.device | None:
    if value is None:
        return None
    if isinstance(value, (str, torch.device)):
        return torch.device(value)
    raise safepoint.ConfigError(f"map_location must be None, a torch.device or a device name, not {value!r}")


def _with_pickled(checkpoint: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` whose values at ``keys`` (``/``-separated) are wrapped in Pickled."""
    for key in keys:
        parts = key.split("/")
        node: dict[Any, Any] = checkpoint
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                break
            node[part] = child = copy.copy(child)
            node = child
        else:
            if parts[-1] in node:
                node[parts[-1]] = safepoint.Pickled(node[parts[-1]])
    return checkpoint


def _saved(where: _Location, save: Any) -> Any:
    """Run ``save``; a value safepoint refuses is re-raised naming the Lightning path and the opt-in."""
    try:
        return save()
    except safepoint.InvalidStateError as err:
        raise safepoint.InvalidStateError(
            f"{err} (in the Lightning checkpoint {where.url}). If you trust whoever will load this checkpoint, "
            f"store the value pickled instead: SafepointCheckpointIO(pickle_keys=[{err.key!r}])",
            key=err.key,
        ) from err


def _discard(_: object) -> None:
    return None


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        moved = copy.copy(value)
        for key, item in value.items():
            moved[key] = _moved(item, device)
        return moved
    if type(value) in (list, tuple):
        return type(value)(_moved(item, device) for item in value)
    return value


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_local(temp: str, target: str) -> None:
    """Rename the committed ``temp`` to ``target``. A file or link already there (a torch checkpoint, or
    save_last="link") is moved aside first and deleted only once the new directory is in place and synced."""
    parent = os.path.dirname(os.path.abspath(target))
    aside = None
    if os.path.lexists(target):
        aside = os.path.join(parent, f".{os.path.basename(target)}{_HIDDEN_TRASH}{uuid.uuid4().hex}")
        os.rename(target, aside)
    os.rename(temp, target)
    _fsync_dir(parent)
    if aside is not None:
        _delete_local(aside)


def _linked(path: str) -> bool:
    """Whether another entry of ``path``'s directory is a symbolic link to it."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    parent, target = os.path.dirname(os.path.abspath(path)), os.path.realpath(path)
    with os.scandir(parent) as entries:
        return any(entry.is_symlink() and os.path.realpath(entry.path) == target for entry in entries)


def _remove_local(path: str) -> None:
    if not os.path.lexists(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        _fsync_dir(parent)
        return
    aside = os.path.join(parent, f".{os.path.basename(path)}{_HIDDEN_TRASH}{uuid.uuid4().hex}")
    os.rename(path, aside)  # gone from its name at once; the deletion below may take a while
    _fsync_dir(parent)
    _delete_local(aside)


def _delete_local(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def _remove_remote(where: _Location) -> None:
    fs, root = where.fs()
    if not fs.exists(root):
        return
    for manifest in fs.glob(f"{root.rstrip('/')}/step-*/manifest.json"):
        fs.rm_file(manifest)  # unpublished first: no reader uses what the deletion below leaves for a while
    fs.rm(root, recursive=True)


def _collect_leftovers(parent: str) -> None:
    """Delete what crashed saves and removals of this host left in ``parent``: trash always, a temporary
    directory once its process is gone (another host's, on a shared file system, is left alone)."""
    for name in os.listdir(parent):
        match = _LEFTOVER.match(name)
        if match is None or (match["host"] is not None and (match["host"] != _HOST or _alive(int(match["pid"])))):
            continue
        _delete_local(os.path.join(parent, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandon(manager: safepoint.CheckpointManager, temp: str) -> None:
    """After a failed first save: close its manager and delete the hidden directory (never visible)."""
    try:
        manager.close()
    except safepoint.SafepointError:
        pass  # the failure being raised is the one that matters; close() only repeats it
    finally:
        shutil.rmtree(temp, ignore_errors=True)
