"""The teacher-logits stage on a truncated real backbone (2 of 30 layers), run as a user runs it."""
import shutil

import numpy as np
import pytest
import torch
import yaml

from pipeline.backbone import load_backbone
from pipeline.config import ModelConfig, TeacherConfig, load_config
from pipeline.shards import read_manifest, read_shard
from pipeline.targets import TARGETS_KEY, TargetFormat
from pipeline.teacher import Teacher

from conftest import BACKBONE, built_once, run_in_process, run_stage, small_config, tree_bytes

pytestmark = pytest.mark.integration  # runs the stages as processes

TOKENIZE, TEACHER = "tokenize_corpus.py", "teacher_logits.py"
SMALL = {"model": {"num_layers": 2}, "teacher": {"batch_size": 4, "chunk_size": 200, "fidelity_positions": 8}}


def _config(folder, tracking_uri, name="config.yaml", run="run", **sections):
    cfg = small_config(folder / run, tracking_uri, **SMALL)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tracking_uri, assets):
    def build(folder):
        config = _config(folder, tracking_uri)
        run_stage(TOKENIZE, "--config", config)
        run_stage(TEACHER, "--config", config)
        return config, folder / "run"

    return built_once(tmp_path_factory, "teacher", build)


def test_targets_align_with_tokens_and_match_the_model(reference):
    config, run = reference
    cfg = load_config(config)
    tokens = read_manifest(run / "tokens", "tokenize")
    teacher = read_manifest(run / "teacher", "teacher", expect={"seq_len": 128})
    assert teacher["input_manifest_hash"] and teacher["target_format"]["format"] == "topk"
    backbone = load_backbone(cfg.model)
    fmt = TargetFormat(cfg.teacher, backbone.config.vocab_size)
    for split in ("train", "heldout"):
        for tok_rec, tea_rec in zip(tokens["splits"][split]["shards"], teacher["splits"][split]["shards"]):
            assert tok_rec["file"] == tea_rec["file"] and tok_rec["samples"] == tea_rec["samples"]
            tok_samples = list(read_shard(run / "tokens", tok_rec))
            tea_samples = list(read_shard(run / "teacher", tea_rec))
            for a, b in zip(tok_samples, tea_samples):
                assert a["__key__"] == b["__key__"]
                np.testing.assert_array_equal(a["input_ids.npy"], b["input_ids.npy"])
    # the stored targets decode to the top-k of the model's own full logits
    sample = tea_samples[0]
    with torch.no_grad():
        logprobs = backbone(torch.as_tensor(sample["input_ids.npy"]).long()[None]).logits[0].log_softmax(-1)
    target = fmt.target(*fmt.decode(sample[TARGETS_KEY], len(sample["input_ids.npy"])))
    values, ids = logprobs.topk(cfg.teacher.k, dim=-1)
    agree = (target.ids == ids).float().mean()
    assert agree > 0.99  # ties at the k-th place may flip between batched and single forward passes
    assert (target.logprobs - values).abs().max() < fmt.step


def test_smaller_than_naive_top64_and_noop_rerun(reference):
    config, run = reference
    manifest = read_manifest(run / "teacher", "teacher")
    train = manifest["splits"]["train"]
    naive_target_bytes = 64 * (2 + 4)
    assert train["bytes"] / train["tokens"] < naive_target_bytes  # shard bytes, ids and tar included
    before = tree_bytes(run / "teacher")
    assert "nothing to do" in run_stage(TEACHER, "--config", config).stdout
    assert tree_bytes(run / "teacher") == before


def test_three_tasks_identical(reference, tmp_path, tracking_uri):
    config, run = reference
    split = _config(tmp_path, tracking_uri, run="split")
    shutil.copytree(run / "tokens", tmp_path / "split" / "tokens")
    for index in (1, 2, 0):  # in this process: the task split is under test, not the command
        code, _, stderr = run_in_process("teacher-logits", split, "--task-index", str(index), "--num-tasks", "3")
        assert code == 0, stderr[-3000:]
    assert tree_bytes(tmp_path / "split" / "teacher") == tree_bytes(run / "teacher")


