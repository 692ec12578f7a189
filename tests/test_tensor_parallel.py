"""model.tensor_parallel: the frozen backbone split across a group of ranks (transformers' tensor
parallelism, gloo on CPU) against one whole copy: forward and teacher on tiny families, then the
teacher-logits and train-exits stages on the tiny pipeline's tokens, whole and split across 2 ranks."""
import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pipeline.backbone import backbone_fingerprint, load_backbone
from pipeline.balcony import BalconyModel
from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.losses import exit_losses
from pipeline.shards import read_manifest, read_shard
from pipeline.targets import TARGETS_KEY, TargetFormat

from conftest import (BACKBONE, ONE_THREAD, ROOT, built_once, losses_by_step, pipeline_command, run_command,
                      run_in_process, stage_command, tiny_config)
from families import tiny

pytestmark = pytest.mark.integration  # processes under torchrun and the deepspeed launcher

# Split matmuls sum in another order: float32 rounding, a few ulps of logits of magnitude ~1-10.
FORWARD_TOLERANCE = 1e-5
TRAINING_TOLERANCE = 1e-4  # relative, per step


def test_two_groups_of_two_ranks_equal_one_whole_backbone():
    """4 ranks = 2 tensor-parallel groups of 2, each rank with inputs of its own: exit and full logits,
    and the teacher's top-k targets, against a whole copy on every rank, and 10 training steps of the
    2 x 2 ranks under DeepSpeed against one whole process on all their data, for Llama, Qwen3 (q/k
    norms) and Gemma 3 (sliding and global attention, softcapping)."""
    command = [str(ROOT / ".venv" / "bin" / "torchrun"), "--standalone", "--nproc_per_node", "4",
               str(ROOT / "tests" / "tensor_parallel_check.py"), "llama", "qwen3", "gemma3"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**ONE_THREAD, "TENSOR_PARALLEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"llama", "qwen3", "gemma3"}
    for name, differences in result.items():
        assert max(v for k, v in differences.items() if k != "training") < FORWARD_TOLERANCE, (name, differences)
        # 10 steps of AdamW from the same exits: the losses part by rounding alone
        assert differences["training"] < TRAINING_TOLERANCE, (name, differences)


def test_heads_that_do_not_divide_are_refused_before_loading(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "llama")  # 4 attention heads, 2 KV heads
    with pytest.raises(ConfigError, match=r"^model.tensor_parallel: 3 does not divide the 4 attention heads and 2 KV heads"):
        load_backbone(ModelConfig(backbone=str(tmp_path / "llama"), tensor_parallel=3))


def tiny_llama_with_the_real_vocabulary(folder):
    """A 4-layer random Llama of 4 heads (SmolLM2-135M's 9 do not split in 2) over SmolLM2's vocabulary:
    it reads the tiny pipeline's tokens; 4 layers leave search-exits two candidates (depths 1 and 2)."""
    import transformers

    from families import COMMON

    # weights 15x wider than the default: a distribution far from uniform, and exits far from the full model
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": 49152, "num_hidden_layers": 4, "initializer_range": 0.3})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def whole_and_split(finished_run, tmp_path_factory):
    """The finished run's tokens, then the chain on a tiny Llama: whole (model.tensor_parallel 1:
    teacher-logits in one process, train-exits on 2 ranks), and split in 2 by `make pipeline`'s command
    (teacher-logits, train-exits on 2 ranks = one group, evaluate and export-exits: each a group of 2).
    {name: (config, run folder, output)}; tests that change a run work on `a_copy` of it."""
    def build(folder):
        backbone = tiny_llama_with_the_real_vocabulary(folder / "llama")
        out = {}
        for name, split in (("whole", 1), ("split", 2)):
            config = tiny_config(folder, f"sqlite:///{folder / 'mlflow.db'}", name,
                                 model={"backbone": str(backbone), "tokenizer": str(BACKBONE), "tensor_parallel": split,
                                        "num_layers": 4},
                                 train={"keep_checkpoints": 10}, eval={"speed": False}, export={"after_evaluate": True})
            shutil.copytree(finished_run[0] / "tokens", folder / name / "tokens")
            if split == 1:
                output = (run_command(stage_command("teacher-logits", config)).stdout
                          + run_command(stage_command("train-exits", config, ranks=2)).stdout)
            else:
                proc = run_command(pipeline_command(config, "--nproc", "2"))
                output = proc.stdout + proc.stderr
            out[name] = (config, folder / name, output)
        return out

    return built_once(tmp_path_factory, "tensor_parallel", build)


def a_copy(run: tuple, folder):
    """(config, run folder) of a copy of a run in `folder`, for a test that changes it."""
    config, original, _ = run
    copy = folder / original.name
    shutil.copytree(original, copy)
    path = folder / config.name
    path.write_text(config.read_text().replace(str(original), str(copy)))
    return path, copy


def test_split_teacher_writes_the_whole_one_s_targets(whole_and_split):
    (_, whole_run, _), (_, split_run, _) = whole_and_split["whole"], whole_and_split["split"]
    whole, ours = read_manifest(whole_run / "teacher", "teacher"), read_manifest(split_run / "teacher", "teacher")
    fmt = TargetFormat.from_manifest(whole, whole_run / "teacher")
    assert ours["backbone_fingerprint"] == whole["backbone_fingerprint"]
    same_ids = total = 0
    for split_name in ("train", "heldout"):
        for a_record, b_record in zip(whole["splits"][split_name]["shards"], ours["splits"][split_name]["shards"]):
            for a, b in zip(read_shard(whole_run / "teacher", a_record), read_shard(split_run / "teacher", b_record)):
                assert a["__key__"] == b["__key__"]
                a, b = (fmt.target(*fmt.decode(s[TARGETS_KEY], len(s["input_ids.npy"]))) for s in (a, b))
                equal = a.ids == b.ids
                same_ids, total = same_ids + int(equal.sum()), total + equal.numel()
                # one quantisation step at most, where a rounding tips over
                assert (a.logprobs - b.logprobs)[equal].abs().max() <= fmt.step * 1.001
    assert same_ids / total > 0.999, same_ids / total  # a draw or a k-th place may tip over, rarely


def test_split_training_takes_the_whole_one_s_steps_and_resumes(whole_and_split, tmp_path):
    """2 ranks, one group: each rank's exits on its own micro-batch, the prefix on both ranks' at once;
    the losses per step equal those of 2 ranks on whole backbones (the same data per rank)."""
    (_, whole_run, reference_output), output = whole_and_split["whole"], whole_and_split["split"][2]
    config, split_run = a_copy(whole_and_split["split"], tmp_path)
    assert "2 ranks (tensor-parallel groups of 2), ZeRO-2" in output
    ours, reference = losses_by_step(output), losses_by_step(reference_output)
    assert sorted(ours) == sorted(reference) == list(range(1, 11))
    for step in reference:
        assert ours[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-6), step
    # killed after step 6: resumed under tensor parallelism, it takes the same steps
    exits = split_run / "exits"
    weights = (exits / "exits.safetensors").read_bytes()
    for name in ("exits.safetensors", "balcony_config.json"):
        (exits / name).unlink()
    (exits / "checkpoints" / "latest").write_text("step00000006")
    resumed = run_command(stage_command("train-exits", config, ranks=2))
    assert "at step 6" in resumed.stdout
    assert losses_by_step(resumed.stdout) == {s: ours[s] for s in range(7, 11)}
    assert (exits / "exits.safetensors").read_bytes() == weights
    # the exits do not depend on the split: one whole process loads them, and scores them as the whole run's
    model = load_config(config).model
    backbone = load_backbone(dataclasses.replace(model, tensor_parallel=1))
    fingerprint = backbone_fingerprint(model, backbone)
    heldout = read_manifest(split_run / "teacher", "teacher")["splits"]["heldout"]["shards"][0]
    batch = {"input_ids.npy": torch.as_tensor(np.stack([s["input_ids.npy"] for s in read_shard(split_run / "teacher", heldout)]))}
    scores = []
    for run in (split_run, whole_run):
        exits = BalconyModel.from_pretrained(backbone, run / "exits", fingerprint)
        with torch.no_grad():  # exact KL to the full model, on held-out sequences
            scores.append(exit_losses(exits, exits.logits, exits.depths, batch, None, chunk=128).tolist())
    assert scores[0] == pytest.approx(scores[1], rel=1e-3, abs=1e-5), scores


def test_split_evaluate_and_export_score_as_a_whole_process(whole_and_split, tmp_path):
    """The split chain's evaluate (a group of 2) scores its exits as one whole process does, and its
    export (slices gathered) is the checkpoint plain transformers loads, with the exit's logits."""
    from transformers import AutoModelForCausalLM

    config, split_run = a_copy(whole_and_split["split"], tmp_path)
    rows = {r["name"]: r for r in json.loads((split_run / "eval" / "metrics.json").read_text())["rows"]}
    shutil.rmtree(split_run / "eval")
    code, _, err = run_in_process("evaluate", config, "model.tensor_parallel=1")
    assert code == 0, err
    whole = {r["name"]: r for r in json.loads((split_run / "eval" / "metrics.json").read_text())["rows"]}
    assert set(rows) == set(whole) and "exit@1" in rows
    for name, row in whole.items():
        for key in ("kl_to_full", "perplexity", "top1_agreement"):
            if key in row:
                assert rows[name][key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), (name, key)
    model = load_config(config).model
    backbone = load_backbone(dataclasses.replace(model, tensor_parallel=1))
    exits = BalconyModel.from_pretrained(backbone, split_run / "exits")
    exported = AutoModelForCausalLM.from_pretrained(split_run / "export" / "exit-1")
    ids = torch.randint(3, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, exits.view(1)(ids).logits, atol=1e-5)


def test_split_search_scores_its_candidates_as_a_whole_one(whole_and_split, tmp_path):
    """search-exits with exits.depths auto on 2 ranks: split in one group of 2, and whole (2 data-parallel
    ranks): the candidates train on the same data per rank, and rank 0's group scores them alike."""
    search = ["exits.depths=auto", "exits.count=1", "search.stride=1", "search.tokens=1024",
              "search.heldout_tokens=512", "search.cost=layers"]
    scores = {}
    for name in ("whole", "split"):
        folder = tmp_path / name
        folder.mkdir()
        config, run = a_copy(whole_and_split[name], folder)
        run_command(stage_command("search-exits", config, *search, ranks=2))
        scores[name] = {(r["kind"], r["depth"]): r for r in json.loads((run / "search" / "scores.json").read_text())["rows"]}
    assert set(scores["split"]) == set(scores["whole"]) and ("balcony", 2) in scores["whole"]
    for key, row in scores["whole"].items():
        assert scores["split"][key]["kl_to_full"] == pytest.approx(row["kl_to_full"], rel=1e-3, abs=1e-6), key
