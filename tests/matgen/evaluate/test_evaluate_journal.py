"""The resume journal: torn writes, duplicates, settings mismatch (fast)."""

from __future__ import annotations

import pytest

from matgen.evaluate.journal import Journal, JournalMismatch


def test_torn_line_is_cut_and_duplicates_keep_the_last(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path, {"fmax": 0.1}) as j:
        j.append([{"stage": "basic", "id": "a", "x": 1}, {"stage": "basic", "id": "b", "x": 2}])
        j.append([{"stage": "basic", "id": "a", "x": 3}])
    with path.open("a") as f:
        f.write('{"stage": "basic", "id": "c", "x"')  # killed mid-write
    with Journal(path, {"fmax": 0.1}) as j:
        assert j.get("basic", "a")["x"] == 3
        assert j.get("basic", "b")["x"] == 2
        assert not j.has("basic", "c")
        j.append([{"stage": "basic", "id": "c", "x": 4}])
    text = path.read_text()
    assert text.endswith("\n") and '"x"\n' not in text
    with Journal(path, {"fmax": 0.1}) as j:
        assert {k[1]: v["x"] for k, v in j.records.items()} == {"a": 3, "b": 2, "c": 4}


def test_other_settings_refuse_to_mix(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path, {"fmax": 0.1}).close()
    with pytest.raises(JournalMismatch):
        Journal(path, {"fmax": 0.05})
