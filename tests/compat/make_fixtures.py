"""Write the golden checkpoint of the current format version, once, when that version is released.

    python tests/compat/make_fixtures.py            # refuses to replace an existing fixture
    python tests/compat/make_fixtures.py --force    # only while the version is unreleased

It writes ``tests/compat/format_v<N>/run``, a manager directory holding one checkpoint saved by this safepoint,
and ``expected.json``, the same values serialised straight from the source objects by the small typed encoder
below, which shares no code with safepoint. ``test_golden.py`` loads every fixture with the current code and
compares the two bit for bit, so a later version that can no longer read an old checkpoint fails the suite.
The state covers every node kind of the format: tensors of every persisted dtype (0-d, empty, non-contiguous),
numpy arrays and scalars, objects saved through state_dict (a module, an optimizer with int-keyed state), dicts
with str and int keys, lists, tuples, every scalar kind (NaN, infinities, big ints, bytes, None, unicode) and a
Pickled entry; from format 2 on, tensors sharing one storage (view nodes; ``expected.json`` lists which keys
must share storage after a load) and every typed value of ``safepoint._codec.TYPED`` (typed nodes); from
format 3 on, DTensors (sharded nodes: uneven rows, columns, an empty shard, a replicated and a 0-d tensor, an
empty tensor), saved by a 2-rank gloo group on 127.0.0.1 that this script starts (``--rank``, internal);
``expected.json`` holds their full tensors, which is what a single-process load returns.
It is small: a few KB.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import types
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
STEP = 42
METRICS = {"loss": 0.25}


def source_state() -> dict[str, Any]:
    """The values saved in the golden checkpoint: fixed formulas, no random numbers, same on every machine."""
    from lightning.fabric.utilities.data import AttributeDict

    import safepoint  # here, not at the top: the encoder below must not depend on the package

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 8 - 0.25)
        model.bias.copy_(torch.tensor([0.5, -1.5]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.125, momentum=0.5)
    model(torch.arange(3, dtype=torch.float32).reshape(1, 3)).sum().backward()
    optimizer.step()
    grid = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "model": model,
        "optimizer": optimizer,
        "tensors": {
            "f32": grid / 3,
            "f64": torch.linspace(-1, 1, 5, dtype=torch.float64),
            "f16": torch.tensor([0.5, -2.0, 65504.0], dtype=torch.float16),
            "bf16": torch.tensor([1.0, -0.0078125, 3.0e38], dtype=torch.bfloat16),
            "f8_e4m3": torch.tensor([0.5, -448.0], dtype=torch.float32).to(torch.float8_e4m3fn),
            "f8_e5m2": torch.tensor([2.0, -57344.0], dtype=torch.float32).to(torch.float8_e5m2),
            "c64": torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64),
            "i64": torch.tensor([-(2**62), 0, 2**62]),
            "i32": torch.tensor([[-7, 8]], dtype=torch.int32),
            "i16": torch.tensor([-300], dtype=torch.int16),
            "i8": torch.tensor([-128, 127], dtype=torch.int8),
            "u8": torch.arange(4, dtype=torch.uint8),
            "u16": torch.tensor([65535], dtype=torch.uint16),
            "u32": torch.tensor([4294967295], dtype=torch.uint32),
            "u64": torch.tensor([2**63], dtype=torch.uint64),
            "bool": torch.tensor([True, False, True]),
            "zero_d": torch.tensor(3.5),
            "empty": torch.empty(0, 3),
            "strided": grid.t(),  # not contiguous
            "special": torch.tensor([math.nan, math.inf, -math.inf, -0.0]),
        },
        "arrays": {
            "f64": np.array([[0.1, 0.2], [0.3, 0.4]]),
            "i16": np.arange(5, dtype=np.int16),
            "big_endian": np.array([1, 256], dtype=">i4"),
            "scalar_f32": np.float32(1.5),
            "scalar_i64": np.int64(-9),
        },
        "config": {
            "lr": 0.125,
            "name": "réseau ✓",
            "flags": [True, False, None],
            "pair": (1, 2.5, "x"),
            "nan": math.nan,
            "inf": math.inf,
            "neg_inf": -math.inf,
            "big": 2**100,
            "raw": b"\x00\xffsafepoint",
            7: "an int key",
            "empty": {},
            "nested": {"deeper": [{"a": [1, [2, ()]]}]},
        },
        "pickled": safepoint.Pickled({"kind": "plain data", "values": [1, 2, 3]}),
        # format 2
        "tied": {"whole": TIED, "grid": TIED.view(3, 4).t(), "tail": TIED[5:], "same": TIED},
        "typed": {
            "ordered": OrderedDict([("z", 1), ("a", torch.tensor([1.5]))]),
            "counter": Counter({"x": 2, 7: -1}),
            "defaultdict": defaultdict(list, {"k": [1]}),
            "defaultdict_none": defaultdict(None, {1: "a"}),
            "set": {3, "b", None, 2.5, b"x", False},
            "frozenset": frozenset({1, 2}),
            "bytearray": bytearray(b"\x00ab"),
            "complex": complex(1.5, -0.0),
            "namespace": argparse.Namespace(lr=0.5, name="n"),
            "simple": types.SimpleNamespace(a=1),
            "path": pathlib.PosixPath("/data/x"),
            "pure_posix": pathlib.PurePosixPath("rel/x"),
            "pure_windows": pathlib.PureWindowsPath("C:/data/x"),
            "size": torch.Size([3, 4]),
            "dtype": torch.bfloat16,
            "device": torch.device("cuda", 1),
            "attributedict": AttributeDict(lr=0.1),
        },
    }


def sharded_values() -> dict[str, torch.Tensor]:
    """The full tensors of the format 3 DTensors (each rank saves its shards of them, see ``PLACEMENTS``)."""
    return {
        "rows": torch.arange(52, dtype=torch.float32).reshape(13, 4) / 8,  # 7 + 6 rows
        "cols": torch.arange(15, dtype=torch.int64).reshape(3, 5) - 7,  # 3 + 2 columns
        "one_row": torch.tensor([[1.5, -2.5]], dtype=torch.bfloat16),  # rank 1's shard is empty
        "replicated": torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64),  # written by one of the two ranks
        "zero_d": torch.tensor(7.0),
        "empty": torch.empty(0, 3),  # no box at all
    }


#: name -> ("shard", dim) or ("replicate",)
PLACEMENTS = {
    "rows": ("shard", 0), "cols": ("shard", 1), "one_row": ("shard", 0), "replicated": ("replicate",),
    "zero_d": ("replicate",), "empty": ("shard", 0),
}  # fmt: skip


def _save_rank(rank: int, world: int, port: int, run: Path) -> None:
    """One rank of the 2-rank group that saves the format 3 fixture."""
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import safepoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    sharded = {
        name: distribute_tensor(
            value, mesh, [Shard(PLACEMENTS[name][1]) if PLACEMENTS[name][0] == "shard" else Replicate()]
        )
        for name, value in sharded_values().items()
    }
    state = {**source_state(), "sharded": sharded}
    with safepoint.CheckpointManager(run) as manager:
        manager.save(STEP, state, metrics=METRICS)
    dist.barrier()
    dist.destroy_process_group()


def _save_sharded(run: Path) -> None:
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, __file__, "--world", "2", "--port", str(port), "--run", str(run), "--rank"]
    ranks = [subprocess.Popen([*command, str(rank)]) for rank in range(2)]
    codes = [process.wait(timeout=300) for process in ranks]
    if any(codes):
        raise SystemExit(f"the ranks saving the sharded fixture exited with {codes}")


#: Which keys of the state share one storage (format 2 writes it once; a load gives them one storage again).
SHARED = [["tied/whole", "tied/grid", "tied/tail", "tied/same"]]
TIED = torch.arange(12, dtype=torch.float32) / 4
_FACTORIES = {None: "None", list: "list", dict: "dict", set: "set", int: "int", OrderedDict: "OrderedDict"}


# -- an encoder that knows nothing about safepoint ------------------------------------------------------------------
def encode(value: Any) -> dict[str, Any]:
    """A typed JSON record of a plain value; objects with state_dict() are recorded as their state_dict."""
    if value is None:
        return {"t": "none"}
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, np.generic):
        return {"t": "npscalar", "dtype": value.dtype.str, "hex": value.tobytes().hex()}
    if isinstance(value, int):
        return {"t": "int", "v": str(value)}
    if isinstance(value, float):
        return {"t": "float", "hex": value.hex()}
    if isinstance(value, str):
        return {"t": "str", "v": value}
    if isinstance(value, bytes):
        return {"t": "bytes", "hex": value.hex()}
    if isinstance(value, torch.Tensor):
        dense = torch.empty(value.shape, dtype=value.dtype).copy_(value).reshape(-1)
        raw = dense.view(torch.uint8).numpy().tobytes() if dense.numel() else b""
        return {"t": "tensor", "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "hex": raw.hex()}  # fmt: skip
    if isinstance(value, np.ndarray):
        native = value.astype(value.dtype.newbyteorder("="))  # a checkpoint stores native byte order
        return {"t": "ndarray", "dtype": native.dtype.str, "shape": list(value.shape), "hex": native.tobytes().hex()}
    typed = _encode_typed(value)
    if typed is not None:
        return typed
    if isinstance(value, dict):
        return {"t": "dict", "items": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"t": type(value).__name__, "items": [encode(v) for v in value]}
    if hasattr(value, "state_dict"):
        return encode(value.state_dict())  # format 1 recorded dict(state_dict()): a module's came back as a dict
    if type(value).__name__ == "Pickled":
        return {"t": "pickled", "value": encode(value.value)}
    raise TypeError(f"no record for {type(value).__name__}")


def _encode_typed(value: Any) -> dict[str, Any] | None:
    """Records of the values format 2 brings back as their own type; the class is named by the record."""
    cls = type(value)

    def items(mapping: Any) -> list[list[dict[str, Any]]]:
        return [[encode(k), encode(v)] for k, v in mapping.items()]

    if cls in (OrderedDict, Counter):
        return {"t": cls.__name__, "items": items(value)}
    if cls is defaultdict:
        return {"t": "defaultdict", "factory": _FACTORIES[value.default_factory], "items": items(value)}
    if cls in (set, frozenset):
        return {"t": cls.__name__, "items": [encode(v) for v in value]}
    if cls is bytearray:
        return {"t": "bytearray", "hex": value.hex()}
    if cls is complex:
        return {"t": "complex", "real": value.real.hex(), "imag": value.imag.hex()}
    if cls in (argparse.Namespace, types.SimpleNamespace):
        return {"t": cls.__name__, "items": items(vars(value))}
    if isinstance(value, pathlib.PurePath):
        return {"t": "path", "class": cls.__name__, "v": str(value)}
    if cls is torch.Size:
        return {"t": "Size", "items": [encode(v) for v in value]}
    if cls is torch.dtype:
        return {"t": "dtype", "v": str(value).removeprefix("torch.")}
    if cls is torch.device:
        return {"t": "device", "v": str(value)}
    if cls.__name__ == "AttributeDict":
        return {"t": "AttributeDict", "module": cls.__module__, "items": items(value)}
    return None


def write(version: int, force: bool) -> Path:
    import safepoint

    if version != safepoint.FORMAT_VERSION:
        raise SystemExit(f"this safepoint writes format {safepoint.FORMAT_VERSION}, not {version}")
    target = ROOT / f"format_v{version}"
    if target.exists():
        if not force:
            raise SystemExit(f"{target} exists: a released format's fixture is never regenerated")
        shutil.rmtree(target)
    target.mkdir(parents=True)
    state = source_state()
    if version >= 3:
        state["sharded"] = sharded_values()  # what a single-process load of the DTensors returns
    expected = {"format_version": version, "step": STEP, "metrics": METRICS, "state_version": 1,
                "shared": SHARED, "state": encode(state)}  # fmt: skip
    if version >= 3:
        _save_sharded(target / "run")
    else:
        with safepoint.CheckpointManager(target / "run") as manager:
            manager.save(STEP, state, metrics=METRICS)
    (target / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=True) + "\n")
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="replace an existing fixture (unreleased versions only)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # one rank of the sharded save
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:
        _save_rank(args.rank, args.world, args.port, args.run)
        return 0
    import safepoint

    print(write(safepoint.FORMAT_VERSION, args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
