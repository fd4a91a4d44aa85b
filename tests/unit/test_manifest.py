"""The strict manifest parser: everything it does not recognise is an error naming the problem, never a crash.

Invariants defended: *visible means complete* (a manifest that does not add up is refused before any payload byte
is read) and *old checkpoints always migrate / newer ones are refused by name*. Malicious manifests are built by
editing the JSON of a real one and re-sealing its checksum (tests/helpers.py), so the check under test is the one
that fires.
"""

from __future__ import annotations

import copy
import json
import math
import re
from argparse import Namespace
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safepoint
from safepoint import CorruptCheckpointError, FormatVersionError, UnsafeCheckpointError
from safepoint._codec import MAX_TREE_DEPTH
from safepoint._manifest import FORMAT_VERSION, EntryRecord, FileRecord, Manifest
from tests.helpers import canonical, seal, xxh3

SOURCE = "/somewhere/step-000000000007/manifest.json"
Body = dict[str, Any]


def parse(data: bytes) -> Manifest:
    return Manifest.from_json(data, SOURCE)


TIED = torch.arange(6, dtype=torch.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "checkpoint"
    torch.manual_seed(0)
    state = {
        "model": torch.nn.Linear(2, 3),
        "opt": {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}}, "groups": [{"lr": 0.1, "params": [0]}]},
        "arr": np.arange(3, dtype=np.int32),
        "scal": np.float32(1.5),
        "pk": safepoint.Pickled({"a": 1}),
        "misc": (1, 2.5, "s", b"b", None, True, math.nan, 2**70),
        "alike": {0: 1, "0": 2},
        "tied": {"a": TIED, "b": TIED[2:].view(2, 2), "c": TIED.view(2, 3).t()},
        "typed": {
            "od": OrderedDict(x=1),
            "set": {1, "x"},
            "c": 1 - 2j,
            "size": torch.Size([2, 3]),
            "ns": Namespace(a=1),
        },
    }
    safepoint.save(path, state, step=7, metrics={"loss": 0.5, "acc": math.nan}, state_version=3)
    return path


@pytest.fixture(scope="module")
def original(saved: Path) -> bytes:
    return (saved / "manifest.json").read_bytes()


@pytest.fixture
def body(original: bytes) -> Body:
    result: Body = json.loads(original)
    return result


def entry_of(body: Body, key: str) -> dict[str, Any]:
    matches = [e for e in body["entries"] if e["key"] == key]
    assert len(matches) == 1, key
    return matches[0]


def node_of(body: Body, *path: str | int) -> dict[str, Any]:
    """The tree node at ``path`` (object nodes are looked through, as the key paths do)."""
    node: dict[str, Any] = body["tree"]
    for part in path:
        while node["k"] in ("object", "typed"):
            node = node["v"]
        if node["k"] == "dict":
            node = next(child for key, child in node["v"] if type(key) is type(part) and key == part)
        else:
            assert isinstance(part, int)
            node = node["v"][part]
    return node


def refused(data: bytes) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as info:
        parse(data)
    return info.value


# -- a valid manifest -------------------------------------------------------------------------------------------
def test_a_real_manifest_parses_and_round_trips(saved: Path, original: bytes) -> None:
    manifest = parse(original)
    assert manifest.to_json() == original  # canonical: parsing and writing again gives the same bytes
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.step == 7
    assert manifest.state_version == 3
    assert manifest.world_size == 1
    assert manifest.metrics["loss"] == 0.5
    assert math.isnan(manifest.metrics["acc"])
    assert re.fullmatch(r"[0-9a-f]{32}", manifest.save_id)
    keys = {e.key: e for e in manifest.entries}
    assert set(keys) == {
        "model/weight", "model/bias", "opt/state/0/step", "opt/state/0/m", "arr", "scal", "pk", "tied/a"
    }  # fmt: skip
    assert [keys["tied/a"].kind, keys["tied/a"].shape] == ["tensor", (6,)]  # three tensors, one storage, one entry
    assert keys["model/weight"].kind == "tensor"
    assert keys["model/weight"].dtype == "F32"
    assert keys["model/weight"].shape == (3, 2)
    assert [keys["arr"].kind, keys["arr"].dtype, keys["arr"].shape] == ["ndarray", "I32", (3,)]
    assert [keys["scal"].kind, keys["scal"].shape, keys["scal"].scalar] == ["ndarray", (), True]
    assert [keys["pk"].kind, keys["pk"].dtype] == ["pickle", "U8"]
    for record in manifest.files:
        on_disk = (saved / record.path).read_bytes()
        assert record.size == len(on_disk)
        assert record.checksum == xxh3(on_disk)
    assert manifest.nbytes == sum(len((saved / r.path).read_bytes()) for r in manifest.files)


