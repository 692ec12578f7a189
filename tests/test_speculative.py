"""Self-speculative decoding (pipeline/speculative.py): exact sampling, confidence-stopped drafts,
ragged batches. Greedy equality with plain decoding for every family: tests/test_families.py."""
import pytest
import torch

import pipeline.speculative as speculative
from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig
from pipeline.speculative import DraftPolicy, Sampling, speculative_generate

from conftest import BACKBONE
from families import perturb_exits, tiny


@pytest.fixture(scope="module")
def model(assets):
    """The real backbone cut to 6 layers; exit 5 starts as the full model itself (every draft accepted),
    exit 3 as the logit lens at 4."""
    return BalconyModel(load_backbone(ModelConfig(backbone=str(BACKBONE), num_layers=6)), [3, 5], init="next_layer").eval()


@pytest.fixture(scope="module")
def prompts(assets):
    """Three prompts of different lengths, left-padded as for HF generate."""
    tok = load_tokenizer(ModelConfig(backbone=str(BACKBONE)))
    texts = ["It is a truth universally acknowledged, that", "The quick brown fox",
             "In the beginning God created the heaven and the earth. And the"]
    encoded = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return encoded.input_ids, encoded.attention_mask


def _alone(model, ids, mask, row, new_tokens):
    real = ids[row:row + 1, -int(mask[row].sum()):]
    return model.generate(real, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)[0, -new_tokens:]


@pytest.mark.parametrize("depth,policy", [(3, DraftPolicy(3)), (3, DraftPolicy(6, tau=0.3)), (5, DraftPolicy(4, tau=0.5)),
                                          (5, DraftPolicy(8))])
def test_a_ragged_batch_decodes_each_prompt_as_plain_greedy_decoding_alone(model, prompts, depth, policy):
    """Each row accepts its own number of drafts (exit 5 all of them, exit 3 some), so the rows are shifted
    in the cache every round; every row still gets the full model's greedy tokens for its prompt alone."""
    ids, mask = prompts
    out, stats = speculative_generate(model, ids, depth, 20, policy, attention_mask=mask)
    for row in range(len(ids)):
        assert torch.equal(out[row, ids.shape[1]:], _alone(model, ids, mask, row, 20)), (depth, policy, row)
    assert stats.rounds > 0 and stats.draft_length <= policy.max_draft
    if depth == 5:  # the draft is the full model: every draft is kept
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_round > 2


def test_confidence_stops_the_drafts_and_never_changes_the_output(model, prompts):
    ids, mask = prompts
    fixed = speculative_generate(model, ids, 3, 16, DraftPolicy(4), attention_mask=mask)
    unsure = speculative_generate(model, ids, 3, 16, DraftPolicy(4, tau=0.999), attention_mask=mask)
    sure = speculative_generate(model, ids, 3, 16, DraftPolicy(4, tau=0.5), attention_mask=mask)
    assert torch.equal(fixed[0], unsure[0]) and torch.equal(fixed[0], sure[0])
    assert fixed[1].draft_length > 3  # drafts of 4 but at the very end, where fewer tokens are left
    assert unsure[1].drafted == 0 and unsure[1].tokens_per_round == 1.0  # plain decoding plus the exit's look
    assert 0 < sure[1].draft_length < fixed[1].draft_length
    assert sure[1].acceptance_rate > fixed[1].acceptance_rate  # the unsure drafts were the rejected ones


def test_finished_rows_stop_at_eos_and_are_padded(model, prompts):
    ids, mask = prompts
    alone = {row: _alone(model, ids, mask, row, 12).tolist() for row in range(len(ids))}
    # a token some row makes first after others: its end, which other rows may reach at once, later or never
    row, end = next((row, i) for row, greedy in alone.items() for i in range(1, 12) if greedy[i] not in greedy[:i])
    eos = alone[row][end]
    out, _ = speculative_generate(model, ids, 5, 12, DraftPolicy(4), attention_mask=mask, eos_token_id=eos, pad_token_id=-1)
    for row, greedy in alone.items():
        stop = greedy.index(eos) + 1 if eos in greedy else 12
        assert out[row, ids.shape[1]:].tolist() == greedy[:stop] + [-1] * (out.shape[1] - ids.shape[1] - stop)


def test_sampling_processing_equals_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6)):
        theirs = TemperatureLogitsWarper(temperature)(None, logits)
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        ours = Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p).probs(logits)
        assert torch.allclose(ours, torch.softmax(theirs, -1), atol=1e-6), (temperature, top_k, top_p)


def _chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities, cells expected < 5 times pooled."""
    from scipy.stats import chisquare

    expected = expected_probs.double()
    expected = expected / expected.sum() * observed.sum()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]]).double()
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        assert obs[-1] == 0, "tokens outside the full model's support were sampled"
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_speculative_sampling_has_the_full_models_distribution_and_would_not_without_the_residual(monkeypatch):
    """20,000 copies of one prompt decoded 3 tokens each by a tiny Llama whose exit at 2 drafts 2 tokens
    (top-6 sampling at temperature 0.5, on both sides): the 2nd and 3rd tokens (drafted, kept or
    redrawn) must follow their exact marginals under the full model. Resampling rejected positions from
    p instead of the residual max(p - q, 0) gives min(p, q) + (1 - sum min(p, q)) p: rejected by the
    same test."""
    backbone = tiny("llama")
    model = BalconyModel(backbone, [2]).eval()
    perturb_exits(model)
    sampling, prompt, n = Sampling(do_sample=True, temperature=0.5, top_k=6), torch.tensor([[5, 9, 17, 33, 65, 129]]), 20000
    vocab = backbone.config.vocab_size
    with torch.no_grad():  # the exact marginals of tokens 2 and 3 under plain sampling
        p1 = sampling.probs(backbone(prompt).logits[0, -1])
        firsts = p1.nonzero()[:, 0]
        p2 = sampling.probs(backbone(torch.cat([prompt.repeat(len(firsts), 1), firsts[:, None]], 1)).logits[:, -1])
        pairs = (p1[firsts, None] * p2).nonzero()
        joint = p1[firsts[pairs[:, 0]]] * p2[pairs[:, 0], pairs[:, 1]]
        prefixes = torch.cat([prompt.repeat(len(pairs), 1), firsts[pairs[:, 0], None], pairs[:, 1:]], 1)
        third = joint @ sampling.probs(backbone(prefixes).logits[:, -1])
        second = p1[firsts] @ p2

    def sample():
        out, stats = speculative_generate(model, prompt.repeat(n, 1), 2, 3, DraftPolicy(2), sampling,
                                          generator=torch.Generator().manual_seed(0))
        new = out[:, prompt.shape[1]:]
        return [torch.bincount(new[:, i], minlength=vocab) for i in (1, 2)], stats

    (count2, count3), stats = sample()
    assert 0.05 < stats.acceptance_rate < 0.95  # both branches (kept, redrawn) are taken often
    assert _chi_square_p(count2, second) > 1e-3 and _chi_square_p(count3, third) > 1e-3
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    (count2, count3), _ = sample()
    assert _chi_square_p(count2, second) < 1e-6
