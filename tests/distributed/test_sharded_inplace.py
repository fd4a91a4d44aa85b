"""A resharded restore reads live DTensors' local shards in place, behind backups: total or nothing on every rank.

A 3-rank gloo group (see worker_inplace.py) restores a checkpoint whose step 2 has a corrupt box that only the
last rank reads, after the other ranks have already written every shard in place (and the last rank some): asked
for step 2, every rank raises and every live shard is bitwise what it was; restoring the newest that verifies,
every rank falls back to step 1, and a tensor step 1 lacks keeps its own values (not step 2's). An object whose
load_state_dict fails on one rank, after all reads, makes that rank put its shards back. A module's DTensor
parameter is read in place too, and a module whose load_state_dict does not keep it is caught and put back. An
optimizer object holding state takes its saved DTensor moments into its own tensors, and is put back (bits, the
same tensors, its learning rate) when a later object fails on its rank.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.distributed.group import run_group

WORLD = 3


@pytest.fixture(scope="module")
def found(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    base = tmp_path_factory.mktemp("inplace")
    ranks = run_group("", WORLD, base, base / "out", worker="tests.distributed.worker_inplace")
    for rank, result in enumerate(ranks):
        assert result.returncode == 0, f"rank {rank} exited {result.returncode}:\n{result.output[-4000:]}"
    return [result.results for result in ranks]


def _all_true(flags: dict[str, bool]) -> list[str]:
    return [key for key, same in flags.items() if same is not True]


def test_a_corrupt_box_one_rank_finds_leaves_every_live_shard_as_it_was(found: list[dict[str, Any]]) -> None:
    assert found[0]["corrupted"] == f"r0000{WORLD - 1}-shd-00000.safetensors"
    for rank, observed in enumerate(found):
        explicit = observed["explicit"]
        assert explicit["error"] == "CorruptCheckpointError", (rank, explicit)
        assert "checksum" in explicit["message"], (rank, explicit)
        assert len(observed["explicit_unchanged"]) == 3
        assert _all_true(observed["explicit_unchanged"]) == [], rank


def test_every_rank_falls_back_to_the_older_step_from_its_own_values(found: list[dict[str, Any]]) -> None:
    for rank, observed in enumerate(found):
        fallback = observed["fallback"]
        assert fallback["error"] is None, (rank, fallback)
        assert fallback["step"] == 1, rank
        assert fallback["skipped"] == [2], rank
        assert _all_true(observed["fallback_m_is_step1"]) == [], rank
        # step 1 has no extra/c: it keeps the values it had, not step 2's read in place and put back
        assert observed["fallback_extra_unchanged"] == {"extra/c": True}, rank


def test_a_failure_in_the_apply_phase_puts_the_failing_ranks_shards_back(found: list[dict[str, Any]]) -> None:
    for rank, observed in enumerate(found):
        failed = observed["apply_fails"]
        assert failed["error"] == "RestoreError", (rank, failed)
        if rank == WORLD - 1:
            assert "refuses" in failed["message"], failed
            assert _all_true(observed["apply_fails_unchanged"]) == [], rank
        else:  # these ranks applied, and were told that another failed
            assert _all_true(observed["apply_fails_is_step2"]) == [], rank


def test_a_clean_restore_fills_the_same_live_tensors(found: list[dict[str, Any]]) -> None:
    for rank, observed in enumerate(found):
        assert observed["clean"]["error"] is None, (rank, observed["clean"])
        assert observed["clean"]["step"] == 2, rank
        assert _all_true(observed["clean_is_step2"]) == [], rank
        assert observed["clean_same_objects"] is True, rank


def test_a_modules_dtensor_parameter_restores_in_place_and_is_checked(found: list[dict[str, Any]]) -> None:
    for rank, observed in enumerate(found):
        assert observed["resets=False"]["error"] is None, (rank, observed["resets=False"])
        assert observed["resets=False same_parameter"] is True, rank
        assert observed["resets=False is_step1"] is True, rank


def test_a_module_that_does_not_keep_what_it_was_given_is_caught_and_put_back(found: list[dict[str, Any]]) -> None:
    for rank, observed in enumerate(found):
        failed = observed["resets=True"]
        assert failed["error"] == "RestoreError", (rank, failed)
        assert "did not take effect" in failed["message"], (rank, failed)
        assert "net/weight" in failed["message"], (rank, failed)
        # the values read in place are put back: the parameter is as it was before the restore, not zeros
        assert observed["resets=True unchanged"] is True, rank
        assert observed["resets=True is_step1"] is False, rank


def test_an_optimizer_holding_state_takes_the_saved_moments_into_its_own_tensors(found: list[dict[str, Any]]) -> None:
    for rank, observed in enumerate(found):
        assert observed["optim clean"]["error"] is None, (rank, observed["optim clean"])
        assert observed["optim clean same_tensors"] is True, rank
        assert _all_true(observed["optim clean same_memory"]) == [], rank
        assert len(observed["optim clean is_saved"]) == 2
        assert _all_true(observed["optim clean is_saved"]) == [], rank
        assert observed["optim clean lr"] == 0.1, rank


def test_an_optimizer_read_in_place_is_put_back_when_a_later_object_fails(found: list[dict[str, Any]]) -> None:
    for rank, observed in enumerate(found):
        failed = observed["optim apply_fails"]
        assert failed["error"] == "RestoreError", (rank, failed)
        assert observed["optim apply_fails same_tensors"] is True, rank
        assert _all_true(observed["optim apply_fails same_memory"]) == [], rank
        if rank == WORLD - 1:  # rolled back: the state (bits and tensors) and the learning rate it had
            assert "refuses" in failed["message"], failed
            assert _all_true(observed["optim apply_fails unchanged"]) == [], rank
            assert observed["optim apply_fails lr"] == 0.5, rank
        else:  # these ranks applied, and were told that another failed
            assert _all_true(observed["optim apply_fails is_saved"]) == [], rank
            assert observed["optim apply_fails lr"] == 0.1, rank


def test_a_restore_closes_the_files_it_held_open_for_its_reads(found: list[dict[str, Any]]) -> None:
    # ranged reads go through one descriptor per file, held for the restore: none is left open after one,
    # whether it applied, fell back, failed on a corrupt box or failed in the apply phase
    for rank, observed in enumerate(found):
        for name in ("explicit", "fallback", "apply_fails", "clean"):
            assert observed[f"open_after_{name}"] == [], (rank, name)