def test_a_hand_built_manifest_round_trips() -> None:
    tree = {
        "k": "dict",
        "v": [
            ["w", {"k": "tensor", "e": 0}],
            [0, {"k": "tuple", "v": [{"k": "float", "v": "-inf"}, {"k": "bytes", "v": "AAE="}, {"k": "none"}]}],
            ["0", {"k": "object", "type": "x.Y", "v": {"k": "dict", "v": [["s", {"k": "ndarray", "e": 1}]]}}],
        ],
    }
    manifest = Manifest(
        step=2**40,
        save_id="0" * 32,
        created=1.5,
        files=(FileRecord("a/00000.safetensors", 64, "xxh3_64:00ff"),),
        entries=(
            EntryRecord("w", "tensor", "BF16", (2, 0, 3), 0, "w"),
            EntryRecord("0/s", "ndarray", "C64", (), 0, "0/s", scalar=True),
        ),
        tree=tree,
        metrics={"loss": 1.0, "big": math.inf},
        state_version=4,
        world_size=8,
        writer="someone else",
    )
    again = parse(manifest.to_json())
    assert again == manifest
    assert again.to_json() == manifest.to_json()


def test_look_alike_keys_in_one_dict_are_accepted(body: Body) -> None:
    alike = node_of(body, "alike")
    assert [type(k) for k, _ in alike["v"]] == [int, str]
    parse(seal(body))


def test_the_deepest_allowed_tree_is_accepted(body: Body) -> None:
    node: dict[str, Any] = {"k": "none"}
    for _ in range(MAX_TREE_DEPTH - 1):
        node = {"k": "list", "v": [node]}
    body["tree"]["v"].append(["deep", node])  # the root is depth 0, "deep" depth 1, its innermost none 200
    assert parse(seal(body)).tree["v"][-1][0] == "deep"


# -- versions and unknown fields ----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["top", "entry", "file"])
def test_an_unknown_field_is_a_format_version_error(body: Body, where: str) -> None:
    target = {"top": body, "entry": body["entries"][0], "file": body["files"][0]}[where]
    target["added_in_a_later_version"] = 1
    error = refused(seal(body))
    assert isinstance(error, FormatVersionError)
    assert "added_in_a_later_version" in str(error)
    assert SOURCE in str(error)


@pytest.mark.parametrize("newer", [FORMAT_VERSION + 1, FORMAT_VERSION + 41, 2**70])
def test_a_newer_format_version_is_refused_naming_both_versions(body: Body, newer: int) -> None:
    body["format_version"] = newer
    body["a_new_field"] = {"anything": [1, 2]}  # a newer format may add fields: the version is what is reported
    error = refused(seal(body))
    assert isinstance(error, FormatVersionError)
    message = str(error)
    assert re.search(rf"\b{newer}\b", message), message
    assert re.search(rf"\b{FORMAT_VERSION}\b", message.replace(str(newer), "")), message
    assert "a_new_field" not in message


def test_a_newer_version_without_a_valid_checksum_is_corrupt(body: Body) -> None:
    # the checksum envelope is shared by every format version: failing it means damage, whatever the version says
    body["format_version"] = FORMAT_VERSION + 1
    error = refused(canonical(body).encode())
    assert isinstance(error, CorruptCheckpointError)
    assert not isinstance(error, FormatVersionError)
    assert "checksum" in str(error)


def test_no_single_bit_flip_reads_as_a_newer_version(body: Body) -> None:
    # found by the reliability suite: a flip turning "checksum" into "checksul", or the version digit 1 into 5,
    # was reported as "written by a newer safepoint", which stops restore instead of falling back
    data = seal(body)
    intact = parse(data)
    for offset in range(len(data)):
        for bit in (0, 2, 5):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            try:
                again = parse(bytes(flipped))
            except FormatVersionError as error:
                pytest.fail(f"byte {offset} bit {bit}: {error}")
            except CorruptCheckpointError:
                continue
            # a flip JSON reads as the same value ("1e-05" -> "1E-05") is no damage: the content is unchanged
            assert again.to_json() == intact.to_json(), (offset, bit)


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None, [1]])
def test_an_invalid_format_version_is_corrupt(body: Body, version: Any) -> None:
    body["format_version"] = version
    error = refused(seal(body))
    assert not isinstance(error, FormatVersionError)
    assert "format_version" in str(error)


# -- missing fields ---------------------------------------------------------------------------------------------
TOP_FIELDS = ["format_version", "step", "save_id", "created", "metrics", "state_version", "world_size", "writer",
              "files", "entries", "tree"]  # fmt: skip


@pytest.mark.parametrize("name", TOP_FIELDS)
def test_a_missing_top_level_field_is_corrupt(body: Body, name: str) -> None:
    del body[name]
    error = refused(seal(body))
    assert not isinstance(error, FormatVersionError)
    assert name in str(error)
    assert SOURCE in str(error)


def test_a_missing_checksum_is_corrupt(body: Body) -> None:
    del body["checksum"]
    error = refused(canonical(body).encode())
    assert "checksum" in str(error)


@pytest.mark.parametrize("name", ["key", "kind", "dtype", "shape", "file", "name", "scalar"])
def test_a_missing_entry_field_is_corrupt(body: Body, name: str) -> None:
    del entry_of(body, "arr")[name]
    error = refused(seal(body))
    assert not isinstance(error, FormatVersionError)
    assert name in str(error)


@pytest.mark.parametrize("name", ["path", "size", "checksum"])
def test_a_missing_file_field_is_corrupt(body: Body, name: str) -> None:
    del body["files"][0][name]
    error = refused(seal(body))
    assert not isinstance(error, FormatVersionError)
    assert name in str(error)