def test_refuses_mismatched_or_corrupt_tokens(reference, tmp_path):
    config, run = reference
    before = tree_bytes(run / "teacher")
    code, _, stderr = run_in_process("teacher-logits", config, "data.seq_len=64")
    assert code == 2 and "seq_len is 128, expected 64" in stderr
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(BACKBONE)
    other.add_tokens(["<balcony>"])
    other.save_pretrained(tmp_path / "tok")
    code, _, stderr = run_in_process("teacher-logits", config, f"model.tokenizer={tmp_path / 'tok'}")
    assert code == 2 and "tokenizer_fingerprint is" in stderr
    code, _, stderr = run_in_process("teacher-logits", config, "model.num_layers=3")
    assert code == 2 and "backbone_fingerprint=" in stderr
    code, _, stderr = run_in_process("teacher-logits", config, "teacher.k=49152")
    assert code == 2 and "teacher.k: must be below the vocabulary size 49152" in stderr
    assert tree_bytes(run / "teacher") == before


def test_corrupt_token_shard_is_refused_before_use(tmp_path, tracking_uri, assets):
    config = _config(tmp_path, tracking_uri)
    run_stage(TOKENIZE, "--config", config)
    shard = tmp_path / "run" / "tokens" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, stderr = run_in_process("teacher-logits", config)
    assert code == 2 and f"{shard}: sha256 is" in stderr
    assert not (tmp_path / "run" / "teacher" / "shard-000001.tar").exists()


def test_sampled_format_end_to_end(tmp_path, tracking_uri, assets):
    config = _config(tmp_path, tracking_uri, teacher={"format": "sampled", "samples": 12})
    run_stage(TOKENIZE, "--config", config)
    run_stage(TEACHER, "--config", config)
    manifest = read_manifest(tmp_path / "run" / "teacher", "teacher")
    assert manifest["target_format"] == {"format": "sampled", "entries": 12, "vocab_size": 49152, "id_bits": 16,
                                         "logprob_bits": 12, "logprob_range": 24.0, "count_bits": 4}
    # the manifest's figures are the shards': each distinct draw stored once, in 16 + 12 + 1 (+ 4) bits
    fmt, stored = TargetFormat.from_manifest(manifest, "manifest"), {"bytes": 0, "entries": 0, "tokens": 0}
    for split in ("train", "heldout"):
        for record in manifest["splits"][split]["shards"]:
            for sample in read_shard(tmp_path / "run" / "teacher", record):
                positions = len(sample["input_ids.npy"])
                stored["bytes"] += sample[TARGETS_KEY].nbytes
                stored["entries"] += fmt.stored_entries(sample[TARGETS_KEY], positions)
                stored["tokens"] += positions
                ids, _ = fmt.decode(sample[TARGETS_KEY], positions)
                assert ids.shape == (positions, 12) and (ids.diff(dim=-1) >= 0).all()  # the draws, in id order
    assert manifest["target_entries_per_token"] == stored["entries"] / stored["tokens"] < 12
    assert manifest["target_bytes_per_token"] == stored["bytes"] / stored["tokens"]
    assert stored["bytes"] < stored["tokens"] * (0.5 + manifest["target_entries_per_token"] * (29 + 4) / 8 + 1)


def test_chunks_bound_the_logits_and_do_not_change_targets(assets):
    backbone = load_backbone(ModelConfig(backbone=str(BACKBONE), num_layers=2))
    seen = []
    backbone.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    ids = torch.randint(0, 49152, (3, 64)).numpy()
    outputs = []
    for chunk in (50, 10_000):
        cfg = TeacherConfig(chunk_size=chunk, fidelity_positions=0)
        outputs.append(Teacher(backbone, TargetFormat(cfg, 49152), cfg).targets(ids, ["a", "b", "c"]))
    assert max(seen[: len(seen) - 1]) <= 50 and seen[-1] == 192
    fmt = TargetFormat(TeacherConfig(), 49152)
    for a, b in zip(*outputs):
        assert torch.equal(fmt.decode(a[TARGETS_KEY], 64)[0], fmt.decode(b[TARGETS_KEY], 64)[0])
