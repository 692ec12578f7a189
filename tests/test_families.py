"""The family matrix: every supported decoder family, as a tiny random-weight model (tests/families.py),
through every path that runs the backbone layer by layer (pipeline/decoder.py), each checked against
the model's own forward or a step-by-step loop over our forward, never HF against itself."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.balcony import BalconyModel
from pipeline.config import TeacherConfig
from pipeline.speculative import DraftPolicy, speculative_generate
from pipeline.targets import TARGETS_KEY, TargetFormat
from pipeline.teacher import Teacher

from conftest import ROOT
from families import FAMILIES, perturb_exits, tiny

NAMES = list(FAMILIES)
DEPTHS = [1, 2]
# Where our arithmetic is not HF's op for op, the tolerance it needs (none today: every family is bit-exact).
TOLERANCE = {}


def _ids(backbone, length: int = 20, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, backbone.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor, name: str) -> bool:
    return torch.equal(a, b) if name not in TOLERANCE else torch.allclose(a, b, atol=TOLERANCE[name], rtol=0)


class _NoTokenizer:
    """The tiny families have no tokenizer to ship with an export."""

    def save_pretrained(self, folder):
        pass


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    return request.param, tiny(request.param)


def test_full_path_equals_the_models_own_forward(family):
    name, backbone = family
    model = BalconyModel(backbone, DEPTHS)
    ids = _ids(backbone)
    with torch.no_grad():
        _, final = model(ids, full=True)
        assert _close(model.logits(final), backbone(ids).logits, name), name


def test_next_layer_exit_starts_as_the_models_own_layer(family):
    """Untrained, a next_layer exit at k is layers[k] + the final norm: the model's own logit lens at
    k+1 (HF's hidden states), so the exit layer gets the mask and RoPE of layers[k]'s type."""
    name, backbone = family
    model = BalconyModel(backbone, DEPTHS, init="next_layer")
    ids = _ids(backbone)
    with torch.no_grad():
        exits, _ = model(ids)
        hidden = backbone(ids, output_hidden_states=True).hidden_states  # [embeddings, after layer 1, ...]
        for depth in DEPTHS:
            lens = model.logits(backbone.model.norm(hidden[depth + 1]))
            assert _close(model.logits(exits[depth]), lens, name), (name, depth)


@pytest.mark.parametrize("init", ["last_layer", "next_layer"])
def test_exit_view_its_export_and_cached_generate_equal_the_exits_forward(family, init, tmp_path):
    """view(k) is an HF model of k+1 layers: its logits, those of its export loaded by plain
    transformers (num_hidden_layers and per-layer settings cut to k+1), and generate() with its KV
    cache must equal BalconyModel's own forward at exit k (the exit layer gets its source layer's
    mask and RoPE)."""
    from transformers import AutoModelForCausalLM

    from pipeline.export import export_exit

    name, backbone = family
    model = BalconyModel(backbone, DEPTHS, init=init)
    perturb_exits(model)
    ids = _ids(backbone)
    with torch.no_grad():
        exits, _ = model(ids)
        for depth in DEPTHS:
            assert _close(model.view(depth)(ids).logits, model.logits(exits[depth]), name), (name, init, depth)
            folder = export_exit(model, depth, tmp_path / f"exit-{depth}", _NoTokenizer(), name)
            loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            assert type(loaded) is type(backbone) and loaded.config.num_hidden_layers == depth + 1
            assert _close(loaded(ids).logits, model.logits(exits[depth]), name), (name, init, depth, "export")
    prompt, steps = _ids(backbone, 6, 1), 10  # 6 + 10 tokens: past the 8-token sliding windows
    for depth in DEPTHS:
        cached = model.generate(prompt, exit=depth, max_new_tokens=steps, do_sample=False, eos_token_id=None)
        by_hand = prompt
        with torch.no_grad():
            for _ in range(steps):
                exits, _ = model(by_hand)
                by_hand = torch.cat([by_hand, model.logits(exits[depth][:, -1]).argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(cached, by_hand), (name, init, depth)


def test_self_speculative_decoding_equals_greedy_full_decoding(family):
    """A ragged batch (row 1 left-padded by 2), fixed and confidence-stopped drafts: each row gets the full
    model's greedy tokens for its prompt alone, past the sliding windows (the rows shift in the cache)."""
    name, backbone = family
    model = BalconyModel(backbone, DEPTHS)
    perturb_exits(model)
    prompt, steps = _ids(backbone, 6, 2), 12
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    greedy = []
    with torch.no_grad():
        for row in range(2):
            ids = prompt[row:row + 1, int((mask[row] == 0).sum()):]
            for _ in range(steps):
                _, final = model(ids, full=True)
                ids = torch.cat([ids, model.logits(final[:, -1]).argmax(-1, keepdim=True)], dim=1)
            greedy.append(ids[0, -steps:])
    for depth, policy in ((1, DraftPolicy(3)), (2, DraftPolicy(2)), (2, DraftPolicy(4, tau=0.01))):
        ours, stats = speculative_generate(model, prompt, depth, steps, policy, attention_mask=mask)
        for row in range(2):
            assert torch.equal(ours[row, prompt.shape[1]:], greedy[row]), (name, depth, policy, row)
        assert stats.rounds > 0 and (stats.drafted > 0 or policy.tau > 0)


def test_teacher_targets_equal_those_of_the_models_own_logits(family):
    """Softcapped (Gemma) and scaled (Granite) logits included: the targets are of what the model outputs."""
    name, backbone = family
    cfg = TeacherConfig(k=16, fidelity_positions=0, chunk_size=16)
    fmt = TargetFormat(cfg, backbone.config.vocab_size)
    ids = _ids(backbone)
    ours = Teacher(backbone, fmt, cfg).targets(ids.numpy(), ["a", "b"])
    with torch.no_grad():
        logits = backbone(ids).logits.flatten(0, 1).float()
    ids, values = (selected.view(2, 20, -1) for selected in fmt.select(logits, None))
    for b, sample in enumerate(ours):
        assert np.array_equal(sample[TARGETS_KEY], fmt.encode(ids[b], values[b])), name


def test_one_deepspeed_step_lowers_every_family_s_exit_loss():
    """One ZeRO-2 step (one rank, gloo) per family, in a process of its own (DeepSpeed joins a process group)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "family_train_step.py"), *NAMES],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(losses) == sorted(NAMES)
    for name, (before, after) in losses.items():
        assert after < before, (name, before, after)
