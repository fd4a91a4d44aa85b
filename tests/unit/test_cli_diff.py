"""``safepoint diff``: two real checkpoints compared value by value, with diff(1)'s exit codes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safepoint
from safepoint import _diff as diff_module
from safepoint._cli import main
from safepoint._diff import compare_tensors, diff_trees


class RefusesToUnpickle:
    """Unpickling this runs code that fails: a diff that compares pickled entries must never do it."""

    def __init__(self, tag: int) -> None:
        self.tag = tag

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise AssertionError("diff unpickled an entry")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def changes(out: str) -> dict[str, str]:
    """``{key: rest of the line}`` for every ``  + key: ...``, ``  - key: ...`` and ``  ~ key: ...`` line."""
    found = {}
    for line in out.splitlines():
        if line[:4] in ("  + ", "  - ", "  ~ "):
            key, _, rest = line[4:].partition(": ")
            found[key] = line[2] + " " + rest.rstrip()
    return found


def base_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": torch.nn.Linear(4, 3),
        "progress": {"step": 10, "epoch": 1},
        "name": "run-a",
        "old": 7,
        "lr": 0.1,
        "mask": np.arange(6, dtype=np.int16),
        "history": {},
        "blob": safepoint.Pickled(RefusesToUnpickle(1)),
    }


def save(root: Path, state: dict[str, Any], step: int = 5, metrics: dict[str, float] | None = None) -> str:
    safepoint.save(root, state, step=step, metrics=metrics or {"loss": 0.5})
    return str(root)


def test_two_saves_of_one_state_are_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", base_state())
    b = save(tmp_path / "b", base_state(), step=6)  # the step is shown, not compared
    code, out, err = run(capsys, "diff", a, b)
    assert code == 0, err
    assert changes(out) == {}
    assert out.splitlines()[-1].startswith("identical: ")
    assert "step 5" in out.splitlines()[0]
    assert "step 6" in out.splitlines()[1]


def test_every_kind_of_change_is_listed_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = base_state()
    after = base_state()
    with torch.no_grad():
        after["model"].weight[1, 2] += 0.5
        after["model"].weight[0, 0] -= 0.25
    after["progress"]["step"] = 11
    after["name"] = "run-b"
    del after["old"]
    after["new"] = [1, 2]
    after["lr"] = 1  # an int where a float was: same number, another type
    after["mask"] = np.arange(6, dtype=np.int32)
    after["history"] = {"loss": 0.25}
    after["blob"] = safepoint.Pickled(RefusesToUnpickle(2))
    a = save(tmp_path / "a", before)
    b = save(tmp_path / "b", after, metrics={"loss": 0.25, "acc": 0.5})
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    found = changes(out)
    assert found.pop("model/weight") == "~ tensor float32 [3, 4]: 2 of 12 element(s) differ, max |a-b| = 0.5"
    assert found.pop("progress/step") == "~ int 10 -> int 11"
    assert found.pop("name") == "~ str 'run-a' -> str 'run-b'"
    assert found.pop("old") == "- int 7"
    assert found.pop("new/0") == "+ int 1"
    assert found.pop("new/1") == "+ int 2"
    assert found.pop("lr") == "~ float 0.1 -> int 1"
    assert found.pop("mask") == "~ ndarray int16 [6] -> ndarray int32 [6]"
    assert found.pop("history/loss") == "+ float 0.25"  # the empty dict filled: its items are the news
    assert found.pop("blob").startswith("~ pickle (")
    assert found.pop("acc") == "+ 0.5"  # metrics
    assert found.pop("loss") == "~ 0.5 -> 0.25"
    assert found == {}  # model/bias, progress/epoch: unchanged, so not listed
    assert out.splitlines()[-1] == "different: entries: 6 changed, 3 added, 1 removed; metrics: 2 differ"


def test_tensors_are_compared_bitwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nan = torch.tensor([math.nan, 1.0])
    a = save(tmp_path / "a", {"zero": torch.tensor([0.0, 2.0]), "nan": nan})
    b = save(tmp_path / "b", {"zero": torch.tensor([-0.0, 2.0]), "nan": nan.clone()})
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    # equal as numbers, not as bits: a diff that says "identical" here would hide a sign flip
    assert changes(out) == {"zero": "~ tensor float32 [2]: 1 of 2 element(s) differ, max |a-b| = 0"}


def test_nan_against_a_number_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", {"w": torch.tensor([1.0, 2.0, 3.0])})
    b = save(tmp_path / "b", {"w": torch.tensor([1.0, math.nan, 3.5])})
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert changes(out)["w"] == (
        "~ tensor float32 [3]: 2 of 3 element(s) differ, max |a-b| = 0.5, 1 where one side is NaN"
    )


def test_shape_changes_and_structure_changes_are_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = save(tmp_path / "a", {"w": torch.zeros(2, 3), "cfg": {"depth": 2, "width": 8}, "tags": ["x"]})
    b = save(tmp_path / "b", {"w": torch.zeros(3, 2), "cfg": 5, "tags": ("x",)})
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert changes(out) == {
        "w": "~ tensor float32 [2, 3] -> tensor float32 [3, 2]",
        "cfg": "~ dict -> int 5",  # not also cfg/depth and cfg/width removed
        "tags": "~ list -> tuple",
    }


def test_an_object_saved_from_another_class_is_a_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    a = save(tmp_path / "a", {"opt": torch.optim.SGD(params, lr=0.1)})
    b = save(tmp_path / "b", {"opt": torch.optim.Adagrad(params, lr=0.1)})
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert changes(out)["opt"] == (
        "~ dict (state_dict of torch.optim.sgd.SGD) -> dict (state_dict of torch.optim.adagrad.Adagrad)"
    )


def test_steps_of_manager_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        for step in (100, 200, 300):
            manager.save(step, {"w": torch.full((2,), float(step)), "step": step})
    run_dir = str(tmp_path / "run")
    code, out, _ = run(capsys, "diff", run_dir, run_dir, "--step-a", "100", "--step-b", "200")
    assert code == 1
    assert changes(out) == {"step": "~ int 100 -> int 200", "w": "~ tensor float32 [2]: 2 of 2 element(s) differ, "
                            "max |a-b| = 100"}  # fmt: skip
    code, out, _ = run(capsys, "diff", run_dir, run_dir, "--step-a", "300")  # B: the newest, 300
    assert code == 0
    assert "step-000000000300" in out.splitlines()[1]


@pytest.mark.parametrize("side", ["a", "b"])
def test_a_damaged_checkpoint_is_trouble_naming_the_file(
    side: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = {name: save(tmp_path / name, {"w": torch.arange(8.0)}) for name in ("a", "b")}
    (victim,) = (tmp_path / side).glob("*/00000.safetensors")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    code, out, err = run(capsys, "diff", paths["a"], paths["b"])
    assert code == 2  # diff(1): trouble, not "different"
    assert out == ""
    assert err.startswith(f"error: {side.upper()}: ")
    assert str(victim) in err
    assert err.count("\n") == 1


def test_a_missing_path_or_an_uncommitted_step_is_trouble(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", {"w": torch.ones(1)})
    code, out, err = run(capsys, "diff", a, str(tmp_path / "nope"))
    assert code == 2
    assert out == ""
    assert err == f"error: {tmp_path / 'nope'} does not exist\n"
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, {"w": torch.ones(1)})
    code, out, err = run(capsys, "diff", a, str(tmp_path / "run"), "--step-b", "2")
    assert code == 2
    assert out == ""
    assert "step 2 is not committed" in err


def test_metrics_alone_make_checkpoints_different(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a", {"w": torch.ones(2)}, metrics={"loss": 0.5})
    b = save(tmp_path / "b", {"w": torch.ones(2)}, metrics={"loss": 0.5, "acc": 0.9})
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert changes(out) == {"acc": "+ 0.9"}
    assert out.splitlines()[-1] == "different: metrics: 1 differ"


def test_state_version_alone_makes_checkpoints_different(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safepoint.save(tmp_path / "a", {"w": torch.ones(2)}, step=1, state_version=1)
    safepoint.save(tmp_path / "b", {"w": torch.ones(2)}, step=1, state_version=2)
    code, out, _ = run(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1
    assert changes(out) == {"state_version": "~ 1 -> 2"}  # the same values may mean other things
    assert out.splitlines()[-1] == "different: state_version differs"


def test_large_tensors_are_compared_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diff_module, "_CHUNK_ELEMENTS", 7)  # many chunks, and a short last one
    a = torch.arange(50, dtype=torch.bfloat16)
    b = a.clone()
    b[3] += 1
    b[20] -= 8
    b[49] = math.inf
    assert compare_tensors(a, a.clone()) is None
    assert compare_tensors(a, b) == "3 of 50 element(s) differ, max |a-b| = inf"
    b[49] = a[49]
    assert compare_tensors(a, b) == "2 of 50 element(s) differ, max |a-b| = 8"
    ints = torch.arange(20, dtype=torch.int64)
    assert compare_tensors(ints, ints.flip(0)) == "20 of 20 element(s) differ"


def test_plain_states_are_compared_by_the_same_engine() -> None:
    """What ``migrate --dry-run`` lists: a state before and after its migrations, never saved."""
    before = {"w": torch.tensor([1.0, float("nan")]), "config": {"lr": 0.1, "old": 1}, "same": [1, 2]}
    after = {"w": torch.tensor([1.0, float("nan")]), "config": {"lr": 0.2, "new": True}, "same": [1, 2]}
    entries, compared = diff_trees(before, after)
    assert [(d.kind, d.key, d.before, d.after) for d in entries] == [
        ("changed", "config/lr", "float 0.1", "float 0.2"),
        ("added", "config/new", "", "bool True"),
        ("removed", "config/old", "int 1", ""),
    ]
    assert compared == 4  # w (NaN equals the same NaN), config/lr, same/0, same/1
    grown, _ = diff_trees(before, {**before, "w": torch.tensor([1.0, 2.0])})
    assert [(d.kind, d.key, d.detail) for d in grown] == [
        ("changed", "w", "1 of 2 element(s) differ, 1 where one side is NaN")
    ]
