"""Tests for matgen.data: locating and downloading splits, parsing, the token cache, batching."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

import matgen.data as data
from matgen.data import (
    DownloadError,
    atom_count_distribution,
    collate_tokens,
    ensure_split_file,
    load_split,
    load_structures,
    load_token_dataset,
    pad_to_atoms,
    resolve_data_dir,
    sample_atom_counts,
)
from matgen.tokenizer import PAD_ID, CrystalTokenizer


@pytest.fixture
def mp20_dir(shared_data_dir: Path) -> Path:
    return shared_data_dir / "mp_20"


pytestmark = pytest.mark.usefixtures("isolated_matgen_env")


@pytest.fixture
def remote_dir(tmp_path: Path, mp20_dir: Path) -> Path:
    """A fake upstream: ``test.csv`` in CDVAE's format (unnamed index column), 4 rows."""
    remote = tmp_path / "remote"
    remote.mkdir()
    frame = pd.read_csv(mp20_dir / "test.csv.gz", nrows=4)[["material_id", "cif", "pretty_formula"]]
    frame.to_csv(remote / "test.csv")  # writes the index as an unnamed first column, as CDVAE's files do
    return remote


# ------------------------------------------------------------------ locating
def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    assert resolve_data_dir() == tmp_path / "xdg" / "matgen" / "mp_20"
    monkeypatch.setenv("MATGEN_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    monkeypatch.delenv("MATGEN_DATA")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == Path.home() / ".cache" / "matgen" / "mp_20"


def test_a_data_root_holding_mp_20_means_that_folder(monkeypatch, tmp_path):
    from matgen.data import data_set_name

    (tmp_path / "root" / "mp_20").mkdir(parents=True)
    (tmp_path / "root" / "mp_20" / "test.csv").write_text("material_id,cif\n")
    assert resolve_data_dir(tmp_path / "root") == tmp_path / "root" / "mp_20"
    monkeypatch.setenv("MATGEN_DATA", str(tmp_path / "root"))
    assert resolve_data_dir() == tmp_path / "root" / "mp_20" and data_set_name() == "MP-20"
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "test.csv").write_text("material_id,cif\n")
    assert (
        resolve_data_dir(tmp_path / "own") == tmp_path / "own" and data_set_name(tmp_path / "own") == "'own'"
    )


def test_env_var_is_used_by_loaders(monkeypatch, mp20_dir):
    monkeypatch.setenv("MATGEN_DATA", str(mp20_dir))
    assert ensure_split_file("val", download=False) == mp20_dir / "val.csv.gz"
    assert len(load_split("val", limit=3)) == 3


def test_ensure_split_file_validates_split_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        ensure_split_file("training", tmp_path)
    with pytest.raises(FileNotFoundError, match="test.csv"):
        ensure_split_file("test", tmp_path / "empty", download=False)


def test_download_from_file_url(tmp_path, remote_dir):
    cache = tmp_path / "cache"
    path = ensure_split_file("test", cache, base_url=remote_dir.as_uri())
    assert path == cache / "test.csv" and path.is_file()
    assert sorted(p.name for p in cache.iterdir()) == [".mp20_download", "test.csv"]  # no temp files left
    frame = load_split("test", cache)
    assert list(frame.columns) == ["material_id", "cif", "pretty_formula"]  # unnamed index dropped
    assert len(frame) == 4
    # present now: a second call finds it without downloading
    assert ensure_split_file("test", cache, base_url="file:///nonexistent", download=False) == path


