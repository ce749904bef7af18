"""Tokenizers, the text dataset and the synthetic tasks: round trips, exact formats, the split."""

import json
import os
import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora.data import (
    BYTE_EOT,
    END,
    IGNORE_INDEX,
    TASK_VOCAB,
    TASKS,
    ByteTokenizer,
    CharTokenizer,
    TaskDataset,
    TextDataset,
    get_task,
    task_tokenizer,
    tokenizer_from_dict,
)
from minilora.errors import ConfigError, DataError, InvalidArgumentError

ALPHABET = "ab\n é☃01"  # ASCII, a newline, Latin-1 and a character beyond the BMP's first page


# ------------------------------------------------------------------------------ tokenizers

@given(st.text(alphabet=ALPHABET, max_size=50))
def test_char_tokenizer_round_trip(text):
    tok = CharTokenizer(ALPHABET)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert [ALPHABET[i] for i in ids] == list(text)  # id i is the i-th character
    assert tok.decode(ids) == text


@given(st.text(max_size=40))
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@given(st.text(alphabet=ALPHABET, min_size=1, max_size=30),
       st.text(alphabet="xyz!", min_size=1, max_size=5))
def test_char_tokenizer_names_unknown_characters(text, bad):
    tok = CharTokenizer(ALPHABET)
    with pytest.raises(InvalidArgumentError) as err:
        tok.encode(text + bad)
    for c in set(bad):
        assert c in str(err.value)


def test_char_tokenizer_from_text_and_errors():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8
    with pytest.raises(InvalidArgumentError, match="repeated"):
        CharTokenizer("abca")
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        CharTokenizer("")
    with pytest.raises(InvalidArgumentError, match=r"\[0, 8\)"):
        tok.decode([0, 8])
    with pytest.raises(InvalidArgumentError, match=r"\[0, 256\)"):
        ByteTokenizer().decode([256])


def test_tokenizers_survive_their_json_form():
    for tok in (CharTokenizer(ALPHABET), ByteTokenizer(), task_tokenizer()):
        again = tokenizer_from_dict(tok.to_dict())
        assert again == tok and type(again) is type(tok)
    with pytest.raises(ConfigError, match="'word'"):
        tokenizer_from_dict({"kind": "word"})


@given(st.text(max_size=40), st.text(max_size=10))
def test_byte_tokenizer_with_eot_has_257_ids_and_decode_stops_at_the_end(text, after):
    tok = ByteTokenizer(eot=True)
    assert tok.vocab_size == 257 and tok.eot_id == BYTE_EOT == 256
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))  # encoding never makes an end-of-text
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([ids, [256], tok.encode(after)])) == text  # stops there


def test_end_of_text_ids_of_the_tokenizers():
    assert ByteTokenizer().eot_id is None and ByteTokenizer().vocab_size == 256
    assert CharTokenizer(ALPHABET).eot_id is None and task_tokenizer().eot_id is None
    assert ByteTokenizer(eot=True) != ByteTokenizer()
    assert repr(ByteTokenizer(eot=True)) == "ByteTokenizer(eot=True)"
    with pytest.raises(InvalidArgumentError, match=r"\[0, 257\)"):
        ByteTokenizer(eot=True).decode([257])
    with pytest.raises(InvalidArgumentError, match="eot must be True or False"):
        ByteTokenizer(eot=1)


def test_byte_tokenizer_json_forms_old_and_new():
    assert ByteTokenizer().to_dict() == {"kind": "byte"}  # what older checkpoints hold
    assert ByteTokenizer(eot=True).to_dict() == {"kind": "byte", "eot": True}
    assert tokenizer_from_dict({"kind": "byte"}) == ByteTokenizer()
    assert tokenizer_from_dict({"kind": "byte", "eot": False}) == ByteTokenizer()
    again = tokenizer_from_dict(json.loads(json.dumps(ByteTokenizer(eot=True).to_dict())))
    assert again == ByteTokenizer(eot=True) and again.vocab_size == 257


