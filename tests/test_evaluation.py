"""Evaluation metrics against a hand computation on a tiny random model, and the stage end to end."""
import math

import pytest
import torch

from pipeline.balcony import BalconyModel
from pipeline.evaluation import score_batch, variants_of


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_metrics_equal_a_hand_computation():
    backbone = _tiny()
    model = BalconyModel(backbone, [1, 2])
    ids = torch.randint(0, 50, (3, 10))
    variants = variants_of(model, [])
    score_batch(model, [], variants, ids[:2], chunk=7)  # two batches, odd chunks: sums must add up
    score_batch(model, [], variants, ids[2:], chunk=7)
    got = {v.name: v.metrics() for v in variants}
    with torch.no_grad():
        out = backbone(ids, output_hidden_states=True)
        p = out.logits.log_softmax(-1)
        lens1 = backbone.lm_head(backbone.model.norm(out.hidden_states[1])).log_softmax(-1)
        exits, _ = model(ids)
        exit2 = backbone.lm_head(exits[2]).log_softmax(-1)
    for name, q in (("lens@1", lens1), ("exit@2", exit2), ("full", p)):
        kl = (p.exp() * (p - q)).sum(-1).mean()
        nll = -q[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
        agree = (q.argmax(-1) == p.argmax(-1)).float().mean()
        assert got[name]["kl_to_full"] == pytest.approx(float(kl), abs=1e-5), name
        assert got[name]["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5), name
        assert got[name]["top1_agreement"] == pytest.approx(float(agree)), name
    assert got["full"]["kl_to_full"] == pytest.approx(0, abs=1e-6) and got["full"]["top1_agreement"] == 1
    assert {v.name: v.cost for v in variants} == {"full": 1, "exit@1": 2 / 3, "exit@2": 1, "lens@1": 1 / 3,
                                                   "lens@2": 2 / 3}
