"""Every exit as a standalone HF checkpoint: plain transformers loads it and gives view(k)'s logits,
lm-evaluation-harness scores it as it is, and it drafts for the full model in assisted generation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.backbone import load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig
from pipeline.errors import InputError
from pipeline.export import export_exit, model_card

from conftest import BACKBONE, ROOT, perturbed_model, tree_bytes


@pytest.fixture(scope="module")
def model(assets):
    return perturbed_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    tokenizer = load_tokenizer(ModelConfig(backbone=str(BACKBONE)))
    return {k: export_exit(model, k, out / f"exit-{k}", tokenizer, "smollm2-6-layers") for k in model.depths}


@pytest.fixture(scope="module")
def prompt(assets):
    tok = load_tokenizer(ModelConfig(backbone=str(BACKBONE)))
    return tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids


@pytest.mark.parametrize("depth", [2, 4])
def test_plain_transformers_load_gives_the_exit_logits(model, exported, prompt, depth):
    loaded = AutoModelForCausalLM.from_pretrained(exported[depth]).eval()
    assert loaded.config.num_hidden_layers == depth + 1 and type(loaded) is type(model.backbone)
    with torch.no_grad():
        theirs = loaded(prompt).logits
        ours = model.view(depth)(prompt).logits
    assert torch.equal(theirs, ours)
    card = (exported[depth] / "README.md").read_text()
    assert f"Balcony exit at depth {depth}" in card and f"relative cost of {(depth + 1) / 6:.3f}" in card


def test_export_is_deterministic_and_replaces_atomically(model, exported, tmp_path):
    tokenizer = load_tokenizer(ModelConfig(backbone=str(BACKBONE)))
    again = export_exit(model, 4, tmp_path / "exit-4", tokenizer, "smollm2-6-layers")
    assert tree_bytes(again) == tree_bytes(exported[4])
    for killed in (".exit-4.tmp-999999", ".exit-4.old-999999"):  # what an export killed mid-way leaves
        (tmp_path / killed).mkdir()
        (tmp_path / killed / "model.safetensors").write_bytes(b"partial")
    export_exit(model, 4, again, tokenizer, "smollm2-6-layers")  # over an existing export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit-4"]  # no temporary or old folder left


def test_tuned_lens_exits_are_refused(model):
    lens = BalconyModel(model.backbone, [2], kind="tuned_lens")
    with pytest.raises(InputError, match="not decoder layers"):
        export_exit(lens, 2, Path("/nonexistent"), None, "x")


def test_card_shows_figures_only_when_given(model):
    scores = {"full": {"perplexity": 30.0}, "exit": {"perplexity": 90.5, "kl_to_full": 1.25, "top1_agreement": 0.5}}
    assert "| this exit | 90.50 | 1.2500 | 0.500 |" in model_card(model, 4, "b", scores)
    assert "No evaluation of these exits" in model_card(model, 4, "b", None)


@pytest.mark.parametrize("depth", [2, 4])
def test_exported_exit_drafts_for_the_full_model_with_greedy_output(model, exported, prompt, depth):
    draft = AutoModelForCausalLM.from_pretrained(exported[depth]).eval()
    greedy = model.backbone.generate(prompt, max_new_tokens=24, do_sample=False)
    assisted = model.backbone.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, greedy)


@pytest.mark.integration
def test_lm_eval_hf_scores_an_export_as_it_is(exported, tmp_path):
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "hf",
           "--model_args", f"pretrained={exported[4]}",
           "--tasks", "balcony_tiny", "--include_path", str(ROOT / "tests" / "data" / "lm_eval_task"),
           "--output_path", str(tmp_path / "results"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("results*.json")]
    assert result["n-samples"]["balcony_tiny"]["effective"] == 5
    assert 0.0 <= result["results"]["balcony_tiny"]["acc,none"] <= 1.0
