"""Dynamic-depth inference: generate at an exit or a budget, through HF's own generate()."""
import pytest
import torch

from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig

from conftest import BACKBONE, perturbed_model


@pytest.fixture(scope="module")
def model(assets):
    return perturbed_model()


@pytest.fixture(scope="module")
def prompt(assets):
    tok = load_tokenizer(ModelConfig(backbone=str(BACKBONE)))
    return tok("It is a truth universally acknowledged, that", return_tensors="pt").input_ids


def test_full_depth_generate_equals_a_greedy_loop_over_the_full_forward(model, prompt):
    ours = model.generate(prompt, budget=1.0, max_new_tokens=12, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            _, final = model(ids, full=True)
            ids = torch.cat([ids, model.logits(final[:, -1]).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, ids)


@pytest.mark.parametrize("depth", [2, 4])
def test_cached_decoding_equals_uncached_and_manual_forward(model, prompt, depth):
    cached = model.generate(prompt, exit=depth, max_new_tokens=10, do_sample=False)
    uncached = model.generate(prompt, exit=depth, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # the same tokens by hand: argmax of the exit's logits from BalconyModel's own forward
    ids = prompt
    for _ in range(10):
        exits, _ = model(ids)
        ids = torch.cat([ids, model.logits(exits[depth][:, -1]).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, cached)


def test_budget_picks_the_deepest_exit_that_fits(model):
    # 6 layers: exit 2 costs 3/6, exit 4 costs 5/6
    assert model.choose_exit(0.5) == 2 and model.choose_exit(0.8) == 2 and model.choose_exit(0.84) == 4
    assert model.choose_exit(1.0) is None
    with pytest.raises(ValueError, match="below the cheapest exit's cost 0.500"):
        model.choose_exit(0.4)
    with pytest.raises(ValueError, match="no exit at depth 3"):
        model.generate(torch.tensor([[1, 2]]), exit=3)


def test_padded_batch_matches_single_sequences(model, prompt):
    short = prompt[:, 3:]
    pad = model.backbone.config.pad_token_id or 0
    batch = torch.cat([prompt, torch.cat([torch.full((1, 3), pad), short], dim=1)])
    mask = torch.cat([torch.ones_like(prompt), torch.cat([torch.zeros(1, 3, dtype=torch.long),
                                                           torch.ones_like(short)], dim=1)])
    out = model.generate(batch, attention_mask=mask, exit=4, max_new_tokens=8, do_sample=False)
    alone = model.generate(short, exit=4, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[1, -8:], alone[0, -8:])
    assert torch.equal(out[0], model.generate(prompt, exit=4, max_new_tokens=8, do_sample=False)[0])


@pytest.mark.parametrize("depth,draft,tau", [(2, 3, 0.0), (4, 4, 0.0), (4, 1, 0.0), (4, 6, 0.5)])
def test_speculative_generate_equals_greedy_full_decoding(model, prompt, depth, draft, tau):
    full = model.generate(prompt, max_new_tokens=20, do_sample=False)
    ours = model.generate(prompt, exit=depth, speculative=True, max_new_tokens=20, do_sample=False, max_draft=draft, tau=tau)
    assert torch.equal(ours, full)


def test_speculative_generate_samples_reproducibly_and_takes_hf_arguments(model, prompt):
    def sample(seed):
        return model.generate(prompt, speculative=True, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                              max_new_tokens=12, generator=torch.Generator().manual_seed(seed))
    first = sample(0)
    assert first.shape == (1, prompt.shape[1] + 12) and torch.equal(first, sample(0))
    assert model.speculative_choice == {"depth": 4, "max_draft": 4, "tau": 0.0}  # no evaluation recorded: the deepest
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(prompt, speculative=True, num_beams=2)
    with pytest.raises(ValueError, match="not a budget"):
        model.generate(prompt, speculative=True, budget=0.5)


def test_assisted_generation_counts_every_draft_accepted_when_the_draft_is_the_full_model(prompt):
    """A next_layer exit at L-1 is layers[L-1] + the final norm: the full model itself. As a draft
    model every drafted token is accepted, so the measured acceptance is exactly 1; with a perturbed
    exit it is below 1 (and the output still equals greedy decoding: tests/test_export.py)."""
    from pipeline.timing import assisted_speedup, greedy_seconds

    backbone = load_backbone(ModelConfig(backbone=str(BACKBONE), num_layers=6))
    model = BalconyModel(backbone, [5], init="next_layer")
    full = greedy_seconds(model, prompt, new_tokens=20, repeats=1)
    stats = assisted_speedup(model, 5, prompt, new_tokens=20, draft_tokens=4, repeats=1, full_seconds=full)
    assert stats["acceptance_rate"] == 1.0 and stats["speedup"] > 0
    with torch.no_grad():
        for p in model.exits.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(0)) * 0.05)
    assert assisted_speedup(model, 5, prompt, 20, 4, repeats=1, full_seconds=full)["acceptance_rate"] < 1.0


def test_the_evaluations_speculative_choice_is_used_only_for_the_exits_it_scored(model, prompt, tmp_path):
    import json

    from pipeline.errors import InputError
    from pipeline.shards import FORMAT_VERSION, file_sha256

    model.save_exits(tmp_path, "fingerprint")
    choice = {"depth": 2, "max_draft": 3, "tau": 0.6, "speedup": 1.1}
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"format_version": FORMAT_VERSION, "exits_sha256": file_sha256(tmp_path / "exits.safetensors"),
                                   "speculative_choice": choice}))
    loaded = BalconyModel.from_pretrained(model.backbone, tmp_path, evaluation=metrics)
    assert loaded.speculative_choice == choice
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(loaded.generate(prompt, speculative=True, max_new_tokens=10, do_sample=False), greedy)
    metrics.write_text(json.dumps({"format_version": FORMAT_VERSION, "exits_sha256": "other", "speculative_choice": choice}))
    with pytest.raises(InputError, match="not an evaluation of the exits in"):
        BalconyModel.from_pretrained(model.backbone, tmp_path, evaluation=metrics)