@pytest.mark.parametrize(
    ("path", "name"), [(("arr",), "e"), (("misc",), "v"), (("misc", 0), "k"), (("model",), "type")]
)
def test_a_missing_tree_node_field_is_corrupt(body: Body, path: tuple[str | int, ...], name: str) -> None:
    node = node_of(body, *path)
    assert name in node
    del node[name]
    refused(seal(body))


# -- the checksum -------------------------------------------------------------------------------------------------
def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaf_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*path, i))]
    return [path]


def _changed(value: Any, path: tuple[Any, ...]) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value - 1 if path == ("format_version",) else value + 1  # a higher version is reported as such
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    return 0  # None


def test_editing_any_value_without_resealing_breaks_the_checksum(body: Body) -> None:
    paths = [p for p in _leaf_paths(body) if p != ("checksum",)]
    assert len(paths) > 50
    for path in paths:
        edited = copy.deepcopy(body)
        target = edited
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = _changed(target[path[-1]], path)
        error = refused(canonical(edited).encode())
        assert "checksum" in str(error), (path, str(error))


def test_reformatting_the_json_keeps_it_valid(body: Body) -> None:
    # the checksum covers the content, not the spelling: indentation and key order do not matter
    expected = parse(canonical(body).encode()).to_json()  # bytes: a NaN metric never equals itself as a float
    assert parse(json.dumps(body, indent=3).encode()).to_json() == expected
    assert parse(json.dumps(dict(reversed(list(body.items())))).encode()).to_json() == expected


def test_an_edit_of_the_text_as_written_breaks_the_checksum(original: bytes) -> None:
    # the text as to_json writes it is checked on the text itself (no re-serialisation): a changed value in it,
    # the checksum and the layout left as they were, is still caught
    assert original.startswith(b'{"checksum":"')
    assert original.endswith(b"}\n")
    for old, new in ((b'"step":7', b'"step":8'), (b'"state_version":3', b'"state_version":4')):
        assert original.count(old) == 1, old
        error = refused(original.replace(old, new))
        assert "checksum" in str(error), old
    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 1  # anywhere in the body: the check covers every byte after the checksum
    with pytest.raises((CorruptCheckpointError, FormatVersionError)):
        parse(bytes(flipped))


def test_the_layout_as_written_with_other_spacing_in_the_body_is_still_valid(original: bytes) -> None:
    # the checksum first but the rest not byte for byte canonical: the text itself does not match the checksum,
    # the content does (checked on the body re-serialised), so it is valid, as any reformatting is
    spaced = original.replace(b'"step":7', b'"step": 7')
    assert spaced != original
    assert spaced.startswith(b'{"checksum":"')
    assert parse(spaced).to_json() == parse(original).to_json()


@pytest.mark.parametrize(
    "checksum",
    ["xxh3_64:0000000000000000", "sha256:00", "xxh3_64:", "", "xxh3_64:XYZ", 5, None, ["xxh3_64:00"]],
)
def test_a_wrong_or_malformed_manifest_checksum_is_corrupt(body: Body, checksum: Any) -> None:
    body["checksum"] = checksum
    error = refused(canonical(body).encode())
    assert "checksum" in str(error)


def test_an_uppercased_checksum_is_not_the_checksum(body: Body) -> None:
    body["checksum"] = body["checksum"].upper().replace("XXH3_64", "xxh3_64")
    assert any(c in "ABCDEF" for c in body["checksum"])
    refused(canonical(body).encode())


# -- malformed values, each with the check expected to fire -----------------------------------------------------------
def _entry(key: str, field: str, value: Any) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        entry_of(body, key)[field] = value

    return edit


def _top(field: str, value: Any) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        body[field] = value

    return edit


def _file(field: str, value: Any) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        body["files"][0][field] = value

    return edit


def _node(path: tuple[str | int, ...], node: Any) -> Callable[[Body], None]:
    """Replace the tree node at ``path`` (its parent must be a dict or list node)."""

    def edit(body: Body) -> None:
        parent = node_of(body, *path[:-1]) if path[:-1] else body["tree"]
        if parent["k"] == "dict":
            for item in parent["v"]:
                if type(item[0]) is type(path[-1]) and item[0] == path[-1]:
                    item[1] = node
        else:
            parent["v"][path[-1]] = node

    return edit


def _edit_node(path: tuple[str | int, ...], edit_node: Callable[[dict[str, Any]], None]) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        edit_node(node_of(body, *path) if path else body["tree"])

    return edit


def _twice(body: Body) -> None:
    # the tuple in "misc" now also names the entry of "arr": two references, in two places
    node_of(body, "misc")["v"][0] = copy.deepcopy(node_of(body, "arr"))


def _orphan(body: Body) -> None:
    _node(("arr",), {"k": "none"})(body)


def _view(key: str, **fields: Any) -> Callable[[Body], None]:
    return _edit_node(("tied", key), lambda node: node.update(fields))


def _typed(key: str, **fields: Any) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        node = next(child for k, child in node_of(body, "typed")["v"] if k == key)
        assert node["k"] == "typed"
        node.update(fields)

    return edit


def _set_of(*items: dict[str, Any]) -> dict[str, Any]:
    return {"k": "list", "v": list(items)}


