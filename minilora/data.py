"""Data: tokenizers, a text dataset, and the synthetic arithmetic tasks of the LoRA story.

Everything here runs on the host with NumPy (batches are small integer arrays; the training loop
moves them to the device). Randomness always comes from a ``numpy.random.Generator`` the caller
passes in, so the same seed gives the same batches, bit for bit.

The tasks share one character vocabulary, :data:`TASK_VOCAB`, so a model trained on the base task
(addition) can be adapted to the others without touching its embedding table:

============  ==================  ======  ===================================================
name          example (k = 3)     role    what the answer is
============  ==================  ======  ===================================================
``add``       ``183+459=0642.``   task A  the sum, k + 1 digits, zero-padded: the base task
``nocarry``   ``183+459=0532.``   task B  the sum digit by digit, every carry forgotten
``digitmax``  ``183+459=0489.``   task C  in each place the larger of the two digits
``rev``       ``183+459=2460.``   extra   the sum with its digits in reverse order
``max``       ``183,459=459.``    extra   the larger of the two numbers
============  ==================  ======  ===================================================

Tasks B and C ask the same question as task A and keep its answer layout (k + 1 digits, place by
place), so an adapter only has to change what the base model does with the digits it already
reads: a rank-8 LoRA on q_proj and v_proj learns either from the task-A model within a few hundred
steps. ``rev`` moves every digit to another place, which such an adapter learns far more slowly
than full fine-tuning does (see benchmarks/RESULTS.md): a lesson about LoRA's limits.

Operands are zero-padded to k digits, so every prompt of a task has the same length and every
answer too: batched greedy evaluation needs no padding. The answer ends with ``.`` (:data:`END`),
which tells a sampler where to stop. All tasks draw their operands from the same pairs
(a, b) in [0, 10^k)^2 and hold out the same pairs, so no held-out question of any task was seen in
training by the base model or by an adapter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .errors import ConfigError, DataError, InvalidArgumentError, check_int, is_int, is_real

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (cross_entropy's default)
END = "."  # the last character of every task answer
TASK_VOCAB = "0123456789+-*,=" + END  # one vocabulary for every task (base and adapters)
BYTE_EOT = 256  # ByteTokenizer(eot=True)'s end-of-text id: the first id after the 256 bytes
# Limits, checked before anything is read or allocated. A text file is read whole and becomes
# 8 bytes (int64) per token, so 1 GiB of text is already 8 GiB of tokens. Operands have at most
# 6 digits: 10^12 pairs, whose ids, sums and digits stay far inside int64. The held-out questions
# are drawn and kept in memory (and each evaluation may run them all): a million is plenty.
MAX_TEXT_BYTES = 2**30
MIN_DIGITS, MAX_DIGITS = 1, 6
MAX_HELDOUT = 10**6


# ------------------------------------------------------------------------------ tokenizers

class CharTokenizer:
    """One token per character of a fixed alphabet: ``chars[i]`` has id ``i``.

    ``encode`` raises InvalidArgumentError naming any character outside the alphabet, rather than
    guessing; ``to_dict`` / ``from_dict`` give the JSON form saved with a model.
    """

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str) or not chars:
            raise InvalidArgumentError(f"CharTokenizer: chars must be a non-empty string, "
                                       f"got {chars!r}")
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise InvalidArgumentError(f"CharTokenizer: chars must be distinct; repeated: {dup!r}")
        self.chars = chars
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._order = np.argsort(codes, kind="stable")
        self._sorted = codes[self._order]
        self._codes = codes

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose alphabet is the sorted set of characters in ``text``."""
        if not text:
            raise InvalidArgumentError("CharTokenizer.from_text: text is empty")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.chars)

    @property
    def eot_id(self) -> int | None:
        """None: a character vocabulary has no end-of-text token (the tasks end at ``.``)."""
        return None

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int64 ids of shape (len(text),); unknown characters raise an error."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point each
        pos = np.minimum(np.searchsorted(self._sorted, codes), len(self._sorted) - 1)
        known = self._sorted[pos] == codes
        if not known.all():
            bad = "".join(sorted({chr(c) for c in codes[~known].tolist()}))
            raise InvalidArgumentError(f"encode: characters {bad!r} are not in the vocabulary "
                                       f"{self.chars!r}")
        return self._order[pos].astype(np.int64)

    def decode(self, ids: Any) -> str:
        """Ids (any int sequence or array) -> the string they stand for."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InvalidArgumentError(f"decode: ids must lie in [0, {self.vocab_size}), got "
                                       f"values from {ids.min()} to {ids.max()}")
        return self._codes[ids].tobytes().decode("utf-32-le")

    def to_dict(self) -> dict:
        """The JSON form: ``{"kind": "char", "chars": ...}``."""
        return {"kind": self.kind, "chars": self.chars}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash((self.kind, self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer({self.chars!r})"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, so any text encodes.

    With ``eot=True`` there is one more id, :data:`BYTE_EOT` = 256, that marks the end of a text
    (an example of a JSONL data set ends with it; a sampler stops there): 257 tokens. ``encode``
    never produces it (no byte sequence stands for it); ``decode`` stops at the first one, since
    what follows the end of a text is not part of it. Without ``eot`` the tokenizer is the
    256-token one that older checkpoints hold, and ``to_dict`` keeps their form ``{"kind":
    "byte"}``, so they load unchanged. Decoding replaces broken UTF-8 sequences with U+FFFD.
    """

    kind = "byte"

    def __init__(self, eot: bool = False) -> None:
        if not isinstance(eot, (bool, np.bool_)):
            raise InvalidArgumentError(f"ByteTokenizer: eot must be True or False, got {eot!r}")
        self.eot = bool(eot)

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes, plus the end-of-text id with ``eot``."""
        return 257 if self.eot else 256

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id (256) with ``eot``, else None."""
        return BYTE_EOT if self.eot else None

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int64 ids of its UTF-8 bytes, shape (number of bytes,)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Any) -> str:
        """Ids in [0, vocab_size) -> text (invalid UTF-8 becomes U+FFFD); with ``eot`` the text
        ends just before the first end-of-text id."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            what = "byte ids" if not self.eot else "ids (bytes and end-of-text 256)"
            raise InvalidArgumentError(f"decode: {what} must lie in [0, {self.vocab_size}), got "
                                       f"values from {ids.min()} to {ids.max()}")
        if self.eot:
            ends = np.flatnonzero(ids == BYTE_EOT)
            if ends.size:
                ids = ids[:ends[0]]
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """The JSON form: ``{"kind": "byte"}``, or ``{"kind": "byte", "eot": true}``."""
        return {"kind": self.kind, "eot": True} if self.eot else {"kind": self.kind}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and other.eot == self.eot

    def __hash__(self) -> int:
        return hash((self.kind, self.eot))

    def __repr__(self) -> str:
        return "ByteTokenizer(eot=True)" if self.eot else "ByteTokenizer()"


Tokenizer = CharTokenizer | ByteTokenizer  # built in; tokenizer_from_dict also gives GPT-2's BPE


class TokenizerLike(Protocol):
    """What the data sets and the training loop need of a tokenizer (CharTokenizer,
    ByteTokenizer, minilora.bpe.GPT2BPETokenizer)."""

    kind: str

    @property
    def vocab_size(self) -> int:
        """The number of token ids, 0 .. vocab_size - 1 (the model's V)."""
        ...

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token's id, or None for a tokenizer without one."""
        ...

    def encode(self, text: str) -> np.ndarray:
        """``text`` as a 1-D int64 array of token ids."""
        ...

    def decode(self, ids: Any) -> str:
        """The text of a sequence of token ids (the inverse of encode)."""
        ...

    def to_dict(self) -> dict:
        """A JSON-able description of this tokenizer (what a checkpoint stores of it)."""
        ...


# the keys each built-in kind's JSON form may hold, and the type each must have
_TOKENIZER_FIELDS: dict[str, dict[str, type]] = {"char": {"kind": str, "chars": str},
                                                 "byte": {"kind": str, "eot": bool}}
_REQUIRED = {"char": {"kind", "chars"}, "byte": {"kind"}}


def tokenizer_from_dict(d: dict) -> Any:
    """Rebuild a tokenizer from its ``to_dict()`` form (a JSON object).

    Kinds: ``"char"`` ``{"kind", "chars": str}``, ``"byte"`` ``{"kind", "eot": bool}`` (``eot``
    absent means false, the form older checkpoints hold) and ``"gpt2_bpe"`` (handed whole to
    ``minilora.bpe.GPT2BPETokenizer.from_dict``). Any other kind, an unknown key, a missing key or
    a value of the wrong JSON type (``eot`` must be a JSON boolean, not 0 or 1) is a ConfigError
    naming it.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"tokenizer_from_dict: expected a JSON object, got "
                          f"{type(d).__name__} {d!r:.80}")
    kind = d.get("kind")
    if kind == "gpt2_bpe":
        try:  # imported here: the BPE tokenizer (and its vocabulary files) is optional
            from .bpe import GPT2BPETokenizer
        except ImportError as exc:
            raise ConfigError(f"tokenizer_from_dict: kind 'gpt2_bpe' needs minilora.bpe, which "
                              f"cannot be imported here ({exc})") from None
        return GPT2BPETokenizer.from_dict(d)
    if not isinstance(kind, str) or kind not in _TOKENIZER_FIELDS:
        raise ConfigError(f"tokenizer_from_dict: unknown tokenizer kind {kind!r}; expected "
                          f"'char', 'byte' or 'gpt2_bpe' (got {d!r:.120})")
    fields = _TOKENIZER_FIELDS[kind]
    unknown = sorted(set(d) - set(fields), key=str)
    missing = sorted(_REQUIRED[kind] - set(d))
    if unknown or missing:
        raise ConfigError(f"tokenizer_from_dict: a {kind!r} tokenizer has keys "
                          f"{sorted(fields)} ({sorted(_REQUIRED[kind])} required); "
                          f"unknown: {unknown}, missing: {missing}")
    for key, want in fields.items():
        if key in d and type(d[key]) is not want:  # exact: a bool is an int, 1 is no boolean
            raise ConfigError(f"tokenizer_from_dict: {kind!r} field {key!r} must be a JSON "
                              f"{'boolean' if want is bool else 'string'}, got "
                              f"{type(d[key]).__name__} {d[key]!r:.80}")
    if kind == "char":
        return CharTokenizer(d["chars"])
    return ByteTokenizer(eot=d.get("eot", False))


def task_tokenizer() -> CharTokenizer:
    """The tokenizer every task uses (alphabet :data:`TASK_VOCAB`)."""
    return CharTokenizer(TASK_VOCAB)


# ---------------------------------------------------------------------------- text dataset

class TextDataset:
    """A token stream cut into random windows of ``block_size + 1`` tokens, as nanoGPT does.

    The first ``1 - val_fraction`` of the text trains, the rest validates. A batch is
    x = tokens[i : i + T], y = tokens[i + 1 : i + T + 1] for B random starts i: (B, T) each.
    """

    def __init__(self, text: str, tokenizer: Tokenizer, block_size: int,
                 val_fraction: float = 0.1) -> None:
        check_int(block_size, "TextDataset: block_size")
        if not is_real(val_fraction) or not 0.0 <= val_fraction < 1.0:
            raise InvalidArgumentError(f"TextDataset: val_fraction must be a number in [0, 1), "
                                       f"got {val_fraction!r}")
        if not isinstance(text, str):
            raise InvalidArgumentError(f"TextDataset: text must be a str, got "
                                       f"{type(text).__name__} (TextDataset.from_file reads a "
                                       f"file)")
        if not callable(getattr(tokenizer, "encode", None)) or \
                not callable(getattr(tokenizer, "decode", None)):
            raise InvalidArgumentError(f"TextDataset: tokenizer must have encode and decode "
                                       f"(a CharTokenizer, ByteTokenizer or GPT2BPETokenizer), "
                                       f"got {type(tokenizer).__name__}")
        self.tokenizer, self.block_size = tokenizer, int(block_size)
        # where the text came from, so a training run can record it and check it later
        # (from_file sets them; None for text given as a string)
        self.path: str | None = None
        self.sha256: str | None = None
        tokens = tokenizer.encode(text)
        n_val = int(len(tokens) * val_fraction)
        self.splits = {"train": tokens[:len(tokens) - n_val], "val": tokens[len(tokens) - n_val:]}
        for name, toks in self.splits.items():
            if (name == "train" or n_val) and len(toks) < block_size + 1:
                raise InvalidArgumentError(
                    f"TextDataset: the {name} split has {len(toks)} tokens, fewer than "
                    f"block_size + 1 = {block_size + 1}; use more text or a smaller block_size")

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer | None = None,
                  block_size: int = 64, val_fraction: float = 0.1) -> TextDataset:
        """Read a UTF-8 text file; without a tokenizer, a CharTokenizer of its characters.

        The dataset records ``path`` (absolute, str) and ``sha256`` (hex digest of the file's
        bytes). A missing or unreadable path, a file over :data:`MAX_TEXT_BYTES` or bytes that are
        not UTF-8 raise a DataError naming the file (and the byte offset and line of the first
        bad byte).
        """
        text, digest = read_text(path, "TextDataset.from_file")
        ds = cls(text, tokenizer or CharTokenizer.from_text(text), block_size, val_fraction)
        ds.path, ds.sha256 = str(Path(path).resolve()), digest  # resumable from any cwd
        return ds

    def get_batch(self, batch_size: int, rng: np.random.Generator,
                  split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """x, y int64 (batch_size, block_size): y is x shifted left by one token."""
        tokens = self._split(split)
        starts = rng.integers(0, len(tokens) - self.block_size, size=batch_size)
        window = starts[:, None] + np.arange(self.block_size + 1)  # (B, T + 1)
        seq = tokens[window]
        return seq[:, :-1], seq[:, 1:]

    def _split(self, split: str) -> np.ndarray:
        if split not in self.splits or not len(self.splits[split]):
            raise InvalidArgumentError(f"TextDataset: split must be 'train' or 'val' (with "
                                       f"val_fraction > 0), got {split!r}")
        return self.splits[split]


def read_text(path: str | Path, who: str) -> tuple[str, str]:
    """(text, SHA-256 hex digest of its bytes) of the UTF-8 file at ``path``; a DataError
    naming the file when it is missing, a directory or another kind of non-regular file,
    unreadable, over :data:`MAX_TEXT_BYTES`, or not UTF-8 (with the byte offset and line of the
    first bad byte)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{who}: {str(path)!r} is a directory, not a text file")
    if not path.is_file():
        if path.exists():  # a FIFO would block the read, a device such as /dev/zero never end
            raise DataError(f"{who}: {str(path)!r} is not a regular file (a pipe, device or "
                            f"socket); minilora reads text only from regular files")
        raise DataError(f"{who}: no such file {str(path)!r}")
    try:
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise DataError(f"{who}: {str(path)!r} has {size:,} bytes, more than MAX_TEXT_BYTES "
                            f"= {MAX_TEXT_BYTES:,} (as int64 tokens it would take 8x that)")
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{who}: {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{who}: {str(path)!r} is not UTF-8 text: byte {exc.start} (0x"
                        f"{raw[exc.start]:02x}, line {line}): {exc.reason}; convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from None
    return text, hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------- tasks

def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Decimal digits of non-negative ints, zero-padded, most significant first: (N,) -> (N, w)."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)  # (w,)
    return (values[:, None] // powers) % 10


@dataclass(frozen=True)
class ArithmeticTask:
    """A question about two k-digit numbers: ``<a><separator><b>=<answer>.``.

    ``fn(a, b, k)`` gives the answer's value, written with ``answer_digits`` zero-padded digits,
    reversed when ``reverse`` is set. Prompts are 2k + 2 characters, answers width + 1 (the end).
    """

    name: str
    description: str
    separator: str
    fn: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    extra_width: int  # answer digits = digits + extra_width (one more for a sum's carry)
    reverse: bool = False
    digits: int = 3

    def __post_init__(self) -> None:
        _check_digits(self.digits, f"task {self.name!r}")

    @property
    def answer_digits(self) -> int:
        """Number of digits of every answer."""
        return self.digits + self.extra_width

    @property
    def prompt_len(self) -> int:
        """Characters in every prompt: k digits, the separator, k digits and '='."""
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        """Characters in every answer, the end mark included."""
        return self.answer_digits + 1

    @property
    def seq_len(self) -> int:
        """Characters in a whole example; a model needs block_size >= seq_len - 1."""
        return self.prompt_len + self.answer_len

    @property
    def num_pairs(self) -> int:
        """Number of distinct questions: (10^k)^2."""
        return 10 ** (2 * self.digits)

    def with_digits(self, digits: int) -> ArithmeticTask:
        """The same task on ``digits``-digit operands, MIN_DIGITS to MAX_DIGITS."""
        _check_digits(digits, f"task {self.name!r}")
        return replace(self, digits=int(digits))

    def operands(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pair ids in [0, 10^2k) -> the operands (a, b): id = a * 10^k + b."""
        ids = np.asarray(ids, dtype=np.int64)
        return ids // 10 ** self.digits, ids % 10 ** self.digits

    def encode(self, ids: np.ndarray, tokenizer: CharTokenizer | None = None) -> np.ndarray:
        """Pair ids (N,) -> token ids of the whole examples, (N, seq_len)."""
        tok = tokenizer or task_tokenizer()
        ids = np.asarray(ids)
        pairs = 10 ** (2 * self.digits)
        if ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= pairs)):
            raise InvalidArgumentError(f"task {self.name!r}: pair ids must be integers in [0, "
                                       f"{pairs}) for {self.digits} digits, got {ids.dtype} "
                                       f"from {ids.min() if ids.size else None} to "
                                       f"{ids.max() if ids.size else None}")
        a, b = self.operands(ids)
        answer = _digits(self.fn(a, b, self.digits).astype(np.int64), self.answer_digits)  # (N, w)
        if self.reverse:
            answer = answer[:, ::-1]
        digit_ids = tok.encode("0123456789")
        sep, eq, end = (np.full((len(a), 1), t) for t in tok.encode(self.separator + "=" + END))
        parts = [digit_ids[_digits(a, self.digits)], sep, digit_ids[_digits(b, self.digits)], eq,
                 digit_ids[answer], end]
        return np.concatenate(parts, axis=1)  # (N, prompt_len + answer_len)

    def example(self, a: int, b: int) -> tuple[str, str]:
        """The (prompt, answer) strings of one question, e.g. ('123+456=', '0579.')."""
        for name, v in (("a", a), ("b", b)):
            if not is_int(v) or not 0 <= v < 10 ** self.digits:  # 1.5 is not an operand
                raise InvalidArgumentError(f"task {self.name!r}: operand {name}={v} must lie in "
                                           f"[0, {10 ** self.digits}) for {self.digits} digits")
        text = task_tokenizer().decode(self.encode(np.array([int(a) * 10 ** self.digits + int(b)])))
        return text[:self.prompt_len], text[self.prompt_len:]

    def to_dict(self) -> dict:
        """The JSON form saved with a model: ``{"name", "digits"}``."""
        return {"name": self.name, "digits": self.digits}


def _check_digits(digits: Any, who: str) -> None:
    if not is_int(digits) or not MIN_DIGITS <= digits <= MAX_DIGITS:
        raise ConfigError(f"{who}: digits must be an int from {MIN_DIGITS} to {MAX_DIGITS} "
                          f"(operands of that many digits), got {digits!r}")


def _sum(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    return a + b


def _carryless_sum(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Digit-wise (a_i + b_i) mod 10: addition that forgets every carry (123+459 -> 572)."""
    powers = 10 ** np.arange(k - 1, -1, -1, dtype=np.int64)  # (k,)
    return ((_digits(a, k) + _digits(b, k)) % 10) @ powers


def _digitwise_max(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """In each place the larger of the two digits (123+459 -> 459, 183+459 -> 489)."""
    powers = 10 ** np.arange(k - 1, -1, -1, dtype=np.int64)  # (k,)
    return np.maximum(_digits(a, k), _digits(b, k)) @ powers


def _max(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    return np.maximum(a, b)


TASKS: dict[str, ArithmeticTask] = {
    "add": ArithmeticTask("add", "task A, the base task: a + b, the sum with k + 1 digits",
                          "+", _sum, extra_width=1),
    "nocarry": ArithmeticTask("nocarry", "task B: a + b digit by digit, forgetting every carry",
                              "+", _carryless_sum, extra_width=1),
    "digitmax": ArithmeticTask("digitmax", "task C: in each place the larger of the two digits",
                               "+", _digitwise_max, extra_width=1),
    "rev": ArithmeticTask("rev", "a + b with the sum's digits written in reverse",
                          "+", _sum, extra_width=1, reverse=True),
    "max": ArithmeticTask("max", "the larger of a and b, written a,b=",
                          ",", _max, extra_width=0),
}
DEFAULT_DIGITS = 3


def get_task(name: str, digits: int | None = None) -> ArithmeticTask:
    """The task registered as ``name`` (see :data:`TASKS`) on ``digits``-digit operands
    (default :data:`DEFAULT_DIGITS`; MIN_DIGITS to MAX_DIGITS, else a ConfigError)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name].with_digits(DEFAULT_DIGITS if digits is None else digits)


class TaskDataset:
    """A task split into training and held-out questions, with batches for the training loop.

    ``n_heldout`` pair ids are drawn without replacement by ``split_seed`` (the same for every
    task, so tasks hold out the same pairs); training batches draw uniformly from the rest.
    A batch is x = seq[:, :-1], y = seq[:, 1:] with y = -100 over the prompt, so only the answer
    is learned: (B, seq_len - 1) each.
    """

    def __init__(self, task: ArithmeticTask, n_heldout: int = 1000, split_seed: int = 1234,
                 tokenizer: CharTokenizer | None = None) -> None:
        # both bounds before the draw below, which allocates n_heldout ids (or, for a large
        # share of the pairs, a permutation of them all)
        if not is_int(n_heldout) or not 0 < n_heldout < task.num_pairs:
            raise InvalidArgumentError(f"TaskDataset: n_heldout must be an int in "
                                       f"(0, {task.num_pairs}) for {task.digits}-digit task "
                                       f"{task.name!r}, got {n_heldout!r}")
        if n_heldout > MAX_HELDOUT:
            raise InvalidArgumentError(f"TaskDataset: n_heldout={n_heldout:,} is more than "
                                       f"MAX_HELDOUT = {MAX_HELDOUT:,}")
        self.task = task
        self.tokenizer = tokenizer or task_tokenizer()
        self.n_heldout, self.split_seed = int(n_heldout), int(split_seed)
        held = np.random.default_rng(split_seed).choice(task.num_pairs, size=n_heldout,
                                                        replace=False)
        self.heldout_ids = held.astype(np.int64)
        self._sorted_heldout = np.sort(self.heldout_ids)
        # train pair number j is the j-th id not held out: j plus the held-out ids at or below it
        self._gaps = self._sorted_heldout - np.arange(n_heldout)

    @property
    def block_size(self) -> int:
        """Positions a model needs: seq_len - 1."""
        return self.task.seq_len - 1

    @property
    def num_train(self) -> int:
        """Number of distinct training questions."""
        return self.task.num_pairs - self.n_heldout

    def train_ids(self, j: np.ndarray) -> np.ndarray:
        """Training pair number j in [0, num_train) -> its pair id (increasing, no held-out id)."""
        j = np.asarray(j, dtype=np.int64)
        return j + np.searchsorted(self._gaps, j, side="right")

    def get_batch(self, batch_size: int, rng: np.random.Generator,
                  split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """x, y int64 (batch_size, seq_len - 1); random training (or held-out) questions."""
        if split == "train":
            ids = self.train_ids(rng.integers(0, self.num_train, size=batch_size))
        elif split == "val":
            ids = self.heldout_ids[rng.integers(0, self.n_heldout, size=batch_size)]
        else:
            raise InvalidArgumentError(f"TaskDataset: split must be 'train' or 'val', got "
                                       f"{split!r}")
        return self.inputs_targets(ids)

    def inputs_targets(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pair ids (N,) -> x, y (N, seq_len - 1) with the prompt's targets set to -100."""
        seq = self.task.encode(ids, self.tokenizer)
        x, y = seq[:, :-1], seq[:, 1:].copy()
        y[:, :self.task.prompt_len - 1] = IGNORE_INDEX
        return x, y

    def heldout(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` held-out questions (all by default) as prompts (n, prompt_len) and
        answers (n, answer_len), token ids."""
        if n is not None:
            check_int(n, "TaskDataset.heldout: n", minimum=0)  # -1 was every question but one
        ids = self.heldout_ids[:n]
        seq = self.task.encode(ids, self.tokenizer)
        return seq[:, :self.task.prompt_len], seq[:, self.task.prompt_len:]


__all__ = ["IGNORE_INDEX", "END", "TASK_VOCAB", "BYTE_EOT", "MAX_TEXT_BYTES", "MIN_DIGITS",
           "MAX_DIGITS", "MAX_HELDOUT", "CharTokenizer", "ByteTokenizer", "Tokenizer",
           "TokenizerLike", "tokenizer_from_dict", "task_tokenizer", "TextDataset", "read_text",
           "ArithmeticTask", "TASKS", "DEFAULT_DIGITS", "get_task", "TaskDataset"]
