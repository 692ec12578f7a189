"""BalconyModel parity with the HF reference, on the real (truncated) backbone and tiny random models."""
import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig
from pipeline.decoder import check_supported
from pipeline.errors import ConfigError, InputError

from conftest import BACKBONE


@pytest.fixture(scope="module")
def smollm(assets):
    return load_backbone(ModelConfig(backbone=str(BACKBONE), num_layers=4))


def test_full_depth_equals_hf_and_the_forward_stops_at_the_deepest_exit(smollm):
    """The real (truncated) backbone; every other family is in tests/test_families.py."""
    model = BalconyModel(smollm, [1, 3])
    ids = torch.randint(0, smollm.config.vocab_size, (2, 16))
    with torch.no_grad():
        _, final = model(ids, full=True)
        assert torch.equal(model.logits(final), smollm(ids).logits)
    calls = []
    hook = smollm.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
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
    with pytest.raises(InputError, match="GPT2LMHeadModel is not a supported decoder-only LM: it has no "
                                         "model.embed_tokens, model.layers, model.norm, model.rotary_emb"):
        BalconyModel(gpt2, [1])


def test_multimodal_checkpoint_loads_as_its_text_model_and_encoder_decoders_are_refused(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    gemma3 = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)).eval()
    gemma3.save_pretrained(tmp_path / "gemma3")
    backbone = load_backbone(ModelConfig(backbone=str(tmp_path / "gemma3")))
    assert type(backbone).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(3, 290, (1, 12))
    with torch.no_grad():
        _, final = BalconyModel(backbone, [1])(ids, full=True)
        assert torch.equal(BalconyModel(backbone, [1]).logits(final), gemma3(input_ids=ids).logits)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(InputError, match="model.backbone: T5ForConditionalGeneration is an encoder-decoder model"):
        check_supported(t5)
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(InputError, match="model.backbone: cannot load .*t5 .*Unrecognized configuration class"):
        load_backbone(ModelConfig(backbone=str(tmp_path / "t5")))


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


def test_rotary_buffers_cast_to_bf16_are_found(smollm):
    """What DeepSpeed 0.16-0.19.1 did to rotary frequencies; train-exits refuses to train on it."""
    from pipeline.decoder import Decoder

    decoder = Decoder(smollm)
    assert decoder.low_precision_rotary() == []
    rotary = smollm.model.rotary_emb
    saved = rotary.inv_freq
    rotary.inv_freq = saved.to(torch.bfloat16)
    try:
        assert "inv_freq" in decoder.low_precision_rotary()
    finally:
        rotary.inv_freq = saved
