"""Import and export: taking ``torch.save`` files, safetensors files, Transformers ``checkpoint-N`` folders and
``torch.distributed.checkpoint`` (DCP) directories in, and handing checkpoints back out as plain files other tools
read.

Import never runs code from the source: ``torch.save`` files are read with ``torch.load(weights_only=True)``
(numpy arrays, as in a Trainer's ``rng_state.pth``, are allowed through torch's own allow-list), and a file that
needs arbitrary pickle is refused with :class:`~safepoint.UnsafeCheckpointError`. A Transformers folder's
``training_args.bin`` is such a file: it is never opened, only listed as skipped. A DCP directory's pickled
``.metadata`` is read by ``_dcp``'s restricted unpickler, which resolves only DCP's metadata classes.

Nothing is ever half-written: an import goes through safepoint's own commit protocol into a destination that
must not exist (removed again if the import fails); an export is written and fsynced under a temporary name in
the destination's directory and published with ``link()``, which fails rather than replace a file.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import pickle
import re
import struct
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ._budget import ByteBudget
from ._codec import key_path
from ._errors import (
    CheckpointNotFoundError,
    ConfigError,
    ConversionError,
    CorruptCheckpointError,
    InvalidStateError,
    SafepointError,
    StorageError,
    UnsafeCheckpointError,
    attach_note,
    mapped_errors,
)
from ._layout import parse_step_dir, step_dir
from ._manager import CheckpointInfo
from ._migrations import resolve_key
from ._payload import plan_file, write_file
from ._pipeline import save_to
from ._reader import read_checkpoint, read_manifest
from ._resolve import Kind, committed_steps, resolve
from ._restore import plain_values
from ._storage import Storage, open_storage
from ._validate import non_negative_int

__all__ = ["ExportFormat", "ImportReport", "export_checkpoint", "import_checkpoint", "locate_checkpoint"]

PathLike = str | os.PathLike[str]
ExportFormat = Literal["torch", "safetensors"]
FORMATS: tuple[ExportFormat, ...] = ("torch", "safetensors")

#: JSON files of a Transformers folder larger than this are refused before they are read.
_MAX_JSON_BYTES = 64 << 20
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")

# What a Transformers Trainer writes into checkpoint-N (trainer.py's *_NAME constants), and the state key each
# file becomes. Model weights become "model", from one file or from the shards an index names.
_TORCH_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler"}
_JSON_FILES = {
    "trainer_state.json": "trainer_state",
    "config.json": "config",
    "generation_config.json": "generation_config",
}
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")  # the Trainer prefers the first when both exist
_MODEL_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_RNG_FILE = re.compile(r"rng_state(?:_\d+)?\.pth")
_NEVER_LOADED = {"training_args.bin": "a pickled TrainingArguments object: loading it could run code"}
_DCP_METADATA = ".metadata"  # what makes a directory a DCP checkpoint (FileSystemWriter's _metadata_fn)
_DCP_DATA = re.compile(r"__\d+_\d+\.distcp")
#: Lightning's FSDP and ModelParallel strategies torch.save the rest of the checkpoint (loops, global_step,
#: callbacks, ...) next to the DCP files; it is merged into the imported state.
_LIGHTNING_META = "meta.pt"


@dataclass(frozen=True)
class ImportReport:
    """What an import read and wrote."""

    source: str
    kind: str  # "torch", "safetensors", "transformers" or "dcp"
    checkpoint: CheckpointInfo  # the safepoint checkpoint written
    entries: tuple[str, ...]  # its top-level keys
    skipped: tuple[str, ...] = ()  # files of a Transformers or DCP folder left out, each with the reason


# -- import ---------------------------------------------------------------------------------------------------
def import_checkpoint(
    source: PathLike, dest: PathLike, *, step: int | None = None, state_version: int = 1
) -> ImportReport:
    """Convert ``source`` (a ``torch.save`` file, a ``.safetensors`` file, a Transformers ``checkpoint-N`` folder
    or a DCP checkpoint directory) into a new safepoint checkpoint directory ``dest``, keeping its nested structure.

    ``step`` defaults to the folder's ``global_step`` (or the N of ``checkpoint-N``), else 0. A top-level value
    that is not a dict is stored under the key ``"value"``. ``dest`` must not exist. A DCP directory's sharded
    tensors become full tensors, its step is Lightning's ``global_step`` (``meta.pt``) or the N of torchtitan's
    ``step-N``, else 0.
    """
    where = os.path.abspath(os.fspath(source))
    if step is not None:
        non_negative_int("step", step)
    kind = detect_source(where)
    _refuse_existing(os.path.abspath(os.fspath(dest)))  # before reading what may be many GB
    skipped: list[str] = []
    if kind == "transformers":
        state, found_step = _read_transformers(where, skipped)
    elif kind == "dcp":
        state, found_step = _read_dcp_folder(where, skipped)
    else:
        state, found_step = (_load_torch(where) if kind == "torch" else _load_safetensors(where)), None
        if not isinstance(state, Mapping):
            state = {"value": state}
    info = write_new_checkpoint(
        dest,
        dict(state),
        step=step if step is not None else (found_step or 0),
        state_version=state_version,
        source=where,
    )
    return ImportReport(where, kind, info, tuple(str(k) for k in state), tuple(skipped))


def detect_source(path: str) -> str:
    """The kind of ``path`` ("torch", "safetensors", "transformers" or "dcp"), from its content, not its name."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist")
    if os.path.isdir(path):
        location = resolve(open_storage(path))
        if location.is_committed_checkpoint or location.kind is Kind.MANAGER:
            raise ConversionError(f"{path} is already a safepoint checkpoint; nothing to import", path=path)
        names = set(os.listdir(path))
        if _DCP_METADATA in names:
            return "dcp"
        known = {*_MODEL_FILES, *_MODEL_INDEXES, *_TORCH_FILES, "trainer_state.json"}
        if names & known:
            return "transformers"
        raise ConversionError(
            f"{path} is a directory but not a Transformers checkpoint folder: it has none of "
            f"{', '.join(sorted(known))}; nor a DCP checkpoint: it has no {_DCP_METADATA}",
            path=path,
        )
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is neither a regular file nor a directory", path=path)
    with mapped_errors("read", path), open(path, "rb") as file:
        head = file.read(9)
        size = os.fstat(file.fileno()).st_size
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        return "torch"
    if head[:1] == b"\x80":  # a pickle (protocol 2 or later): torch.save's legacy format
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    raise ConversionError(
        f"{path} is not a format safepoint can import: expected a torch.save file, a .safetensors file or a "
        "Transformers checkpoint-N folder",
        path=path,
    )