def _view_of(key: str) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        index = next(i for i, entry in enumerate(body["entries"]) if entry["key"] == key)
        node_of(body, "tied", "b")["e"] = index

    return edit


def _as_tensor_node(node: dict[str, Any]) -> None:
    index = node["e"]
    node.clear()
    node.update(k="tensor", e=index)


def _swap_names(body: Body) -> None:
    entry_of(body, "model/bias")["name"] = entry_of(body, "model/weight")["name"]


def _dup_file(body: Body) -> None:
    body["files"].append(dict(body["files"][0]))


def _dup_key(key: Any) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        body["tree"]["v"].append([key, {"k": "none"}])
        body["tree"]["v"].append([key, {"k": "int", "v": 1}])

    return edit


def _deep_tree(depth: int) -> Callable[[Body], None]:
    def edit(body: Body) -> None:
        node: dict[str, Any] = {"k": "none"}
        for _ in range(depth):
            node = {"k": "list", "v": [node]}
        body["tree"]["v"].append(["deep", node])

    return edit


MALFORMED: list[tuple[str, Callable[[Body], None], str]] = [
    ("step bool", _top("step", True), "step"),
    ("step negative", _top("step", -1), "step"),
    ("step str", _top("step", "7"), "step"),
    ("step float", _top("step", 7.0), "step"),
    ("state_version null", _top("state_version", None), "state_version"),
    ("world_size zero", _top("world_size", 0), "world_size"),
    ("world_size bool", _top("world_size", True), "world_size"),
    ("created str", _top("created", "yesterday"), "created"),
    ("created bool", _top("created", True), "created"),
    ("created null", _top("created", None), "created"),
    ("writer int", _top("writer", 5), "writer"),
    ("save_id short", _top("save_id", "abc"), "save_id"),
    ("save_id upper", _top("save_id", "A" * 32), "save_id"),
    ("save_id newline", _top("save_id", "a" * 32 + "\n"), "save_id"),
    ("save_id int", _top("save_id", 5), "save_id"),
    ("metrics list", _top("metrics", []), "metrics"),
    ("metric str", _top("metrics", {"loss": "low"}), "metric"),
    ("metric bool", _top("metrics", {"loss": True}), "metric"),
    ("metric null", _top("metrics", {"loss": None}), "metric"),
    ("metric list", _top("metrics", {"loss": [1.0]}), "metric"),
    ("files not list", _top("files", {"0": 1}), "files"),
    ("file not object", _top("files", [5]), "files[0]"),
    ("file twice", _dup_file, "twice"),
    ("size bool", _file("size", True), "size"),
    ("size negative", _file("size", -1), "size"),
    ("size str", _file("size", "100"), "size"),
    ("size float", _file("size", 100.0), "size"),
    ("checksum int", _file("checksum", 5), "checksum"),
    ("checksum algorithm", _file("checksum", "md5:00ff"), "checksum"),
    ("checksum not hex", _file("checksum", "xxh3_64:xyz"), "checksum"),
    ("checksum empty digest", _file("checksum", "xxh3_64:"), "checksum"),
    ("entries not list", _top("entries", "all"), "entries"),
    ("entry not object", _top("entries", [[]]), "entries[0]"),
    ("key int", _entry("arr", "key", 5), "key"),
    ("name null", _entry("arr", "name", None), "name"),
    ("kind unknown", _entry("arr", "kind", "weird"), "kind"),
    ("kind list", _entry("arr", "kind", ["ndarray"]), "kind"),
    ("dtype unknown", _entry("arr", "dtype", "F128"), "dtype"),
    ("dtype lower", _entry("arr", "dtype", "i32"), "dtype"),
    ("dtype numpy object", _entry("arr", "dtype", "O"), "dtype"),
    ("dtype list", _entry("arr", "dtype", ["I32"]), "dtype"),
    ("dtype dict", _entry("arr", "dtype", {"I32": 1}), "dtype"),
    ("dtype null", _entry("arr", "dtype", None), "dtype"),
    ("shape str", _entry("arr", "shape", "3"), "shape"),
    ("shape int", _entry("arr", "shape", 3), "shape"),
    ("shape dict", _entry("arr", "shape", {"0": 3}), "shape"),
    ("shape null", _entry("arr", "shape", None), "shape"),
    ("dim float", _entry("arr", "shape", [3.0]), "shape"),
    ("dim negative", _entry("arr", "shape", [-1, -3]), "shape"),
    ("dim bool", _entry("arr", "shape", [True, 3]), "shape"),
    ("dim str", _entry("arr", "shape", ["3"]), "shape"),
    ("65 dims", _entry("arr", "shape", [1] * 65), "65 dimensions"),
    ("1000 dims", _entry("arr", "shape", [1] * 1000), "1000 dimensions"),
    ("shape too large", _entry("arr", "shape", [2**40, 2**40]), "bytes"),
    ("shape huge int", _entry("arr", "shape", [10**300]), "bytes"),
    ("file negative", _entry("arr", "file", -1), "file"),
    ("file bool", _entry("arr", "file", True), "file"),
    ("file missing", _entry("arr", "file", 99), "file"),
    ("file str", _entry("arr", "file", "0"), "file"),
    ("scalar int", _entry("arr", "scalar", 1), "scalar"),
    ("scalar null", _entry("arr", "scalar", None), "scalar"),
    ("scalar on a tensor", _entry("opt/state/0/step", "scalar", True), "scalar"),
    ("scalar with 3 items", _entry("arr", "scalar", True), "scalar"),
    ("name twice in a file", _swap_names, "twice"),
    ("key not where the tree puts it", _entry("arr", "key", "elsewhere"), "elsewhere"),
    ("tree not object", _top("tree", []), "tree"),
    ("tree root a list", _top("tree", {"k": "list", "v": []}), "dict"),
    ("node kind unknown", _node(("arr",), {"k": "weird", "e": 0}), "unknown kind"),
    ("node kind int", _node(("arr",), {"k": 5}), "unknown kind"),
    ("node kind null", _node(("arr",), {"k": None}), "unknown kind"),
    ("node without kind", _node(("misc", 0), {"v": 1}), "unknown kind"),
    ("node not object", _node(("misc", 0), [1]), "not an object"),
    ("node extra field", _edit_node((), lambda n: n.update(x=1)), "fields"),
    ("dict items not list", _node(("alike",), {"k": "dict", "v": {"a": {"k": "none"}}}), "dict node"),
    ("dict item not pair", _node(("alike",), {"k": "dict", "v": [["a"]]}), "pairs"),
    ("dict item triple", _node(("alike",), {"k": "dict", "v": [["a", {"k": "none"}, 1]]}), "pairs"),
    ("dict key bool", _node(("alike",), {"k": "dict", "v": [[True, {"k": "none"}]]}), "key"),
    ("dict key float", _node(("alike",), {"k": "dict", "v": [[1.5, {"k": "none"}]]}), "key"),
    ("dict key null", _node(("alike",), {"k": "dict", "v": [[None, {"k": "none"}]]}), "key"),
    ("dict key list", _node(("alike",), {"k": "dict", "v": [[["a"], {"k": "none"}]]}), "key"),
    ("duplicate str key", _dup_key("twin"), "duplicate"),
    ("duplicate int key", _dup_key(3), "duplicate"),
    ("list items dict", _node(("misc",), {"k": "list", "v": {"0": {"k": "none"}}}), "list node"),
    ("tuple items str", _node(("misc",), {"k": "tuple", "v": "abc"}), "tuple node"),
    ("object type int", _edit_node((), lambda n: n["v"][0][1].update(type=5)), "type"),
    ("leaf index negative", _edit_node(("arr",), lambda n: n.update(e=-1)), "entry"),
    ("leaf index too big", _edit_node(("arr",), lambda n: n.update(e=7)), "entry"),
    ("leaf index bool", _edit_node(("arr",), lambda n: n.update(e=True)), "entry"),
    ("leaf index str", _edit_node(("arr",), lambda n: n.update(e="0")), "entry"),
    ("leaf index float", _edit_node(("arr",), lambda n: n.update(e=0.0)), "entry"),
    ("entry referenced twice", _twice, "exactly once"),
    ("entry never referenced", _orphan, "exactly once"),
    ("tree kind disagrees", _edit_node(("arr",), lambda n: n.update(k="tensor")), "tree says"),
    ("pickle posing as tensor", _edit_node(("pk",), lambda n: n.update(k="tensor")), "tree says"),
    ("int holds str", _node(("misc", 0), {"k": "int", "v": "1"}), "int node"),
    ("int holds bool", _node(("misc", 0), {"k": "int", "v": True}), "int node"),
    ("int holds float", _node(("misc", 0), {"k": "int", "v": 1.5}), "int node"),
    ("bool holds int", _node(("misc", 0), {"k": "bool", "v": 1}), "bool node"),
    ("str holds int", _node(("misc", 0), {"k": "str", "v": 5}), "str node"),
    ("float holds NaN word", _node(("misc", 0), {"k": "float", "v": "NaN"}), "float node"),
    ("float holds bool", _node(("misc", 0), {"k": "float", "v": False}), "float node"),
    ("float holds null", _node(("misc", 0), {"k": "float", "v": None}), "float node"),
    ("bytes not base64", _node(("misc", 0), {"k": "bytes", "v": "!!!"}), "bytes node"),
    ("bytes not ascii", _node(("misc", 0), {"k": "bytes", "v": "\u00e9"}), "bytes node"),
    ("bytes int", _node(("misc", 0), {"k": "bytes", "v": 5}), "bytes node"),
    ("none with value", _node(("misc", 0), {"k": "none", "v": None}), "fields"),
    ("tree too deep", _deep_tree(MAX_TREE_DEPTH), "deeper"),
    # format 2: views of a shared storage must lie inside their entry (6 elements)
    ("view offset past the end", _view("b", offset=3), "reaches past"),
    ("view last element past the end", _view("c", shape=[3, 3]), "reaches past"),
    ("view stride too long", _view("c", stride=[1, 4]), "reaches past"),
    ("view empty, offset past the end", _view("b", shape=[0, 2], offset=7), "reaches past"),
    ("view offset negative", _view("b", offset=-1), "view offset"),
    ("view offset bool", _view("b", offset=True), "view offset"),
    ("view offset float", _view("b", offset=1.0), "view offset"),
    ("view stride negative", _view("c", stride=[-1, 3]), "view stride"),
    ("view shape negative", _view("c", shape=[-2, 3]), "view shape"),
    ("view shape not list", _view("b", shape=4), "view shape"),
    ("view stride str", _view("b", stride="1"), "view stride"),
    ("view sizes and strides differ", _view("b", stride=[2]), "strides"),
    ("view 65 dims", _view("b", shape=[1] * 65, stride=[0] * 65), "65 sizes"),
    ("view of 2**63 elements", _view("b", shape=[2**62, 2], stride=[0, 0]), "64 bits"),
    ("view stride huge", _view("b", shape=[1, 1], stride=[10**30, 1]), "64 bits"),
    ("view offset huge", _view("b", offset=10**30), "64 bits"),
    ("view empty with a huge size", _view("c", shape=[0, 10**30], stride=[1, 1]), "64 bits"),
    ("view of an ndarray entry", _view_of("arr"), "1-D tensor"),
    ("view of a 2-D entry", _view_of("model/weight"), "1-D tensor"),
    ("view missing a field", _edit_node(("tied", "b"), lambda n: n.pop("stride")), "fields"),
    ("view and tensor of one entry", _edit_node(("tied", "b"), _as_tensor_node), "exactly once"),
    ("viewed entry named elsewhere", _entry("tied/a", "key", "tied/b"), "sits at"),
    # format 2: typed values, names from the fixed table only, with the inner node each name is built from
    ("typed unknown name", _typed("od", t="os.system"), "unknown type"),
    ("typed name int", _typed("od", t=5), "unknown type"),
    ("typed module path", _typed("od", t="collections.defaultdict:os.getcwd"), "unknown type"),
    ("typed wrong inner kind", _typed("od", t="builtins.set"), "not a list node"),
    ("typed inner not a node", _typed("od", v=[1]), "not an object"),
    ("typed extra field", _edit_node(("typed", "od"), lambda n: n.update(type="x")), "fields"),
    ("set of a list", _typed("set", v={"k": "list", "v": [{"k": "list", "v": []}]}), "other than scalars"),
    ("set of equal items", _typed("set", v=_set_of({"k": "int", "v": 1}, {"k": "float", "v": 1.0})), "equal items"),
    ("set of 1 and True", _typed("set", v=_set_of({"k": "int", "v": 1}, {"k": "bool", "v": True})), "equal items"),
    ("complex of ints", _typed("c", v={"k": "tuple", "v": [{"k": "int", "v": 1}, {"k": "int", "v": 2}]}), "two floats"),
    ("complex of one float", _typed("c", v={"k": "tuple", "v": [{"k": "float", "v": 1.0}]}), "two floats"),
    ("size of a str", _typed("size", v={"k": "tuple", "v": [{"k": "str", "v": "2"}]}), "64-bit ints"),
    ("size too big", _typed("size", v={"k": "tuple", "v": [{"k": "int", "v": 2**63}]}), "64-bit ints"),
    ("namespace int key", _typed("ns", v={"k": "dict", "v": [[1, {"k": "none"}]]}), "not a str"),
    ("tree far too deep", _deep_tree(MAX_TREE_DEPTH + 100), "deeper"),
]


