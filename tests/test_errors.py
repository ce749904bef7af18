"""minilora.errors: one base class, each error also the built-in a Python user would catch, and
messages that name the op and the values involved."""

import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import errors
from minilora.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    DataError,
    DestinationError,
    DiskFullError,
    DTypeError,
    GraphError,
    InvalidArgumentError,
    MiniLoraError,
    ShapeError,
    StateDictError,
    TrainingDivergedError,
    TrainingInterrupted,
    shape_error,
)

EXPECTED_BUILTIN = {
    ShapeError: ValueError,
    DTypeError: TypeError,
    InvalidArgumentError: ValueError,
    ConfigError: ValueError,
    BackendError: RuntimeError,
    GraphError: RuntimeError,
    StateDictError: KeyError,
    CheckpointError: ValueError,
    DataError: ValueError,
    DestinationError: ValueError,
    DiskFullError: OSError,
    TrainingDivergedError: FloatingPointError,
}

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


def test_every_error_class_in_the_module_is_listed_here():
    """A new error class must be added to EXPECTED_BUILTIN (and so get its hierarchy checked)."""
    defined = {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, Exception) and not issubclass(obj, Warning)
               and obj.__module__ == errors.__name__}
    assert defined - {MiniLoraError, TrainingInterrupted} == set(EXPECTED_BUILTIN)


def test_the_note_of_nan_weights_is_a_warning_not_an_error():
    """Loading NaN weights is said, not refused (one may want to look at them): a UserWarning
    that ``except MiniLoraError`` does not catch and a warnings filter can pick by its class."""
    assert issubclass(errors.NonFiniteWarning, UserWarning)
    assert not issubclass(errors.NonFiniteWarning, MiniLoraError)


def test_an_interrupted_run_is_a_keyboard_interrupt_not_an_error():
    """Ctrl-C must stay a KeyboardInterrupt (``except Exception`` does not swallow it) while it
    carries where the completed steps were saved."""
    stop = TrainingInterrupted(7, "runs/x", {"step": [1]})
    assert isinstance(stop, KeyboardInterrupt) and not isinstance(stop, Exception)
    assert (stop.step, stop.checkpoint, stop.history) == (7, "runs/x", {"step": [1]})


@pytest.mark.parametrize("cls", list(EXPECTED_BUILTIN), ids=lambda c: c.__name__)
def test_hierarchy(cls):
    assert issubclass(cls, MiniLoraError)
    assert issubclass(cls, EXPECTED_BUILTIN[cls])
    with pytest.raises(EXPECTED_BUILTIN[cls]):
        raise cls("boom")
    with pytest.raises(MiniLoraError):
        raise cls("boom")


def test_config_error_is_an_invalid_argument():
    assert issubclass(ConfigError, InvalidArgumentError)


@given(op=st.sampled_from(["matmul", "add", "linear", "layer_norm"]), a=shapes, b=shapes)
def test_shape_error_names_op_and_both_shapes(op, a, b):
    err = shape_error(op, a, b)
    assert isinstance(err, ShapeError)
    msg = str(err)
    assert msg.startswith(f"{op}:")
    assert str(a) in msg and str(b) in msg
    assert msg.index(str(a)) < msg.rindex(str(b))  # in the order given


def test_shape_error_detail_and_more_than_two_shapes():
    err = shape_error("where", (2, 3), (3,), (4, 1), detail="cannot broadcast")
    assert str(err) == "where: incompatible shapes (2, 3) and (3,) and (4, 1): cannot broadcast"
    # lists are shown as tuples, so the message reads the same whatever the caller passed
    assert "(5, 6)" in str(shape_error("reshape", [5, 6], (7,)))


def test_state_dict_error_str_has_no_extra_quotes():
    err = StateDictError("load_state_dict: missing keys ['fc.weight']")
    assert str(err) == "load_state_dict: missing keys ['fc.weight']"
    assert str(StateDictError()) == ""
    # a plain KeyError would have wrapped the message in quotes
    assert str(KeyError("x")) == "'x'"


def test_ops_raise_shape_errors_naming_both_shapes():
    a = ml.Tensor(np.zeros((2, 3), np.float32))
    b = ml.Tensor(np.zeros((4, 5), np.float32))
    with pytest.raises(ShapeError, match=r"matmul.*\(2, 3\).*\(4, 5\)"):
        a @ b
    with pytest.raises(ShapeError, match=r"add.*\(2, 3\).*\(4, 5\)"):
        a + b
    with pytest.raises(ValueError):  # still catchable as the built-in
        a * b