@pytest.mark.parametrize("d,words", [
    ({"kind": "byte", "eot": 1}, ["'eot'", "JSON boolean", "int"]),
    ({"kind": "byte", "eot": "true"}, ["'eot'", "JSON boolean", "str"]),
    ({"kind": "byte", "eot": None}, ["'eot'", "JSON boolean"]),
    ({"kind": "char", "chars": 5}, ["'chars'", "JSON string"]),
    ({"kind": "char"}, ["missing: ['chars']"]),
    ({"kind": "byte", "size": 256}, ["unknown: ['size']"]),
    ({"kind": 3}, ["unknown tokenizer kind 3"]),
    ({}, ["unknown tokenizer kind None"]),
    (["byte"], ["JSON object", "list"]),
    ("byte", ["JSON object", "str"]),
])
def test_tokenizer_from_dict_checks_the_json_types(d, words):
    with pytest.raises(ConfigError) as err:
        tokenizer_from_dict(d)
    for w in words:
        assert w in str(err.value)


def test_tokenizer_from_dict_hands_gpt2_bpe_to_the_bpe_module(monkeypatch):
    seen = []

    class FakeBPE:  # stands in for minilora.bpe.GPT2BPETokenizer, whatever that file holds now
        @classmethod
        def from_dict(cls, d):
            seen.append(d)
            return cls()

    fake = types.ModuleType("minilora.bpe")
    fake.GPT2BPETokenizer = FakeBPE
    monkeypatch.setitem(sys.modules, "minilora.bpe", fake)
    d = {"kind": "gpt2_bpe", "anything": [1, 2]}
    assert isinstance(tokenizer_from_dict(d), FakeBPE) and seen == [d]


def test_tokenizer_from_dict_names_a_missing_bpe_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "minilora.bpe", None)  # makes the import fail
    with pytest.raises(ConfigError, match="'gpt2_bpe' needs minilora.bpe"):
        tokenizer_from_dict({"kind": "gpt2_bpe"})


# ---------------------------------------------------------------------------- text dataset

