"""The second real backbone: Gemma 3 270M (sliding-window and global attention, QK-norm, a 262,144-token
vocabulary), truncated to 3 of its 18 layers as the SmolLM2 tests truncate theirs. Built by
`make assets MODEL=gemma3-270m`; `make test` builds it, a plain pytest without it skips these tests."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig

from conftest import ASSETS, pipeline_command, run_command, tiny_config

GEMMA = ASSETS / "gemma3-270m"
pytestmark = pytest.mark.skipif(not (GEMMA / "ASSET.json").exists(),
                                reason=f"Gemma 3 270M is not built in {GEMMA}: make assets MODEL=gemma3-270m")
LAYERS, DEPTHS = 3, [1, 2]


@pytest.fixture(scope="module")
def prompt():
    tokenizer = load_tokenizer(ModelConfig(backbone=str(GEMMA)))
    return tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids


def test_the_layer_by_layer_path_equals_gemma_s_own_forward(prompt):
    """Our decoder (embedding scale, local and global RoPE, the sliding mask, the soft-capped head) against
    the model's own forward, bit for bit, on the real weights."""
    backbone = load_backbone(ModelConfig(backbone=str(GEMMA), num_layers=LAYERS))
    model = BalconyModel(backbone, DEPTHS)
    with torch.no_grad():
        _, final = model(prompt, full=True)
        assert torch.equal(model.logits(final), backbone(prompt).logits)


@pytest.mark.integration
def test_the_whole_chain_runs_on_gemma(tmp_path, prompt):
    """tokenize (Gemma's tokenizer), teacher-logits (18-bit ids), train-exits (2 ranks), evaluate and
    export, as `make pipeline` runs them; the exported exit is a Gemma checkpoint plain transformers loads."""
    # a quarter of the tiny pipeline's tokens: a 262k-token head is ~6x SmolLM2's per position; decode
    # speed is left out (the family matrix runs Gemma 3's cached generation and self-speculative decoding)
    config = tiny_config(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "gemma", model={"backbone": str(GEMMA)},
                         data={"train_tokens": 2048, "heldout_tokens": 256}, train={"max_steps": 6},
                         eval={"speed": False}, exits={"depths": DEPTHS}, export={"after_evaluate": True})
    run_command(pipeline_command(config, "--nproc", "2"))
    run = tmp_path / "gemma"
    teacher = json.loads((run / "teacher" / "manifest.json").read_text())
    assert teacher["target_format"]["id_bits"] == 18  # ceil(log2 262144)
    rows = {row["name"]: row for row in json.loads((run / "eval" / "metrics.json").read_text())["rows"]}
    for depth in DEPTHS:  # a few steps on 2k tokens: scored, not yet good (configs/gemma3-270m.yaml is the recipe)
        assert 0 < rows[f"exit@{depth}"]["kl_to_full"] < float("inf") and 0 <= rows[f"exit@{depth}"]["top1_agreement"] <= 1
    # the trained exit, exported (its config's per-layer attention types cut to its layers), is a Gemma
    # checkpoint that plain transformers loads and runs to the trained exit's logits
    model = BalconyModel.from_pretrained(load_backbone(ModelConfig(backbone=str(GEMMA), num_layers=LAYERS)), run / "exits")
    for depth in DEPTHS:
        exported = AutoModelForCausalLM.from_pretrained(run / "export" / f"exit-{depth}").eval()
        assert exported.config.num_hidden_layers == depth + 1 and len(exported.config.layer_types) == depth + 1
        with torch.no_grad():
            assert torch.equal(exported(prompt).logits, model.view(depth)(prompt).logits)
