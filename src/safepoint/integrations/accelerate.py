"""Accelerate: ``save_state(accelerator)`` and ``load_state(accelerator)`` with safepoint's guarantees.

They mean what ``Accelerator.save_state`` and ``Accelerator.load_state`` mean (the same objects, the same
``ProjectConfiguration``: ``automatic_checkpoint_naming``, ``total_limit``, ``iteration``), with four differences:

- Atomic: ``checkpoint_<i>`` (or ``output_dir``) appears complete or not at all. Accelerate creates the folder
  first and fills it file by file.
- Verified: every byte is checked before anything is applied. A damaged checkpoint named by ``input_dir`` is
  refused; with automatic naming, ``load_state(accelerator)`` falls back to the newest checkpoint that verifies
  and logs a warning naming each one it skipped. Accelerate loads whatever is in the newest folder.
- No pickle: models, optimizers, schedulers, the scaler, data-loader states, RNG states and registered objects are
  stored through safepoint. Accelerate pickles all but the models, and loads registered objects with
  ``weights_only=False``.
- Retention after durability: ``total_limit`` removes old checkpoints only once the new one is durable.
  Accelerate deletes them before it writes the new one, so a crash mid-save can leave fewer than the limit.

Layout: each checkpoint keeps Accelerate's name and is a :class:`safepoint.CheckpointManager` directory holding one
step (the save iteration), so ``safepoint ls/verify checkpoints/checkpoint_3`` work on it::

    project_dir/checkpoints/checkpoint_3/step-000000000003/manifest.json + <save id>/*.safetensors

A manager directory rather than a single checkpoint because the manager is what runs one commit for many
processes (per-rank RNG states, written by every rank, published by rank 0 once all are durable). A save writes it
under a hidden sibling name (``.checkpoint_3.partial``), and only rank 0 renames it to ``checkpoint_3`` once the
step is durable, then fsyncs the parent directory: the name never shows an incomplete folder. Retention renames a
checkpoint to ``.checkpoint_1.deleting`` (it disappears at once), then deletes it; leftovers of either kind are
removed at the next save.

This module must never import safepoint's private modules: it uses the names in ``safepoint.__all__`` only. It
reads Accelerate's registries of prepared objects (``accelerator._models`` and its siblings), as
``Accelerator.save_state`` itself does: Accelerate has no public accessor for them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

import safepoint

try:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType, broadcast  # type: ignore[import-untyped]
except ImportError as err:  # pragma: no cover - exercised in a subprocess without accelerate
    raise ImportError(
        f"safepoint.integrations.accelerate needs Accelerate ({err}): pip install 'safepoint[accelerate]'"
    ) from err

__all__ = ["load_state", "save_state"]

logger = logging.getLogger("safepoint.integrations.accelerate")

_CHECKPOINT = re.compile(r"checkpoint_([0-9]+)")
_PARTIAL = ".partial"
_DELETING = ".deleting"
# the device generators Accelerate saves besides CUDA's (safepoint.RNGState covers Python, numpy, CPU and CUDA)
_OTHER_DEVICES = ("xpu", "mlu", "sdaa", "musa", "hpu", "neuron")
_UNSUPPORTED = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


def save_state(accelerator: Accelerator, output_dir: str | os.PathLike[str] | None = None) -> Path:
    """Save what ``accelerator.save_state(output_dir)`` saves, atomically and durably; return the folder.

    With ``automatic_checkpoint_naming`` the folder is ``project_dir/checkpoints/checkpoint_<iteration>`` and
    ``output_dir`` is ignored, as in Accelerate; after the save, checkpoints beyond ``total_limit`` are removed,
    oldest first, never the new one. ``accelerator.project_configuration.iteration`` goes up by one.

    Raises CheckpointExistsError if the folder exists (Accelerate raises for ``checkpoint_<i>``; for an explicit
    ``output_dir`` a checkpoint is never rewritten in place, so give a new or empty folder), ConfigError for
    what it cannot save (FSDP, DeepSpeed, Megatron-LM, XLA; save-state hooks), InvalidStateError naming the key
    path of a value that cannot be stored exactly (e.g. in a registered object's state_dict). Every process
    calls it, as with Accelerate.
    """
    _check_supported(accelerator)
    config = accelerator.project_configuration
    step = _iteration(config)
    limit = _total_limit(config) if config.automatic_checkpoint_naming else None
    if config.automatic_checkpoint_naming:
        final = Path(_project_dir(accelerator), "checkpoints", f"checkpoint_{step}")
    elif output_dir is None:
        raise safepoint.ConfigError("save_state needs an output_dir when automatic checkpoint naming is disabled")
    else:
        final = Path(os.path.expanduser(os.fspath(output_dir))).absolute()
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        hint = "set accelerator.project_configuration.iteration past it" if config.automatic_checkpoint_naming else ""
        raise safepoint.CheckpointExistsError(
            f"{final} already exists: a checkpoint is never rewritten in place; {hint or 'save to a new folder'}",
            path=str(final),
        )
    staging = final.with_name(f".{final.name}{_PARTIAL}")
    _on_main(accelerator, lambda: _prepare_parent(final, staging, automatic=config.automatic_checkpoint_naming))
    try:
        with safepoint.CheckpointManager(staging) as manager:
            manager.save(step, _state(accelerator))  # returns on every rank once the step is durable
    except BaseException:
        if accelerator.is_main_process:  # nothing of a failed save stays, not even under the hidden name
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _on_main(accelerator, lambda: _publish(staging, final, limit))
    config.iteration = step + 1
    return final


def load_state(accelerator: Accelerator, input_dir: str | os.PathLike[str] | None = None) -> safepoint.RestoreReport:
    """Load what ``accelerator.load_state(input_dir)`` loads, every byte verified first; return the report.

    ``input_dir`` is exactly that checkpoint: a damaged one raises CorruptCheckpointError naming it, a folder
    without a safepoint checkpoint CheckpointNotFoundError. Without it (automatic naming only, as in Accelerate)
    the newest ``checkpoint_<i>`` that verifies is loaded; each newer one is skipped with a warning naming it and
    listed in ``report.skipped``; checkpoints none of which verifies raise CorruptCheckpointError, and no
    checkpoint at all CheckpointNotFoundError: training never silently starts from scratch.

    A checkpoint whose entries do not match the live objects (another model, other registered objects) raises
    RestoreError and changes nothing. With automatic naming, ``project_configuration.iteration`` is then set
    past the newest ``checkpoint_<i>``, so the next save does not collide with it (Accelerate leaves it at 0).
    """
    _check_supported(accelerator)
    config = accelerator.project_configuration
    state = _state(accelerator)
    if input_dir is not None:
        folder = Path(os.path.expanduser(os.fspath(input_dir))).absolute()
        report = _restore_exactly(folder, state)
    elif config.automatic_checkpoint_naming:
        report = _restore_newest(Path(_project_dir(accelerator), "checkpoints"), state)
    else:
        raise safepoint.ConfigError("load_state needs an input_dir when automatic checkpoint naming is disabled")
    accelerator.step = state["accelerator"]["step"]
    if config.automatic_checkpoint_naming:
        numbers = [number for number, _ in _checkpoints(Path(_project_dir(accelerator), "checkpoints"))]
        config.iteration = max([_iteration(config), *(n + 1 for n in numbers)])
    return report


# -- what is saved ---------------------------------------------------------------------------------------------
def _state(accelerator: Accelerator) -> dict[str, Any]:
    """The entries, named after Accelerate's files (``model``, ``model_1``, ``optimizer``, ...)."""
    state: dict[str, Any] = {}
    for kind, objects in (
        ("model", accelerator._models),
        ("optimizer", accelerator._optimizers),
        ("scheduler", accelerator._schedulers),
    ):
        for index, obj in enumerate(objects):
            state[_name(kind, index)] = obj
    for index, loader in enumerate(accelerator._dataloaders):
        sampler = _seedable_sampler(loader)
        if sampler is not None:
            state[_name("sampler", index)] = _SamplerState(sampler)
        if getattr(loader, "use_stateful_dataloader", False):
            state[_name("dl_state_dict", index)] = safepoint.PerRank(loader)  # each rank reads its own shard
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    for index, obj in enumerate(accelerator._custom_objects):
        state[f"custom_checkpoint_{index}"] = obj
    state["random_states"] = safepoint.PerRank(_RandomStates())
    state["accelerator"] = {"step": int(accelerator.step)}
    return state


def _name(kind: str, index: int) -> str:
    return kind if index == 0 else f"{kind}_{index}"


def _seedable_sampler(loader: Any) -> Any:
    """The sampler Accelerate saves: a SeedableRandomSampler of an IterableDatasetShard loader, else None."""
    if isinstance(getattr(loader, "dataset", None), IterableDatasetShard):
        sampler = loader.get_sampler()
        if isinstance(sampler, SeedableRandomSampler):
            return sampler
    return None


class _SamplerState:
    """A SeedableRandomSampler's state: its seed and epoch (Accelerate pickles the whole sampler object)."""

    def __init__(self, sampler: Any) -> None:
        self._sampler = sampler

    def state_dict(self) -> dict[str, int]:
        return {"initial_seed": int(self._sampler.initial_seed), "epoch": int(self._sampler.epoch)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._sampler.initial_seed = int(state_dict["initial_seed"])
        self._sampler.set_epoch(int(state_dict["epoch"]))


class _RandomStates:
    """This process's generators, as Accelerate saves them: Python, numpy, torch CPU and CUDA
    (:class:`safepoint.RNGState`), and the other device types Accelerate knows, where present."""

    def __init__(self) -> None:
        self._rng = safepoint.RNGState()

    def state_dict(self) -> dict[str, Any]:
        state = self._rng.state_dict()
        for name, module in _device_modules():
            state[name] = list(module.get_rng_state_all())
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        devices = list(_device_modules())
        for name, _ in devices:
            if name not in state_dict:
                raise safepoint.RestoreError(f"the checkpoint has no RNG states for the {name} devices of this process")
        self._rng.load_state_dict({k: v for k, v in state_dict.items() if k not in _OTHER_DEVICES})
        for name, module in devices:
            module.set_rng_state_all(state_dict[name])


def _device_modules() -> Iterator[tuple[str, Any]]:
    for name in _OTHER_DEVICES:
        module = getattr(torch, name, None)
        available = getattr(module, "is_available", None)
        if module is not None and callable(available) and available() and hasattr(module, "get_rng_state_all"):
            yield name, module


def _check_supported(accelerator: Accelerator) -> None:
    if not isinstance(accelerator, Accelerator):
        raise safepoint.ConfigError(f"expected an accelerate.Accelerator, not {type(accelerator).__name__}")
    kind = accelerator.distributed_type
    if any(kind == getattr(DistributedType, name, None) for name in _UNSUPPORTED):
        raise safepoint.ConfigError(
            f"safepoint's Accelerate integration does not support {kind} yet: use accelerator.save_state/load_state"
        )
    hooks = [*accelerator._save_model_state_pre_hook.values(), *accelerator._load_model_state_pre_hook.values()]
    if hooks:
        raise safepoint.ConfigError(
            f"save/load state hooks are registered ({', '.join(getattr(h, '__name__', repr(h)) for h in hooks)}): "
            "they write and read files outside the verified checkpoint, which safepoint's save_state cannot "
            "include; remove them or use accelerator.save_state/load_state"
        )


def _project_dir(accelerator: Accelerator) -> str:
    project_dir = accelerator.project_configuration.project_dir
    if project_dir is None:
        raise safepoint.ConfigError("automatic checkpoint naming needs ProjectConfiguration(project_dir=...)")
    return str(project_dir)


def _iteration(config: Any) -> int:
    value = config.iteration
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise safepoint.ConfigError(f"project_configuration.iteration must be a non-negative integer, not {value!r}")
    return value


def _total_limit(config: Any) -> int | None:
    value = config.total_limit
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise safepoint.ConfigError(f"project_configuration.total_limit must be None or an integer >= 0, not {value!r}")
    return value


# -- publishing and retention (the main process only) ----------------------------------------------------------
def _on_main(accelerator: Accelerator, work: Callable[[], None]) -> None:
    """Run ``work`` on the main process; every process returns, or raises, when it is done."""
    if accelerator.num_processes == 1:
        _mapped(work)
        return
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            _mapped(work)
        except BaseException as err:
            failure = err
    # a failure on the main process must not leave the others waiting in a barrier until its timeout
    flag = broadcast(torch.tensor([0 if failure is None else 1], device=accelerator.device), from_process=0)
    if failure is not None:
        raise failure
    if int(flag.item()) != 0:
        raise safepoint.StorageError("the main process failed to publish the checkpoint; its error says why")


def _mapped(work: Callable[[], None]) -> None:
    """Run ``work``; an operating-system error becomes a StorageError with its errno and path (cause kept)."""
    try:
        work()
    except safepoint.SafepointError:
        raise
    except OSError as err:
        path = os.fsdecode(err.filename) if err.filename is not None else ""
        raise safepoint.StorageError(f"publishing the checkpoint failed: {err}", errno=err.errno, path=path) from err


def _prepare_parent(final: Path, staging: Path, *, automatic: bool) -> None:
    """Create the parent folder durably and remove what crashed saves and removals left."""
    created = _makedirs(final.parent)
    if created:
        _fsync_dir(created)
    leftovers = {staging} if staging.exists() else set()
    if automatic:
        leftovers.update(p for p in final.parent.iterdir() if _leftover_of_checkpoint(p.name))
    for path in sorted(leftovers):
        shutil.rmtree(path)


def _leftover_of_checkpoint(name: str) -> bool:
    for suffix in (_PARTIAL, _DELETING):
        if name.startswith(".") and name.endswith(suffix) and _CHECKPOINT.fullmatch(name[1 : -len(suffix)]):
            return True
    return False


def _makedirs(path: Path) -> Path | None:
    """Create ``path`` and its missing parents; the parent of the topmost one created (to fsync), or None."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return missing[-1].parent if missing else None


def _publish(staging: Path, final: Path, total_limit: int | None) -> None:
    """Give the durable checkpoint its name, make the name durable, then apply ``total_limit``."""
    if final.exists() and any(final.iterdir()):  # another writer got there since the check
        raise safepoint.CheckpointExistsError(f"{final} appeared while this save was writing", path=str(final))
    os.replace(staging, final)  # onto an absent or empty folder: atomic
    _fsync_dir(final.parent)
    if total_limit is not None:
        _retain(final.parent, keep=total_limit, protect=final)


def _retain(folder: Path, *, keep: int, protect: Path) -> None:
    found = [path for _, path in _checkpoints(folder) if path != protect]
    excess = len(found) + 1 - max(keep, 1)  # the new one always stays, as with Accelerate's total_limit=0
    for path in found[: max(excess, 0)]:
        logger.info("total_limit=%s: removing %s", keep, path)
        doomed = path.with_name(f".{path.name}{_DELETING}")
        os.replace(path, doomed)  # gone from every listing at once; then its files
        _fsync_dir(folder)
        shutil.rmtree(doomed)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- loading ---------------------------------------------------------------------------------------------------
def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``checkpoint_<i>`` folders in ``folder``, ascending by ``i``."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _restore_exactly(folder: Path, state: dict[str, Any]) -> safepoint.RestoreReport:
    if not folder.is_dir():
        raise safepoint.CheckpointNotFoundError(f"{folder} does not exist or is not a folder")
    with safepoint.CheckpointManager(folder) as manager:
        report = manager.restore(state)
    if report is None:
        raise safepoint.CheckpointNotFoundError(
            f"{folder} holds no committed safepoint checkpoint (one written by Accelerator.save_state loads with "
            "accelerator.load_state)"
        )
    return report


def _restore_newest(folder: Path, state: dict[str, Any]) -> safepoint.RestoreReport:
    candidates = _checkpoints(folder)
    if not candidates:
        raise safepoint.CheckpointNotFoundError(f"no checkpoint_<i> folder in {folder}: there is nothing to load")
    skipped: list[safepoint.SkippedCheckpoint] = []
    for number, path in reversed(candidates):
        try:
            report = _restore_exactly(path, state)
        except (safepoint.CorruptCheckpointError, safepoint.CheckpointNotFoundError) as err:
            logger.warning("skipping %s, it does not verify: %s", path, err)
            skipped.append(safepoint.SkippedCheckpoint(number, str(path), str(err)))
            continue
        return dataclasses.replace(report, skipped=(*skipped, *report.skipped))
    reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped)
    raise safepoint.CorruptCheckpointError(
        f"none of the {len(skipped)} checkpoints in {folder} verifies, so nothing was loaded ({reasons})"
    )
