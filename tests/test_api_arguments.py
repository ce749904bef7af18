"""Arguments of the public Python API that used to give a silent wrong result: each is now a
minilora error naming the argument and the value."""

import numpy as np
import pytest

import minilora as ml
from minilora import backend as B
from minilora import checkpoint, lora, nn, quant
from minilora import functional as F
from minilora.errors import DTypeError, InvalidArgumentError, ShapeError, StateDictError


@pytest.mark.host_only("refused before any array work")
@pytest.mark.parametrize("other", [None, "a", b"a", {"x": 1}])
def test_a_tensor_combined_with_a_non_number_is_a_type_error(other):
    """``Tensor + None`` was NaN (asarray(None, float32)); a string made a string array."""
    t = ml.Tensor(np.ones(3, np.float32))
    for op in (lambda: t + other, lambda: t * other, lambda: other - t):
        with pytest.raises(DTypeError, match=f"combine a tensor with {type(other).__name__}"):
            op()


def test_mse_loss_refuses_a_target_that_would_broadcast_the_input():
    x = ml.Tensor(np.arange(4.0).reshape(4, 1))
    with pytest.raises(ShapeError, match=r"target \(4,\) must broadcast .*make \(4, 4\)"):
        F.mse_loss(x, np.arange(4.0))  # was 2.5, where every elementwise loss is 0
    assert F.mse_loss(x, np.arange(4.0).reshape(4, 1)).item() == 0.0
    assert F.mse_loss(ml.Tensor(np.ones((3, 4))), np.zeros(4)).item() == 1.0  # (4,) into (3, 4)


@pytest.mark.host_only("refused before any array work")
@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(2, 2), "relu"),
                                  lambda: nn.ModuleList([1, 2]),
                                  lambda: nn.ModuleList().append(3)])
def test_containers_refuse_entries_that_are_not_modules(make):
    """They were dropped silently: len(Sequential(Linear, "relu")) was 1."""
    with pytest.raises(DTypeError, match="entries must be Modules"):
        make()
    seq = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(DTypeError, match="got int 5"):
        seq[0] = 5
    assert isinstance(seq[0], nn.Linear)


@pytest.mark.host_only("refused before any array work")
@pytest.mark.parametrize("make, message", [
    (lambda: nn.Linear(3, 3, bias="no"), "Linear: bias must be True or False, got 'no'"),
    (lambda: nn.LayerNorm(4, bias="no"), "LayerNorm: bias must be True or False"),
    (lambda: nn.LayerNorm(4, eps=-1), "eps must be a finite number > 0, got -1"),
    (lambda: nn.LayerNorm(4, eps=0.0), "eps must be a finite number > 0, got 0.0"),
    (lambda: nn.LayerNorm(4, eps=float("nan")), "eps must be a finite number > 0, got nan"),
    (lambda: nn.LayerNorm(0), "normalized_shape must be an int >= 1"),
    (lambda: quant.quantize(np.ones(64, np.float32), double_quant="no"),
     "double_quant must be True or False, got 'no'"),
    (lambda: ml.Tensor(np.ones(2), requires_grad="no"),
     "Tensor: requires_grad must be True or False, got 'no'"),
    (lambda: ml.Tensor(np.ones(2)).requires_grad_("no"), "requires_grad_: flag must be True"),
    (lambda: lora.lora_scaling(4, 16, use_rslora="no"), "use_rslora must be True or False"),
    (lambda: lora.lora_scaling(2, -16), "alpha must be a positive number.*got -16"),
    (lambda: lora.lora_scaling(2, float("nan")), "alpha must be a positive number.*got nan"),
    (lambda: F.cross_entropy(ml.Tensor(np.zeros((2, 3))), np.array([0, 1]), ignore_index="x"),
     "cross_entropy: ignore_index must be an int, got 'x'"),
    (lambda: ml.Tensor(np.ones((4, 2))).split(True), "split_size must be a positive int or a "
                                                     "list of ints, got True"),
    (lambda: ml.Tensor(np.ones((4, 2))).split(2.0), "got 2.0"),
    (lambda: ml.Tensor(np.ones((4, 2))).split([1, "a"]), r"got \[1, 'a'\]"),
    (lambda: ml.Tensor(np.ones((4, 2))).split(2, axis=3), "split: axis 3 is not an axis"),
    (lambda: quant.normal_float_code(0.5), "offset must be a probability between 0.5 and 1"),
])
def test_switches_and_settings_are_checked(make, message):
    """A string is truthy ("no" made a bias, double-quantized), and eps <= 0 made a LayerNorm
    of a constant row NaN."""
    with pytest.raises((DTypeError, InvalidArgumentError, ShapeError), match=message):
        make()


