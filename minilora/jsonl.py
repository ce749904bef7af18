"""Instruction data from a JSONL file: one ``{"prompt": str, "completion": str}`` object a line.

This is the completion format mlx-lm's LoRA trainer and torchtune's instruct datasets take. Each
example becomes the token sequence

    seq = encode(prompt) + encode(completion) + [eot]           length L = P + C + 1

(prompt and completion are encoded separately, so the boundary between them is exact, and the
end-of-text token tells a sampler where the answer stops). A batch holds one example a row,
right-padded to the data set's ``block_size`` T:

    x = seq[:-1]   (B, T)    padding: the end-of-text id (any valid id would do: attention is
                             causal, so a padded position changes nothing before it)
    y = seq[1:]    (B, T)    y = -100 (IGNORE_INDEX) where the target is a prompt token
                             (positions 0 .. P - 2) or padding (positions L - 1 .. T - 1)

so the loss, a mean over the scored targets, counts the completion tokens and the final
end-of-text only: the model learns to answer, not to write prompts.

A held-out split of ``n_heldout`` examples (default 10%, at least 1, at most 1000) is drawn by
``split_seed`` and never trained on; :func:`exact_match` asks the model for their completions by
greedy decoding. Examples are kept once, unpadded (a flat token array and offsets); a batch is
padded as it is cut, so a file with one long example costs memory for that example only. Repeated
examples are not removed: one that is both in the file's training part and held out is held out
only in name (deduplicate the file first when that matters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import backend as B
from .data import IGNORE_INDEX, MAX_HELDOUT, TokenizerLike, read_text
from .errors import DataError, InvalidArgumentError, check_int, is_int
from .gpt import MAX_BLOCK_SIZE

KEYS = ("prompt", "completion")  # exactly these, in any order
DEFAULT_HELDOUT_SHARE = 0.1
MIN_DEFAULT_HELDOUT, MAX_DEFAULT_HELDOUT = 1, 1000


def default_n_heldout(n_examples: int) -> int:
    """10% of ``n_examples``, at least 1 and at most 1000."""
    share = int(n_examples * DEFAULT_HELDOUT_SHARE)
    return min(MAX_DEFAULT_HELDOUT, max(MIN_DEFAULT_HELDOUT, share))


class _RepeatedKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object hook: a key given twice is an error (json keeps the last silently)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _RepeatedKeyError(key)
        seen[key] = value
    return seen


def parse_jsonl(text: str, where: str) -> tuple[list[dict], list[int]]:
    """The objects of a JSONL text and the 1-based line each came from; blank lines are skipped.

    ``where`` starts every error message (e.g. ``"JsonlDataset: 'data.jsonl'"``); a line that is
    not JSON, not an object or repeats a key raises a DataError naming its line. Records are
    checked for their keys and types by :func:`check_record`.
    """
    records, lines = [], []
    if text.startswith("\ufeff"):  # a byte-order mark, as some editors write: not part of line 1
        text = text[1:]
    # split on "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON allows
    # unescaped inside strings
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_repeats)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} line {number}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno}): {line[:80]!r}") from None
        except _RepeatedKeyError as exc:
            raise DataError(f"{where} line {number}: key {exc.key!r} appears twice") from None
        except RecursionError:
            raise DataError(f"{where} line {number}: nested too deeply to be a "
                            f'{{"prompt", "completion"}} object') from None
        records.append(obj)
        lines.append(number)
    return records, lines


def check_record(record: Any, where: str) -> tuple[str, str]:
    """(prompt, completion) of one record, or a DataError starting with ``where`` that says what
    is wrong: not an object, missing or extra keys, a value that is not a string, an empty prompt
    or completion."""
    if not isinstance(record, dict):
        raise DataError(f'{where}: expected an object {{"prompt": str, "completion": str}}, got '
                        f"{_json_type(record)} {json.dumps(record)[:60]}")
    missing = [k for k in KEYS if k not in record]
    extra = sorted(str(k) for k in record if k not in KEYS)
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"extra {extra}"] if extra else [])
        raise DataError(f"{where}: the keys must be exactly {list(KEYS)}; {', '.join(parts)}")
    for key in KEYS:
        value = record[key]
        if not isinstance(value, str):
            shown = "" if value is None else f" {json.dumps(value)[:60]}"
            raise DataError(f"{where}: {key!r} must be a string, got {_json_type(value)}{shown}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's \ud800 escapes a lone surrogate: no text has it
            code = ord(value[exc.start])
            raise DataError(f"{where}: {key!r} holds a lone surrogate U+{code:04X} at character "
                            f"{exc.start} (a \\u escape JSON allows, but no UTF-8 text holds); "
                            f"write the character itself or its surrogate pair") from None
    if not record["prompt"]:
        # the first completion token is predicted from the prompt's last: without one it would
        # never be learned, and greedy decoding would have nothing to start from
        raise DataError(f"{where}: 'prompt' is empty; every completion needs a prompt to follow")
    if not record["completion"]:
        raise DataError(f"{where}: 'completion' is empty; there would be nothing to learn")
    return record["prompt"], record["completion"]


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


class JsonlDataset:
    """Prompt/completion examples, a held-out split, and batches whose loss is on completions only.

    ``records``: dicts ``{"prompt": str, "completion": str}``. ``tokenizer`` must have an
    end-of-text id (``eot_id``), which ends every example. ``block_size``: the T of a batch, at
    least the longest example's length L minus 1 (default: exactly that); ``n_heldout`` examples
    (default :func:`default_n_heldout`) are held out, chosen by ``split_seed``. ``locations``
    names each record in error messages and ``source`` the whole collection (``from_file`` passes
    ``"'path' line N"`` and ``"'path'"``; default ``"record i"`` and ``"the record list"``).

    Attributes: ``tokenizer``, ``n_heldout``, ``split_seed``, ``path`` and ``sha256`` (of the file,
    set by :meth:`from_file`; None otherwise), ``heldout_index`` and ``train_index`` (record
    numbers of the two splits: held out in drawing order, training in file order).
    """

    def __init__(self, records: Sequence[dict], tokenizer: TokenizerLike,
                 block_size: int | None = None, n_heldout: int | None = None,
                 split_seed: int = 1234, *, locations: Sequence[str] | None = None,
                 source: str | None = None) -> None:
        eot = getattr(tokenizer, "eot_id", None)
        if not is_int(eot):
            raise InvalidArgumentError(
                f"JsonlDataset: the tokenizer has no end-of-text token (its eot_id is {eot!r}), "
                f"and every example must end with one; train the base with --tokenizer byte (a "
                f"ByteTokenizer(eot=True)) or use GPT-2's BPE tokenizer, not {tokenizer!r:.60}")
        if not 0 <= eot < tokenizer.vocab_size:
            raise InvalidArgumentError(f"JsonlDataset: the tokenizer's eot_id={eot} lies outside "
                                       f"its vocabulary [0, {tokenizer.vocab_size})")
        if block_size is not None and (not is_int(block_size) or
                                       not 1 <= block_size <= MAX_BLOCK_SIZE):
            raise InvalidArgumentError(f"JsonlDataset: block_size must be None or an int in "
                                       f"[1, MAX_BLOCK_SIZE = {MAX_BLOCK_SIZE}], got "
                                       f"{block_size!r}")
        check_int(split_seed, "JsonlDataset: split_seed", minimum=0)
        if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
            raise InvalidArgumentError(f"JsonlDataset: records must be a list of "
                                       f'{{"prompt", "completion"}} dicts, got '
                                       f"{type(records).__name__}")
        if locations is not None and len(locations) != len(records):
            raise InvalidArgumentError(f"JsonlDataset: {len(locations)} locations for "
                                       f"{len(records)} records")
        self._names = list(locations) if locations is not None else None
        self._source_name = source or "the record list"
        self.tokenizer = tokenizer
        self.eot_id = int(eot)
        self.path: str | None = None
        self.sha256: str | None = None
        n = len(records)
        if n == 0:
            raise DataError(f"JsonlDataset: {self._source()} holds no examples (it is empty or "
                            f"has only blank lines)")
        # each record's keys and types first (a file of one bad line was said to be too short),
        # then n_heldout, both before any example is tokenized: a wrong split fails at once
        pairs = [check_record(record, f"JsonlDataset: {self._name(i)}")
                 for i, record in enumerate(records)]
        self.n_heldout = self._check_heldout(n_heldout, n)
        self.split_seed = int(split_seed)

        pieces, prompt_lens, lengths = [], np.empty(n, np.int64), np.empty(n, np.int64)
        end = np.array([self.eot_id], np.int64)
        # an example may fill the block asked for, or else the longest context a model can have:
        # a longer one is refused here, by line, before the whole file's token array is built
        limit = (block_size if block_size is not None else MAX_BLOCK_SIZE) + 1
        which = f"{'block_size' if block_size is not None else 'MAX_BLOCK_SIZE'} + 1 = {limit}"
        for i, (prompt, completion) in enumerate(pairs):
            p_ids = self._encode(prompt, i, "prompt")
            c_ids = self._encode(completion, i, "completion")
            seq_len = len(p_ids) + len(c_ids) + 1
            if seq_len > limit:
                raise DataError(f"JsonlDataset: {self._name(i)}: the example has {seq_len} tokens "
                                f"(prompt {len(p_ids)} + completion {len(c_ids)} + end-of-text "
                                f"1), more than {which}; shorten it or raise block_size")
            pieces += [p_ids, c_ids, end]
            prompt_lens[i], lengths[i] = len(p_ids), seq_len
        self._tokens = np.concatenate(pieces)  # every example, unpadded, one after another
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._prompt_lens, self._lengths = prompt_lens, lengths
        self._block_size = int(block_size) if block_size is not None else int(lengths.max()) - 1

        order = np.random.default_rng(self.split_seed).permutation(n)
        self.heldout_index = order[:self.n_heldout].astype(np.int64)
        self.train_index = np.sort(order[self.n_heldout:]).astype(np.int64)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: TokenizerLike, block_size: int | None = None,
                  n_heldout: int | None = None, split_seed: int = 1234) -> JsonlDataset:
        """Read a UTF-8 JSONL file, one ``{"prompt": str, "completion": str}`` object a line
        (blank lines skipped).

        The data set records ``path`` (absolute, str) and ``sha256`` (hex digest of the file's
        bytes), as :meth:`minilora.data.TextDataset.from_file` does. Every error is a DataError
        naming the file and, for a bad example, its line.
        """
        who = "JsonlDataset.from_file"
        text, digest = read_text(path, who)
        shown = repr(str(path))
        records, lines = parse_jsonl(text, f"JsonlDataset: {shown}")
        ds = cls(records, tokenizer, block_size, n_heldout, split_seed, source=shown,
                 locations=[f"{shown} line {n}" for n in lines])
        ds.path, ds.sha256 = str(Path(path).resolve()), digest  # resumable from any cwd
        return ds

    # ------------------------------------------------------------------------ sizes, splits

    @property
    def block_size(self) -> int:
        """Positions a model needs: the T of every batch (the longest example's length - 1,
        unless a larger one was asked for)."""
        return self._block_size

    @property
    def num_examples(self) -> int:
        """Number of examples in all."""
        return len(self._lengths)

    @property
    def num_train(self) -> int:
        """Number of training examples (all but the held-out ones)."""
        return len(self.train_index)

    def get_batch(self, batch_size: int, rng: np.random.Generator,
                  split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """x, y int64 (batch_size, block_size): random examples of ``split`` ("train", or "val"
        for the held-out ones), one a row, drawn with replacement.

        x = seq[:-1], y = seq[1:] right-padded; y is -100 (IGNORE_INDEX) where its target is a
        prompt token or padding, so only the completion and its end-of-text are scored.
        """
        check_int(batch_size, "JsonlDataset.get_batch: batch_size")
        pool = self._split(split)
        return self.inputs_targets(pool[rng.integers(0, len(pool), size=batch_size)])

    def inputs_targets(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record numbers (N,) -> x, y int64 (N, block_size) as :meth:`get_batch` makes them."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        T = self._block_size
        pos = np.arange(T + 1)  # (T + 1,)
        lengths, prompts = self._lengths[index][:, None], self._prompt_lens[index][:, None]
        inside = pos < lengths  # (N, T + 1): the example's own tokens, not padding
        flat = np.minimum(self._starts[index][:, None] + pos, len(self._tokens) - 1)
        seq = np.where(inside, self._tokens[flat], self.eot_id)  # (N, T + 1)
        x, y = seq[:, :-1], seq[:, 1:].copy()
        # y[:, j] is the token at j + 1: scored when that is a completion token or the final
        # end-of-text (P <= j + 1 < L)
        scored = (pos[1:] >= prompts) & inside[:, 1:]
        y[~scored] = IGNORE_INDEX
        return x, y

    def heldout(self, n: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The first ``n`` held-out examples (all by default) as (prompts, completions): lists of
        int64 token arrays, each completion ending with the end-of-text id."""
        if n is not None and (not is_int(n) or n < 0):
            raise InvalidArgumentError(f"JsonlDataset.heldout: n must be None or an int >= 0, "
                                       f"got {n!r}")
        prompts, completions = [], []
        for i in self.heldout_index[:n].tolist():
            s, p, length = self._starts[i], self._prompt_lens[i], self._lengths[i]
            prompts.append(self._tokens[s:s + p].copy())
            completions.append(self._tokens[s + p:s + length].copy())
        return prompts, completions

    # ---------------------------------------------------------------------------- helpers

    def _split(self, split: str) -> np.ndarray:
        if split == "train":
            return self.train_index
        if split == "val":
            return self.heldout_index
        raise InvalidArgumentError(f"JsonlDataset: split must be 'train' or 'val' (the held-out "
                                   f"examples), got {split!r}")

    def _check_heldout(self, n_heldout: Any, n: int) -> int:
        if n_heldout is None:
            n_heldout = default_n_heldout(n)
        elif not is_int(n_heldout) or not 1 <= n_heldout <= MAX_HELDOUT:
            raise InvalidArgumentError(f"JsonlDataset: n_heldout must be None or an int in "
                                       f"[1, MAX_HELDOUT = {MAX_HELDOUT:,}], got {n_heldout!r}")
        if n_heldout >= n:
            raise DataError(f"JsonlDataset: {self._source()} has {n} example(s), too few to hold "
                            f"out {n_heldout} and train on the rest; it needs at least "
                            f"{n_heldout + 1} (or a smaller n_heldout)")
        return int(n_heldout)

    def _encode(self, text: str, i: int, key: str) -> np.ndarray:
        try:
            ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64).reshape(-1)
        except InvalidArgumentError as exc:
            raise DataError(f"JsonlDataset: {self._name(i)}: {key!r} cannot be encoded: "
                            f"{exc}") from None
        if (ids == self.eot_id).any():  # only the end may be the end
            raise DataError(f"JsonlDataset: {self._name(i)}: {key!r} encodes to the end-of-text "
                            f"token {self.eot_id}; remove it from the text")
        return ids

    def _name(self, i: int) -> str:
        return self._names[i] if self._names is not None else f"record {i}"

    def _source(self) -> str:
        return self._source_name

    def __repr__(self) -> str:
        where = f" from {self.path!r}" if self.path else ""
        return (f"JsonlDataset({self.num_examples} examples{where}, {self.n_heldout} held out, "
                f"block_size={self.block_size})")


