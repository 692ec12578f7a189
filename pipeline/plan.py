"""`make plan`: what the chain costs on a site, and whether it fits, before anything is queued.

Per stage: tokens, model FLOPs (counted on the backbone's own architecture, built without its
weights), wall time per task from the site's throughput per device, array tasks, device-hours,
bytes written, and memory per device of the jobs that hold the backbone. A chain that cannot fit
(a task past its time limit, memory past a node's, output past the disk) is refused with one line
naming the setting to change.

FLOPs per token, forward, 2 per multiply-add: a layer costs 2 x its parameters plus causal
attention, 2 x seq_len x attention width (QK^T and AV over seq_len / 2 positions on average;
sliding windows are counted as full, so long-context estimates err high); the head 2 x its
parameters. Training an exit costs 3x its layer's forward (forward; backward for inputs and
weights) and 2x the head (forward; input gradient only, it is frozen) on train.loss_positions of
the positions; the prefix up to the deepest exit runs forward only.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from pipeline.config import AUTO, ClusterConfig, Config, JobConfig
from pipeline.corpus import plan_shards
from pipeline.errors import ConfigError
from pipeline.registry import EVALUATE, SEARCH_EXITS, TEACHER_LOGITS, TOKENIZE, TRAIN_EXITS
from pipeline.targets import TargetFormat
from pipeline.timing import projected_speculative_speedup
from pipeline.training import uses_bf16

FIT = 0.8  # share of a time limit a task may plan to use: the rest absorbs startup and the estimate's error
GIB = 1 << 30
GPU_RUNTIME = 2 * GIB  # CUDA context and allocator slack per GPU
TOKEN_BYTES = 4  # int32 token ids in the shards
# A sampled cache stores each position's distinct draws, and a count for those drawn more than once: how
# many of each depends on how peaked the teacher is. Measured on the demo's teacher (SmolLM2-135M-Instruct on
# the embedded corpus; results/teacher-cache/formats.txt: 7.9, 13.2 and 21.9 distinct of 16, 32 and 64
# draws, 0.25-0.27 of them repeated; the demo's teacher manifest: 22.1 of 64 over its 139k tokens):
# ~DISTINCT_SCALE * n ** DISTINCT_POWER distinct tokens among n draws; a sharper teacher stores fewer.
DISTINCT_SCALE, DISTINCT_POWER, REPEATED_SHARE = 1.03, 0.74, 0.27


# ---------------------------------------------------------------- sizes and times as SLURM writes them


def parse_bytes(text: str, key: str) -> int:
    """SLURM sizes: "64G", "900M", "2T", a bare number in megabytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise ConfigError(f"{key}: {text!r} is not a size like 64G or 900M")
    return int(float(match[1]) * 1024 ** "KMGT".index(match[2] or "M") * 1024)


def parse_time(text: str, key: str) -> int:
    """SLURM time limits in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = text.strip().rpartition("-")
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or (days and not days.isdigit()) or not 1 <= len(parts) <= 3:
        raise ConfigError(f"{key}: {text!r} is not a time limit like 04:00:00 or 2-00:00:00")
    numbers = [int(p) for p in parts]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = (numbers + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    m, s = numbers if len(numbers) == 2 else (numbers[0], 0) if len(numbers) == 1 else (None, None)
    if m is None:
        h, m, s = numbers
        return (h * 60 + m) * 60 + s
    return m * 60 + s


def human(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{prefix}{unit}"
    return f"{n:.3g}{unit}"


def size(n: float) -> str:
    """Bytes in SLURM's binary units (its "64G" is 64 GiB)."""
    for power, prefix in ((5, "Pi"), (4, "Ti"), (3, "Gi"), (2, "Mi"), (1, "Ki")):
        if n >= 1024**power:
            return f"{n / 1024**power:.3g} {prefix}B"
    return f"{n:.0f} B"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


# ---------------------------------------------------------------- the backbone, counted


