"""RNGState: the global random generators as one checkpointable object.

Saving it captures Python's ``random``, numpy's global generator, torch's CPU generator and, when CUDA is
available, every CUDA device's generator. Restoring it sets them all, so a resumed run draws the same numbers
(dropout masks, shuffles) as an uninterrupted one.

A fresh process seeds Python's and numpy's generators from the operating system: for two runs to be comparable
from their start (not only from a resume), seed all three yourself (``random.seed``, ``np.random.seed``,
``torch.manual_seed``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._errors import RestoreError

__all__ = ["RNGState"]


class RNGState:
    """Put ``safepoint.RNGState()`` in the state dict; it holds nothing itself and reads the generators on save."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {"version": version, "state": list(internal), "gauss_next": gauss},
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"python", "numpy", "torch"} - set(state_dict)
        if missing:
            raise RestoreError(f"RNG state lacks {sorted(missing)}")
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) != torch.cuda.device_count():
            raise RestoreError(
                f"the checkpoint has RNG states for {len(cuda)} CUDA devices, this process sees "
                f"{torch.cuda.device_count()}"
            )
        cpu_state = _generator_state(state_dict["torch"], torch.get_rng_state(), "torch")
        cuda_states = (
            [_generator_state(s, torch.cuda.get_rng_state(i), f"cuda/{i}") for i, s in enumerate(cuda)]
            if cuda is not None and torch.cuda.is_available()
            else None
        )
        py = state_dict["python"]
        python_state = (int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"])
        numpy_state = _numpy_tuple(state_dict["numpy"])
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        for index, device_state in enumerate(cuda_states or ()):
            torch.cuda.set_rng_state(device_state, index)


def _generator_state(saved: Any, current: torch.Tensor, name: str) -> torch.Tensor:
    # torch reads generator state from raw memory: anything but an owning uint8 tensor of the same size crashes it
    if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8 or saved.shape != current.shape:
        raise RestoreError(f"RNG state {name!r} is not a generator state of this torch build")
    return saved.clone()


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "name": name,
        "keys": keys,
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": cached,
    }


def _numpy_tuple(state: Mapping[str, Any]) -> tuple[str, np.ndarray[Any, Any], int, int, float]:
    return (
        str(state["name"]),
        np.asarray(state["keys"], dtype=np.uint32),
        int(state["pos"]),
        int(state["has_gauss"]),
        float(state["cached_gaussian"]),
    )