def test_generate_refuses_a_token_count_that_would_run_for_ever():
    from minilora.gpt import MAX_NEW_TOKENS

    model = ml.GPT(ml.GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(InvalidArgumentError, match="max_new_tokens=1000000000000 is more than "
                                                   "MAX_NEW_TOKENS"):
        model.generate(np.array([[1]]), 10**12)
    assert MAX_NEW_TOKENS == 10**6 and model.generate(np.array([[1]]), 2).shape == (1, 3)


@pytest.mark.host_only("configs only")
def test_lora_config_takes_numpy_scalars_as_the_numbers_they_hold():
    """dropout=np.float32(0.1) was refused as outside [0, 1), alpha=np.int64(16) as not positive,
    while r=np.int32(4) was taken."""
    from minilora import lora

    config = lora.LoraConfig(r=np.int32(4), alpha=np.int64(16), dropout=np.float32(0.1))
    assert (config.r, config.alpha) == (4, 16) and type(config.alpha) is int
    assert abs(config.dropout - 0.1) < 1e-7
    assert '"lora_alpha": 16' in __import__("json").dumps(config.to_peft_dict())


def test_lora_layers_check_their_rank_before_allocating():
    from minilora import lora
    from minilora.errors import ConfigError
    from minilora.lora.layer import LoRALinear

    layer = LoRALinear(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="r=1000000000 is more than MAX_RANK"):
        layer.update_layer("a", r=10**9, alpha=16)  # was a 29.8 GiB MemoryError
    with pytest.raises(ConfigError, match="alpha must be a positive number, got nan"):
        layer.update_layer("a", r=2, alpha=float("nan"))
    with pytest.raises(ConfigError, match="r must be a positive integer, got 0"):
        lora.lora_scaling(0, 16)  # was ZeroDivisionError
    layer.update_layer("a", r=2, alpha=4)
    assert layer.lora_A["a"].weight.shape == (2, 4)


def test_quantize_model_says_when_it_would_change_nothing():
    """On a quantized model, quant_type='fp4' left every layer nf4 without a word; skip=None
    was a bare TypeError."""
    model = ml.GPT(ml.GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=64))
    quant.quantize_model(model)
    with pytest.raises(InvalidArgumentError, match=r"5 more are quantized already as nf4, "
                                                   r"blocksize 64.*asked for fp4"):
        quant.quantize_model(model, quant_type="fp4")
    quant.quantize_model(model)  # the same settings again: nothing to do, nothing refused
    with pytest.raises(InvalidArgumentError, match="skip must be a layer name or a list"):
        quant.quantize_model(ml.GPT(model.config), skip=None)


def test_a_second_method_on_one_model_names_the_first():
    """inject_ia3 twice said its targets "matched no linear-like module" (the first had wrapped
    them), inject_bottleneck twice that the GPT had no blocks; BitFit already named the first."""
    from minilora import family, lora
    from minilora.errors import ConfigError

    cfg = ml.GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8)
    for inject in (family.inject_ia3, family.inject_bottleneck):
        model = inject(ml.GPT(cfg))
        for again in (family.inject_ia3, family.inject_bottleneck):
            with pytest.raises(ConfigError, match="the model already carries"):
                again(model)
        with pytest.raises(ConfigError, match="carries .*Config, a method of the PEFT family"):
            lora.inject_lora(model)


def test_load_state_dict_takes_tensors_and_refuses_complex_values():
    """A complex weight lost its imaginary part silently; Tensor values (as PyTorch users pass
    them) were a bare 'setting an array element with a sequence'."""
    from minilora.errors import StateDictError

    layer = nn.Linear(2, 2)
    state = {k: ml.Tensor(np.full(v.shape, 0.5, np.float32)) for k, v in
             layer.state_dict().items()}
    layer.load_state_dict(state)
    assert np.all(ml.backend.to_numpy(layer.weight.data) == 0.5)
    bad = {**layer.state_dict(), "weight": np.ones((2, 2), np.complex64)}
    with pytest.raises(StateDictError, match="'weight' holds complex64 values"):
        layer.load_state_dict(bad)
    assert np.all(ml.backend.to_numpy(layer.weight.data) == 0.5)  # nothing changed


