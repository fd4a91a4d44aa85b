"""User-state migrations: the chain, its checks, restore through it, and the key-path helpers.

Invariant defended: *old checkpoints always migrate, newer ones are refused*, and restore stays total or
nothing: a migration that fails leaves the live state exactly as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safepoint
from safepoint import ConfigError, KeyPathError, MigrationError, Migrations, StateVersionError
from tests.compat.test_golden import FIXTURES, live_state
from tests.conftest import fresh_state, make_state, tensors_of
from tests.helpers import assert_same


def chain(to: int = 4) -> Migrations:
    """Version 1 -> ``to`` (at most 4), each step touching keys an old state may not have (the OneTrainer bug)."""
    migrations = Migrations()

    def rename_lr(state: dict[str, Any]) -> dict[str, Any]:
        return safepoint.rename_key(state, "config/lr", "learning_rate", default=1e-3)

    def add_gradient_checkpointing(state: dict[str, Any]) -> dict[str, Any]:
        return safepoint.set_default(state, "config/gradient_checkpointing", False)

    def drop_legacy(state: dict[str, Any]) -> dict[str, Any]:
        safepoint.remove_key(state, "config/legacy")
        return state

    # registered out of order on purpose: the chain is ordered by version, not by registration
    for version, function in ((2, rename_lr), (1, add_gradient_checkpointing), (3, drop_legacy)):
        if version < to:
            migrations.register(from_version=version)(function)
    return migrations


# -- the chain ----------------------------------------------------------------------------------------------------
def test_upgrade_runs_every_step_in_version_order_and_fills_missing_keys() -> None:
    old = {"config": {"lr": 0.5, "legacy": "x"}}
    upgraded = chain().upgrade(old, from_version=1)
    assert upgraded == {"config": {"learning_rate": 0.5, "gradient_checkpointing": False}}
    assert old == {"config": {"lr": 0.5, "legacy": "x"}}  # the caller's dict is not modified


def test_upgrade_of_a_state_that_never_had_the_keys_uses_the_declared_defaults() -> None:
    assert chain().upgrade({"config": {}}, from_version=1) == {
        "config": {"learning_rate": 1e-3, "gradient_checkpointing": False}
    }


def test_upgrade_from_a_middle_version_and_to_a_middle_version() -> None:
    migrations = chain()
    assert migrations.upgrade({"config": {"lr": 2.0}}, from_version=2, to_version=3) == {
        "config": {"learning_rate": 2.0}
    }
    assert migrations.upgrade({"config": {}}, from_version=4) == {"config": {}}


def test_a_duplicate_registration_is_refused_naming_both_functions() -> None:
    migrations = chain()
    with pytest.raises(ConfigError, match="add_gradient_checkpointing") as caught:

        @migrations.register(from_version=1)
        def another(state: dict[str, Any]) -> dict[str, Any]:
            return state

    assert "another" in str(caught.value)
    assert migrations.versions == (1, 2, 3)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
def test_a_bad_from_version_is_refused_at_registration(bad: Any) -> None:
    with pytest.raises(ConfigError, match="from_version"):
        Migrations().register(from_version=bad)


def gapped() -> Migrations:
    migrations = Migrations()
    migrations.register(from_version=1)(lambda state: state)
    migrations.register(from_version=3)(lambda state: state)
    return migrations


def test_a_gap_is_refused_at_first_use_before_any_migration_runs() -> None:
    with pytest.raises(ConfigError, match=r"gap.*none from 2"):
        gapped().upgrade({}, from_version=1)


def test_a_gap_is_refused_by_the_manager_before_the_directory_is_touched(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gap"):
        safepoint.CheckpointManager(tmp_path / "run", state_version=4, migrations=gapped())
    assert not (tmp_path / "run").exists()


def test_a_migration_beyond_the_codes_state_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"drop_legacy upgrades version 3 to 4.*state_version is 3"):
        safepoint.CheckpointManager(tmp_path / "run", state_version=3, migrations=chain())


def test_a_chain_that_stops_short_of_the_codes_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ends at version 4.*state_version is 6"):
        safepoint.CheckpointManager(tmp_path / "run", state_version=6, migrations=chain())


def test_migrations_must_be_a_migrations_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"safepoint.Migrations"):
        safepoint.CheckpointManager(tmp_path / "run", migrations={1: lambda s: s})  # type: ignore[arg-type]


def test_a_failing_migration_is_named_with_its_version_and_cause() -> None:
    migrations = Migrations()

    @migrations.register(from_version=1)
    def pop_without_default(state: dict[str, Any]) -> dict[str, Any]:
        state["config"].pop("gradient_checkpointing")  # the OneTrainer bug
        return state

    with pytest.raises(MigrationError) as caught:
        migrations.upgrade({"config": {}}, from_version=1)
    error = caught.value
    assert error.function.endswith("pop_without_default")
    assert error.from_version == 1
    assert isinstance(error.__cause__, KeyError)
    assert "pop_without_default (from version 1 to 2)" in str(error)
    assert "gradient_checkpointing" in str(error)


def test_a_migration_that_forgets_to_return_the_state_is_caught() -> None:
    migrations = Migrations()

    @migrations.register(from_version=1)
    def forgetful(state: dict[str, Any]) -> None:
        state["x"] = 1

    with pytest.raises(MigrationError, match=r"forgetful.*returned NoneType.*return state"):
        migrations.upgrade({}, from_version=1)


def test_a_newer_state_is_refused_naming_both_versions() -> None:
    with pytest.raises(StateVersionError, match="state_version 5, newer than this code's 4") as caught:
        chain().upgrade({}, from_version=5, to_version=4)
    assert caught.value.saved_version == 5
    assert caught.value.expected_version == 4


def test_a_state_older_than_the_chain_is_refused_naming_the_missing_step() -> None:
    migrations = Migrations()
    migrations.register(from_version=2)(lambda state: state)
    with pytest.raises(StateVersionError, match="no migration is registered from version 1"):
        migrations.upgrade({}, from_version=1)


# -- restore through the chain ------------------------------------------------------------------------------------
def save_versioned(root: Path, steps: dict[int, int], state: dict[str, Any]) -> None:
    """Save ``state`` at each step with the given state_version, as code of that version would."""
    for step, version in steps.items():
        with safepoint.CheckpointManager(root, state_version=version) as manager:
            manager.save(step, state)


def test_equal_versions_without_migrations_change_nothing(tmp_path: Path) -> None:
    save_versioned(tmp_path, {1: 3}, make_state())
    state = fresh_state()
    with safepoint.CheckpointManager(tmp_path, state_version=3) as manager:
        report = manager.restore(state)
    assert report is not None
    assert report.migrations == ()
    assert report.state_version == 3
    assert_same(tensors_of(state), tensors_of(make_state()))


def test_an_older_checkpoint_without_migrations_is_refused(tmp_path: Path) -> None:
    save_versioned(tmp_path, {1: 1}, make_state())
    state = fresh_state()
    before = tensors_of(state)
    with (
        safepoint.CheckpointManager(tmp_path, state_version=2) as manager,
        pytest.raises(StateVersionError, match=r"state_version 1 and this code expects 2.*pass migrations="),
    ):
        manager.restore(state)
    assert_same(tensors_of(state), before)


def test_a_newer_checkpoint_is_refused_without_falling_back_to_an_older_step(tmp_path: Path) -> None:
    save_versioned(tmp_path, {1: 2, 2: 3}, make_state())
    state = fresh_state()
    before = tensors_of(state)
    with safepoint.CheckpointManager(tmp_path, state_version=2) as manager:
        with pytest.raises(StateVersionError, match="state_version 3, newer than this code's 2") as caught:
            manager.restore(state)
        assert "step-000000000002" in str(caught.value)
        assert_same(tensors_of(state), before)
        report = manager.restore(state, step=1)  # asking for the older step explicitly still works
    assert report is not None
    assert report.step == 1


def test_a_failing_migration_leaves_the_live_state_unchanged(tmp_path: Path) -> None:
    save_versioned(tmp_path, {5: 1}, {**make_state(), "config": {"lr": 0.5}})
    migrations = Migrations()

    @migrations.register(from_version=1)
    def broken(state: dict[str, Any]) -> dict[str, Any]:
        state["model"]["0.weight"].zero_()  # touches the loaded data, which is not live
        raise ValueError("boom")

    state = {**fresh_state(), "config": {"lr": 0.0}}
    before = tensors_of(state)
    with (
        safepoint.CheckpointManager(tmp_path, state_version=2, migrations=migrations) as manager,
        pytest.raises(MigrationError, match=r"broken .from version 1 to 2. failed.*boom") as caught,
    ):
        manager.restore(state)
    assert isinstance(caught.value.__cause__, ValueError)
    assert_same(tensors_of(state), before)
    assert state["config"] == {"lr": 0.0}


def test_restore_of_a_version_1_checkpoint_into_version_3_live_state(tmp_path: Path) -> None:
    save_versioned(tmp_path, {7: 1}, {**make_state(), "config": {"lr": 0.5, "legacy": True}})
    state = {**fresh_state(), "config": {"learning_rate": 0.0, "gradient_checkpointing": True, "legacy": None}}
    with safepoint.CheckpointManager(tmp_path, state_version=3, migrations=chain(to=3)) as manager:
        report = manager.restore(state)
    assert report is not None
    assert report.migrations == ("chain.<locals>.add_gradient_checkpointing (1 -> 2)",
                                 "chain.<locals>.rename_lr (2 -> 3)")  # fmt: skip
    assert report.state_version == 1
    assert state["config"] == {"learning_rate": 0.5, "gradient_checkpointing": False, "legacy": True}
    assert_same(tensors_of(state), tensors_of(make_state()))


def test_the_golden_version_1_checkpoint_restores_into_version_3_live_state(tmp_path: Path) -> None:
    run = shutil.copytree(FIXTURES[0] / "run", tmp_path / "run")
    migrations = Migrations()

    @migrations.register(from_version=1)
    def add_gradient_checkpointing(state: dict[str, Any]) -> dict[str, Any]:
        return safepoint.set_default(state, "config/gradient_checkpointing", False)

    @migrations.register(from_version=2)
    def rename_lr(state: dict[str, Any]) -> dict[str, Any]:
        return safepoint.rename_key(state, "config/lr", "learning_rate", default=1e-3)

    state = live_state()
    del state["config"]["lr"]
    state["config"].update(learning_rate=None, gradient_checkpointing=None)
    with safepoint.CheckpointManager(run, state_version=3, migrations=migrations) as manager:
        report = manager.restore(state)
    assert report is not None
    assert [name.split(".")[-1] for name in report.migrations] == [
        "add_gradient_checkpointing (1 -> 2)",
        "rename_lr (2 -> 3)",
    ]
    assert state["config"]["learning_rate"] == 0.125
    assert state["config"]["gradient_checkpointing"] is False


def test_the_one_checkpoint_restore_takes_a_state_version_and_migrations(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"config": {"lr": 0.5}}, state_version=2)
    state: dict[str, Any] = {"config": {"learning_rate": 0.0}}
    report = safepoint.restore(tmp_path / "ckpt", state, state_version=3, migrations=chain(to=3))
    assert report.migrations[-1].endswith("rename_lr (2 -> 3)")
    assert state == {"config": {"learning_rate": 0.5}}
    with pytest.raises(StateVersionError, match="newer than this code's 1"):
        safepoint.restore(tmp_path / "ckpt", state, state_version=1)
    with pytest.raises(ConfigError, match="state_version"):
        safepoint.restore(tmp_path / "ckpt", state, migrations=chain(to=3))


# -- key-path helpers ---------------------------------------------------------------------------------------------
def test_set_default_adds_only_what_is_missing() -> None:
    state: dict[str, Any] = {"config": {"a": 1}}
    safepoint.set_default(state, "config/a", 2)
    safepoint.set_default(state, "config/b", 3)
    assert state == {"config": {"a": 1, "b": 3}}


def test_remove_key_returns_the_value_or_the_declared_default() -> None:
    state: dict[str, Any] = {"config": {"a": 1}}
    assert safepoint.remove_key(state, "config/a") == 1
    assert safepoint.remove_key(state, "config/a") is None
    assert safepoint.remove_key(state, "config/a", default="gone") == "gone"
    assert state == {"config": {}}


def test_move_key_moves_or_sets_the_default_and_never_overwrites() -> None:
    state: dict[str, Any] = {"old": {"x": 1}, "new": {}}
    safepoint.move_key(state, "old/x", "new/y", default=0)
    assert state == {"old": {}, "new": {"y": 1}}
    safepoint.move_key(state, "old/x", "new/z", default=0)
    assert state == {"old": {}, "new": {"y": 1, "z": 0}}
    with pytest.raises(KeyPathError, match="'new/y' exists already"):
        safepoint.move_key(state, "new/z", "new/y", default=0)
    assert state == {"old": {}, "new": {"y": 1, "z": 0}}


def test_key_paths_find_the_int_keys_of_optimizer_state() -> None:
    state: dict[str, Any] = {"optimizer": {"state": {0: {"exp_avg": 1}}}}
    safepoint.rename_key(state, "optimizer/state/0/exp_avg", "momentum", default=None)
    safepoint.rename_key(state, ["optimizer", "state", 0, "momentum"], "m", default=None)
    assert state == {"optimizer": {"state": {0: {"m": 1}}}}


@pytest.mark.parametrize(
    ("call", "where"),
    [
        (lambda s: safepoint.set_default(s, "config/optim/lr", 0.1), "'config/optim' is missing"),
        (lambda s: safepoint.remove_key(s, "nope/x"), "'nope' is missing"),
        (lambda s: safepoint.rename_key(s, "config/optim/lr", "x", default=0), "'config/optim' is missing"),
        (lambda s: safepoint.move_key(s, "config/a", "other/b", default=0), "'other' is missing"),
        (lambda s: safepoint.set_default(s, "config/a/b", 0), "'config/a' is of type int, not a dict"),
        (lambda s: safepoint.set_default(s, "items/0/x", 0), "'items/0' is of type int, not a dict"),
        (lambda s: safepoint.remove_key(s, "items/5"), "'items' is of type list, not a dict"),
    ],
)
def test_a_missing_intermediate_path_is_a_typed_error_naming_the_full_path(call: Any, where: str) -> None:
    state: dict[str, Any] = {"config": {"a": 1}, "items": [1, 2]}
    with pytest.raises(KeyPathError, match=where) as caught:
        call(state)
    assert not isinstance(caught.value, KeyError)
    assert caught.value.key in str(caught.value)
    assert state == {"config": {"a": 1}, "items": [1, 2]}


def test_a_key_path_error_inside_a_migration_names_the_migration() -> None:
    migrations = Migrations()

    @migrations.register(from_version=1)
    def deep(state: dict[str, Any]) -> dict[str, Any]:
        return safepoint.set_default(state, "config/optim/lr", 0.1)

    with pytest.raises(MigrationError, match=r"deep .from version 1 to 2.*'config/optim/lr'") as caught:
        migrations.upgrade({"config": {}}, from_version=1)
    assert isinstance(caught.value.__cause__, KeyPathError)


@pytest.mark.parametrize("bad", ["", "a//b", 3, ["a", None]])
def test_a_malformed_key_path_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError, match="key path"):
        safepoint.set_default({"a": {}}, bad, 1)


# -- whatever the state and the path, a helper succeeds or raises a typed error ----------------------------------------
_keys = st.one_of(st.sampled_from(["a", "b", "0", "1", "²"]), st.integers(0, 2))
_trees = st.recursive(
    st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just(torch.zeros(1))),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(_keys, children, max_size=3)),
    max_leaves=12,
)
_paths = st.lists(st.sampled_from(["a", "b", "0", "1", "²"]), min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(tree=st.dictionaries(_keys, _trees, max_size=3), first=_paths, second=_paths)
def test_helpers_never_raise_anything_but_typed_errors(tree: dict[Any, Any], first: str, second: str) -> None:
    calls = [
        lambda: safepoint.set_default(tree, first, 1),
        lambda: safepoint.remove_key(tree, first, default=None),
        lambda: safepoint.rename_key(tree, first, "renamed", default=None),
        lambda: safepoint.move_key(tree, first, second, default=None),
    ]
    named = []
    for call in calls:
        try:
            call()
        except KeyPathError as err:  # anything else (KeyError, IndexError, TypeError, ValueError) fails the test
            named.append(err.key)
    renamed = f"{first.rpartition('/')[0]}/renamed".lstrip("/")
    assert set(named) <= {first, second, renamed}  # the error names the path it was given
