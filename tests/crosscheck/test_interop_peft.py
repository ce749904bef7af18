"""import_peft / export_peft against PEFT on transformers' GPT-2: an adapter made in PEFT gives
the same logits in minilora, one trained in minilora the same logits in PEFT, and merging in
either gives the same weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import minilora as ml  # noqa: E402
from minilora import interop, lora  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = [pytest.mark.crosscheck,  # transformers warns of its own deprecations
              pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*")]

V, T = 13, 8


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_gpt2(seed=0, n_layer=2):
    config = transformers.GPT2Config(n_layer=n_layer, n_head=2, n_embd=16, vocab_size=V,
                                     n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def their_logits(model, idx):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


def our_logits(model, idx):
    with ml.no_grad():
        return host(model(idx))


def merged_weights_agree(ours, theirs_merged):
    """merge_and_unload on minilora's side; its HF-layout weights against PEFT's merged model."""
    lora.merge_and_unload(ours)
    assert not lora.lora_layers(ours)
    theirs = {k: v.detach().numpy() for k, v in theirs_merged.state_dict().items()}
    for key, value in interop.hf_state_dict(ours).items():
        np.testing.assert_allclose(value, theirs[key], rtol=1e-10, atol=1e-12, err_msg=key)


IDX = np.random.default_rng(0).integers(0, V, (3, T))
PEFT_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    dict(r=3, lora_alpha=5, target_modules=["c_attn", "attn.c_proj"], use_rslora=True,
         rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_proj": 7}),
    dict(r=2, lora_alpha=16, target_modules=["c_fc", "mlp.c_proj"], layers_to_transform=[1],
         lora_dropout=0.1),
]


@pytest.mark.parametrize("kwargs", PEFT_CONFIGS)
def test_a_peft_adapter_imported_into_minilora(tmp_path, kwargs):
    base = hf_gpt2(seed=1)
    base.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False,
                                                       fan_in_fan_out=True, **kwargs))
    theirs = theirs.double().eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = interop.gpt_from_hf(tmp_path / "base", dtype=np.float64)
    before = our_logits(ours, IDX)
    interop.import_peft(ours, tmp_path / "adapter")
    ours.eval()
    expected = their_logits(theirs, IDX)
    assert np.abs(expected - before).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(our_logits(ours, IDX), expected, rtol=1e-10, atol=1e-12)
    merged_weights_agree(ours, theirs.merge_and_unload())


def train_a_few_steps(model, steps=3):
    opt = ml.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    rng = np.random.default_rng(4)
    for _ in range(steps):
        idx = rng.integers(0, V, (4, T))
        _, loss = model(idx, np.roll(idx, -1, axis=1))
        model.zero_grad()
        loss.backward()
        opt.step()


OUR_CONFIGS = [
    lora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
    lora.LoraConfig(r=2, alpha=6, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "fc",
                                                  "proj"), use_rslora=True,
                    rank_pattern={"k_proj": 3, "h.0.mlp.fc": 1}, alpha_pattern={"v_proj": 2.5}),
    lora.LoraConfig(r=3, alpha=3, target_modules=("h.1.attn.k_proj", "proj")),
]


@pytest.mark.parametrize("config", OUR_CONFIGS, ids=range(len(OUR_CONFIGS)))
def test_a_minilora_adapter_exported_loads_in_peft(tmp_path, config):
    ml.manual_seed(2)
    ours = ml.GPT(ml.GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2,
                               n_embd=16)).double()
    interop.gpt_to_hf(ours, tmp_path / "base")
    lora.inject_lora(ours, config)
    train_a_few_steps(ours)  # B moves off zero
    ours.eval()
    interop.export_peft(ours, tmp_path / "adapter")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
    theirs = peft.PeftModel.from_pretrained(base.eval(), tmp_path / "adapter").eval()
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    expected = our_logits(ours, IDX)
    np.testing.assert_allclose(their_logits(theirs, IDX), expected, rtol=1e-10, atol=1e-12)
    with ml.no_grad(), lora.disable_adapters(ours):
        assert np.abs(host(ours(IDX)) - expected).max() > 1e-4  # training changed something
    merged_weights_agree(ours, theirs.merge_and_unload())
