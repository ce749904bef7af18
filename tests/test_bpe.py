"""GPT-2 byte-level BPE on hand-built vocabularies: the byte table, GPT-2's pre-tokenization,
merges by rank, round trips, the JSON form, and the errors of vocab.json / merges.txt."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import bpe
from minilora.bpe import BYTE_TO_CHAR, EOT, GPT2BPETokenizer, bytes_to_unicode, pretokenizer
from minilora.errors import CheckpointError, ConfigError, InvalidArgumentError

BYTES = [BYTE_TO_CHAR[b] for b in range(256)]  # the 256 single-byte symbols
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
          ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("Ġ", "Ġ")]


def make(merges=MERGES, eot=True, bytes_=BYTES):
    """A tokenizer with the byte symbols, every merge result, and <|endoftext|> last."""
    tokens = list(bytes_) + [a + b for a, b in merges] + ([EOT] if eot else [])
    return GPT2BPETokenizer({t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges)


def ids_of(tok, *tokens):
    return [tok.encoder[t] for t in tokens]


def write_files(folder, vocab, merges_text):
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------- byte table and split

def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    same = [b for b in range(256) if table[b] == chr(b)]
    assert len(same) == 188 and same == [*range(0x21, 0x7F), *range(0xA1, 0xAD),
                                         *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in same]
    assert [table[b] for b in others] == [chr(256 + k) for k in range(68)]  # in byte order
    assert table[0x20] == "Ġ" and table[0x0A] == "Ċ" and table[0xAD] == chr(323)


@pytest.mark.parametrize("text, words", [
    ("Hello world", ["Hello", " world"]),
    ("I'm here, it's 2024!", ["I", "'m", " here", ",", " it", "'s", " 2024", "!"]),
    ("don't  stop\n\n", ["don", "'t", " ", " stop", "\n\n"]),
    ("a   b", ["a", "  ", " b"]),  # a whitespace run leaves its last space to the next word
    ("  ", ["  "]), ("end   ", ["end", "   "]), ("x\t\ty", ["x", "\t", "\t", "y"]),
    ("naïve café Zürich", ["naïve", " café", " Zürich"]),
    ("日本語のテキスト", ["日本語のテキスト"]), ("Ελληνικά русский", ["Ελληνικά", " русский"]),
    ("x² ½ Ⅻ", ["x", "²", " ½", " Ⅻ"]),  # No / Nl are numbers, not letters
    ("٣٤٥ १२३ 3.14", ["٣٤٥", " १२३", " 3", ".", "14"]),
    ("a!\x1c\x1cb", ["a", "!\x1c\x1c", "b"]),  # U+001C is not White_Space (re's \s says it is)
    ("a\u00a0\u3000b", ["a", "\u00a0", "\u3000", "b"]),
    ("e\u0301 😀🚀 !!", ["e", "\u0301", " 😀🚀", " !!"]),  # a combining mark is not a letter
    ("'S 'LL", ["'", "S", " '", "LL"]),  # the contractions are lower case only
])
def test_pretokenizer_splits_as_gpt2(text, words):
    assert pretokenizer().findall(text) == words


@given(st.text(max_size=60))
def test_pretokenizer_covers_the_text(text):
    assert "".join(pretokenizer().findall(text)) == text


# ---------------------------------------------------------------------------- merges

def test_merges_apply_by_rank_not_by_position():
    abc = {t: i for i, t in enumerate(BYTES + ["ab", "bc"])}
    assert GPT2BPETokenizer(abc, [("b", "c"), ("a", "b")]).bpe("abc") == ["a", "bc"]
    assert GPT2BPETokenizer(abc, [("a", "b"), ("b", "c")]).bpe("abc") == ["ab", "c"]
    tok = make()
    assert tok.bpe("hello") == ["hello"]  # he, ll, hell, hello: four ranks in turn
    assert tok.bpe("Ġworld") == ["Ġworld"] and tok.bpe("Ġhello") == ["Ġ", "hello"]
    assert tok.bpe("ĠĠĠĠĠ") == ["ĠĠ", "ĠĠ", "Ġ"]  # left to right, never overlapping
    assert tok.bpe("xyz") == ["x", "y", "z"] and tok.bpe("h") == ["h"]


def test_encode_known_ids_and_special_token():
    tok = make()
    ids = tok.encode("hello world")
    assert ids.dtype == np.int64 and ids.shape == (2,)
    assert ids.tolist() == ids_of(tok, "hello", "Ġworld")
    assert tok.eot_id == tok.vocab_size - 1
    assert tok.encode(f"hello{EOT} world{EOT}{EOT}").tolist() == \
        ids_of(tok, "hello", EOT, "Ġworld", EOT, EOT)
    assert tok.encode("").shape == (0,) and tok.encode(EOT).tolist() == [tok.eot_id]
    plain = make(eot=False)  # without the token in the vocabulary it is plain text
    assert plain.eot_id is None
    assert plain.decode(plain.encode(EOT)) == EOT and len(plain.encode(EOT)) > 1


@given(st.text(max_size=80))
def test_without_merges_ids_are_the_utf8_bytes(text):
    tok = GPT2BPETokenizer({c: i for i, c in enumerate(BYTES)}, [])
    assert tok.encode(text).tolist() == list(text.encode("utf-8"))  # BYTES[b] has id b


@given(st.binary(max_size=60))
def test_every_byte_decodes(data):
    tok = make()
    ids = ids_of(tok, *(BYTE_TO_CHAR[b] for b in data))
    assert tok.decode(ids) == data.decode("utf-8", errors="replace")


@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(["hello", " world", EOT, "  "])),
                max_size=8))
def test_decode_inverts_encode(parts):
    text = "".join(parts)
    tok = make()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(list(tok.encode(text))) == text


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(bpe, "_CACHE_MAX", 3)
    tok = make()
    ids = tok.encode("a b c d e f hello hello")
    assert len(tok._cache) <= 3 and tok.decode(ids) == "a b c d e f hello hello"
    assert tok.encode("a b c d e f hello hello").tolist() == ids.tolist()


def test_encode_decode_errors():
    tok = make()
    with pytest.raises(InvalidArgumentError, match=r"\[0, 267\)"):
        tok.decode([0, 267])
    with pytest.raises(InvalidArgumentError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(InvalidArgumentError, match=r"lone surrogate U\+D800"):
        tok.encode("ab\ud800c")
    no_tab = make(bytes_=[c for c in BYTES if c != BYTE_TO_CHAR[9]])
    assert no_tab.decode(no_tab.encode("hello")) == "hello"
    with pytest.raises(InvalidArgumentError, match="byte 0x09"):
        no_tab.encode("a\tb")


# ---------------------------------------------------------------------------- JSON form

def test_to_dict_from_dict_round_trip():
    tok = make()
    d = json.loads(json.dumps(tok.to_dict()))
    assert d["kind"] == "gpt2_bpe" and d["merges"][0] == ["h", "e"]
    back = GPT2BPETokenizer.from_dict(d)
    assert back == tok and back is not tok and back != make(MERGES[:-1]) and tok != "tok"
    assert back.encode("hello world").tolist() == tok.encode("hello world").tolist()
    assert back.vocab_size == tok.vocab_size and repr(back) == repr(tok)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(kind="char"), "kind must be 'gpt2_bpe'"),
    (lambda d: d.pop("vocab"), "vocab is missing"),
    (lambda d: d.pop("merges"), "merges is missing"),
    (lambda d: d.update(vocab=[["a", 0]]), "vocab: the vocabulary must be a non-empty object"),
    (lambda d: d.update(vocab={}), "an empty object"),
    (lambda d: d["vocab"].update(h="7"), r"id of token 'h' must be an integer, got '7'"),
    (lambda d: d["vocab"].update(h=True), "id of token 'h' must be an integer"),
    (lambda d: d["vocab"].update(h=1.0), "id of token 'h' must be an integer"),
    (lambda d: d["vocab"].update(h=0), "id 0 is given to two tokens"),
    (lambda d: d["vocab"].update(h=9999), r"outside \[0, 267\)"),
    (lambda d: d.update(merges="h e"), "merges must be a list"),
    (lambda d: d["merges"].append(["a", "b", "c"]), "merge 11 must be two non-empty tokens"),
    (lambda d: d["merges"].append(["a b", "c"]), "merge 11 must be two non-empty tokens"),
    (lambda d: d["merges"].append(["x", "y"]), r"merge 11 \('x', 'y'\) uses 'xy'"),
])
def test_from_dict_names_the_bad_field(change, match):
    d = make().to_dict()
    change(d)
    with pytest.raises(ConfigError, match=match):
        GPT2BPETokenizer.from_dict(d)


def test_from_dict_and_init_refuse_non_dicts():
    with pytest.raises(ConfigError, match="expected an object"):
        GPT2BPETokenizer.from_dict([1, 2])
    with pytest.raises(ConfigError, match="GPT2BPETokenizer: the id of token 'a'"):
        GPT2BPETokenizer({"a": None}, [])
    with pytest.raises(ConfigError, match="uses 'ab'"):
        GPT2BPETokenizer({"a": 0, "b": 1}, [("a", "b")])


# ---------------------------------------------------------------------------- from_dir

def merges_text(merges, header="#version: 0.2\n"):
    return header + "".join(f"{a} {b}\n" for a, b in merges)


@pytest.mark.parametrize("header", ["#version: 0.2\n", ""])
def test_from_dir_reads_hf_files(tmp_path, header):
    tok = make()
    folder = write_files(tmp_path / "tok", tok.encoder, merges_text(MERGES, header))
    assert GPT2BPETokenizer.from_dir(folder) == tok
    assert GPT2BPETokenizer.from_dir(str(folder)).encode("hello").tolist() == \
        ids_of(tok, "hello")
    (folder / "merges.txt").write_text(merges_text(MERGES).replace("\n", "\r\n"))
    assert GPT2BPETokenizer.from_dir(folder) == tok  # Windows line ends


def test_from_dir_names_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="lacks vocab.json and merges.txt"):
        GPT2BPETokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps(make().encoder))
    with pytest.raises(CheckpointError, match=r"lacks merges.txt \("):
        GPT2BPETokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder"):
        GPT2BPETokenizer.from_dir(tmp_path / "vocab.json")
    (tmp_path / "merges.txt").mkdir()
    with pytest.raises(CheckpointError, match="merges.txt' is not a regular file"):
        GPT2BPETokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("vocab_text, match", [
    ('{"a": 0,', "vocab.json': is not valid JSON"),
    ('[["a", 0]]', "vocab.json': must hold a JSON object"),
    ('{"a": 0, "b": "1"}', "vocab.json': the id of token 'b' must be an integer, got '1'"),
    ('{"a": 0, "b": 0}', "vocab.json': id 0 is given to two tokens, 'a' and 'b'"),
    ('{"a": 0, "b": 2}', r"vocab.json': the id of token 'b' is 2, outside \[0, 2\)"),
    ('{"a": 0, "b": 1.5}', "vocab.json': the id of token 'b' must be an integer"),
    ('{"a": 0, "b": false}', "vocab.json': the id of token 'b' must be an integer"),
])
def test_from_dir_names_bad_vocab(tmp_path, vocab_text, match):
    (tmp_path / "vocab.json").write_text(vocab_text)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match=match):
        GPT2BPETokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("#version: 0.2\nh e\nl  l\n", r"merges.txt' line 3: expected two tokens"),
    ("h e\n\nl l\n", r"merges.txt' line 2: expected two tokens"),
    ("h e l\n", r"merges.txt' line 1: expected two tokens"),
    ("#version: 0.2\nh e\nq z\n", r"merges.txt': merge 2 \('q', 'z'\) uses 'qz'"),
])
def test_from_dir_names_bad_merges(tmp_path, text, match):
    write_files(tmp_path, make().encoder, text)
    with pytest.raises(CheckpointError, match=match):
        GPT2BPETokenizer.from_dir(tmp_path)


def test_from_dir_refuses_non_utf8_merges(tmp_path):
    write_files(tmp_path, make().encoder, "")
    (tmp_path / "merges.txt").write_bytes(b"#version: 0.2\nh e\n\xff\xfe l\n")
    with pytest.raises(CheckpointError, match=r"merges.txt' is not UTF-8 text \(byte 18"):
        GPT2BPETokenizer.from_dir(tmp_path)
