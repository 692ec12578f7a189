"""`make plan`: the paper's recipe on the example GPU site, checked against the closed-form arithmetic
of a LLaMA-3-8B (its published config.json, configs/shapes/llama3-8b), and sites that cannot hold
it refused with the setting to change named."""
import math
import subprocess
import sys

import pytest
import yaml

from conftest import ONE_THREAD, ROOT, tiny_config
from pipeline.config import ClusterConfig, JobConfig, load_cluster_config, load_config
from pipeline.errors import ConfigError
from pipeline.launch import chain
from pipeline.plan import FIT, make_plan, parse_bytes, parse_time

LLAMA = str(ROOT / "configs/shapes/llama3-8b")
SITE = ROOT / "configs/cluster/example-gpu.yaml"

# LLaMA-3-8B by hand: d 4096, 32 layers, GQA 32 heads / 8 KV heads of 128, MLP 14336, vocabulary 128256
D, LAYERS, MLP, KV, VOCAB, SEQ = 4096, 32, 14336, 1024, 128256, 4096
LAYER = D * (D + KV + KV + D) + 3 * D * MLP + 2 * D  # q, k, v, o; gate, up, down; two RMSNorms
LAYER_FWD = 2 * LAYER + 2 * SEQ * D  # + causal attention: QK^T and AV over seq/2 positions on average
HEAD = 2 * D * VOCAB


def paper(*overrides: str):
    return load_config(ROOT / "configs/llama3-8b.yaml", [f"model.backbone={LLAMA}", *overrides])


def site(**changes) -> ClusterConfig:
    cluster = load_cluster_config(SITE)
    for key, value in changes.items():
        setattr(cluster, key, value)
    return cluster


def stage(plan, name):
    return next(s for s in plan.stages if s.stage == name)


def test_paper_recipe_fits_the_example_site_with_the_arithmetic_by_hand():
    cfg, cluster = paper(), site()
    plan = make_plan(cfg, cluster, chain(cfg))
    assert plan.problems == []
    assert plan.arch.total_params == 8_030_261_248 and plan.arch.layer_params[0] == LAYER

    teacher = stage(plan, "teacher-logits")
    assert teacher.flops_per_token == LAYERS * LAYER_FWD + HEAD  # ~16.1 GFLOP per token
    tokens = 31_500_000_000 + 4_194_304
    hours = tokens * teacher.flops_per_token / cluster.throughput.teacher_flops / 3600
    assert teacher.device_hours == pytest.approx(hours, rel=0.01)  # ~287 H200-hours, as the anchors say
    shards = math.ceil(31_500_000_000 / (512 * SEQ)) + 2
    assert teacher.tasks == math.ceil(hours / (4 * FIT))  # 90 tasks of a 4-hour limit
    assert teacher.wall_s <= 4 * 3600 * FIT and teacher.tasks <= shards

    train = stage(plan, "train-exits")  # prefix to 21, three exits of 3 layer-forwards + head forward and backward
    assert train.flops_per_token == 21 * LAYER_FWD + 3 * (3 * LAYER_FWD + 2 * HEAD)
    assert train.wall_s == pytest.approx(31.5e9 * train.flops_per_token / (16 * cluster.throughput.train_flops))
    memory = train.memory  # ZeRO-2: the whole backbone; bf16 weights, then gradients and fp32 states partitioned
    assert memory["backbone"] == 8_030_261_248 * 2 and train.comm_s == 0
    assert memory["exit states"] == pytest.approx(3 * LAYER * (2 + 14 / 16))
    assert sum(memory.values()) < 80 * 2**30
    zero3 = stage(make_plan(paper("train.zero_stage=3"), cluster, chain(cfg)), "train-exits")
    assert zero3.memory["backbone"] == pytest.approx((8_030_261_248 / 16 + 2 * LAYER + D * VOCAB) * 2)  # a share
    assert zero3.memory["exit states"] == pytest.approx(3 * LAYER * 16 / 16)  # all 16 bytes per parameter partitioned
    assert zero3.comm_s > 0  # the 21-layer prefix gathered every micro-batch

    # decode at batch 1 reads each weight once: the exit at 21 its 21 layers, its own and the (untied) head
    assert plan.arch.decode_weights(None) == LAYERS * LAYER + D * VOCAB
    assert plan.arch.decode_weights(21) == 22 * LAYER + D * VOCAB