def greedy_completions(model: Any, data: JsonlDataset, n: int | None = None,
                       batch_size: int = 1000) -> list[np.ndarray]:
    """The greedy answers to the first ``n`` held-out prompts: for example i, the first
    len(completion_i) generated tokens (its end-of-text included when the model stops there).

    Prompts of the same length go through ``model.generate(prompts, k, temperature=0)`` together
    (up to ``batch_size`` rows at a time), k the longest completion among them.
    """
    check_int(batch_size, "exact_match: batch_size")
    prompts, completions = data.heldout(n)
    if not prompts:
        raise InvalidArgumentError(f"exact_match: no held-out examples to score (n={n!r})")
    block = getattr(getattr(model, "config", None), "block_size", None)
    if block is not None and block < data.block_size:
        raise InvalidArgumentError(f"exact_match: the data needs block_size {data.block_size}, "
                                   f"the model has {block}")
    p_lens = np.array([len(p) for p in prompts])
    answers: list[np.ndarray] = [np.zeros(0, np.int64)] * len(prompts)
    for length in np.unique(p_lens).tolist():
        group = np.flatnonzero(p_lens == length)
        for start in range(0, len(group), batch_size):
            rows = group[start:start + batch_size].tolist()
            k = max(len(completions[i]) for i in rows)
            out = model.generate(np.stack([prompts[i] for i in rows]), k, temperature=0.0)
            got = B.to_numpy(out)[:, length:]  # (b, k)
            for r, i in enumerate(rows):
                answers[i] = got[r, :len(completions[i])]
    return answers


def exact_match(model: Any, data: JsonlDataset, n: int | None = None,
                batch_size: int = 1000) -> float:
    """Share of the first ``n`` held-out examples (all by default) whose greedy completion equals
    the true one exactly, its end-of-text included: the model must stop where the completion
    does (tokens after that are not judged). See :func:`greedy_completions`."""
    got = greedy_completions(model, data, n, batch_size)
    _, completions = data.heldout(n)
    return sum(np.array_equal(g, c) for g, c in zip(got, completions)) / len(completions)


__all__ = ["KEYS", "JsonlDataset", "exact_match", "greedy_completions", "parse_jsonl",
           "check_record", "default_n_heldout"]
