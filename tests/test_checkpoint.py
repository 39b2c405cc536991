import os

import numpy as np
import pytest

from pejax import checkpoint as ckpt


def _arrays():
    return {
        "samples.a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "labels": np.array([0, 1, 1]),
    }


def test_round_trip(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _arrays(), {"iteration": 3, "x": [1, 2]})
    assert path.name == "ckpt-000003.npz"
    arrays, meta = ckpt.load_checkpoint(path)
    assert meta == {"iteration": 3, "x": [1, 2]}
    for k, v in _arrays().items():
        np.testing.assert_array_equal(arrays[k], v)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temporary file left behind


def test_keeps_the_newest_two(tmp_path):
    for t in range(5):
        ckpt.save_checkpoint(tmp_path, t, _arrays(), {"iteration": t})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-000003.npz",
        "ckpt-000004.npz",
    ]


def test_truncated_file_is_detected_and_named(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _arrays(), {"iteration": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ckpt.CorruptCheckpointError, match=r"ckpt-000001\.npz.*unreadable or truncated"
    ):
        ckpt.load_checkpoint(path)


def test_modified_array_fails_checksum(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _arrays(), {"iteration": 1})
    ckpt.load_checkpoint(path)  # valid before the change
    # Rewrite the file with one array changed but the old metadata (and checksum) kept.
    with np.load(path, allow_pickle=False) as data:
        payload = {k: data[k] for k in data.files}
    payload["samples.a"] = payload["samples.a"] + 1
    with open(path, "wb") as f:
        np.savez(f, **payload)
    with pytest.raises(ckpt.CorruptCheckpointError, match="fails its SHA-256 checksum"):
        ckpt.load_checkpoint(path)


def test_falls_back_to_the_last_good_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _arrays(), {"iteration": 1})
    newest = ckpt.save_checkpoint(tmp_path, 2, _arrays(), {"iteration": 2})
    newest.write_bytes(b"garbage")
    with pytest.warns(ckpt.CorruptCheckpointWarning, match="ckpt-000002.npz"):
        path, _, meta = ckpt.latest_valid_checkpoint(tmp_path)
    assert meta["iteration"] == 1 and path.name == "ckpt-000001.npz"
    assert newest.read_bytes() == b"garbage"  # left untouched for inspection


def test_no_checkpoint_and_no_folder(tmp_path):
    assert ckpt.latest_valid_checkpoint(tmp_path / "missing") is None
    assert ckpt.latest_valid_checkpoint(tmp_path) is None


def test_refuses_object_arrays_and_never_unpickles(tmp_path):
    with pytest.raises(ValueError, match="must be numeric"):
        ckpt.save_checkpoint(tmp_path, 0, {"x": np.array([{"a": 1}], dtype=object)}, {})
    # A hand-made npz holding a pickled object array is refused on load (allow_pickle=False).
    bad = tmp_path / "ckpt-000007.npz"
    with open(bad, "wb") as f:
        np.savez(f, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.load_checkpoint(bad)