@dataclass(frozen=True)
class Architecture:
    name: str
    layer_params: tuple[int, ...]  # per decoder layer
    hidden: int
    attention_width: int  # heads x head_dim
    vocab: int
    head_params: int
    embedding_params: int  # the input embedding's, when it is not the head's own weight
    total_params: int
    dtype_bytes: int  # of the weights as the stages load them
    heads: int  # attention heads; a tensor-parallel split must divide them and the KV heads
    kv_heads: int

    @property
    def layers(self) -> int:
        return len(self.layer_params)

    def layer_flops(self, index: int, seq_len: int) -> float:
        return 2 * self.layer_params[index] + 2 * seq_len * self.attention_width

    def prefix_flops(self, depth: int, seq_len: int) -> float:
        return sum(self.layer_flops(i, seq_len) for i in range(depth))

    def forward_flops(self, seq_len: int) -> float:
        """The whole model's forward, head included: the teacher's work per token."""
        return self.prefix_flops(self.layers, seq_len) + self.head_flops

    def prefix_params(self, depth: int) -> int:
        return sum(self.layer_params[:depth])

    @property
    def head_flops(self) -> float:
        return 2 * self.head_params

    def decode_weights(self, depth: int | None) -> int:
        """Weights one decode step at batch 1 reads (each once, what bounds its time): every layer and the
        head for the full model (None); for an exit at `depth`, the layers before it, its own layer (the
        shape of the next one) and the head. The head's share is what no exit saves."""
        if depth is None:
            return self.prefix_params(self.layers) + self.head_params
        return self.prefix_params(depth) + self.layer_params[depth] + self.head_params

    def backbone_bytes(self, split: int) -> float:
        """The frozen backbone on one rank of a tensor-parallel group of `split`: a 1/split slice of every
        layer and of the head, the embedding whole, and the head whole once more (an exit's loss and the
        teacher score a rank's own positions with it: pipeline/decoder.py)."""
        if split == 1:
            return self.total_params * self.dtype_bytes
        layers = self.total_params - self.head_params - self.embedding_params
        return (layers / split + self.embedding_params + self.head_params * (1 + 1 / split)) * self.dtype_bytes

    def splits(self) -> list[int]:
        """The tensor-parallel sizes the backbone allows: the divisors of its heads and KV heads."""
        return [n for n in range(1, self.kv_heads + 1) if self.heads % n == 0 and self.kv_heads % n == 0]

    def tensor_parallel_bytes(self, depth: int, split: int) -> float:
        """What a rank of a group of `split` sends and receives per token through `depth` layers: two
        all-reduces of the hidden state per layer (after attention, after the MLP), a ring's 2(N-1)/N each."""
        return depth * 2 * 2 * (split - 1) / split * self.hidden * self.dtype_bytes


def architecture(cfg: Config, gpu: bool) -> Architecture:
    from pipeline.backbone import backbone_on_meta, resolve_dtype
    from pipeline.decoder import Decoder

    backbone = backbone_on_meta(cfg.model)
    decoder = Decoder(backbone)
    config = decoder.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = resolve_dtype(cfg.model, torch.device("cuda" if gpu else "cpu"))
    return Architecture(
        name=f"{type(backbone).__name__} ({cfg.model.backbone})",
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in decoder.layers),
        hidden=config.hidden_size, attention_width=config.num_attention_heads * head_dim,
        vocab=backbone.lm_head.weight.shape[0], head_params=backbone.lm_head.weight.numel(),
        embedding_params=0 if backbone.get_input_embeddings().weight is backbone.lm_head.weight else backbone.get_input_embeddings().weight.numel(),
        total_params=sum(p.numel() for p in backbone.parameters()), dtype_bytes=torch.empty(0, dtype=dtype).element_size(),
        heads=config.num_attention_heads, kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


# ---------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    stage: str
    job: JobConfig
    tokens: int
    flops_per_token: float
    tasks: int  # array tasks; 1 for a single job
    devices: int  # per task: GPUs, or processes of a CPU-only job
    wall_s: float  # per task
    bytes_written: int
    memory: dict[str, float] = field(default_factory=dict)  # per device, by part
    comm_s: float = 0.0  # ZeRO-3 gathers, overlapped with compute (wall is the larger)
    tensor_parallel_s: float = 0.0  # all-reduces of a split backbone, on the critical path (in wall)
    tensor_parallel_step_bytes: float = 0.0  # what one rank all-reduces per optimizer step (training)
    note: str = ""

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def device_hours(self) -> float:
        return self.wall_s * self.tasks * self.devices / 3600


@dataclass
class Plan:
    arch: Architecture
    stages: list[StagePlan]
    problems: list[str]  # each one line naming the setting to change

    def tasks(self, stage: str) -> int:
        return next((s.tasks for s in self.stages if s.stage == stage), 1)


def exit_flops(arch: Architecture, kind: str, seq_len: int) -> float:
    """One exit's forward: a decoder layer (a copy of the last), or a tuned lens's affine map."""
    return 2 * arch.hidden * (arch.hidden + 1) if kind == "tuned_lens" else arch.layer_flops(arch.layers - 1, seq_len)