@pytest.mark.parametrize(("edit", "fragment"), [(e, f) for _, e, f in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_a_malformed_manifest_is_corrupt(body: Body, edit: Callable[[Body], None], fragment: str) -> None:
    edit(body)
    error = refused(seal(body))
    assert type(error) is CorruptCheckpointError, f"{type(error).__name__}: {error}"
    assert fragment in str(error), str(error)
    assert SOURCE in str(error)
    assert error.path == SOURCE


@pytest.mark.parametrize(
    ("state", "kind"),
    [({"a": TIED, "b": TIED[1:]}, "view"), ({"o": OrderedDict(a=1)}, "typed"), ({"s": {1}}, "typed")],
    ids=["view", "OrderedDict", "set"],
)
def test_format_2_nodes_in_a_format_1_manifest_are_corrupt(tmp_path: Path, state: dict[str, Any], kind: str) -> None:
    safepoint.save(tmp_path / "c", state)
    body = json.loads((tmp_path / "c" / "manifest.json").read_bytes())
    assert body["format_version"] == FORMAT_VERSION
    parse(seal(body))
    body["format_version"] = 1
    error = refused(seal(body))
    assert f"kind {kind!r} in a manifest of format version 1" in str(error)


@pytest.mark.parametrize(
    "path",
    ["../x.safetensors", "/etc/passwd", "a/../../b", "a\x00b", "x" * 10_000, "a//b", "", "a/", "./a", "..", ".",
     "a\nb", "a\n", "a\\..\\b", "a/b/c/d/e", "~/x", "-rf", "a b", "\u00e9"],
)  # fmt: skip
def test_a_file_path_that_could_leave_the_checkpoint_is_unsafe(body: Body, path: str) -> None:
    body["files"][0]["path"] = path
    error = refused(seal(body))
    assert isinstance(error, UnsafeCheckpointError), f"{type(error).__name__}: {error}"
    assert SOURCE in str(error)


@pytest.mark.parametrize("path", [5, None, ["a"], {"p": "a"}])
def test_a_file_path_that_is_not_a_string_is_unsafe(body: Body, path: Any) -> None:
    body["files"][0]["path"] = path
    assert isinstance(refused(seal(body)), UnsafeCheckpointError)


def test_names_with_odd_characters_are_allowed_they_are_key_paths(body: Body) -> None:
    # names are looked up in the payload header, never used as paths: any string a state key can hold is fine
    entry_of(body, "arr")["name"] = "a\x00b/../" + "x" * 5000
    names = {entry.name for entry in parse(seal(body)).entries}
    assert "a\x00b/../" + "x" * 5000 in names


# -- nesting deep enough to exhaust the JSON parser's recursion -----------------------------------------------------
def _sealed_text(body: Body, placeholder: str, nested: str) -> bytes:
    """Seal ``body`` whose placeholder string is replaced by raw JSON text (too deep to build as objects)."""
    content = {k: v for k, v in body.items() if k != "checksum"}
    text = canonical(content).replace(json.dumps(placeholder), nested)
    return text[:-1].encode() + b',"checksum":"' + xxh3(text.encode()).encode() + b'"}'


def _at_stack_depth(depth: int, call: Callable[[], Any]) -> Any:
    return call() if depth == 0 else _at_stack_depth(depth - 1, call)


@pytest.mark.parametrize("depth", [1_000, 10_000, 1_000_000])
def test_json_nested_past_the_recursion_limit_is_corrupt(body: Body, depth: int) -> None:
    body["tree"]["v"].append(["deep", "PLACEHOLDER"])
    data = _sealed_text(body, "PLACEHOLDER", '{"k":"list","v":[' * depth + '{"k":"none"}' + "]}" * depth)
    assert b"checksum" in data[-100:]
    error = refused(data)
    assert SOURCE in str(error)


@pytest.mark.parametrize("stack", [0, 150, 400, 700])
def test_nesting_near_the_recursion_limit_never_escapes_as_recursion_error(body: Body, stack: int) -> None:
    # json.loads may just succeed where a later step (the checksum re-serialises the body) would recurse deeper
    body["metrics"] = {"m": "PLACEHOLDER"}
    for depth in range(100, 1100, 20):
        data = _sealed_text(body, "PLACEHOLDER", "[" * depth + "]" * depth)
        try:
            _at_stack_depth(stack, lambda data=data: parse(data))
        except CorruptCheckpointError:
            continue
        pytest.fail(f"a list nested {depth} deep passed as a metric")


# -- fuzzing ------------------------------------------------------------------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(["dict", "list", "tensor", "pickle", "ndarray", "F32", "nan", "-inf", "", -1, 0, 2**64]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


def _outcome(data: bytes) -> Manifest | None:
    """Parse ``data``: a manifest, or None for a CorruptCheckpointError. Anything else fails the test."""
    try:
        manifest = parse(data)
    except CorruptCheckpointError as err:
        if not str(err):
            pytest.fail("an error must say what is wrong")
        return None
    # whatever the parser accepts, the writer writes back and the parser accepts again, identically
    assert parse(manifest.to_json()).to_json() == manifest.to_json()
    return manifest


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_only_ever_corrupt(data: bytes) -> None:
    assert _outcome(data) is None


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.integers(0, 255)), min_size=1, max_size=5))
def test_byte_mutations_of_a_valid_manifest_are_only_ever_corrupt(
    original: bytes, edits: list[tuple[int, int, int]]
) -> None:
    data = bytearray(original)
    for position, operation, byte in edits:
        at = position % (len(data) + 1)
        if operation == 0 and at < len(data):
            data[at] ^= 1 << (byte % 8)
        elif operation == 1:
            data.insert(at, byte)
        elif at < len(data):
            del data[at]
    if bytes(data) != original:
        _outcome(bytes(data))  # a mutation may, rarely, be harmless (whitespace); it must never crash


