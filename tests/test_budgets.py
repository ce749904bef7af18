"""Budgets of the device path, as counts (not times), under the strict stand-in for CuPy.

On a GPU a device-to-host sync stalls the host until every queued kernel has run, and every
kernel launch costs some microseconds whatever its size. So the device path is held to counts
that ``minilora.strict`` makes exactly:

* a training step (full, LoRA or QLoRA; one shard or two; the loop's forward and backward, the
  index checks, the loss and gradient-norm checks, the clipping and the AdamW update) waits for
  the device at most twice, evaluation and checkpoint steps aside;
* generation waits at most once per generated token;
* a step of the reference configuration (4 layers of 4 heads over 256 channels, block 128,
  vocabulary 64) launches at most 800 kernels. The count does not depend on the batch size (a
  larger batch makes each kernel bigger, not more of them; the test checks that), so it is
  counted at a batch of two rows instead of sixteen.

The counts are strict's, so these tests run only on that backend (``MINILORA_BACKEND=strict``);
elsewhere they are skipped, saying so.
"""

from __future__ import annotations

import numpy as np
import pytest

import minilora as ml
from minilora import backend as B
from minilora import fast
from minilora.data import CharTokenizer, TextDataset
from minilora.errors import InvalidArgumentError
from minilora.fast import checks
from minilora.gpt import GPT, GPTConfig
from minilora.optim import AdamW, norm_array
from minilora.step import forward_backward
from minilora.train import TrainConfig, train

pytestmark = pytest.mark.skipif(
    B.get_backend() != "strict",
    reason="the budgets are counts made by minilora.strict: run with MINILORA_BACKEND=strict")

SYNCS_PER_STEP = 2
LAUNCHES_PER_REFERENCE_STEP = 800
REFERENCE = dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
SMALL = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)


def strict():
    from minilora import strict as s

    return s


def text_data(block_size: int) -> TextDataset:
    chars = "".join(chr(33 + i) for i in range(64))
    text = "".join(np.random.default_rng(0).choice(list(chars), size=4000))
    return TextDataset(text, CharTokenizer(chars), block_size)


def model_of(kind: str, config: dict, dropout: float = 0.0) -> GPT:
    ml.manual_seed(0)
    model = GPT(GPTConfig(**config, dropout=dropout))
    if kind in ("lora", "qlora"):
        if kind == "qlora":
            ml.quant.quantize_model(model, blocksize=16)
        ml.lora.inject_lora(model, ml.lora.LoraConfig(r=2, alpha=4, dropout=dropout))
    return model


def per_step(model: GPT, data: TextDataset, steps: int, **config) -> list:
    """strict's counts of each training step after the first, through the loop (``callback``
    runs after each step: the difference of two snapshots is one whole step)."""
    snaps = []
    # the schedule runs on past `until`: the evaluation at its end is not one of these steps
    cfg = TrainConfig(steps=steps + 1, warmup=1, eval_every=10**6, **config)
    train(model, data, cfg, until=steps, progress=False,
          callback=lambda done, record: snaps.append(strict().counts()))
    return [(b.launches - a.launches, b.syncs - a.syncs, sites(a, b, "syncs"),
             sites(a, b, "launches")) for a, b in zip(snaps, snaps[1:])]


def sites(a, b, kind: str) -> dict:
    """The call sites that counted ``kind`` between snapshots a and b."""
    out = {}
    for site, c in b.by_site.items():
        before = getattr(a.by_site[site], kind) if site in a.by_site else 0
        if getattr(c, kind) > before:
            out[site] = getattr(c, kind) - before
    return out


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("kind,dropout,grad_clip", [
    ("full", 0.0, 1.0), ("full", 0.1, 0.0), ("lora", 0.1, 1.0), ("qlora", 0.0, 1.0)])
def test_a_training_step_waits_for_the_device_at_most_twice(kind, dropout, grad_clip, shards):
    data = text_data(SMALL["block_size"])
    steps = per_step(model_of(kind, SMALL, dropout), data, 4, batch_size=4, shards=shards,
                     grad_clip=grad_clip)
    assert len(steps) == 3
    for launches, syncs, where, _ in steps:
        assert launches > 0  # the step did run on the device
        assert syncs <= SYNCS_PER_STEP, f"{syncs} syncs in a step, at {where}"