def train_flops_per_token(arch: Architecture, depths: list[int], kind: str, loss_positions: float, online: bool,
                          seq_len: int) -> float:
    deepest = max(depths)
    flops = arch.prefix_flops(deepest, seq_len) + len(depths) * (
        3 * exit_flops(arch, kind, seq_len) + 2 * arch.head_flops * loss_positions)
    if online:  # the rest of the full forward and its head, every step
        flops += arch.prefix_flops(arch.layers, seq_len) - arch.prefix_flops(deepest, seq_len) + arch.head_flops
    return flops


def planned_shards(cfg: Config) -> list:
    """The shards as one read group lays them out: with more groups each group's last shard may be
    partial (at most read_groups - 1 more shards), and their sizes would need the hub's file list."""
    return plan_shards(dataclasses.replace(cfg.data, read_groups=1))


def planned_depths(cfg: Config, arch: Architecture) -> list[int]:
    """The exits' depths; with auto, the deepest candidates stand in (the search has not chosen yet)."""
    if cfg.exits.depths != AUTO:
        return cfg.exits.depths
    from pipeline.search import candidate_depths

    candidates = candidate_depths(cfg, arch.layers)
    return candidates[-(cfg.exits.count or len(candidates)):]


def trained_params(arch: Architecture, kind: str, exits: int) -> int:
    return (arch.hidden * (arch.hidden + 1) if kind == "tuned_lens" else arch.layer_params[-1]) * exits


def zero3_gathered_bytes(arch: Architecture, cfg: Config, depths: list[int]) -> float:
    """What each rank all-gathers per micro-batch under ZeRO-3: the prefix to the deepest exit, the
    embedding and the head, and the exits, each once (DeepSpeed keeps a gathered weight until its last
    reuse; measured by bench/zero3_gathers.py)."""
    exits = trained_params(arch, cfg.exits.kind, len(depths))
    return (arch.prefix_params(max(depths)) + arch.head_params + arch.embedding_params + exits) * arch.dtype_bytes


STATE_BYTES = 16  # per trained parameter: weights, gradients and AdamW states (bf16: + an fp32 master copy)


def memory_per_device(arch: Architecture, cfg: Config, depths: list[int], world: int, gpu: bool) -> dict[str, float]:
    """Peak memory of one training rank, by part: the frozen backbone (a 1/world share under ZeRO-3, plus
    the gathered layer in use, the next one prefetched and the head; a tensor-parallel slice), the exits'
    weights, gradients and AdamW states by ZeRO stage, the activations the exit layers keep for backward,
    one loss chunk, and one prefix layer's intermediates (split, for its whole group's inputs)."""
    b, zero, n, split = arch.dtype_bytes, cfg.train.zero_stage, len(depths), cfg.model.tensor_parallel
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    exit_params = trained_params(arch, cfg.exits.kind, n)
    bf16 = uses_bf16(cfg, torch.device("cuda" if gpu else "cpu"))
    param, grad, optim = (2, 2, 12) if bf16 else (4, 4, 8)  # bf16: fp32 master + AdamW m, v
    per_token_layer = arch.layer_params[-1] / arch.hidden  # ~ width of a layer's intermediates
    return {
        "backbone": (arch.total_params * b / world + (2 * max(arch.layer_params) + arch.head_params) * b
                     if zero == 3 else arch.backbone_bytes(split)),
        "exit states": exit_params * (param / (world if zero >= 3 else 1) + grad / (world if zero >= 2 else 1)
                                      + optim / (world if zero >= 1 else 1)),
        "activations": tokens * n * b * (4 / 3 * per_token_layer + 6 * arch.hidden),
        "loss chunk": cfg.train.chunk_size * arch.vocab * (b + 12),  # logits; fp32 log-softmax, target, gradient
        # one layer's intermediates for the group's stacked inputs, split; the other ranks' hidden states
        "prefix": tokens * (per_token_layer + (split - 1) * arch.hidden) * b,
        **({"runtime": GPU_RUNTIME} if gpu else {}),
    }


def teacher_memory(arch: Architecture, cfg: Config, gpu: bool) -> dict[str, float]:
    b, split = arch.dtype_bytes, cfg.model.tensor_parallel
    return {"backbone": arch.backbone_bytes(split),
            "activations": cfg.teacher.batch_size * cfg.data.seq_len * max(arch.layer_params) / arch.hidden / split * b,
            "head chunk": cfg.teacher.chunk_size * arch.vocab * (b + 12),
            **({"runtime": GPU_RUNTIME} if gpu else {})}