@pytest.mark.host_only("the tasks' host-side data")
def test_task_helpers_refuse_operands_they_would_wrap_or_truncate():
    """encode([10^6, -1]) wrote "00+00" and "99+99" for 2 digits, example(1.5, 5) asked 1+5,
    heldout(-1) gave every question but one."""
    from minilora.data import TaskDataset, get_task

    task = get_task("add", 2)
    with pytest.raises(InvalidArgumentError, match=r"pair ids must be integers in \[0, 10000\)"):
        task.encode(np.array([10**6, -1]))
    with pytest.raises(InvalidArgumentError, match="pair ids must be integers"):
        task.encode(np.array([1.5]))
    with pytest.raises(InvalidArgumentError, match="operand a=1.5"):
        task.example(1.5, 5)
    assert task.example(12, 5) == ("12+05=", "017.")
    data = TaskDataset(task, n_heldout=10)
    with pytest.raises(InvalidArgumentError, match="heldout: n must be an int >= 0, got -1"):
        data.heldout(-1)
    assert data.heldout(3)[0].shape[0] == 3


@pytest.mark.parametrize("op, message", [
    (lambda x: x.sum(axis=2), r"sum: axis 2 is not an axis .* \(2, 3\) \(ints from -2 to 1\)"),
    (lambda x: x.sum(axis=(0, -2)), r"sum: axis \(0, -2\) is not an axis or a tuple of distinct"),
    (lambda x: x.mean(axis=1.0), r"mean: axis 1.0 is not"),
    (lambda x: x.max(axis=-3), r"max: axis -3 is not"),
    (lambda x: x.var(axis=True), r"var: axis True is not"),
    (lambda x: x.argmax(axis=(0, 1)), r"argmax: axis \(0, 1\) is not an axis of"),
    (lambda x: x.transpose(0, 5), r"transpose: dim1: axis 5 is not an axis"),
    (lambda x: F.softmax(x, axis=2), r"softmax: axis 2 is not an axis"),
    (lambda x: F.log_softmax(x, axis=-3), r"log_softmax: axis -3 is not an axis"),
])
def test_an_axis_out_of_range_is_a_shape_error_naming_the_op(op, message):
    """NumPy's AxisError named an array inside the op (or, for mean, an IndexError had no words)."""
    x = ml.Tensor(np.arange(6.0).reshape(2, 3))
    with pytest.raises(ShapeError, match=message):
        op(x)
    assert x.sum(axis=(0, -1)).item() == 15.0 and F.softmax(x, axis=-2).shape == (2, 3)


@pytest.mark.host_only("refused before any array work")
@pytest.mark.parametrize("make, error, message", [
    (lambda: nn.Dropout("0.1"), InvalidArgumentError, r"p must be a number in \[0, 1\], got '0.1'"),
    (lambda: nn.Dropout(float("nan")), InvalidArgumentError, "got nan"),
    (lambda: ml.set_default_dtype("float77"), InvalidArgumentError,
     "set_default_dtype: dtype must be float32 or float64, got 'float77'"),
    (lambda: nn.Linear(2, 2).astype("float77"), DTypeError, "Linear.astype: dtype must be a float"),
    (lambda: nn.Linear(2, 2).astype(np.int64), DTypeError, "Linear.astype: dtype must be a float"),
    (lambda: ml.data.TextDataset("abcdefgh", "utf-8", 4), InvalidArgumentError,
     "tokenizer must have encode and decode .* got str"),
    (lambda: ml.data.TextDataset(b"abcdefgh", ml.data.ByteTokenizer(), 4), InvalidArgumentError,
     "text must be a str, got bytes"),
    (lambda: ml.data.TextDataset("abcdefgh", ml.data.ByteTokenizer(), 4, "0.1"),
     InvalidArgumentError, "val_fraction must be a number in \\[0, 1\\), got '0.1'"),
    (lambda: ml.optim.clip_grad_norm([], "1"), InvalidArgumentError,
     "max_norm must be a number >= 0, got '1'"),
    (lambda: checkpoint.load_checkpoint(None), InvalidArgumentError,
     "load_checkpoint: the directory must be a path .* got NoneType"),
    (lambda: checkpoint.save_checkpoint(None, nn.Linear(2, 2)), InvalidArgumentError,
     "save_checkpoint: directory must be a path"),
    (lambda: checkpoint.save_checkpoint("unused", None), InvalidArgumentError,
     "save_checkpoint: model must be a minilora Module, got NoneType"),
    (lambda: ml.lora.read_adapter(None), InvalidArgumentError, "must be a path"),
])
def test_less_used_helpers_name_the_argument(make, error, message):
    """Each was a bare TypeError, LookupError or AttributeError from deep inside (or, for
    clip_grad_norm's "1", no error at all)."""
    with pytest.raises(error, match=message):
        make()