def test_download_over_loopback_http(tmp_path, remote_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(remote_dir))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        path = ensure_split_file("test", tmp_path / "cache", base_url=base_url, timeout=10)
        assert len(load_split("test", tmp_path / "cache")) == 4
        with pytest.raises(DownloadError, match=rf"{base_url}/val.csv.*404"):
            ensure_split_file("val", tmp_path / "cache", base_url=base_url, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert path.read_bytes() == (remote_dir / "test.csv").read_bytes()


def test_download_failures_name_url_and_path(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        ensure_split_file("test", cache, base_url=(tmp_path / "nowhere").as_uri())
    assert "nowhere/test.csv" in str(info.value) and str(cache / "test.csv") in str(info.value)
    # a page that is not an MP-20 CSV (say, an HTML error page) is rejected and not cached
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "test.csv").write_text("<html>rate limited</html>\n")
    with pytest.raises(DownloadError, match="does not look like an MP-20 CSV"):
        ensure_split_file("test", cache, base_url=bogus.as_uri())
    assert not cache.exists() or not any(cache.iterdir())
    # a mistyped folder that a failed download would have created is not left behind
    typo = tmp_path / "typo" / "mp20"
    with pytest.raises(DownloadError):
        ensure_split_file("test", typo, base_url=(tmp_path / "nowhere").as_uri())
    assert not (tmp_path / "typo").exists()


# ------------------------------------------------------------------ reading
def test_load_split_shared_data(mp20_dir):
    frame = load_split("test", mp20_dir, limit=5)
    assert len(frame) == 5
    assert {"material_id", "cif"} <= set(frame.columns)
    assert not any(str(c).startswith("Unnamed") for c in frame.columns)
    assert frame["material_id"].map(type).eq(str).all()


def test_load_structures_skips_unparsable_rows(tmp_path, mp20_dir):
    frame = pd.read_csv(mp20_dir / "test.csv.gz", nrows=3)[["material_id", "cif"]]
    frame.loc[1, "cif"] = "data_broken\n_cell_length_a nonsense\n"
    frame.to_csv(tmp_path / "test.csv", index=False)
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        ids, structures = load_structures("test", tmp_path, progress=False)
    assert ids == [frame.material_id[0], frame.material_id[2]]
    assert all(len(s) > 0 for s in structures)


# ------------------------------------------------------------------ token dataset and cache
def test_token_dataset_is_cached_and_rebuilt_when_corrupt(tmp_path, mp20_dir, monkeypatch):
    cache_dir = tmp_path / "token-cache" / "tokens"  # $MATGEN_CACHE/tokens, beside evaluate/
    first = load_token_dataset("test", mp20_dir, limit=12, progress=False)
    files = list(cache_dir.glob("*.pt"))
    assert len(files) == 1
    assert len(first) == 12 and not first.skipped
    assert first.num_atoms.tolist() == [(t.numel() - 6) // 4 for t in first.tokens]
    ids, structures = load_structures("test", mp20_dir, limit=12, progress=False)
    assert first.ids == ids
    tokenizer = CrystalTokenizer()
    assert all(torch.equal(t, tokenizer.encode(s)) for t, s in zip(first.tokens, structures, strict=True))

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_parse_cifs", no_parsing)
        second = load_token_dataset("test", mp20_dir, limit=12, progress=False)
    assert second.ids == first.ids and torch.equal(second.num_atoms, first.num_atoms)
    assert all(torch.equal(a, b) for a, b in zip(first.tokens, second.tokens, strict=True))

    # a different limit is a different cache entry
    assert len(load_token_dataset("test", mp20_dir, limit=5, progress=False)) == 5
    assert len(list(cache_dir.glob("*.pt"))) == 2

    files[0].write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_token_dataset("test", mp20_dir, limit=12, progress=False)
    assert rebuilt.ids == first.ids
    assert all(torch.equal(a, b) for a, b in zip(first.tokens, rebuilt.tokens, strict=True))
    with monkeypatch.context() as patch:  # and the rebuilt file is good again
        patch.setattr(data, "_parse_cifs", no_parsing)
        assert load_token_dataset("test", mp20_dir, limit=12, progress=False).ids == first.ids


def test_token_dataset_without_cache_writes_nothing(tmp_path, mp20_dir):
    result = load_token_dataset("test", mp20_dir, limit=3, cache=False, progress=False)
    assert len(result) == 3
    assert not (tmp_path / "token-cache").exists()


def test_token_dataset_records_skipped_rows(tmp_path, mp20_dir):
    frame = pd.read_csv(mp20_dir / "test.csv.gz", nrows=3)[["material_id", "cif"]]
    frame.loc[0, "cif"] = "garbage"
    frame.to_csv(tmp_path / "test.csv", index=False)
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        result = load_token_dataset("test", tmp_path, progress=False)
    assert list(result.skipped) == [frame.material_id[0]]
    assert result.ids == frame.material_id[1:].tolist()


# ------------------------------------------------------------------ batching
def test_collate_and_pad():
    seqs = [torch.arange(10), torch.arange(18), torch.arange(14)]
    batch, num_atoms = collate_tokens(seqs)
    assert batch.shape == (3, 18) and batch.dtype == torch.long
    assert num_atoms.tolist() == [1, 3, 2]
    assert torch.equal(batch[0, :10], seqs[0]) and (batch[0, 10:] == PAD_ID).all()
    assert torch.equal(batch[1], seqs[1])
    assert pad_to_atoms(seqs[0], 2).shape == (14,)
    assert pad_to_atoms(batch, 5).shape == (3, 26)
    assert torch.equal(pad_to_atoms(pad_to_atoms(seqs[0], 4), 1), seqs[0])  # trimming PAD is fine
    with pytest.raises(ValueError, match="more than max_atoms"):
        pad_to_atoms(batch, 2)
    with pytest.raises(ValueError):
        collate_tokens([torch.arange(11)])


def test_atom_count_distribution():
    dist = atom_count_distribution(torch.tensor([1, 2, 2, 4]))
    assert dist.shape == (5,)
    assert torch.allclose(dist, torch.tensor([0.0, 0.25, 0.5, 0.0, 0.25], dtype=dist.dtype))
    assert atom_count_distribution(torch.tensor([3]), max_atoms=20).shape == (21,)
    samples = sample_atom_counts(dist, 1000, generator=torch.Generator().manual_seed(0))
    assert set(samples.unique().tolist()) <= {1, 2, 4}
    assert 0.4 < (samples == 2).double().mean() < 0.6
    with pytest.raises(ValueError):
        atom_count_distribution(torch.tensor([0, 1]))


def test_a_custom_data_folder_missing_a_split_is_not_filled_with_mp20(tmp_path, remote_dir):
    own = tmp_path / "own"
    own.mkdir()
    (own / "train.csv").write_text((remote_dir / "test.csv").read_text())
    with pytest.raises(FileNotFoundError, match="holds train.csv but no val.csv"):
        ensure_split_file("val", own, base_url=remote_dir.as_uri())
    assert sorted(p.name for p in own.iterdir()) == ["train.csv"]


def test_empty_or_limited_splits_give_clear_errors(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "train.csv").write_text("")
    with pytest.raises(ValueError, match="cannot read .*train.csv as a CSV table"):
        load_split("train", own)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        load_split("train", own, limit=-5)
