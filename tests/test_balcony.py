"""BalconyModel parity with the HF reference, on the real (truncated) backbone and tiny random models."""
import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, InputError

from conftest import BACKBONE


def _tiny(kind: str):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    config = {"qwen2": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=2),
              "mistral": lambda: MistralConfig(**common, sliding_window=6)}[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def smollm(assets):
    return load_backbone(ModelConfig(backbone=str(BACKBONE), num_layers=4))


def _models(smollm):
    return [("smollm2", smollm), ("qwen2", _tiny("qwen2")), ("mistral", _tiny("mistral"))]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_full_depth_equals_hf_and_exits_equal_hand_assembly(smollm, index):
    name, lm = _models(smollm)[index]
    model = BalconyModel(lm, [1, 3])
    ids = torch.randint(0, lm.config.vocab_size, (2, 16))
    with torch.no_grad():
        exits, final = model(ids, full=True)
        reference = lm(ids, output_hidden_states=True)
        assert torch.equal(model.lm_head(final), reference.logits), name
        for depth in (1, 3):
            # hand assembly: HF's hidden state after `depth` layers -> exit layer -> exit norm -> head
            exit_ = model.exits[str(depth)]
            hidden = reference.hidden_states[depth]
            positions = torch.arange(16).unsqueeze(0)
            rotary = lm.model.rotary_emb(hidden, positions)
            mask = model._masks(hidden, positions)[-1]
            expected = lm.lm_head(exit_.norm(exit_.layer(hidden, attention_mask=mask, position_ids=positions,
                                                         position_embeddings=rotary)))
            assert torch.allclose(model.lm_head(exits[depth]), expected, atol=1e-5), (name, depth)
    # the forward without the full model stops at the deepest exit
    calls = []
    hook = lm.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    model(ids)
    hook.remove()
    assert calls == []


def test_exit_initialisation_and_trainable_set(smollm):
    model = BalconyModel(smollm, [2])
    exit_ = model.exits["2"]
    for (n, p), q in zip(exit_.layer.named_parameters(), smollm.model.layers[-1].parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    assert torch.equal(exit_.norm.weight, smollm.model.layers[2].input_layernorm.weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("exits.") for n in trainable)


def test_next_layer_init_and_tuned_lens_start_as_logit_lenses(smollm):
    """next_layer: exit k before training is the logit lens at k+1; the tuned lens at k, the lens at k."""
    ids = torch.randint(0, smollm.config.vocab_size, (2, 12))
    with torch.no_grad():
        reference = smollm(ids, output_hidden_states=True).hidden_states  # [embeddings, after layer 1, ...]
        lens = {k: smollm.lm_head(smollm.model.norm(reference[k])) for k in (2, 3)}
        next_layer = BalconyModel(smollm, [1, 2], init="next_layer")
        exits, _ = next_layer(ids)
        for depth in (1, 2):
            assert torch.allclose(smollm.lm_head(exits[depth]), lens[depth + 1], atol=1e-4), depth
        tuned = BalconyModel(smollm, [2, 3], kind="tuned_lens")
        exits, _ = tuned(ids)
        for depth in (2, 3):
            assert torch.allclose(smollm.lm_head(exits[depth]), lens[depth], atol=1e-5), depth
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {f"exits.{k}.layer.proj.{w}" for k in (2, 3) for w in ("weight", "bias")}


def test_refusals(smollm):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match=r"exits.depths: 4 is out of range: an exit depth must be in \[1, 3\]"):
        BalconyModel(smollm, [1, 4])
    with pytest.raises(ConfigError, match="exits.depths: at least one"):
        BalconyModel(smollm, [])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(InputError, match="GPT2LMHeadModel is not a supported decoder-only LM"):
        BalconyModel(gpt2, [1])


def test_export_load_round_trip(smollm, tmp_path):
    model = BalconyModel(smollm, [1, 2])
    with torch.no_grad():
        for p in model.exits.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_exits(tmp_path, backbone_fingerprint="abc")
    loaded = BalconyModel.from_pretrained(smollm, tmp_path, backbone_fingerprint="abc")
    for (n, p), (_, q) in zip(model.exits.named_parameters(), loaded.exits.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(InputError, match="backbone_fingerprint is 'abc', this backbone's is 'xyz'"):
        BalconyModel.from_pretrained(smollm, tmp_path, backbone_fingerprint="xyz")