def group_job(job: JobConfig, split: int) -> JobConfig:
    """A job of one process (teacher-logits' array tasks, evaluate) as a tensor-parallel group: `split`
    processes on one node, each with the job's GPUs and cores, and `split` times its memory."""
    if split == 1:
        return job
    mebibytes = 0 if job.mem.strip() == "0" else parse_bytes(job.mem, "mem") * split // 2**20
    mem = "0" if not mebibytes else f"{mebibytes // 1024}G" if mebibytes % 1024 == 0 else f"{mebibytes}M"
    return dataclasses.replace(job, nodes=1, tasks_per_node=split, gpus_per_node=job.gpus_per_node * split, mem=mem)


@dataclass
class PlanContext:
    """What every stage's plan reads: the recipe, the site and the backbone; refusals collect in `problems`."""

    cfg: Config
    cluster: ClusterConfig
    arch: Architecture
    site: str  # how refusals name the site config
    gpu: bool
    problems: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.cluster.train.nodes * self.cluster.train.tasks_per_node

    @property
    def tokens(self) -> int:
        return self.cfg.data.train_token_count + self.cfg.data.heldout_tokens


def make_plan(cfg: Config, cluster: ClusterConfig, stages: list[str], site: str = "the site config") -> Plan:
    """The plan of `stages` (names, in chain order) on `cluster`; problems are collected, not raised."""
    gpu = cluster.teacher.gpus_per_node > 0 or cluster.train.gpus_per_node > 0
    ctx = PlanContext(cfg, cluster, architecture(cfg, gpu), site, gpu)
    split = cfg.model.tensor_parallel
    if split not in ctx.arch.splits():
        ctx.problems.append(f"model.tensor_parallel: {split} does not divide the {ctx.arch.heads} attention heads and "
                            f"{ctx.arch.kv_heads} KV heads; choose one of {ctx.arch.splits()}")
    if cluster.node.gpus and split > cluster.node.gpus:
        ctx.problems.append(f"model.tensor_parallel: a group of {split} ranks must sit on one node, which has "
                            f"{cluster.node.gpus} GPUs (node.gpus)")
    plans = []
    if TOKENIZE.name in stages:
        plans.append(tokenize_plan(ctx))
    if TEACHER_LOGITS.name in stages and cfg.reads_cached_targets():
        plans.append(teacher_plan(ctx))
    if SEARCH_EXITS.name in stages:
        plans.append(search_plan(ctx))
    if TRAIN_EXITS.name in stages:
        plans.append(train_plan(ctx))
    if EVALUATE.name in stages:
        plans.append(evaluate_plan(ctx))
    ctx.problems += resource_problems(ctx, plans)
    return Plan(ctx.arch, plans, ctx.problems)


