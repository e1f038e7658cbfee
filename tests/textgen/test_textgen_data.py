"""Tokenizer and data: GPT-2 ids, encode/decode round trip, detokenisers, loaders, cache, packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from textgen.data import (
    load_corpora,
    load_corpus,
    pack,
    ptb_detokenize,
    read_documents,
    resolve_corpora,
    split_wikitext_articles,
    wikitext_detokenize,
)
from textgen.tokenizer import EOT_ID, MASK_ID, VOCAB_SIZE


def test_gpt2_ids_and_round_trip(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's own ids
    text = "Call me Ishmael.\n\tCafé ☕ — 1,000 ships' logs!  "
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|endoftext|>") == [EOT_ID]
    assert VOCAB_SIZE == 50258 and MASK_ID == 50257


def test_decode_shows_or_drops_special_tokens(tokenizer):
    ids = tokenizer.encode("Hello") + [EOT_ID, MASK_ID] + tokenizer.encode(" world")
    assert tokenizer.decode(ids) == "Hello<|endoftext|>[MASK] world"
    assert tokenizer.decode(ids, show_special=False) == "Hello world"


def test_wikitext_detokenisation_of_a_sample_line():
    line = (
        ' He had a guest @-@ starring role in " The Bill " ( 2000 ) , worth 1 @,@ 000 @.@ 5 dollars . '
        "Teddy 's Story followed . \n"
    )
    assert wikitext_detokenize(line) == (
        ' He had a guest-starring role in "The Bill" (2000), worth 1,000.5 dollars. Teddy\'s Story followed.\n'
    )
    assert wikitext_detokenize(" = = Career = = \n") == " == Career ==\n"


def test_wikitext_articles_split_at_top_level_headings():
    text = " \n = A = \n \n Text a . \n = = Sub = = \n More . \n = B = \n Text b . \n"
    arts = split_wikitext_articles(text)
    assert len(arts) == 2 and arts[0].startswith(" = A =") and "= = Sub = =" in arts[0]
    assert arts[1].startswith(" = B =")


def test_ptb_detokenisation():
    assert ptb_detokenize(" it was n't the firm 's N N shares \n ") == " it wasn't the firm's 1 1 shares\n"
    assert ptb_detokenize("a <unk> b") == "a ? b"


def test_read_documents_from_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n" + json.dumps({"extract": "third"}) + "\n"
    )
    (sub / "skip.bin").write_bytes(b"\x00")
    assert read_documents(tmp_path) == ["first document", "second", "third"]
    assert read_documents(sub / "b.jsonl") == ["second", "third"]
    (sub / "C.TXT").write_text("fourth")  # extensions in any case
    (sub / "d.JSONL").write_text(json.dumps({"text": "fifth"}) + "\n")
    assert read_documents(tmp_path) == ["first document", "fourth", "second", "third", "fifth"]
    with pytest.raises(FileNotFoundError):
        resolve_corpora(["no-such-corpus"])


def test_folders_skip_hidden_files_and_this_tools_outputs(tmp_path):
    """A run or evaluation folder inside the data folder, a Mac resource fork and a hidden folder are not
    text to train on; UTF-16 without a byte-order mark and an empty path are refused by name."""
    data = tmp_path / "proj"
    (data / "run").mkdir(parents=True)
    (data / "notes.txt").write_text("the only document")
    (data / "._notes.txt").write_bytes(b"\x00\x05\x16\x07\xff resource fork")
    (data / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (data / "run" / "samples.txt").write_text("=== sample 0 ===\ngenerated")
    (data / "eval").mkdir()
    (data / "eval" / "cells.jsonl").write_text(json.dumps({"key": {}, "result": 1}) + "\n")
    (data / ".git").mkdir()
    (data / ".git" / "x.txt").write_text("not data")
    assert read_documents(data) == ["the only document"]
    utf16 = tmp_path / "u16.txt"
    utf16.write_bytes("Hello world\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match="NUL bytes.*utf-16le"):
        read_documents(utf16)
    utf32 = tmp_path / "u32.txt"
    utf32.write_bytes("Hello".encode("utf-32"))
    with pytest.raises(ValueError, match="UTF-32"):
        read_documents(utf32)
    with pytest.raises(ValueError, match="empty data path"):
        resolve_corpora([""])


def test_named_corpora_resolve_under_the_data_dir(tmp_path, monkeypatch):
    from textgen.data import EVAL_CORPORA, TRAIN_CORPORA

    for spec in [*TRAIN_CORPORA.values(), *EVAL_CORPORA.values()]:
        (tmp_path / spec.relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / spec.relpath).write_text("x")
    monkeypatch.setenv("TEXTGEN_DATA", str(tmp_path))
    assert [n for n, _, _ in resolve_corpora(["train"])] == list(TRAIN_CORPORA)
    ((name, path, _),) = resolve_corpora(["wikitext2"])
    assert name == "wikitext2" and path == tmp_path / "wikitext2" / "wiki.test.tokens"
    with pytest.raises(FileNotFoundError, match="TEXTGEN_DATA"):
        resolve_corpora(["ptb"], data_dir=tmp_path / "elsewhere")


def test_a_cache_that_cannot_be_written_is_warned_about_and_the_text_still_read(tokenizer, tmp_path):
    """A read-only home (a shared machine, a container) stopped `textgen train` at its first corpus."""
    src = tmp_path / "t.txt"
    src.write_text("one two three four five")
    (tmp_path / "blocker").write_text("a file where the cache folder would go")
    with pytest.warns(
        UserWarning, match="could not write the token cache .* TEXTGEN_CACHE or pass --cache-dir"
    ):
        corpus = load_corpus("t", src, read_documents, tokenizer, cache_dir=tmp_path / "blocker" / "cache")
    assert tokenizer.decode(corpus.tokens[:-1].tolist()) == src.read_text()


def test_token_stream_cache_and_packing(tokenizer, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("one two three four five six seven eight nine ten")
    calls = []

    def reader(p):
        calls.append(p)
        return read_documents(p)

    c1 = load_corpus("t", src, reader, tokenizer, cache_dir=tmp_path / "cache")
    c2 = load_corpus("t", src, reader, tokenizer, cache_dir=tmp_path / "cache")
    assert len(calls) == 1, "the second load must come from the cache"
    assert np.array_equal(c1.tokens, c2.tokens) and c1.tokens.dtype == np.uint16
    assert c1.tokens[-1] == EOT_ID and tokenizer.decode(c1.tokens[:-1].tolist()) == src.read_text()
    src.write_text("changed text")
    assert load_corpus("t", src, reader, tokenizer, cache_dir=tmp_path / "cache").num_documents == 1
    assert len(calls) == 2, "a changed file must be re-tokenized"

    both = load_corpora([str(src), str(src)], tokenizer, cache_dir=tmp_path / "cache")
    assert (both.tokens == EOT_ID).sum() == 2
    seqs = pack(np.arange(23, dtype=np.uint16), 5)
    assert seqs.shape == (4, 5) and seqs.dtype == torch.long
    assert seqs[1].tolist() == [5, 6, 7, 8, 9]


def test_a_jsonl_without_a_text_field_is_refused_not_read_by_its_id_column(tmp_path):
    from textgen.data import read_documents

    path = tmp_path / "ids.jsonl"
    path.write_text('{"id": "doc-0", "body": "It was the best of times."}\n')
    with pytest.raises(
        ValueError, match=r"ids.jsonl:1: no text in a field named text or extract.*id \(str\), body \(str\)"
    ):
        read_documents(path)
    path.write_text('{"id": "doc-0", "text": "It was the best of times."}\n')
    assert read_documents(path) == ["It was the best of times."]


def test_a_local_folder_named_like_a_corpus_is_pointed_out(tmp_path, monkeypatch):
    from textgen.data import TRAIN_CORPORA, resolve_corpora

    shipped = (
        tmp_path / "data" / TRAIN_CORPORA["sotu"].relpath
    )  # the built-in corpus, as a data folder holds it
    shipped.parent.mkdir(parents=True)
    shipped.write_text('{"text": "Fellow citizens."}\n')
    (tmp_path / "sotu").mkdir()
    (tmp_path / "sotu" / "mine.txt").write_text("my own text")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"'sotu' names a built-in corpus.*write ./sotu to read it"):
        ((name, path, _),) = resolve_corpora(["sotu"], data_dir=tmp_path / "data")
    assert name == "sotu" and path == shipped
    ((name, path, _),) = resolve_corpora(["./sotu"], data_dir=tmp_path / "data")
    assert path == Path("sotu")


def test_encoding_hints_name_compression_and_windows_1252(tmp_path):
    import gzip

    from textgen.data import read_text

    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"some text"))
    with pytest.raises(ValueError, match="gzip-compressed, not text: decompress it first"):
        read_text(tmp_path / "a.txt.gz")
    (tmp_path / "w.txt").write_bytes("\u201cquoted\u201d \u2014 dash".encode("cp1252"))
    with pytest.raises(ValueError, match="iconv -f cp1252 -t utf-8"):
        read_text(tmp_path / "w.txt")
    (tmp_path / "l.txt").write_bytes("caf\u00e9".encode("latin1"))
    with pytest.raises(ValueError, match="iconv -f latin1 -t utf-8"):
        read_text(tmp_path / "l.txt")


def test_long_texts_are_encoded_in_pieces_with_the_same_ids(tokenizer):
    """Cutting only where GPT-2's pre-tokenizer cuts keeps the ids of a one-call encode, also across runs
    of newlines, punctuation, digits, contractions, non-Latin letters and the end-of-text marker."""
    from textgen.tokenizer import split_points

    parts = [
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
        "It's 1,234.5 miles -- isn't it?  Two  spaces\there.\r\n",
        "Ελληνικά και русский текст, 中文字符 and émigré cafés.\n<|endoftext|>Next doc\n\n\n",
    ]
    text = "".join(parts * 40)
    one_call = tokenizer._tok.encode(text).ids
    for every in (7, 31, 256):
        assert len(split_points(text, every)) > 10
        assert tokenizer.encode_batch([text, "short"], piece_chars=every)[0] == one_call
    assert tokenizer.encode(text) == one_call


def test_a_folder_reads_markdown_and_counts_the_files_it_skips(tmp_path):
    """A .md file is read in a folder as it is given alone; images and archives beside the text are
    skipped with one warning that counts them, never silently."""
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("# Notes\n\nmarkdown text")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "d.zip").write_bytes(b"PK\x03\x04\x14\x00")
    assert read_documents(tmp_path / "b.md") == ["# Notes\n\nmarkdown text"]
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) that are not text by name \(\.png, \.zip"):
        assert read_documents(tmp_path) == ["plain text", "# Notes\n\nmarkdown text"]


def test_a_symlink_back_up_the_tree_does_not_read_the_folders_beside_it(tmp_path):
    """data/up -> .. is a loop: following it once would read every folder beside data/ as well."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "mine.txt").write_text("my text")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "theirs.txt").write_text("someone else's text")
    (data / "up").symlink_to("..")
    (data / "self").symlink_to(".")
    (data / "sub").mkdir()
    (data / "sub" / "s.txt").write_text("sub text")
    (data / "sub" / "root").symlink_to("../..")
    assert read_documents(data) == ["my text", "sub text"]