@pytest.mark.host_only("refused before any array work")
@pytest.mark.parametrize("call, who", [
    (lambda m: lora.inject_lora(m), "inject_lora"),
    (lambda m: lora.save_adapter(m, "unused"), "save_adapter"),
    (lambda m: lora.set_adapter(m, "default"), "set_adapter"),
    (lambda m: lora.merge(m), "merge"),
    (lambda m: lora.unmerge(m), "unmerge"),
    (lambda m: lora.merge_and_unload(m), "merge_and_unload"),
    (lambda m: lora.delete_adapter(m, "default"), "delete_adapter"),
    (lambda m: lora.add_weighted_adapter(m, ["default"], [1.0], "c"), "add_weighted_adapter"),
    (lambda m: lora.lora_layers(m), "lora_layers"),
    (lambda m: lora.lora_configs(m), "lora_configs"),
    (lambda m: lora.count_parameters(m), "count_parameters"),
    (lambda m: lora.print_trainable_parameters(m), "count_parameters"),
    (lambda m: quant.memory_report(m), "memory_report"),
])
@pytest.mark.parametrize("model", [None, "gpt"])
def test_a_model_that_is_no_module_is_refused_by_name(call, who, model):
    """None or a name failed as AttributeError: 'NoneType' object has no attribute '__dict__'."""
    with pytest.raises(DTypeError, match=f"{who}: model must be a minilora nn.Module, got "
                                         f"{type(model).__name__}"):
        call(model)


@pytest.mark.host_only("refused before any array work")
def test_functional_layers_refuse_arrays_and_tables_of_the_wrong_rank():
    """An array weight failed on memoryview.T; a 1-D weight raised IndexError in linear and
    made embedding return a scalar."""
    from minilora import interop

    x = ml.Tensor(np.ones((2, 4)))
    with pytest.raises(DTypeError, match="linear: weight must be a Tensor, got ndarray"):
        F.linear(x, np.ones((3, 4)))
    with pytest.raises(DTypeError, match="linear: bias must be a Tensor"):
        F.linear(x, ml.Tensor(np.ones((3, 4))), np.ones(3))
    with pytest.raises(ShapeError, match="weight must be \\(out, in\\)"):
        F.linear(x, ml.Tensor(np.ones(4)))
    with pytest.raises(ShapeError, match="embedding: weight must be a table \\(V, C\\), got "
                                         "shape \\(4,\\)"):
        F.embedding(np.array([[1, 2]]), ml.Tensor(np.ones(4)))
    with pytest.raises(InvalidArgumentError, match="dropout: p must lie in \\[0, 1\\], got '0.5'"):
        F.dropout(x, "0.5")
    with pytest.raises(DTypeError, match="hf_config: config must be a GPTConfig"):
        interop.hf_config(None)
    with pytest.raises(DTypeError, match="hf_state_dict: model must be a minilora GPT"):
        interop.hf_state_dict(None)


def test_tensors_and_their_shapes_are_refused_by_name():
    """NumPy's own errors (inhomogeneous shape, data type not understood, 'float' object cannot
    be interpreted as an integer) named no argument; a float axis reached NumPy as well."""
    with pytest.raises(ShapeError, match=r"Tensor: data must be rectangular"):
        ml.Tensor([[1, 2], [3]])
    with pytest.raises(DTypeError, match=r"Tensor: dtype 'foo' is not a NumPy dtype"):
        ml.Tensor([1.0], dtype="foo")
    x = ml.Tensor(np.ones((2, 3)))
    with pytest.raises(InvalidArgumentError, match=r"reshape: the shape must be ints.*\(3.0, 2\)"):
        x.reshape(3.0, 2)
    assert x.reshape(np.int64(3), -1).shape == (3, 2)
    with pytest.raises(ShapeError, match="concatenate: axis 1.0 is not an axis"):
        ml.cat([x, x], axis=1.0)
    with pytest.raises(ShapeError, match=r"stack: axis 3 is not a place for a new axis beside "
                                         r"the axes of shape \(2, 3\) \(ints from -3 to 2\)"):
        ml.stack([x, x], axis=3)
    assert ml.stack([x, x], axis=-1).shape == (2, 3, 2) == ml.stack([x, x], axis=2).shape