@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**16))
def test_text_batches_are_shifted_windows_of_the_stream(block_size, batch_size, seed):
    text = "the quick brown fox jumps over the lazy dog " * 3
    ds = TextDataset(text, CharTokenizer.from_text(text), block_size, val_fraction=0.2)
    x, y = ds.get_batch(batch_size, np.random.default_rng(seed))
    assert x.shape == y.shape == (batch_size, block_size)
    train_text = ds.tokenizer.decode(ds.splits["train"])
    assert train_text == text[:len(train_text)]
    for row_x, row_y in zip(x, y):
        window = ds.tokenizer.decode(np.r_[row_x, row_y[-1]])
        assert window in train_text  # a contiguous piece of the training split
        np.testing.assert_array_equal(row_x[1:], row_y[:-1])
    x2, y2 = ds.get_batch(batch_size, np.random.default_rng(seed))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_text_dataset_validation_split_and_errors(tmp_path):
    text = "0123456789" * 10
    ds = TextDataset(text, CharTokenizer.from_text(text), 4, val_fraction=0.3)
    assert len(ds.splits["val"]) == 30 and len(ds.splits["train"]) == 70
    xv, _ = ds.get_batch(5, np.random.default_rng(0), split="val")
    assert xv.shape == (5, 4)
    with pytest.raises(InvalidArgumentError, match="'test'"):
        ds.get_batch(2, np.random.default_rng(0), split="test")
    with pytest.raises(InvalidArgumentError, match="block_size"):
        TextDataset("abc", CharTokenizer("abc"), 8)
    path = tmp_path / "tiny.txt"
    path.write_text("hello hello hello", encoding="utf-8")
    from_file = TextDataset.from_file(path, block_size=3, val_fraction=0.0)
    assert from_file.tokenizer.chars == " ehlo"
    with pytest.raises(InvalidArgumentError, match="no such file"):
        TextDataset.from_file(tmp_path / "missing.txt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_text_from_a_pipe_or_device_is_refused_as_not_a_regular_file(tmp_path):
    # a FIFO would block the read and /dev/zero never ends: both exist, neither is "missing"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (fifo, *(p for p in ("/dev/zero",) if os.path.exists(p))):
        with pytest.raises(DataError, match="is not a regular file") as err:
            TextDataset.from_file(path)
        assert str(path) in str(err.value) and "no such file" not in str(err.value)


# ---------------------------------------------------------------------------------- tasks

def _oracle(name, a, b, k):
    """The expected (prompt, answer), worked out digit by digit on strings."""
    da, db = f"{a:0{k}d}", f"{b:0{k}d}"
    if name == "add":
        return f"{da}+{db}=", f"{a + b:0{k + 1}d}{END}"
    if name == "nocarry":
        places = (str((int(x) + int(y)) % 10) for x, y in zip(da, db))
        return f"{da}+{db}=", "0" + "".join(places) + END
    if name == "digitmax":
        return f"{da}+{db}=", "0" + "".join(max(x, y) for x, y in zip(da, db)) + END
    if name == "rev":
        return f"{da}+{db}=", f"{a + b:0{k + 1}d}"[::-1] + END
    assert name == "max"
    return f"{da},{db}=", f"{max(a, b):0{k}d}{END}"


def test_task_examples_from_the_docs():
    examples = {name: "".join(get_task(name).example(183, 459)) for name in TASKS}
    assert examples == {"add": "183+459=0642.", "nocarry": "183+459=0532.",
                        "digitmax": "183+459=0489.", "rev": "183+459=2460.",
                        "max": "183,459=459."}


@given(st.sampled_from(sorted(TASKS)), st.integers(1, 4), st.data())
def test_task_examples_match_the_written_arithmetic(name, k, data):
    a = data.draw(st.integers(0, 10**k - 1))
    b = data.draw(st.integers(0, 10**k - 1))
    task = get_task(name, k)
    prompt, answer = task.example(a, b)
    assert (prompt, answer) == _oracle(name, a, b, k)
    assert len(prompt) == task.prompt_len and len(answer) == task.answer_len


@given(st.sampled_from(sorted(TASKS)), st.integers(1, 3),
       st.lists(st.integers(0, 10**6 - 1), min_size=1, max_size=20))
def test_task_encode_is_the_batched_example(name, k, raw_ids):
    task = get_task(name, k)
    ids = np.array(raw_ids) % task.num_pairs
    seqs = task.encode(ids)
    assert seqs.shape == (len(ids), task.seq_len)
    tok = task_tokenizer()
    for pair, row in zip(ids.tolist(), seqs):
        a, b = divmod(pair, 10**k)
        assert tok.decode(row) == "".join(task.example(a, b))


def test_tasks_share_one_vocabulary_and_registry_errors():
    tok = task_tokenizer()
    assert tok.chars == TASK_VOCAB
    for name in TASKS:
        task = get_task(name, 2)
        assert task.encode(np.arange(task.num_pairs)).max() < tok.vocab_size
    with pytest.raises(ConfigError) as err:
        get_task("mul")
    assert "'mul'" in str(err.value) and all(name in str(err.value) for name in TASKS)
    with pytest.raises(ConfigError, match="digits"):
        get_task("add", 0)
    with pytest.raises(InvalidArgumentError, match="b=100"):
        get_task("add", 2).example(3, 100)


@given(st.integers(1, 3), st.integers(1, 90), st.integers(0, 2**16))
def test_split_is_disjoint_and_covers_every_pair(k, n_heldout, split_seed):
    task = get_task("add", k)
    n_heldout = min(n_heldout, task.num_pairs - 1)
    ds = TaskDataset(task, n_heldout=n_heldout, split_seed=split_seed)
    held = set(ds.heldout_ids.tolist())
    assert len(held) == n_heldout
    train = ds.train_ids(np.arange(ds.num_train))
    assert np.all(np.diff(train) > 0)  # a bijection onto its image
    assert held.isdisjoint(train.tolist())
    assert len(held) + len(train) == task.num_pairs and train.max() < task.num_pairs


@given(st.sampled_from(sorted(TASKS)), st.integers(0, 2**16))
def test_training_batches_never_show_a_heldout_question(name, seed):
    ds = TaskDataset(get_task(name, 1), n_heldout=40, split_seed=7)  # 100 pairs: collisions likely
    held_prompts = {task_tokenizer().decode(p) for p in ds.heldout()[0]}
    x, y = ds.get_batch(64, np.random.default_rng(seed))
    P = ds.task.prompt_len
    for row in x:
        assert task_tokenizer().decode(row[:P]) not in held_prompts


def test_targets_score_only_the_answer():
    ds = TaskDataset(get_task("add", 3), n_heldout=100)
    x, y = ds.get_batch(16, np.random.default_rng(0))
    P = ds.task.prompt_len
    assert x.shape == y.shape == (16, ds.task.seq_len - 1) == (16, ds.block_size)
    assert np.all(y[:, :P - 1] == IGNORE_INDEX)
    np.testing.assert_array_equal(y[:, P - 1:-1], x[:, P:])  # y is x shifted by one
    tok = task_tokenizer()
    for row_x, row_y in zip(x, y):
        prompt = tok.decode(row_x[:P])
        a, b = int(prompt[:3]), int(prompt[4:7])
        assert tok.decode(row_y[P - 1:]) == f"{a + b:04d}."


def test_split_is_deterministic_and_shared_by_tasks():
    a = TaskDataset(get_task("add"), n_heldout=500, split_seed=3)
    b = TaskDataset(get_task("max"), n_heldout=500, split_seed=3)
    c = TaskDataset(get_task("add"), n_heldout=500, split_seed=4)
    np.testing.assert_array_equal(a.heldout_ids, b.heldout_ids)
    assert not np.array_equal(a.heldout_ids, c.heldout_ids)
    x1, _ = a.get_batch(8, np.random.default_rng(5))
    x2, _ = a.get_batch(8, np.random.default_rng(5))
    np.testing.assert_array_equal(x1, x2)
    prompts, answers = a.heldout(3)
    tok = task_tokenizer()
    for pid, p, ans in zip(a.heldout_ids[:3].tolist(), prompts, answers):
        assert (tok.decode(p), tok.decode(ans)) == a.task.example(*divmod(pid, 1000))
    with pytest.raises(InvalidArgumentError, match="n_heldout"):
        TaskDataset(get_task("add", 1), n_heldout=100)
    with pytest.raises(InvalidArgumentError, match="'test'"):
        a.get_batch(2, np.random.default_rng(0), split="test")


# ---------------------------------------------------- distrusted files and sizes (issue #11)

def test_a_text_file_records_its_path_and_sha256(tmp_path):
    import hashlib

    path = tmp_path / "t.txt"
    path.write_bytes("héllo wörld ☃ ".encode() * 4)
    ds = TextDataset.from_file(path, block_size=4)
    assert ds.path == str(path)
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert TextDataset("abcdefgh", CharTokenizer("abcdefgh"), 4).sha256 is None
    assert TextDataset("abcdefgh", CharTokenizer("abcdefgh"), 4).path is None


def test_a_text_file_that_is_not_utf8_names_the_byte(tmp_path):
    from minilora.errors import DataError

    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncafé au lait".encode("latin-1"))  # é is 0xe9 in Latin-1
    with pytest.raises(DataError) as info:
        TextDataset.from_file(path, block_size=4)
    msg = str(info.value)
    for word in (str(path), "not UTF-8", "byte 14", "0xe9", "line 2"):
        assert word in msg, msg
    assert isinstance(info.value, InvalidArgumentError)


def test_a_text_path_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    import pathlib

    from minilora.errors import DataError

    with pytest.raises(DataError, match="is a directory"):
        TextDataset.from_file(tmp_path)
    path = tmp_path / "t.txt"
    path.write_text("hello hello hello")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(DataError) as info:
        TextDataset.from_file(path, block_size=3)
    assert str(path) in str(info.value) and "Permission denied" in str(info.value)


def test_a_text_file_over_the_limit_is_refused_before_reading(tmp_path):
    from minilora import data
    from minilora.errors import DataError

    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(data.MAX_TEXT_BYTES + 1)  # sparse: no disk space, and never read
    with pytest.raises(DataError) as info:
        TextDataset.from_file(path)
    assert f"MAX_TEXT_BYTES = {data.MAX_TEXT_BYTES:,}" in str(info.value)


def test_heldout_counts_beyond_the_limit_are_refused_before_allocating():
    from minilora import data

    task = get_task("add", data.MAX_DIGITS)  # 10^12 pairs: only the limit stops 10^11
    with pytest.raises(InvalidArgumentError) as info:
        TaskDataset(task, n_heldout=data.MAX_HELDOUT + 1)
    assert f"MAX_HELDOUT = {data.MAX_HELDOUT:,}" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="n_heldout must be an int.*True"):
        TaskDataset(get_task("add", 1), n_heldout=True)
    assert TaskDataset(task, n_heldout=10).num_train == 10**12 - 10


@pytest.mark.parametrize("digits", [0, 7, 9, True, 2.0, "3"])
def test_task_digits_outside_the_named_range_are_refused(digits):
    from minilora import data

    with pytest.raises(ConfigError) as info:
        get_task("add", digits)
    msg = str(info.value)
    assert repr(digits) in msg and f"an int from 1 to {data.MAX_DIGITS} (operands" in msg, msg