def test_a_binary_file_named_txt_is_called_binary_not_another_encoding(tmp_path):
    from textgen.data import read_text

    png = tmp_path / "photo.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x04")
    with pytest.raises(ValueError, match=r"photo\.txt is a binary file") as e:
        read_text(png)
    assert "iconv" not in str(e.value)


def test_the_default_data_root_is_the_shared_folder_only_beside_a_source_checkout(tmp_path, monkeypatch):
    """Installed from a wheel, '<repo>/../shared/data' would be a folder beside site-packages."""
    import textgen.tokenizer as tk
    from textgen.data import default_data_dir

    monkeypatch.delenv("TEXTGEN_DATA", raising=False)
    monkeypatch.delenv("TEXTGEN_TOKENIZER", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    site = tmp_path / "site-packages"  # an installed package: no pyproject.toml above textgen/
    monkeypatch.setattr(tk, "_REPO_ROOT", site)
    assert default_data_dir() == tmp_path / "xdg" / "textgen" / "text"
    assert tk.default_tokenizer_path() == tmp_path / "xdg" / "textgen" / "tokenizer" / "gpt2"
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("[project]\n")
    monkeypatch.setattr(tk, "_REPO_ROOT", checkout)
    assert default_data_dir() == tmp_path / "shared" / "data" / "text"