@FUZZ
@given(choice=st.data())
def test_structural_mutations_with_a_valid_checksum_are_only_ever_corrupt(
    original: bytes, choice: st.DataObject
) -> None:
    body: Body = json.loads(original)
    draw = choice.draw
    for _ in range(draw(st.integers(1, 3))):
        target: Any = body
        for part in draw(st.sampled_from(_container_paths(body))):
            target = target[part]
        operation = draw(st.sampled_from(["replace", "delete", "add"]))
        if operation == "add" or not target:
            if isinstance(target, dict):
                target[draw(st.text(max_size=6))] = draw(JSON_VALUES)
            else:
                target.insert(draw(st.integers(0, len(target))), draw(JSON_VALUES))
            continue
        key = (
            draw(st.sampled_from(sorted(target))) if isinstance(target, dict) else draw(st.integers(0, len(target) - 1))
        )
        if operation == "delete":
            del target[key]
        else:
            target[key] = draw(JSON_VALUES)
    _outcome(seal(body))


def _container_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    result = [path] if isinstance(value, (dict, list)) else []
    if isinstance(value, dict):
        result += [p for k, v in value.items() if k != "checksum" for p in _container_paths(v, (*path, k))]
    elif isinstance(value, list):
        result += [p for i, v in enumerate(value) for p in _container_paths(v, (*path, i))]
    return result