def test_device_batches_with_two_shards_wait_at_most_twice_and_a_bad_target_waits_too():
    """Batches already on the device: the shards' target counts come back in one transfer and
    the index checks' flags with the loss and the norm in another. A bad target raises its own
    error then, before any update, and no sync is spent on it before."""
    model = model_of("full", SMALL)
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = text_data(SMALL["block_size"]).get_batch(4, np.random.default_rng(1))
    x, y = B.asarray(x), B.asarray(y)
    with strict().counting() as c:
        with checks.deferred() as pending:
            loss = forward_backward(model, x, y, 2, sync=False)
            loss, norm = pending.settle(loss, norm_array(params))
    assert c.syncs <= SYNCS_PER_STEP and np.isfinite(loss) and norm > 0
    bad = y.copy()
    bad[0, 0] = SMALL["vocab_size"]  # out of range
    with strict().counting() as c:
        with pytest.raises(InvalidArgumentError, match=r"targets must lie in \[0, 64\)"):
            with checks.deferred() as pending:
                forward_backward(model, x, bad, 2, sync=False)
                assert c.syncs == 1  # the shards' counts only: the check waits
                pending.settle()


def test_the_training_loop_raises_a_bad_device_index_before_any_update():
    """The same error as on the host, raised by the loop once the step's flags come back, the
    weights untouched and no gradient left behind."""
    model = model_of("full", SMALL)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [B.to_numpy(p.data).copy() for p in params]
    data = text_data(SMALL["block_size"])
    original = data.get_batch

    def device_batch(batch_size, rng, split="train"):
        x, y = original(batch_size, rng, split)
        x = x.copy()
        x[1, 2] = -1
        return B.asarray(x), B.asarray(y)
    data.get_batch = device_batch
    with pytest.raises(InvalidArgumentError, match=r"token ids must lie in \[0, 64\)"):
        train(model, data, TrainConfig(steps=2, batch_size=4, warmup=1), progress=False)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(B.to_numpy(p.data), b)
        assert p.grad is None


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (0.8, 5)])
def test_generation_waits_at_most_once_per_token(use_cache, temperature, top_k):
    model = model_of("lora", SMALL)
    prompt = text_data(SMALL["block_size"]).get_batch(3, np.random.default_rng(2))[0][:, :5]
    n = 14  # past the block of 16: the cache refills its cropped window too
    with strict().counting() as c:
        out = model.generate(prompt, n, temperature=temperature, top_k=top_k, seed=3,
                             use_cache=use_cache)
    assert out.shape == (3, 5 + n)
    assert c.syncs <= n, sites(strict().Counts(), c, "syncs")


def test_a_reference_step_launches_at_most_800_kernels_whatever_the_batch():
    data = text_data(REFERENCE["block_size"])
    with fast.forms(True):
        counts = {rows: per_step(model_of("full", REFERENCE), data, 3, batch_size=rows,
                                 shards=1) for rows in (2, 3)}
    launches = {rows: [s[0] for s in steps] for rows, steps in counts.items()}
    assert launches[2] == launches[3]  # per kernel, not per row
    assert max(launches[2]) <= LAUNCHES_PER_REFERENCE_STEP, launches[2]


def test_the_loop_runs_one_shard_on_a_device_by_default():
    """TrainConfig's shards left open: one on a device, and the step's counts are the one-shard
    step's (two shards would add a second forward and backward)."""
    data = text_data(SMALL["block_size"])
    auto = per_step(model_of("full", SMALL), data, 3, batch_size=4)
    one = per_step(model_of("full", SMALL), data, 3, batch_size=4, shards=1)
    two = per_step(model_of("full", SMALL), data, 3, batch_size=4, shards=2)
    assert [s[0] for s in auto] == [s[0] for s in one] < [s[0] for s in two]


def test_adamw_is_two_launches_for_the_whole_model_on_the_device():
    """The parameters live in one flat buffer: a gather of the gradients and one kernel. With a
    parameter lacking its gradient the rest are updated one kernel each, on their views."""
    model = model_of("full", SMALL)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = B.xp.ones_like(p.data)
    opt = AdamW(params, lr=1e-3)
    opt.step()  # the flat set is made at the first step
    with fast.forms(True), strict().counting() as c:
        opt.step(grad_scale=0.5)
    assert c.launches == 2 and c.syncs == 0
    params[0].grad = None
    with fast.forms(True), strict().counting() as c:
        opt.step()
    assert c.launches == len(params) - 1 and c.syncs == 0


