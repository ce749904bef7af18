"""A byte-level base trained on one text, adapted with LoRA to a second text written partly in
bytes the base never saw: the adapter lowers the second text's validation loss, the base's own
weights stay exactly as they were, and switching the adapter off gives the base back."""

import numpy as np

import minilora as ml
from minilora.data import ByteTokenizer, TextDataset
from minilora.gpt import GPT, GPTConfig
from minilora.lora import LoraConfig, disable_adapters, inject_lora
from minilora.train import TrainConfig, train, validation_loss
from tests.helpers import host

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj")


def english(n_words, seed=0):
    """Lower-case English words and spaces only: the bytes a-z and 0x20."""
    words = ("the cat sat on a mat and a dog ran to the red barn where an old man fed his hens"
             .split())
    return " ".join(np.random.default_rng(seed).choice(words, n_words))


def price_list(n_items, seed=1):
    """Prices in French: digits, accents (two UTF-8 bytes each), the euro sign (three), '#', ','
    and ';' -- lines like ``crème 4,27 € #318;``."""
    rng = np.random.default_rng(seed)
    items = ["café", "thé", "crème", "pâté", "gâteau"]
    return "".join(f"{rng.choice(items)} {rng.integers(1, 10)},{rng.integers(10, 99)} € "
                   f"#{rng.integers(100, 999)}; " for _ in range(n_items))


def test_lora_adapts_a_byte_level_base_to_a_text_with_new_characters():
    first, second = english(6000), price_list(1500)
    new_bytes = set(second.encode()) - set(first.encode())
    assert set(first.encode()) <= set(b"abcdefghijklmnopqrstuvwxyz ")
    assert {ord(c) for c in "0123456789#,;"} <= new_bytes and 0xC3 in new_bytes  # é, è, â
    assert {0xE2, 0x82, 0xAC} <= new_bytes  # the euro sign's three bytes

    tok, T = ByteTokenizer(), 32
    base_data, new_data = TextDataset(first, tok, T), TextDataset(second, tok, T)
    ml.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=T, n_layer=2, n_head=4,
                          n_embd=64))
    train(model, base_data, TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup=30,
                                         min_lr=3e-4, eval_every=300, seed=0), progress=False)
    base_loss = validation_loss(model, base_data, 32)
    before = validation_loss(model, new_data, 32)
    assert base_loss < 1.2 < before  # the base knows its own text, not the second one

    base_weights = {k: host(v).copy() for k, v in model.state_dict().items()}
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=ALL_LINEAR))
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    train(model, new_data, TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup=20,
                                       min_lr=1e-4, eval_every=300, seed=1), progress=False)
    after = validation_loss(model, new_data, 32)

    # 8.9 -> 3.8 nats per byte here: the adapter learns to use bytes whose embeddings it cannot
    # change (wte is frozen and tied to the head) by moving the hidden states instead
    assert after < 0.6 * before, (before, after)
    state = model.state_dict()
    for key, value in base_weights.items():
        adapted = key.replace(".weight", ".base_layer.weight").replace(".bias",
                                                                        ".base_layer.bias")
        now = state[key] if key in state else state[adapted]
        assert (host(now) == value).all(), f"base weight {key} changed"
    with disable_adapters(model):
        assert validation_loss(model, new_data, 32) == before
        assert validation_loss(model, base_data, 32) == base_loss