def _numpy_globals() -> list[Any]:
    """What ``np.random.get_state()`` and plain arrays pickle into: torch documents allow-listing exactly these.
    Object arrays are still refused, their items being unpickled by the same restricted unpickler."""
    multiarray: Any = importlib.import_module(
        "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
    )
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64, np.complex64, np.complex128)  # fmt: skip
    # numpy 1.x pickles these functions under numpy.core, numpy 2.x under numpy._core: a file may hold either
    aliases = [
        (getattr(multiarray, name), f"{package}.multiarray.{name}")
        for name in ("_reconstruct", "scalar")
        for package in ("numpy.core", "numpy._core")
    ]
    return [np.ndarray, np.dtype, *(type(np.dtype(kind)) for kind in kinds), *aliases]


def _load_torch(path: str) -> Any:
    try:
        with mapped_errors("read", path), torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            # a plain pickle of another protocol: the restricted unpickler refuses what it cannot read anyway
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            with open(path, "rb") as file:  # a file object: torch.load hands a path named *.safetensors elsewhere
                return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} needs arbitrary pickle to load, which could run code; it was refused and nothing in it ran "
            f"({_refusal(err)})",
            path=path,
        ) from err
    except SafepointError:
        raise
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as err:
        raise CorruptCheckpointError(f"{path} is not a readable torch.save file: {err}", path=path) from err