@FUZZ
@given(document=JSON_VALUES)
def test_random_sealed_json_documents_are_only_ever_corrupt(document: Any) -> None:
    data = seal(document) if isinstance(document, dict) else json.dumps(document).encode()
    assert _outcome(data) is None


# -- format 3: sharded nodes ------------------------------------------------------------------------------------
V3 = Path(__file__).resolve().parents[1] / "compat" / "format_v3" / "run" / "step-000000000042" / "manifest.json"


@pytest.fixture
def sharded_body() -> Body:
    """The manifest of the format 3 golden checkpoint (DTensors saved by 2 ranks), to edit."""
    result: Body = json.loads(V3.read_bytes())
    return result


def rows_of(body: Body) -> dict[str, Any]:
    """The sharded node of the 13 x 4 tensor split over 2 ranks (rows 0-6 and 7-12)."""
    node = node_of(body, "sharded", "rows")
    assert node["k"] == "sharded"
    return node


def test_a_sharded_manifest_parses_and_round_trips() -> None:
    original = V3.read_bytes()
    assert parse(original).to_json() == original


SHARDED_MALFORMED: list[tuple[str, Callable[[Body], None], str]] = [
    ("box-sizes", lambda b: rows_of(b)["boxes"][1].update(offsets=[8, 0], sizes=[5, 4]), "its entry"),
    ("overlap", lambda b: rows_of(b)["boxes"][1].update(offsets=[6, 0]), "overlap"),
    ("outside", lambda b: rows_of(b)["boxes"][1].update(offsets=[8, 0]), "outside the shape"),
    ("negative", lambda b: rows_of(b)["boxes"][1].update(offsets=[-1, 0]), "offsets"),
    ("shape", lambda b: rows_of(b).update(shape=[14, 4]), "a gap"),
    ("dims", lambda b: rows_of(b).update(shape=[13]), "dimensions"),
    ("dtype", lambda b: rows_of(b).update(dtype="F64"), "its entry"),
    ("unknown-dtype", lambda b: rows_of(b).update(dtype="F128"), "unknown dtype"),
    ("entry", lambda b: rows_of(b)["boxes"][1].update(e=10_000), "does not exist"),
    (
        "entry-of-another-box",
        lambda b: rows_of(b)["boxes"][1].update(e=rows_of(b)["boxes"][0]["e"], offsets=[7, 0]),
        "its entry",
    ),
    ("at", lambda b: rows_of(b)["boxes"][0].update(at=10**9), "outside its file"),
    ("at-in-header", lambda b: rows_of(b)["boxes"][0].update(at=3), "at must be"),
    ("chunk", lambda b: rows_of(b)["boxes"][0].update(chunk=65535), "power of two"),
    ("sums", lambda b: rows_of(b)["boxes"][0].update(sums=rows_of(b)["boxes"][0]["sums"][:-1]), "chunk checksums"),
    ("sums-algorithm", lambda b: rows_of(b)["boxes"][0].update(sums="md5:" + "0" * 16), "xxh3_64"),
    ("box-field", lambda b: rows_of(b)["boxes"][0].update(extra=1), "fields"),
    # JSON that Python reads as ints but safepoint never writes: a box with these goes the long way, and fails there
    ("bool-offset", lambda b: rows_of(b)["boxes"][1].update(offsets=[7, False]), "offsets"),
    ("bool-entry", lambda b: rows_of(b)["boxes"][1].update(e=True), "entry must be"),
    ("float-at", lambda b: rows_of(b)["boxes"][0].update(at=64.0), "at must be"),
    ("string-sizes", lambda b: rows_of(b)["boxes"][1].update(sizes="64"), "is not a list"),
    ("node-field", lambda b: rows_of(b).update(extra=1), "fields"),
    ("huge-empty", lambda b: node_of(b, "sharded", "empty").update(shape=[0, 2**64]), "beyond 64 bits"),
]


@pytest.mark.parametrize(("edit", "fragment"), [(e, f) for _, e, f in SHARDED_MALFORMED],
                         ids=[n for n, _, _ in SHARDED_MALFORMED])  # fmt: skip
def test_a_malformed_sharded_node_is_corrupt(sharded_body: Body, edit: Callable[[Body], None], fragment: str) -> None:
    edit(sharded_body)
    error = refused(seal(sharded_body))
    assert type(error) is CorruptCheckpointError, f"{type(error).__name__}: {error}"
    assert fragment in str(error), str(error)


def test_a_missing_box_is_a_gap(sharded_body: Body) -> None:
    rows = rows_of(sharded_body)
    dropped = rows["boxes"].pop()
    # its entry stays listed but unreferenced: the gap is reported before the reference check
    error = refused(seal(sharded_body))
    assert "do not cover it exactly once" in str(error), str(error)
    assert "a gap" in str(error)
    assert dropped["sizes"] == [6, 4]


def test_a_sharded_node_in_a_format_2_manifest_is_corrupt(sharded_body: Body) -> None:
    sharded_body["format_version"] = 2
    error = refused(seal(sharded_body))
    assert "kind 'sharded' in a manifest of format version 2" in str(error)