def array_plan(ctx: PlanContext, stage: str, job: JobConfig, key: str, seconds_per_token: float, flops: float,
               written: int) -> StagePlan:
    """An array stage: tasks sized to fit the time limit (array_tasks 0) or checked against it. A task
    writes whole shards (a block of them), so its time is that of its share of shards."""
    specs, limit = planned_shards(ctx.cfg), parse_time(job.time, f"{key}.time")
    shard_s = ctx.cfg.data.sequences_per_shard * ctx.cfg.data.seq_len * seconds_per_token
    per_task = max(1, int(limit * FIT // shard_s))  # shards one task can write in time
    tasks = ctx.cluster.array_tasks or min(len(specs), math.ceil(len(specs) / per_task))
    wall = math.ceil(len(specs) / tasks) * shard_s
    if wall > limit * FIT:
        fix = (f"set array_tasks to {math.ceil(len(specs) / per_task)} or more (0: sized by the plan) or raise {key}.time"
               if shard_s <= limit * FIT else
               f"one shard takes ~{hours(shard_s)}: lower data.sequences_per_shard or raise {key}.time")
        ctx.problems.append(f"{ctx.site}: {key}.time: each of {tasks} {stage} tasks needs ~{hours(wall)}, over "
                            f"{FIT:.0%} of its {job.time} limit; {fix}")
    return StagePlan(stage, job, ctx.tokens, flops, tasks, max(1, job.gpus_per_node), wall, written)


def tokenize_plan(ctx: PlanContext) -> StagePlan:
    job, data = ctx.cluster.tokenize, ctx.cfg.data
    plan = array_plan(ctx, TOKENIZE.name, job, "tokenize",
                      1 / (ctx.cluster.throughput.tokenize_tokens_per_s * job.cpus_per_task), 0.0, ctx.tokens * TOKEN_BYTES)
    plan.note = "the time is tokenizing; " + ("every task reads the whole source (data.read_groups 1)"
                                              if data.read_groups == 1 else
                                              f"each task reads the read groups its shards come from (of {data.read_groups})")
    return plan


def teacher_plan(ctx: PlanContext) -> StagePlan:
    """Array tasks of one tensor-parallel group each: the forward split over its devices, plus the split's
    all-reduces (not overlapped: the next layer waits on them)."""
    arch, split, rates = ctx.arch, ctx.cfg.model.tensor_parallel, ctx.cluster.throughput
    fmt = TargetFormat(ctx.cfg.teacher, arch.vocab)
    distinct = min(fmt.entries, DISTINCT_SCALE * fmt.entries**DISTINCT_POWER) if fmt.kind == "sampled" else None
    target_bytes = fmt.bytes_per_position(distinct, REPEATED_SHARE)
    flops = arch.forward_flops(ctx.cfg.data.seq_len)
    all_reduce = arch.tensor_parallel_bytes(arch.layers, split) / rates.tensor_parallel_bytes_per_s
    plan = array_plan(ctx, TEACHER_LOGITS.name, group_job(ctx.cluster.teacher, split), "teacher",
                      flops / (split * rates.teacher_flops) + all_reduce, flops,
                      ctx.tokens * (target_bytes + TOKEN_BYTES))
    if distinct is not None:
        plan.note = (f"{target_bytes:.0f} target bytes per token: {distinct:.1f} distinct of {fmt.entries} draws per "
                     "position assumed (as SmolLM2-135M's, results/teacher-cache/; a sharper teacher stores fewer)")
    plan.tensor_parallel_s = all_reduce * plan.wall_s / (all_reduce + flops / (split * rates.teacher_flops))
    plan.memory = teacher_memory(arch, ctx.cfg, ctx.gpu)
    return plan


# (depths, exits.kind, share of positions the loss reads, whether the teacher runs online) of one set of exits
ExitRun = tuple[list[int], str, float, bool]


def exit_runs(ctx: PlanContext, depths: list[int]) -> list[ExitRun]:
    """What train-exits trains at `depths`: the exits, then each baseline."""
    return [(depths, c.exits.kind, c.train.loss_positions, not c.train.reads_cached_targets)
            for _, c, _ in ctx.cfg.exit_runs()]


def training_plan(ctx: PlanContext, stage: str, runs: list[ExitRun], train_tokens: int) -> StagePlan:
    """search- or train-exits: compute over the ranks, ZeRO-3's gathers beside it, memory, time limits."""
    cfg, job, world, seq = ctx.cfg, ctx.cluster.train, ctx.world, ctx.cfg.data.seq_len
    flops = sum(train_flops_per_token(ctx.arch, *run, seq) for run in runs)
    compute = train_tokens * flops / (world * ctx.cluster.throughput.train_flops)
    split = cfg.model.tensor_parallel  # each rank all-reduces for its group's inputs: split x its own tokens
    deepest = max(max(depths) for depths, *_ in runs)
    all_reduce = train_tokens / world * split * ctx.arch.tensor_parallel_bytes(deepest, split)
    compute += all_reduce / ctx.cluster.throughput.tensor_parallel_bytes_per_s
    comm = 0.0
    if cfg.train.zero_stage == 3 and world > 1:
        micro_batches = train_tokens / world / (cfg.train.micro_batch_size * seq)
        gathered = sum(zero3_gathered_bytes(ctx.arch, cfg, depths) for depths, *_ in runs)
        comm = micro_batches * gathered / ctx.cluster.throughput.network_bytes_per_s
    plan = StagePlan(stage, job, train_tokens, flops, 1, world, max(compute, comm), 0, comm_s=comm,
                     tensor_parallel_s=all_reduce / ctx.cluster.throughput.tensor_parallel_bytes_per_s,
                     tensor_parallel_step_bytes=all_reduce / max(1, train_tokens // cfg.train.tokens_per_step),
                     memory=memory_per_device(ctx.arch, cfg, runs[0][0], world, ctx.gpu))
    if job.tasks_per_node % split:
        ctx.problems.append(f"{ctx.site}: train.tasks_per_node: {job.tasks_per_node} ranks per node are not whole "
                            f"groups of model.tensor_parallel {split} (a group must sit on one node)")
    limit = parse_time(job.time, "train.time")
    if plan.wall_s <= limit * FIT:
        return plan
    if not ctx.cluster.requeue_grace_s:
        ctx.problems.append(f"{ctx.site}: train.time: {stage} needs ~{hours(plan.wall_s)} on {world} devices, over "
                            f"{FIT:.0%} of its {job.time} limit, and requeue_grace_s is 0; raise train.time or "
                            "train.nodes, or let it requeue (requeue_grace_s > 0)")
    else:
        plan.note = f"~{math.ceil(plan.wall_s / (limit * FIT)) - 1} requeues at the time limit, each resuming its checkpoint"
    step_s = plan.wall_s / max(1, train_tokens // cfg.train.tokens_per_step)
    if step_s * cfg.train.checkpoint_every > limit * FIT:
        ctx.problems.append(f"{ctx.site}: train.checkpoint_every: {cfg.train.checkpoint_every} steps take "
                            f"~{hours(step_s * cfg.train.checkpoint_every)}, past {FIT:.0%} of the {job.time} limit: "
                            "a requeued job would never reach a checkpoint; lower it")
    return plan


def search_plan(ctx: PlanContext) -> StagePlan:
    from pipeline.search import candidate_depths

    cfg = ctx.cfg
    candidates = candidate_depths(cfg, ctx.arch.layers)
    run = (candidates, cfg.exits.kind, cfg.search.loss_positions, not cfg.train.reads_cached_targets)
    return training_plan(ctx, SEARCH_EXITS.name, [run], cfg.search.tokens)


def train_plan(ctx: PlanContext) -> StagePlan:
    cfg, depths = ctx.cfg, planned_depths(ctx.cfg, ctx.arch)
    trained = cfg.train.max_steps * cfg.train.tokens_per_step or cfg.train.epochs * cfg.data.train_token_count
    plan = training_plan(ctx, TRAIN_EXITS.name, exit_runs(ctx, depths), trained)
    plan.bytes_written = trained_params(ctx.arch, cfg.exits.kind, len(depths)) * STATE_BYTES * cfg.train.keep_checkpoints
    return plan


def evaluate_plan(ctx: PlanContext) -> StagePlan:
    """One forward of the full model, then every exit and baseline, and the logit lens, per token scored."""
    cfg, arch, seq = ctx.cfg, ctx.arch, ctx.cfg.data.seq_len
    scored = cfg.data.heldout_tokens + len(cfg.eval.data) * cfg.eval.data_tokens
    depths, trained_sets = planned_depths(cfg, arch), len(cfg.exit_runs())
    per_token = (arch.forward_flops(seq)
                 + len(depths) * (trained_sets * (exit_flops(arch, "balcony", seq) + arch.head_flops) + arch.head_flops))
    job = group_job(ctx.cluster.evaluate, cfg.model.tensor_parallel)
    return StagePlan(EVALUATE.name, job, scored, per_token, 1, max(1, job.gpus_per_node),
                     scored * per_token / (cfg.model.tensor_parallel * ctx.cluster.throughput.evaluate_flops), 0,
                     note="+ decode-speed measurements (eval.speed)" if cfg.eval.speed else "")


def smallest_split(ctx: PlanContext, stage: str, limit: float) -> int | None:
    """The smallest model.tensor_parallel (a divisor of the heads, within a node's GPUs) whose memory per
    device fits `limit` for `stage` (training at ZeRO-2: a split backbone is not also partitioned)."""
    for split in ctx.arch.splits():
        if split > max(1, ctx.cluster.node.gpus):
            break
        cfg = dataclasses.replace(ctx.cfg, model=dataclasses.replace(ctx.cfg.model, tensor_parallel=split),
                                  train=dataclasses.replace(ctx.cfg.train, zero_stage=min(ctx.cfg.train.zero_stage, 2)))
        teacher = stage == TEACHER_LOGITS.name
        memory = (teacher_memory(ctx.arch, cfg, ctx.gpu) if teacher else
                  memory_per_device(ctx.arch, cfg, planned_depths(cfg, ctx.arch), ctx.world, ctx.gpu))
        job = group_job(ctx.cluster.teacher, split) if teacher else ctx.cluster.train
        if sum(memory.values()) <= limit and not host_problem(ctx, job, "teacher" if teacher else "train", split):
            return split
    return None


def memory_advice(ctx: PlanContext, stage: str, part: str, limit: float) -> str:
    """What lowers the largest part of a stage's memory per device: a knob of that stage, its direction."""
    if part == "backbone":
        if stage == TEACHER_LOGITS.name and ctx.arch.dtype_bytes > 2:
            return "set model.dtype bfloat16 (half the bytes)"
        split = smallest_split(ctx, stage, limit)
        if split is not None and split > ctx.cfg.model.tensor_parallel:
            return (f"set model.tensor_parallel {split} (the smallest that fits: the backbone split across {split} "
                    "GPUs of a node" + (", at train.zero_stage 2)" if stage != TEACHER_LOGITS.name else ")"))
        if stage == TEACHER_LOGITS.name:
            return "no split across a node's GPUs (model.tensor_parallel) holds the backbone: use devices with more memory"
        return "set train.zero_stage 3 (it shards the backbone over the ranks)"
    if stage == TEACHER_LOGITS.name:
        return {"activations": "lower teacher.batch_size", "head chunk": "lower teacher.chunk_size"}.get(
            part, "raise teacher.mem")
    return {"exit states": "raise train.zero_stage (it shards the exits' optimizer states)",
            "activations": "lower train.micro_batch_size", "prefix": "lower train.micro_batch_size",
            "loss chunk": "lower train.chunk_size"}.get(part, "raise train.mem")


def host_problem(ctx: PlanContext, job: JobConfig, key: str, split: int) -> str:
    """On a GPU site each rank loads its slice of the backbone (all of it, unsplit) on the host: refused
    when the job's processes on a node need more than it asks for."""
    node_memory = parse_bytes(ctx.cluster.node.memory, "node.memory") if ctx.cluster.node.memory else 0
    asked = parse_bytes(job.mem, f"{key}.mem") if job.mem.strip() != "0" else node_memory
    host = job.tasks_per_node * ctx.arch.backbone_bytes(split)
    if asked and host > asked:
        return (f"{ctx.site}: {key}.mem: {job.tasks_per_node} processes each load {size(host / job.tasks_per_node)} "
                f"of the backbone on the host, more than {job.mem}; raise it (\"0\": the whole node)")
    return ""


def resource_problems(ctx: PlanContext, plans: list[StagePlan]) -> list[str]:
    """Requests a node cannot grant, memory a device or node cannot hold, output the disk cannot take."""
    node, problems, site = ctx.cluster.node, [], ctx.site
    key_of = {TOKENIZE.name: "tokenize", TEACHER_LOGITS.name: "teacher", SEARCH_EXITS.name: "train",
              TRAIN_EXITS.name: "train", EVALUATE.name: "evaluate"}
    node_memory = parse_bytes(node.memory, "node.memory") if node.memory else 0
    for plan in plans:
        key, job = key_of[plan.stage], plan.job
        if node.gpus and job.gpus_per_node > node.gpus:
            problems.append(f"{site}: {key}.gpus_per_node: {job.gpus_per_node} is more than a node's {node.gpus} (node.gpus)")
        if node.cpus and job.tasks_per_node * job.cpus_per_task > node.cpus:
            problems.append(f"{site}: {key}.cpus_per_task: {job.tasks_per_node} x {job.cpus_per_task} cores is more than "
                            f"a node's {node.cpus} (node.cpus)")
        asked = parse_bytes(job.mem, f"{key}.mem") if job.mem.strip() != "0" else node_memory
        if node_memory and asked > node_memory:
            problems.append(f"{site}: {key}.mem: {job.mem} is more than a node's {node.memory} (node.memory); lower it")
        if not plan.memory:
            continue
        per_device = sum(plan.memory.values())
        if ctx.gpu:
            limit = parse_bytes(node.gpu_memory, "node.gpu_memory") if node.gpu_memory else 0
            host = host_problem(ctx, job, key, ctx.cfg.model.tensor_parallel)
        else:  # a CPU-only job: a rank's share of the node's memory is its device memory
            limit, host = (asked / job.tasks_per_node if asked else 0), ""
        if limit and per_device > limit:
            biggest = max(plan.memory, key=plan.memory.get)
            problems.append(f"{site}: {plan.stage} needs ~{size(per_device)} per device, more than its "
                            f"{size(limit)}; the largest part is {biggest} ({size(plan.memory[biggest])}): "
                            + memory_advice(ctx, plan.stage, biggest, limit))
        if host:  # after the device's: what fixes that may fix this
            problems.append(host)
    if node.disk:
        written = sum(p.bytes_written for p in plans)
        if written > parse_bytes(node.disk, "node.disk"):
            entries = "teacher.k" if ctx.cfg.teacher.format == "topk" else "teacher.samples"
            problems.append(f"{site}: node.disk: the run writes ~{size(written)}, more than the {node.disk} free; "
                            f"lower data.train_tokens or {entries}, or free space")
    return problems


def plan_table(plan: Plan, cfg: Config, cluster: ClusterConfig) -> str:
    arch, lines = plan.arch, []
    split = cfg.model.tensor_parallel
    lines.append(f"backbone: {arch.name}: {arch.layers} layers, hidden {arch.hidden}, vocabulary {arch.vocab:,}, "
                 f"{arch.total_params / 1e9:.2f}B parameters ({arch.dtype_bytes} bytes each)"
                 + (f"; tensor parallel {split}: {size(arch.backbone_bytes(split))} of it per device and host process"
                    if split > 1 else ""))
    lines.append(f"data: {cfg.data.train_token_count:,} train + {cfg.data.heldout_tokens:,} held-out tokens, "
                 f"{len(planned_shards(cfg)):,} shards of {cfg.data.sequences_per_shard} x {cfg.data.seq_len}"
                 + (f" (read groups add up to {cfg.data.read_groups - 1} partial shards)" if cfg.data.read_groups > 1 else ""))
    lines.append("")
    lines.append("| stage | tokens | FLOP/token | FLOPs | tasks x devices | wall per task | limit | device-hours | written |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for s in plan.stages:
        device = "GPU" if s.job.gpus_per_node else ("CPU task" if s.stage != TOKENIZE.name else f"task of {s.job.cpus_per_task} cores")
        lines.append(f"| {s.stage} | {human(s.tokens)} | {human(s.flops_per_token) if s.flops_per_token else '-'} | "
                     f"{human(s.flops) if s.flops_per_token else '-'} | {s.tasks} x {s.devices} {device} | {hours(s.wall_s)} | "
                     f"{s.job.time} | {s.device_hours:,.1f} | {size(s.bytes_written) if s.bytes_written else '-'} |")
    lines.append("")
    for s in plan.stages:
        if s.memory:
            parts = ", ".join(f"{k} {size(v)}" for k, v in s.memory.items())
            lines.append(f"{s.stage}: memory per device ~{size(sum(s.memory.values()))} ({parts})")
        if s.tensor_parallel_s:
            per_step = f", {size(s.tensor_parallel_step_bytes)} per rank per step" if s.tensor_parallel_step_bytes else ""
            lines.append(f"{s.stage}: tensor-parallel all-reduces ~{hours(s.tensor_parallel_s)} of the wall time at "
                         f"{human(cluster.throughput.tensor_parallel_bytes_per_s)}B/s (groups of {cfg.model.tensor_parallel}"
                         f"{per_step})")
        if s.comm_s:
            lines.append(f"{s.stage}: ZeRO-3 gathers ~{hours(s.comm_s)} at {human(cluster.throughput.network_bytes_per_s)}B/s, "
                         f"overlapped with ~{hours(s.tokens * s.flops_per_token / (s.devices * cluster.throughput.train_flops))} of compute")
        if s.note:
            lines.append(f"{s.stage}: {s.note}")
    full, depths = arch.decode_weights(None), planned_depths(cfg, arch)
    lines.append(f"decode at batch 1 (bound by the weights it reads): the head is {arch.head_params / full:.0%} of a "
                 f"full-depth step, so no exit decodes more than {full / arch.head_params:.2f}x faster; exits at "
                 + ", ".join(f"{d}: {full / arch.decode_weights(d):.2f}x" for d in depths)
                 + (" (the deepest candidates: exits.depths is auto)" if cfg.exits.depths == AUTO else ""))
    drafts = range(1, 9)
    lines.append("self-speculative decoding at batch 1, a projection (weight-bound: a draft step reads the exit's "
                 "weights, a verification of a few positions all weights once; acceptance independent per draft): "
                 + "; ".join(f"exit {d} pays from acceptance {arch.decode_weights(d) / full:.2f}, at 0.6 / 0.8 / 0.9 "
                             + " / ".join(f"{max(projected_speculative_speedup(a, n, arch.decode_weights(d) / full) for n in drafts):.2f}x"
                                          for a in (0.6, 0.8, 0.9)) for d in depths))
    total = sum(s.device_hours for s in plan.stages if s.job.gpus_per_node)
    if total:
        lines.append(f"GPU-hours in all: {total:,.0f}")
    lines.append("")
    lines += [f"does not fit: {p}" for p in plan.problems] or ["fits: every task within its time limit, "
                                                            "memory and requests within a node"]
    return "\n".join(lines)