def test_projected_speculative_speedup_is_leviathans_formula():
    from pipeline.timing import projected_speculative_speedup

    assert projected_speculative_speedup(0.4, 1, 0.4) == pytest.approx(1.0)  # (1 + a) / (1 + r): even at a = r
    assert projected_speculative_speedup(1.0, 4, 0.25) == pytest.approx(5 / 2)  # every draft kept: 5 tokens, 2 steps
    assert projected_speculative_speedup(0.5, 3, 0.2) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 1.6)
    assert projected_speculative_speedup(0.0, 3, 0.2) == pytest.approx(1 / 1.6)  # nothing kept: only the drafts' cost


def test_array_size_follows_the_time_limit():
    cfg = paper()
    short = make_plan(cfg, site(teacher=JobConfig(gpus_per_node=1, mem="64G", time="02:00:00")), chain(cfg))
    long = make_plan(cfg, site(teacher=JobConfig(gpus_per_node=1, mem="64G", time="08:00:00")), chain(cfg))
    assert short.problems == long.problems == []
    assert stage(short, "teacher-logits").tasks == pytest.approx(4 * stage(long, "teacher-logits").tasks, abs=4)


@pytest.mark.parametrize("change, knob", [
    ({"array_tasks": 16}, "set array_tasks to 90 or more"),  # the shipped array size of before: 18 h a task
    ({"teacher": JobConfig(gpus_per_node=1, mem="64G", time="00:01:00")}, "lower data.sequences_per_shard"),
    ({"teacher": JobConfig(gpus_per_node=1, mem="3000G", time="04:00:00")}, "teacher.mem: 3000G is more than a node's 2000G"),
    ({"train": JobConfig(nodes=2, tasks_per_node=8, gpus_per_node=8, mem="64G", time="48:00:00")}, "train.mem: 8 processes each load"),
    ({"train": JobConfig(nodes=2, tasks_per_node=8, cpus_per_task=16, gpus_per_node=8, mem="0", time="48:00:00")},
     "train.cpus_per_task: 8 x 16 cores"),
    ({"train": JobConfig(nodes=1, tasks_per_node=8, gpus_per_node=8, mem="0", time="12:00:00"), "requeue_grace_s": 0},
     "train.time: train-exits needs ~47.0 h"),
])
def test_infeasible_sites_are_refused_with_the_knob_named(change, knob):
    cfg = paper()
    plan = make_plan(cfg, site(**change), chain(cfg), site="example-gpu.yaml")
    assert any(knob in p for p in plan.problems), plan.problems


def test_memory_and_disk_refusals():
    cfg = paper("train.micro_batch_size=64")
    plan = make_plan(cfg, site(), chain(cfg))
    assert any("largest part is activations" in p and "lower train.micro_batch_size" in p for p in plan.problems)
    cfg = paper("train.zero_stage=0", "train.micro_batch_size=1")  # an 8B backbone and its exits on every GPU
    small_gpus = site()
    small_gpus.node.gpu_memory = "24G"
    plan = make_plan(cfg, small_gpus, chain(cfg))
    assert any("largest part is backbone" in p and "set model.tensor_parallel 4 (the smallest that fits: the backbone "
               "split across 4 GPUs of a node, at train.zero_stage 2)" in p for p in plan.problems), plan.problems
    small_disk = site()
    small_disk.node.disk = "2T"  # the sampled-64 targets alone are ~2.6 TiB, top-64's ~6.8 TiB
    assert any(p.endswith("lower data.train_tokens or teacher.samples, or free space") for p in
               make_plan(paper(), small_disk, chain(paper())).problems)
    assert any(p.endswith("lower data.train_tokens or teacher.k, or free space") for p in
               make_plan(paper("teacher.format=topk"), small_disk, chain(paper("teacher.format=topk"))).problems)