def test_weighted_adapters_take_numbers_and_lists_and_a_layer_names_its_adapters():
    ml.manual_seed(0)
    model = ml.GPT(ml.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    lora.inject_lora(model, lora.LoraConfig(r=2))
    for weights in (1.0, [True], [float("nan")], [1.0, 2.0]):
        with pytest.raises(InvalidArgumentError, match="weights must be one finite number per "
                                                       "adapter"):
            lora.add_weighted_adapter(model, ["default"], weights, "c")
    with pytest.raises(InvalidArgumentError, match="adapters must be a non-empty list of "
                                                   "existing adapters.*got 'default'"):
        lora.add_weighted_adapter(model, "default", [1.0], "c")
    lora.add_weighted_adapter(model, ["default"], [np.float32(0.5)], "half")  # NumPy's floats
    assert "half" in lora.lora_configs(model)
    with pytest.raises(InvalidArgumentError, match="delta_weight: this layer has no adapter "
                                                   "'zz'; it has \\['default', 'half'\\]"):
        model.h[0].attn.q_proj.delta_weight("zz")


@pytest.mark.host_only("refused before any array work")
@pytest.mark.parametrize("call, error, message", [
    (lambda: quant.unpack_nibbles(np.zeros(2, np.uint8), 1.0), ShapeError, "asked for n=1.0"),
    (lambda: quant.quant_linear_from_bnb_state(None), StateDictError, "state must be a dict"),
    (lambda: ml.interop.is_peft_gpt2(None), DTypeError, "is_peft_gpt2: expected a dict"),
    (lambda: ml.interop.gpt_from_hf(None), InvalidArgumentError, "gpt_from_hf: source"),
    (lambda: ml.optim.AdamW([ml.Tensor(np.ones(2), requires_grad=True)], betas="ab"),
     InvalidArgumentError, "betas must be two numbers in \\[0, 1\\), got 'ab'"),
    (lambda: len(ml.Tensor(np.array(1.0))), DTypeError, "len\\(\\) of a 0-d tensor"),
])
def test_the_rest_of_the_sweep_is_refused_by_name(call, error, message):
    """Each was a bare TypeError, AttributeError or IndexError from deep inside."""
    with pytest.raises(error, match=message):
        call()


@pytest.mark.host_only("refused before any array work, or host arrays")
def test_the_reviews_edges_of_the_new_checks():
    """From a review of the checks above: a 0-d input to linear was an IndexError in the message
    itself; every conversion failure was called ragged data; arrays that worked as sizes,
    shapes, weights and betas were refused."""
    with pytest.raises(ShapeError, match="linear: .*must have a feature axis"):
        F.linear(ml.Tensor(np.array(1.0)), ml.Tensor(np.ones((3, 4))))
    with pytest.raises(DTypeError, match="cannot be made an array of dtype float32"):
        ml.Tensor(["a"], dtype="float32")
    x = ml.Tensor(np.ones((5, 2)))
    assert [p.shape[0] for p in x.split(np.array([2, 3]))] == [2, 3]
    assert x.reshape(np.array([2, 5])).shape == (2, 5)
    opt = ml.optim.AdamW([ml.Tensor(np.ones(2), requires_grad=True)], betas=np.array([0.9, 0.99]))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    ml.manual_seed(0)
    model = ml.GPT(ml.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    lora.inject_lora(model, lora.LoraConfig(r=2))
    lora.add_weighted_adapter(model, ["default"], np.array([0.5]), "half")
    d = lora.LoraConfig().to_peft_dict()
    with pytest.raises(ml.errors.ConfigError, match="layers_to_transform=0 is not supported"):
        lora.LoraConfig.from_peft_dict({**d, "layers_to_transform": 0})  # PEFT: layer 0 only


def test_a_refused_step_is_not_counted():
    p = ml.Tensor(B.asarray(np.ones((2, 3))), requires_grad=True)
    for opt in (ml.optim.AdamW([p], lr=0.1), ml.optim.SGD([p], lr=0.1)):
        p.grad = B.asarray(np.ones((3, 2)))
        with pytest.raises(ShapeError):
            opt.step()
        assert opt.step_count == 0 and opt.state_dict()["step"] == 0
        p.grad = B.asarray(np.ones((2, 3)))
        opt.step()
        assert opt.step_count == 1 and opt.param_steps == [1]