def _refusal(err: Exception) -> str:
    """The line of torch's message that says what was refused (its first lines suggest weights_only=False)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (specific or lines or [type(err).__name__])[0]


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        with mapped_errors("read", path):
            return load_file(path, device="cpu")
    except SafepointError:
        raise
    except (SafetensorError, RuntimeError, ValueError, OSError) as err:
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {err}", path=path) from err


def _load_json(path: str) -> Any:
    with mapped_errors("read", path):
        size = os.path.getsize(path)
        if size > _MAX_JSON_BYTES:
            raise CorruptCheckpointError(f"{path} is {size} bytes, more than a JSON file here may be", path=path)
        with open(path, "rb") as file:
            data = file.read()
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {err}", path=path) from err


def _read_transformers(folder: str, skipped: list[str]) -> tuple[dict[str, Any], int | None]:
    names = sorted(os.listdir(folder))
    used: set[str] = set()
    state: dict[str, Any] = {}
    model, model_files = _read_model(folder, names)
    if model is not None:
        state["model"] = model
    used.update(model_files)
    parts: list[tuple[str, str, Callable[[str], Any]]] = [(n, k, _load_torch) for n, k in _TORCH_FILES.items()]
    parts += [(n, n.removesuffix(".pth"), _load_torch) for n in names if _RNG_FILE.fullmatch(n)]  # one per rank
    parts += [(n, k, _load_json) for n, k in _JSON_FILES.items()]
    for name, key, load in parts:
        if name in names:
            state[key] = load(os.path.join(folder, name))
            used.add(name)
    for name in names:
        if name in used:
            continue
        reason = _NEVER_LOADED.get(name, "not training state (tokenizer, docs or an unknown file)")
        skipped.append(f"{name}: {reason}")
    return state, _step_of(folder, state.get("trainer_state"))


def _read_dcp_folder(folder: str, skipped: list[str]) -> tuple[dict[str, Any], int | None]:
    from ._dcp import read_dcp  # the DCP reader uses this module's torch.load helpers

    checkpoint = read_dcp(folder)
    state = dict(checkpoint.state)
    used = {_DCP_METADATA, *checkpoint.files}
    meta: Any = None
    if _LIGHTNING_META in os.listdir(folder):
        path = os.path.join(folder, _LIGHTNING_META)
        meta = _load_torch(path)
        if not isinstance(meta, Mapping):
            raise ConversionError(f"{path} does not hold a dict (Lightning's meta.pt does)", path=path)
        clash = sorted(str(k) for k in set(meta) & set(state))
        if clash:
            raise ConversionError(f"{path} and the DCP files both hold {clash}", path=path)
        state.update(meta)
        used.add(_LIGHTNING_META)
    if checkpoint.flat:
        skipped.append(f"{_DCP_METADATA}: it has no planner_data, so the keys stay DCP's flattened ones")
    for name in sorted(set(os.listdir(folder)) - used):
        reason = "a .distcp file the metadata does not name" if _DCP_DATA.fullmatch(name) else "not a DCP file"
        skipped.append(f"{name}: {reason}")
    torchtitan = re.fullmatch(r"step-(\d+)", os.path.basename(folder.rstrip("/")))  # torchtitan's step-N folders
    found_step = _step_of(folder, meta)
    return state, found_step if found_step is not None or torchtitan is None else int(torchtitan.group(1))


def _read_model(folder: str, names: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    for name in _MODEL_FILES:
        if name in names:
            path = os.path.join(folder, name)
            return (_load_safetensors(path) if name.endswith(".safetensors") else _load_torch(path)), [name]
    for index in _MODEL_INDEXES:
        if index in names:
            return _read_shards(folder, index)
    return None, []


def _read_shards(folder: str, index: str) -> tuple[dict[str, Any], list[str]]:
    path = os.path.join(folder, index)
    weight_map = _load_json(path)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{path} has no weight_map of tensor name -> shard file", path=path)
    model: dict[str, Any] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not _SHARD_NAME.fullmatch(shard) or ".." in shard:  # a name from the file must not leave the folder
            raise UnsafeCheckpointError(f"{path} names the shard {shard!r}, which is not a file name", path=path)
        shard_path = os.path.join(folder, shard)
        part = _load_safetensors(shard_path) if shard.endswith(".safetensors") else _load_torch(shard_path)
        if not isinstance(part, Mapping):
            raise CorruptCheckpointError(f"{shard_path} does not hold a dict of tensors", path=shard_path)
        model.update(part)
    missing = sorted(set(weight_map) - set(model))
    if missing:
        raise CorruptCheckpointError(f"{path} names tensors no shard holds: {missing[:5]}", path=path)
    return model, [index, *shards]


def _step_of(folder: str, trainer_state: Any) -> int | None:
    if isinstance(trainer_state, dict):
        step = trainer_state.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            return step
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(folder.rstrip("/")))
    return int(match.group(1)) if match else None


def _refuse_existing(where: str) -> None:
    if os.path.lexists(where):
        raise ConversionError(f"{where} exists; refusing to write into it: choose a new destination", path=where)


def write_new_checkpoint(
    dest: PathLike,
    state: dict[str, Any],
    *,
    step: int,
    state_version: int,
    source: str,
    metrics: Mapping[str, float] | None = None,
) -> CheckpointInfo:
    """Commit ``state`` as a new checkpoint directory ``dest`` (which must not exist), or leave nothing behind.

    ``dest`` may be a step directory of a manager directory (``runs/exp1/step-000000000500``) when its name
    is the step written: the layout is the same, so the manager then lists and restores it like its own.
    """
    state_version = non_negative_int("state_version", state_version)
    storage = open_storage(dest)
    where = storage.describe("")
    named = parse_step_dir(os.path.basename(where))
    if named is not None and named != step:
        raise ConversionError(
            f"{where} is named as step {named} of a manager directory, but the checkpoint is step {step}: "
            f"name it {step_dir(step)}, or write it outside the manager directory",
            path=where,
        )
    _refuse_existing(where)
    if not storage.ensure_dir(""):  # created by someone else since
        _refuse_existing(where)
    try:
        return save_to(storage, "", step, state, metrics=metrics, state_version=state_version)
    except BaseException as err:
        try:
            storage.remove_tree("")
        except Exception as cleanup:
            attach_note(err, f"safepoint: removing the unfinished {where} also failed: {cleanup!r}")
        if isinstance(err, InvalidStateError):
            raise ConversionError(f"{source}: {err}", path=source) from err
        raise


# -- export ---------------------------------------------------------------------------------------------------
def locate_checkpoint(storage: Storage, step: int | None) -> str:
    """The checkpoint to read in ``storage``: the root when it is one checkpoint, else the newest committed
    step of a manager directory, or ``step``. CheckpointNotFoundError names what is there instead."""
    location = resolve(storage)
    if location.is_committed_checkpoint:
        manifest = read_manifest(storage, "")
        if step is not None and step != manifest.step:
            raise ConfigError(
                f"{storage.describe('')} is a single checkpoint of step {manifest.step}; "
                "a step chooses among the steps of a manager directory"
            )
        return ""
    committed = committed_steps(storage, location)
    if not committed:
        raise CheckpointNotFoundError(f"no committed checkpoint in {storage.describe('')}")
    if step is None:
        return step_dir(committed[-1])
    if step not in committed:
        shown = ", ".join(map(str, committed[-10:]))
        raise CheckpointNotFoundError(f"step {step} is not committed in {storage.describe('')} (committed: {shown})")
    return step_dir(step)


def export_checkpoint(
    checkpoint: PathLike,
    dest: PathLike,
    *,
    format: ExportFormat,
    step: int | None = None,
    key: str | None = None,
    allow_pickle: Iterable[str] | bool = False,
) -> str:
    """Write a checkpoint (every byte verified first) as one plain file that other tools read; returns its path.

    ``format="torch"``: a ``torch.save`` file that ``torch.load(weights_only=True)`` reads, with the nested
    structure kept (numpy arrays and scalars become tensors, which weights_only loads without allow-listing).
    ``format="safetensors"``: tensors only, named by their key path (``optimizer/state/0/exp_avg``); any other
    value is a ConversionError naming its key. ``key`` exports one subtree, e.g. ``"model"`` for a plain
    state_dict. ``checkpoint`` is a checkpoint directory or a manager directory (its newest step, or ``step``).
    ``dest`` must not exist; it appears complete or not at all.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    storage = open_storage(checkpoint)
    if not storage.exists(""):
        raise CheckpointNotFoundError(f"{storage.describe('')} does not exist")
    if not storage.is_dir(""):
        raise ConversionError(f"{storage.describe('')} is a file, not a checkpoint directory",
                              path=storage.describe(""))  # fmt: skip
    target = os.path.abspath(os.fspath(dest))
    _check_destination(target)  # before reading the whole checkpoint
    location = locate_checkpoint(storage, step)
    value: Any = plain_values(read_checkpoint(storage, location), allow_pickle)
    if key is not None:
        value = _subtree(value, key, storage.describe(location))
    if format == "torch":
        plain = _for_torch(value)
        _publish_file(target, lambda path: _torch_save(plain, path))
    else:
        tensors = _flat_tensors(value, target)
        _publish_file(target, lambda path: _write_safetensors(tensors, path))
    return target