def test_requeue_lets_training_span_time_limits_but_not_a_checkpoint_interval():
    cfg = paper()
    one_node = JobConfig(nodes=1, tasks_per_node=8, gpus_per_node=8, mem="0", time="12:00:00")
    plan = make_plan(cfg, site(train=one_node), chain(cfg))
    assert plan.problems == [] and "requeues at the time limit" in stage(plan, "train-exits").note
    plan = make_plan(paper("train.checkpoint_every=20000"), site(train=one_node), chain(cfg))
    assert any("train.checkpoint_every" in p for p in plan.problems)


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("04:00:00", 14400), ("10:30", 630), ("2-00:00:00", 172800),
                                           ("1-12", 129600), ("1-00:30", 88200)])
def test_slurm_time_limits(text, seconds):
    assert parse_time(text, "t") == seconds


def test_slurm_sizes():
    assert parse_bytes("64G", "m") == 64 * 2**30 and parse_bytes("900", "m") == 900 * 2**20
    assert parse_bytes("2T", "m") == 2 * 2**40
    for bad in ("lots", "4 hours"):
        with pytest.raises(ConfigError, match="m: "):
            parse_bytes(bad, "m") if bad == "lots" else parse_time(bad, "m")


@pytest.mark.integration
def test_plan_command_prints_the_plan_or_refuses_in_one_line(tmp_path):
    command = [sys.executable, str(ROOT / "stages/run_pipeline.py"), "--config", str(ROOT / "configs/llama3-8b.yaml"),
               "--cluster", str(SITE), "--plan", f"model.backbone={LLAMA}"]
    fits = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "| teacher-logits | 31.5G | 16.1G |" in fits.stdout and "GPU-hours in all: 663" in fits.stdout
    assert "the head is 7% of a full-depth step, so no exit decodes more than 14.29x faster; exits at 15: 1.87x" in fits.stdout
    # self-speculative: drafts of 1 pay once a draft is kept more often than a draft step costs (its share of the weights)
    r15 = (16 * LAYER + D * VOCAB) / (LAYERS * LAYER + D * VOCAB)
    assert f"a projection (weight-bound" in fits.stdout and f"exit 15 pays from acceptance {r15:.2f}," in fits.stdout
    refused = subprocess.run([*command, "train.micro_batch_size=64"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lower train.micro_batch_size" in errors[0], refused.stderr[-2000:]


@pytest.mark.integration
def test_calibrate_measures_the_table_the_plan_reads(tmp_path, tracking_uri, assets):
    """`make calibrate` on a truncated real backbone: a throughput line the site config takes as is, and
    a plan of the same recipe on that site."""
    config = tiny_config(tmp_path, tracking_uri, "calibrate")
    run = [sys.executable, str(ROOT / "stages/run_pipeline.py"), "--config", str(config)]
    measured = subprocess.run([*run, "--calibrate"], capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert measured.returncode == 0, measured.stderr[-2000:]
    line = next(line for line in measured.stdout.splitlines() if line.startswith("throughput: "))
    rates = yaml.safe_load(line)["throughput"]
    assert set(rates) == {"tokenize_tokens_per_s", "teacher_flops", "evaluate_flops", "train_flops"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    site = tmp_path / "site.yaml"
    site.write_text((ROOT / "configs/cluster/local.yaml").read_text().split("\nthroughput:")[0] + "\n" + line + "\n")
    assert load_cluster_config(site).throughput.train_flops == pytest.approx(rates["train_flops"])
    plan = subprocess.run([*run, "--cluster", str(site), "--plan"], capture_output=True, text=True, cwd=ROOT)
    assert plan.returncode == 0 and "| teacher-logits |" in plan.stdout, plan.stderr[-2000:]


def test_memory_advice_names_a_knob_of_the_stage_in_the_right_direction():
    """The teacher holds the whole backbone: with GPUs smaller than it, no train.* knob helps it; a split
    across 4 GPUs does (2 would hold ~9.6 GiB of it, with the rest past 12G)."""
    cfg = paper("train.zero_stage=3")
    small_gpus = site()
    small_gpus.node.gpu_memory = "12G"  # the bf16 8B backbone alone is ~15 GiB
    problems = make_plan(cfg, small_gpus, chain(cfg)).problems
    teacher = [p for p in problems if "teacher-logits needs" in p]
    assert len(teacher) == 1 and "largest part is backbone" in teacher[0], problems
    assert "train." not in teacher[0] and teacher[0].endswith("set model.tensor_parallel 4 (the smallest that fits: "
                                                              "the backbone split across 4 GPUs of a node)")
    small_gpus.node.gpu_memory = "1G"
    teacher = [p for p in make_plan(cfg, small_gpus, chain(cfg)).problems if "teacher-logits needs" in p]
    assert teacher[0].endswith("no split across a node's GPUs (model.tensor_parallel) holds the backbone: use devices "
                               "with more memory")
    fp32 = paper("model.dtype=float32")
    teacher = [p for p in make_plan(fp32, small_gpus, chain(fp32)).problems if "teacher-logits needs" in p]
    assert teacher and teacher[0].endswith("set model.dtype bfloat16 (half the bytes)")


LLAMA_70B = str(ROOT / "configs/shapes/llama3-70b")


def seventy(*overrides: str):
    return load_config(ROOT / "configs/llama3-70b.yaml", [f"model.backbone={LLAMA_70B}", *overrides])


def test_70b_fits_split_in_fours_and_is_refused_whole_naming_the_split():
    """LLaMA-3-70B (its published shape): 131 GiB of bf16 weights, on 141 GB GPUs. Split in 4 every stage
    fits; whole, the plan names model.tensor_parallel for both stages that hold it."""
    cfg, cluster = seventy(), site()
    plan = make_plan(cfg, cluster, chain(cfg))
    assert plan.problems == [] and cfg.model.tensor_parallel == 4
    arch = plan.arch
    layers = arch.total_params - arch.head_params - arch.embedding_params
    per_rank = (layers / 4 + arch.embedding_params + arch.head_params * 5 / 4) * 2  # slices, embedding, head twice
    teacher, train = stage(plan, "teacher-logits"), stage(plan, "train-exits")
    assert teacher.memory["backbone"] == train.memory["backbone"] == pytest.approx(per_rank)  # ~36.3 GiB
    assert teacher.devices == 4 and teacher.job.tasks_per_node == 4 and teacher.job.mem == "256G"  # a group per task
    assert teacher.device_hours == pytest.approx(teacher.tasks * teacher.wall_s * 4 / 3600)
    # each layer all-reduces the hidden state twice per token: 2 x 2 x 3/4 x 8192 x 2 bytes, 80 layers
    assert arch.tensor_parallel_bytes(80, 4) == 80 * 2 * 2 * 3 / 4 * 8192 * 2 and teacher.tensor_parallel_s > 0
    assert train.tensor_parallel_s == pytest.approx(
        31.5e9 / 16 * 4 * arch.tensor_parallel_bytes(53, 4) / cluster.throughput.tensor_parallel_bytes_per_s)
    whole = make_plan(seventy("model.tensor_parallel=1"), cluster, chain(cfg)).problems
    split_advice = [p for p in whole if "largest part is backbone" in p]
    assert len(split_advice) == 2 and all("set model.tensor_parallel" in p for p in split_advice), whole
    assert whole[0] == split_advice[0] and "set model.tensor_parallel 4 " in whole[0]  # the refusal's one line
    three = make_plan(seventy("model.tensor_parallel=3"), cluster, chain(cfg)).problems
    assert three[0] == ("model.tensor_parallel: 3 does not divide the 64 attention heads and 8 KV heads; "
                        "choose one of [1, 2, 4, 8]")
