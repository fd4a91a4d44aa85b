"""Transformers and TRL: ``class MyTrainer(SafepointTrainerMixin, Trainer)`` makes the Trainer's checkpoints safe.

This module owns the folder ``checkpoint-N`` that a Transformers ``Trainer`` (or any TRL trainer built on it)
writes at each save, and the Trainer's resume from such a folder. Nothing else in the user's code changes.

A checkpoint folder keeps the Transformers layout, so ``from_pretrained(checkpoint-N)`` still loads the model::

    checkpoint-N/
      config.json, model.safetensors, tokenizer files, ...   written by the Trainer's save_model, as always
      trainer_state.json, training_args.json                  JSON (no training_args.bin pickle)
      entropy_ctrl_state.json, ...                            a TRL trainer's extra files, as it writes them
      safepoint/step-<N>/                                     one safepoint checkpoint: optimizer, scheduler,
                                                              scaler, each rank's RNG, and the size and SHA-256
                                                              of every file above

Save, on every rank: the Trainer's own ``_save_checkpoint`` runs unchanged, but its output directory is a hidden
staging folder next to the final one (``.checkpoint-N.safepoint-staging/checkpoint-N``), and its optimizer,
scheduler, scaler and RNG files are taken by safepoint instead of ``torch.save``. After a barrier (every rank's
files written), rank 0 fsyncs and digests every file; then every rank saves through one
:class:`safepoint.CheckpointManager` (a process group coordinates the ranks when one is initialised), whose
commit covers every byte of the folder. Only then does rank 0 rename the staging folder to ``checkpoint-N`` and
fsync the parent: a ``checkpoint-N`` is complete or absent, whatever the number of ranks. A folder already
called ``checkpoint-N`` is swapped out atomically (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere moved
aside first and put back if the save dies before its replacement is in place), and removed only after. Rotation
(``save_total_limit``, keeping ``best_model_checkpoint``) runs after that, never removes the checkpoint just
saved, and hides a folder before deleting it.

Resume: ``train(resume_from_checkpoint=True)`` verifies checkpoints from the highest step down and resumes
from the first that verifies, naming in a warning every one it skipped; if checkpoint folders exist and none
verifies, it raises instead of training from scratch. A folder without a safepoint record (written by a plain
Trainer) cannot be verified and is skipped like a damaged one. An explicit path is verified and refused with a
:class:`safepoint.CorruptCheckpointError` (or ``CheckpointNotFoundError``) naming it.

This module must never write or read a pickle, make ``checkpoint-N`` visible before every byte of it is
durable, or delete a checkpoint before its replacement is durable. It uses only the public ``safepoint`` API.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

try:
    import transformers.trainer as _hf_trainer
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # pragma: no cover - exercised in a subprocess without transformers
    raise ImportError(
        "safepoint.integrations.transformers needs the transformers package: pip install 'safepoint[transformers]'"
    ) from err

import safepoint

__all__ = ["SafepointTrainerMixin"]

logger = logging.getLogger("safepoint")

#: The safepoint checkpoint inside each checkpoint folder, and the JSON that replaces training_args.bin.
SAFEPOINT_DIR = "safepoint"
TRAINING_ARGS_JSON = "training_args.json"
#: What this integration writes into the safepoint checkpoint's ``meta`` entry; the layout version is checked.
LAYOUT = "safepoint.integrations.transformers"
LAYOUT_VERSION = 1

_CHECKPOINT = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")
# hidden names next to checkpoint-N: a save being written, a replaced checkpoint, a checkpoint being deleted
_STAGING, _REPLACED, _TRASH = ".safepoint-staging", ".safepoint-replaced", ".safepoint-trash"
_CHUNK = 1 << 22

if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class SafepointTrainerMixin(_TrainerBase):
    """Put it first: ``class MyTrainer(SafepointTrainerMixin, Trainer)`` (or ``SFTTrainer``, any TRL trainer).

    Checkpoints become atomic across ranks, verified on resume and pickle-free (see the module docstring).
    ``safepoint_timeout`` is how long, in seconds, a rank waits for the others at each step of a save or
    restore before a :class:`safepoint.CoordinationError` names the ranks that did not arrive.
    DeepSpeed, FSDP and ``save_on_each_node`` are refused with a :class:`safepoint.ConfigError` at the first save.
    """

    safepoint_timeout: float = 600.0
    # class defaults, so that nothing depends on the order of __init__ in a long MRO
    _safepoint_redirect: str | None = None
    _safepoint_pending: dict[str, Any] | None = None
    _safepoint_resuming: tuple[str, Mapping[str, Any]] | None = None  # the folder train() verified, its meta
    _safepoint_rng: _RNGSnapshot | None = None

    # -- save ----------------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        # while a save runs, every layer of _save_checkpoint (the Trainer's and a TRL trainer's) writes to staging
        if self._safepoint_redirect is not None:
            return self._safepoint_redirect
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._safepoint_refuse_unsupported()
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, f".{name}{_STAGING}")
        staged = os.path.join(staging_root, name)
        rank0 = self.args.process_index == 0
        if rank0:
            os.makedirs(run_dir, exist_ok=True)
            _clean_leftovers(run_dir)
            os.makedirs(staging_root)
        _barrier()
        self._safepoint_pending = {}
        self._safepoint_redirect = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._safepoint_redirect = None
        pending, self._safepoint_pending = self._safepoint_pending, None
        os.makedirs(staged, exist_ok=True)
        self._safepoint_fix_best(staging_root, run_dir, staged)
        _barrier()  # every rank's Transformers files are written
        files = _digest_tree(staged, sync=True) if rank0 else {}
        state = {
            **pending,
            "files": safepoint.PerRank(files),
            "meta": {
                "layout": LAYOUT,
                "layout_version": LAYOUT_VERSION,
                "global_step": self.state.global_step,
                "world_size": self.args.world_size,
            },
        }
        with safepoint.CheckpointManager(os.path.join(staged, SAFEPOINT_DIR), timeout=self.safepoint_timeout) as sp:
            sp.save(self.state.global_step, state)  # returns on every rank once the commit is durable
        final = os.path.join(run_dir, name)
        if rank0:
            self._safepoint_publish(staged, final)
            _remove(staging_root)
            if self.args.should_save:
                self._safepoint_rotate(run_dir, final)
        _barrier()  # no rank goes on before checkpoint-N is visible

    def _safepoint_publish(self, staged: str, final: str) -> None:
        """Make ``staged`` (committed, durable) visible as ``final``; an existing ``final`` goes only after."""
        parent = os.path.dirname(final)
        _fsync_dir(staged)  # its entry for safepoint/, made after the Transformers files were synced
        if not os.path.lexists(final):
            _rename(staged, final)
        elif _exchange(staged, final):
            _fsync_dir(parent)
            _remove(staged)  # holds the replaced checkpoint now
        else:
            aside = os.path.join(parent, f".{os.path.basename(final)}{_REPLACED}")
            _remove(aside)
            _rename(final, aside)  # put back by _clean_leftovers if the save dies before the next rename
            _rename(staged, final)
            _fsync_dir(parent)
            _remove(aside)
        _fsync_dir(parent)

    def _safepoint_rotate(self, run_dir: str, just_saved: str) -> None:
        """``save_total_limit`` as the Trainer means it, run after the commit: the checkpoint just saved counts as
        the newest (a higher-numbered folder left by an abandoned run is older than it) and is never removed;
        ``best_model_checkpoint`` is kept too."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        newest = os.path.normpath(just_saved)
        found = [os.path.normpath(path) for _, path in _checkpoint_dirs(run_dir)]
        order = sorted(found, key=lambda path: (path == newest, _step_of(path)))
        protected = {newest}
        if self.state.best_model_checkpoint is not None:
            protected.add(os.path.normpath(self.state.best_model_checkpoint))
        keep = max(limit, len(protected & set(found)))
        remaining = len(order)
        for path in order:
            if remaining <= keep:
                break
            if path in protected:
                continue
            logger.info("removing %s (save_total_limit=%s)", path, limit)
            _discard(path)
            remaining -= 1

    def _safepoint_fix_best(self, staging_root: str, run_dir: str, staged: str) -> None:
        """The Trainer recorded the best checkpoint under the staging name; record its final name instead."""
        best = self.state.best_model_checkpoint
        if best is None or os.path.commonpath([os.path.abspath(best), os.path.abspath(staging_root)]) != (
            os.path.abspath(staging_root)
        ):
            return
        self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging_root))
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staged, _hf_trainer.TRAINER_STATE_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        pending = self._safepoint_pending_state()
        pending["optimizer"] = self.optimizer
        pending["scheduler"] = self.lr_scheduler

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            self._safepoint_pending_state()["scaler"] = scaler

    def _save_rng_state(self, output_dir: str) -> None:
        # the generators as they are now, not when the manager reads the state a little later
        snapshot = _RNGSnapshot(safepoint.RNGState().state_dict())
        self._safepoint_pending_state()["rng"] = safepoint.PerRank(snapshot)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        with _training_args_not_pickled():
            super()._save(output_dir, state_dict)
        if self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            text: str = self.args.to_json_string()  # type: ignore[no-untyped-call]
            with open(os.path.join(str(folder), TRAINING_ARGS_JSON), "w", encoding="utf-8") as file:
                file.write(text)

    def _safepoint_pending_state(self) -> dict[str, Any]:
        if self._safepoint_pending is None:
            raise safepoint.ConfigError(
                "the optimizer, scheduler, scaler and RNG are saved by SafepointTrainerMixin._save_checkpoint only; "
                "a subclass called a part of the save on its own"
            )
        return self._safepoint_pending

    def _safepoint_refuse_unsupported(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise safepoint.ConfigError(
                "SafepointTrainerMixin does not support DeepSpeed or FSDP yet (their sharded states are written by "
                "their own engines); train without the mixin there"
            )
        if self.args.save_on_each_node and self.args.world_size > 1:
            raise safepoint.ConfigError(
                "SafepointTrainerMixin commits one checkpoint folder from rank 0: save_on_each_node=True is not "
                "supported; put output_dir on a filesystem every node shares"
            )

    # -- resume --------------------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        self._safepoint_resuming = None
        resolved = self._safepoint_resolve(resume_from_checkpoint)
        return super().train(resolved, trial, ignore_keys_for_eval, **kwargs)

    def _safepoint_resolve(self, resume: str | bool | None) -> str | bool | None:
        if resume is None or resume is False:
            return resume
        if resume is not True:
            path = os.fspath(resume)
            self._safepoint_resuming = (path, _verify_checkpoint(path))
            return path
        output_dir = str(self.args.output_dir)
        if self.args.process_index == 0 and os.path.isdir(output_dir):
            _clean_leftovers(output_dir)  # puts back a checkpoint a killed replacement had moved aside
        _barrier()
        candidates = sorted(_checkpoint_dirs(output_dir), reverse=True)
        if not candidates:
            return True  # the Trainer raises its own "No valid checkpoint found" error
        skipped: list[str] = []
        for _, path in candidates:
            try:
                self._safepoint_resuming = (path, _verify_checkpoint(path))
            except safepoint.SafepointError as problem:
                skipped.append(str(problem))
                continue
            if skipped:
                logger.warning("resuming from %s; skipped newer checkpoints that do not verify: %s", path, skipped)
            return path
        raise safepoint.CorruptCheckpointError(
            f"none of the {len(candidates)} checkpoints in {output_dir} verifies, so training does not start from "
            f"scratch: {'; '.join(skipped)}",
            path=output_dir,
        )

    def _safepoint_verify(self, checkpoint: str) -> Mapping[str, Any]:
        """Every byte of ``checkpoint`` checked; its ``meta`` entry. Raises a SafepointError naming it.

        The folder train() has just verified to resume from is not read twice; any other is read now."""
        if self._safepoint_resuming is not None and self._safepoint_resuming[0] == checkpoint:
            return self._safepoint_resuming[1]
        return _verify_checkpoint(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._safepoint_verify(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint is not None:
            self._safepoint_verify(self.state.best_model_checkpoint)
        super()._load_best_model()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            self._safepoint_restore(checkpoint)
        # a TRL trainer reads its extra JSON here; the Trainer itself finds no optimizer.pt and reads nothing
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        """Restored together with the optimizer, by :meth:`_load_optimizer_and_scheduler`."""

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # the Trainer asks for the generators after skipping the batches already trained; they were read (and
        # verified) with the optimizer and are applied only now
        if checkpoint is not None and self._safepoint_rng is not None and self._safepoint_rng.state is not None:
            safepoint.RNGState().load_state_dict(self._safepoint_rng.state)

    def _safepoint_restore(self, checkpoint: str) -> None:
        meta = self._safepoint_verify(checkpoint)
        state: dict[str, Any] = {"optimizer": self.optimizer, "scheduler": self.lr_scheduler}
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler
        self._safepoint_rng = _RNGSnapshot()
        if meta["world_size"] == self.args.world_size:
            state["rng"] = safepoint.PerRank(self._safepoint_rng)
        else:
            logger.warning(
                "%s was saved by %s ranks, this run has %s: the random generators are not restored, so the resumed "
                "run is not bitwise the one that stopped",
                checkpoint,
                meta["world_size"],
                self.args.world_size,
            )
        with safepoint.CheckpointManager(os.path.join(checkpoint, SAFEPOINT_DIR), timeout=self.safepoint_timeout) as sp:
            report = sp.restore(state, strict=False)  # "files" and "meta" are read by the verification only
        self._safepoint_resuming = None  # read in full now; a later read of this folder verifies it again
        if report is None:
            raise safepoint.CheckpointNotFoundError(f"{checkpoint} holds no committed safepoint checkpoint")
        missing = [key for key in state if key not in report.restored]
        if missing:
            logger.warning("%s holds no %s; left as they are (was it saved with save_only_model?)", checkpoint, missing)


class _RNGSnapshot:
    """The generators' state at one moment: saved as it was taken; on restore, held until the Trainer asks."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.state = state

    def state_dict(self) -> Mapping[str, Any]:
        return self.state if self.state is not None else safepoint.RNGState().state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.state = state_dict


# -- verifying a checkpoint folder -------------------------------------------------------------------------------
def _verify_checkpoint(checkpoint: str) -> Mapping[str, Any]:
    if not os.path.isdir(checkpoint):
        raise safepoint.CheckpointNotFoundError(f"{checkpoint} is not a checkpoint folder: it does not exist")
    record = os.path.join(checkpoint, SAFEPOINT_DIR)
    if not os.path.isdir(record):
        raise safepoint.CorruptCheckpointError(
            f"{checkpoint} is not a safepoint checkpoint (no {SAFEPOINT_DIR}/ record, e.g. written by a plain "
            "Trainer): nothing to verify it against",
            path=checkpoint,
        )
    try:
        with safepoint.CheckpointManager(record) as sp:
            if sp.latest_step() is None:
                raise safepoint.CorruptCheckpointError(f"{record} holds no committed checkpoint", path=record)
            values, _ = sp.load(mmap=True)  # every byte checked; the tensors are dropped unread
    except safepoint.SafepointError as problem:
        raise safepoint.CorruptCheckpointError(f"{checkpoint} does not verify: {problem}", path=checkpoint) from problem
    meta = values.get("meta")
    if not isinstance(meta, dict) or meta.get("layout") != LAYOUT:
        raise safepoint.CorruptCheckpointError(f"{record} was not written by {LAYOUT}", path=record)
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise safepoint.FormatVersionError(
            f"{record} has layout version {meta.get('layout_version')!r}; this code reads {LAYOUT_VERSION}",
            path=record,
        )
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(checkpoint)))
    if match is not None and int(match.group(1)) != meta.get("global_step"):
        raise safepoint.CorruptCheckpointError(
            f"{checkpoint} holds the checkpoint of step {meta['global_step']}, not of step {match.group(1)}",
            path=checkpoint,
        )
    _check_files(checkpoint, _recorded_files(values.get("files"), record))
    return meta


def _recorded_files(per_rank: object, record: str) -> dict[str, Mapping[str, Any]]:
    """The ``files`` entry, ``{rank: {relative path: {"size": int, "sha256": str}}}``, merged over the ranks."""
    expected: dict[str, Mapping[str, Any]] = {}
    tables = per_rank.values() if isinstance(per_rank, dict) else [None]
    for table in tables:
        if not isinstance(table, dict) or not all(
            isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            for name, entry in table.items()
        ):  # fmt: skip
            raise safepoint.CorruptCheckpointError(f"{record} has no readable table of the folder's files", path=record)
        expected.update(table)
    return expected


def _check_files(checkpoint: str, expected: Mapping[str, Mapping[str, Any]]) -> None:
    found = _digest_tree(checkpoint, sync=False)
    unrecorded = sorted(set(found) - set(expected))
    if unrecorded:
        raise safepoint.CorruptCheckpointError(
            f"{checkpoint} holds files its commit does not cover: {unrecorded}", path=checkpoint
        )
    for name, record in expected.items():
        where = os.path.join(checkpoint, name)
        if name not in found:
            raise safepoint.CorruptCheckpointError(f"{where} is missing", path=where)
        if found[name]["size"] != record["size"]:
            raise safepoint.CorruptCheckpointError(
                f"{where} has {found[name]['size']} bytes, its commit says {record['size']}", path=where
            )
        if found[name]["sha256"] != record["sha256"]:
            raise safepoint.CorruptCheckpointError(f"{where} does not match its SHA-256 checksum", path=where)


def _digest_tree(root: str, *, sync: bool) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``root`` but the safepoint record, by ``/``-separated relative path;
    with ``sync``, every file and directory is fsynced too (the Trainer's writers never fsync)."""
    files: dict[str, dict[str, Any]] = {}
    for directory, subdirs, names in os.walk(root):
        if os.path.samefile(directory, root):
            subdirs[:] = [d for d in subdirs if d != SAFEPOINT_DIR]
        subdirs.sort()
        for name in sorted(names):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if os.path.islink(path):
                raise safepoint.UnsafeCheckpointError(f"{path} is a symbolic link", path=path)
            files[relative] = _digest_file(path, sync=sync)
        if sync:
            _fsync_dir(directory)
    return files


def _digest_file(path: str, *, sync: bool) -> dict[str, Any]:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb") as file:
        while read := file.readinto(buffer):
            digest.update(view[:read])
            size += read
        if sync:
            os.fsync(file.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


# -- the folder operations ---------------------------------------------------------------------------------------
def _checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(run_dir, name)
        if match is not None and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _step_of(path: str) -> int:
    match = _CHECKPOINT.match(os.path.basename(path))
    return int(match.group(1)) if match is not None else -1


def _clean_leftovers(run_dir: str) -> None:
    """What killed saves left: a replaced checkpoint whose replacement never arrived goes back; the rest goes."""
    for name in os.listdir(run_dir):
        if not name.startswith(f".{PREFIX_CHECKPOINT_DIR}-"):
            continue
        path = os.path.join(run_dir, name)
        if name.endswith(_REPLACED):
            final = os.path.join(run_dir, name[1 : -len(_REPLACED)])
            if not os.path.lexists(final):
                _rename(path, final)
                _fsync_dir(run_dir)
                continue
        if name.endswith((_STAGING, _REPLACED, _TRASH)):
            _remove(path)


def _discard(path: str) -> None:
    """Hide ``path`` with one rename, then delete it: a crash mid-delete never leaves a partial checkpoint."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".{name}{_TRASH}")
    _remove(trash)
    _rename(path, trash)
    _fsync_dir(parent)
    _remove(trash)


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError as err:
        raise safepoint.StorageError(f"cannot remove {path}: {err}", errno=err.errno, path=path) from err


def _rename(source: str, target: str) -> None:
    try:
        os.rename(source, target)
    except OSError as err:
        raise safepoint.StorageError(
            f"cannot rename {source} to {target}: {err}", errno=err.errno, path=target
        ) from err


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise safepoint.StorageError(f"cannot open {path}: {err}", errno=err.errno, path=path) from err
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a directory
            raise safepoint.StorageError(f"cannot fsync {path}: {err}", errno=err.errno, path=path) from err
    finally:
        os.close(fd)


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: str, second: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise safepoint.StorageError(f"cannot exchange {first} and {second}: {os.strerror(code)}", errno=code, path=second)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _training_args_not_pickled() -> Iterator[None]:
    """The Trainer's ``_save`` ends with ``torch.save(self.args, join(output_dir, TRAINING_ARGS_NAME))``; for the
    length of the call that name is the null device (an absolute path, so ``join`` returns it), and no
    training_args.bin is written: the mixin writes training_args.json instead. One module attribute, restored in
    ``finally``; two trainers saving at once on two threads of one process would share it."""
    saved = _hf_trainer.TRAINING_ARGS_NAME
    _hf_trainer.TRAINING_ARGS_NAME = os.devnull
    try:
        yield
    finally:
        _hf_trainer.TRAINING_ARGS_NAME = saved