def _subtree(value: Any, key: str, where: str) -> Any:
    node = value
    for part in [p for p in key.split("/") if p]:
        found, actual = resolve_key(node, part)
        if not found:
            raise ConversionError(f"{where} has no entry {key!r} (no {part!r} there)", path=where)
        node = node[actual]
    return node


def _for_torch(value: Any) -> Any:
    """The value as torch.save should write it: numpy values become tensors; containers keep their exact type
    (an OrderedDict, a defaultdict with its factory, a torch.Size); tensors are written as loaded, so tensors that
    share storage (tied weights) share it in the exported file too."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return torch.from_numpy(np.array(value))
    if isinstance(value, (dict, list)):
        result = copy.copy(value)  # same type, and a defaultdict keeps its default_factory
        for key in range(len(value)) if isinstance(value, list) else value:
            result[key] = _for_torch(value[key])
        return result
    if isinstance(value, tuple):
        items = [_for_torch(v) for v in value]
        return torch.Size(items) if type(value) is torch.Size else tuple(items)
    return value


def _flat_tensors(value: Any, dest: str) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: list[str | int]) -> None:
        name = key_path(path) or "value"
        if isinstance(node, (torch.Tensor, np.ndarray, np.generic)) and name in found:
            raise ConversionError(
                f"cannot export to {dest}: two entries would both be named {name!r} in a flat safetensors file "
                "(a key containing '/', or the keys 0 and '0')",
                path=dest,
            )
        if isinstance(node, torch.Tensor):
            found[name] = node
        elif isinstance(node, (np.ndarray, np.generic)):
            found[name] = torch.from_numpy(np.array(node))  # a copy: loaded arrays are read-only
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, [*path, i])
        else:
            raise ConversionError(
                f"cannot export to {dest}: safetensors holds only tensors, and {name!r} is of type "
                f"{type(node).__name__}; export a subtree of tensors (key='model'), or use format='torch'",
                path=dest,
            )

    walk(value, [])
    return found


def _check_destination(target: str) -> None:
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ConversionError(f"cannot write {target}: the directory {parent} does not exist", path=target)
    if os.path.lexists(target):
        raise ConversionError(f"{target} exists; refusing to overwrite it: choose a new destination", path=target)


def _publish_file(target: str, write: Callable[[str], None]) -> None:
    """Write under a temporary name in the target's directory, fsync, then link to the name: never a partial
    file under ``target``, never a replaced one."""
    _check_destination(target)
    parent, name = os.path.split(target)
    storage = open_storage(parent)
    temp = f".{name}.{uuid.uuid4().hex}.partial"
    try:
        write(storage.describe(temp))
        try:
            storage.publish(temp, name)
        except FileExistsError as err:
            raise ConversionError(f"{target} appeared while it was written; it was left as it is",
                                  path=target) from err  # fmt: skip
    finally:
        storage.remove_file(temp)
    storage.sync_dir("")


def _torch_save(value: Any, path: str) -> None:
    try:
        with open(path, "xb") as file:
            torch.save(value, file)
            file.flush()
            os.fsync(file.fileno())
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}", errno=err.errno, path=path) from err
    except RuntimeError as err:  # torch's zip writer turns the file's OSError (ENOSPC) into this, as its context
        cause = err.__context__
        if isinstance(cause, OSError):
            raise StorageError(f"cannot write {path}: {cause.strerror or cause}", errno=cause.errno,
                               path=path) from err  # fmt: skip
        raise StorageError(f"cannot write {path}: {err}", path=path) from err


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safepoint's own streaming safetensors writer: views of one loaded buffer are written without a copy
    (``safetensors.torch.save_file`` refuses tensors that share memory)."""
    storage = open_storage(os.path.dirname(path))
    planned = plan_file(os.path.basename(path), [(i, n, t) for i, (n, t) in enumerate(tensors.items())])
    sink = storage.create(planned.path)
    try:
        write_file(sink, planned, list(tensors.values()), bytearray(planned.buffer_bytes), ByteBudget(256 << 20))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
