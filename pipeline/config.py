"""One YAML recipe per run, loaded into typed dataclasses and validated in one place.

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-4", "run.dir=/tmp/x"])

Unknown keys, wrong types and out-of-range values raise ConfigError naming the key path
(`train.lr: expected a float, got 'abc'`). Ranges live next to each field as metadata.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.registry import TRAIN_EXITS


def _num(default, *, ge=None, gt=None, le=None, lt=None, execution=False):
    """A numeric field with its range. `execution=True`: how a run executes, not what it computes (batch
    and chunk sizes, checkpoint cadence): left out of the config hash, so it may change on resume."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "execution": execution})


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    """The run directory RUN: RUN/tokens, RUN/teacher, RUN/exits, RUN/eval, RUN/logs."""
    experiment: str = "balcony"
    """MLflow experiment name."""
    tracking_uri: str = ""
    """MLflow store; empty: the sqlite file RUN/../mlflow.db, shared by sibling runs."""


@dataclass
class ModelConfig:
    backbone: str = ""
    """The frozen decoder LM: a local HF folder (safetensors) or a hub name."""
    tokenizer: str = ""
    """Tokenizer folder or hub name; empty: the backbone's own."""
    revision: str = ""
    """Hub revision of the backbone; empty: the default branch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Backbone weights' dtype; auto: bf16 on GPU, fp32 on CPU."""
    num_layers: int = _num(0, ge=0)
    """Keep only the first N layers (fast tests); 0 keeps all."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (never by default)."""
    tensor_parallel: int = _num(1, gt=0, execution=True)
    """Split the frozen backbone across groups of this many ranks (GPUs of a node), for a backbone too large
    for one device; the exits train data-parallel across all ranks. Must divide the attention and KV heads."""

    def validate(self, path: str) -> None:
        if not self.backbone:
            raise ConfigError(f"{path}.backbone: required (a local HF model folder or a hub name)")


@dataclass
class DataConfig:
    source: Literal["text", "json", "parquet", "hub"] = "json"
    """Where documents come from: local files of one format, or a hub dataset (streamed)."""
    files: list[str] = field(default_factory=list)
    """Local files or globs (text, json, parquet)."""
    hub_name: str = ""
    """Hub dataset, e.g. HuggingFaceTB/smollm-corpus."""
    hub_config: str = ""
    """Hub dataset configuration, e.g. cosmopedia-v2."""
    hub_split: str = "train"
    """Hub dataset split."""
    text_field: str = "text"
    """The record field holding a document's text (json, parquet, hub)."""
    text_sample_by: Literal["document", "paragraph", "line"] = "document"
    """What one document is in a .txt file."""
    prompt_field: str = ""
    """With chat_template: the field of the prompt; records become (prompt, text) conversations."""
    chat_template: bool = False
    """Format each record with the tokenizer's chat template (as the reference code does for cosmopedia)."""
    train_tokens: int = _num(0, ge=0)
    """Train tokens to write; give this or train_fraction."""
    train_fraction: float = _num(0.0, ge=0.0, le=1.0)
    """Train tokens as a fraction of reference_tokens (the paper: 0.2% of 15T)."""
    reference_tokens: int = _num(0, ge=0)
    """The backbone's pretraining tokens, for train_fraction."""
    heldout_fraction: float = _num(0.01, gt=0.0, lt=1.0)
    """Share of documents held out (never trained on)."""
    heldout_tokens: int = _num(65536, gt=0)
    """Held-out tokens written to RUN/tokens/heldout."""
    seq_len: int = _num(512, ge=8)
    """Tokens per packed sequence."""
    sequences_per_shard: int = _num(256, gt=0)
    """Sequences per shard: the unit of work, resume and task splitting."""
    seed: int = _num(0, ge=0)
    """Document order and held-out choice."""
    shuffle_buffer: int = _num(10000, ge=0)
    """Streaming shuffle buffer in documents; 0 keeps the source's order."""
    read_groups: int = _num(1, ge=1)
    """The source's files (local files, or a hub dataset's data files) cut into this many groups, in
    order; each group fills its own shards, in proportion to its size, from its own documents, so a
    tokenize task reads only the groups its shards come from and a group's shards commit when it is
    packed. 1: any document may land in any shard (the best mix, for files of different styles)."""
    # Execution: with the same files, a run that succeeds makes the same shards either way.
    on_bad_record: Literal["error", "skip"] = field(default="error", metadata={"execution": True})
    """A record that cannot be a document (bad JSON, a binary or empty file, no text or not a string):
    error refuses the first (FILE:LINE) before anything is written; skip leaves such records out and
    counts them in the manifest (skipped_records)."""

    def validate(self, path: str) -> None:
        if self.source == "hub":
            if not self.hub_name:
                raise ConfigError(f"{path}.hub_name: required when {path}.source is 'hub'")
        elif not self.files:
            raise ConfigError(f"{path}.files: required when {path}.source is '{self.source}'")
        if self.chat_template and not self.prompt_field:
            raise ConfigError(f"{path}.prompt_field: required when {path}.chat_template is true")
        if (self.train_tokens > 0) == (self.train_fraction > 0):
            raise ConfigError(f"{path}.train_tokens: give exactly one of train_tokens and train_fraction (> 0)")
        if self.train_fraction > 0 and self.reference_tokens <= 0:
            raise ConfigError(f"{path}.reference_tokens: required (> 0) with {path}.train_fraction")
        if self.train_token_count < self.seq_len:
            raise ConfigError(f"{path}.train_tokens: {self.train_token_count} tokens are below one sequence ({self.seq_len})")

    @property
    def train_token_count(self) -> int:
        return self.train_tokens or round(self.train_fraction * self.reference_tokens)


AUTO = "auto"  # exits.depths: chosen by the search-exits stage


@dataclass
class ExitsConfig:
    depths: list[int] | Literal["auto"] = field(default_factory=list)
    """Exit depths: exit k reads the hidden state after layers[:k]; auto: the search-exits stage chooses them
    (exits.count or exits.budgets; its settings under search)."""
    kind: Literal["balcony", "tuned_lens"] = "balcony"
    """balcony: a decoder layer + norm per exit; tuned_lens: an affine map into the frozen final norm (a baseline)."""
    init: Literal["last_layer", "next_layer"] = "last_layer"
    """last_layer (the paper's): a copy of the last layer + layers[k].input_layernorm; next_layer: a copy of
    layers[k] + the final norm (an untrained exit k is the logit lens at depth k+1)."""

    count: int = _num(0, ge=0)
    """depths auto: keep this many exits, those that minimise the mean KL to the full model over compute budgets
    spread evenly from the cheapest candidate to the full model."""
    budgets: list[float] = field(default_factory=list)
    """depths auto: relative costs in (0, 1); for each, keep the best candidate that costs no more."""

    def validate(self, path: str) -> None:
        if self.depths == AUTO:
            if bool(self.count) == bool(self.budgets):
                raise ConfigError(f"{path}.depths: auto needs {path}.count (how many exits) or {path}.budgets "
                                  f"(relative costs), one of them")
            if any(not 0 < b < 1 for b in self.budgets):
                raise ConfigError(f"{path}.budgets: each must be in (0, 1), got {self.budgets}")
            return
        if self.count or self.budgets:
            raise ConfigError(f"{path}.count / {path}.budgets: only with {path}.depths auto")
        if any(k < 1 for k in self.depths):
            raise ConfigError(f"{path}.depths: every depth must be >= 1, got {self.depths}")
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"{path}.depths: duplicate depths in {self.depths}")


@dataclass
class SearchConfig:
    """exits.depths auto: how the search-exits stage trains and scores its candidate exits."""

    first: float = _num(0.25, gt=0.0, lt=1.0)
    """Shallowest candidate, as a share of the backbone's layers (rounded up)."""
    last: float = _num(0.9, gt=0.0, lt=1.0)
    """Deepest candidate, as a share of the layers (rounded down, below the last layer)."""
    stride: int = _num(2, gt=0)
    """Layers between candidates."""
    tokens: int = _num(32768, gt=0)
    """Train tokens the candidates learn from, all at once: the end of the train split's epoch order. train-exits
    then trains on the rest, starting each chosen exit from its candidate: the budget is read once."""
    loss_positions: float = _num(0.25, gt=0.0, le=1.0)
    """The candidates' train.loss_positions: the head and loss dominate a candidate's cost, so they learn from a
    random share of each micro-batch's positions."""
    heldout_tokens: int = _num(4096, gt=0)
    """Held-out tokens each candidate is scored on (KL to the full model, top-1 agreement, perplexity)."""
    cost: Literal["measured", "layers"] = "measured"
    """A candidate's relative cost: measured: decode latency at batch 1 (a line fitted over the candidates and
    the full model: the head and embedding count); layers: layers run / L."""

    def validate(self, path: str) -> None:
        if self.first > self.last:
            raise ConfigError(f"{path}.first: {self.first} is above {path}.last {self.last}")


@dataclass
class TeacherConfig:
    format: Literal["topk", "sampled"] = "topk"
    """topk: the k most likely tokens + a rest bucket (biased); sampled: draws from the teacher (unbiased)."""
    k: int = _num(64, gt=0)
    """Top-k entries per position."""
    samples: int = _num(24, gt=0)
    """Draws per position (sampled); each distinct token drawn is stored once, with its count."""
    logprob_bits: int = _num(12, ge=4, le=16)
    """Bits per quantised log-prob, on [-24, 0] nats. Top-k weighs its ids by them; a sampled target's gradient
    never reads them (only its logged loss does), so 8 train the same exits as 12."""
    fidelity_positions: int = _num(64, ge=0)
    """Positions per batch checked against the full distribution (logged, not stored)."""
    seed: int = _num(0, ge=0)
    """Draws of the sampled format."""
    batch_size: int = _num(8, gt=0, execution=True)
    """Sequences per backbone forward."""
    chunk_size: int = _num(1024, gt=0, execution=True)
    """Positions per head + log-softmax chunk (bounds the [positions, vocab] logits)."""


@dataclass
class TrainConfig:
    lr: float = _num(5e-4, gt=0.0)
    """AdamW's peak learning rate."""
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    """cosine: decay over the steps after warmup; wsd: warmup, constant, then a linear decay over the last
    decay_fraction of the steps; constant: no decay."""
    warmup_fraction: float = _num(0.01, ge=0.0, lt=1.0)
    """Share of the steps in linear warmup."""
    decay_fraction: float = _num(0.2, gt=0.0, le=1.0)
    """wsd: share of the steps in the final decay."""
    min_lr_ratio: float = _num(0.0, ge=0.0, le=1.0)
    """Where the decay ends, as a fraction of lr."""
    weight_decay: float = _num(0.0, ge=0.0)
    """AdamW's weight decay."""
    adam_beta2: float = _num(0.999, gt=0.0, lt=1.0)
    """AdamW's second-moment decay (0.95 adapts faster in short runs)."""
    grad_clip: float = _num(1.0, ge=0.0)
    """Gradient norm clipping; 0: none."""
    tokens_per_step: int = _num(1_048_576, gt=0)
    """Global batch in tokens (seq_len x micro_batch_size x ranks x accumulation)."""
    micro_batch_size: int = _num(8, gt=0)
    """Sequences per process per micro-step."""
    zero_stage: int = _num(2, ge=0, le=3)
    """DeepSpeed ZeRO stage (settings in configs/deepspeed/zeroN.json)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """DeepSpeed's precision; auto: bf16 on GPU, fp32 on CPU."""
    autocast_bf16: bool = False
    """bf16 autocast of the matmuls (prefix, exits, head) with fp32 weights and losses: ~2x on CPUs with
    avx512_bf16 or AMX; on a GPU, precision bf16 already runs in bf16."""
    checkpoint_every: int = _num(200, gt=0, execution=True)
    """Optimizer steps between checkpoints."""
    keep_checkpoints: int = _num(2, gt=0, execution=True)
    """Checkpoints kept."""
    max_steps: int = _num(0, ge=0)
    """Optimizer steps; 0: `epochs` passes over the data."""
    epochs: int = _num(1, gt=0)
    """Passes over the data when max_steps is 0. A second pass over cached targets costs no teacher time
    and, at a demo's budget, gains nearly what as many fresh tokens do (results/exit-study)."""
    snapshots: list[int] = field(default_factory=list, metadata={"execution": True})
    """Steps at which the exits are also exported to OUT/snapshots/stepNNNNNNNN (a learning curve from one
    run, each point scored by the evaluate stage); may be added to a run under way."""
    chunk_size: int = _num(1024, gt=0, execution=True)
    """Positions per head + loss chunk (bounds the [positions, vocab] logits)."""
    loss_positions: float = _num(1.0, gt=0.0, le=1.0)
    """Share of each micro-batch's positions the loss reads (a seeded random subset, the same for every exit):
    the exit layers still see every position; the head and loss cost this share."""
    num_workers: int = _num(0, ge=0, le=1)
    """0: read and decode the shards in the training process; 1: in one background process (same order)."""
    online_teacher: bool = False
    """The backbone's own full forward each step (exact KL) instead of RUN/teacher."""
    objective: Literal["kl", "ce"] = "kl"
    """kl: self-distillation; ce: next-token cross-entropy (the EE-Tuning baseline)."""
    baselines: list[Literal["tuned_lens", "ce"]] = field(default_factory=list)
    """Trained after the exits, same data and recipe, into RUN/baselines/NAME: tuned_lens and ce exits;
    evaluate scores them beside the exits."""
    seed: int = _num(0, ge=0)
    """Data order and initialisation."""

    @property
    def reads_cached_targets(self) -> bool:
        """Whether the exits learn from RUN/teacher (neither the online teacher nor CE needs it)."""
        return self.objective == "kl" and not self.online_teacher

    def validate(self, path: str) -> None:
        if any(step < 1 for step in self.snapshots):
            raise ConfigError(f"{path}.snapshots: steps must be >= 1, got {self.snapshots}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError(f"{path}.baselines: duplicate names in {self.baselines}")
        if self.baselines and self.zero_stage == 3:  # a second engine cannot re-partition the shared backbone
            raise ConfigError(f"{path}.baselines: not with {path}.zero_stage 3; train them in a run of their own "
                              f"(train.objective=ce or exits.kind=tuned_lens) and name it in eval.baselines")


@dataclass
class EvalConfig:
    max_sequences: int = _num(0, ge=0)
    """Held-out sequences to score; 0: all."""
    batch_size: int = _num(4, gt=0, execution=True)
    """Sequences per forward."""
    chunk_size: int = _num(1024, gt=0, execution=True)
    """Positions per head chunk."""
    baselines: list[str] = field(default_factory=list)
    """Exported folders (a tuned lens, CE exits) scored beside the exits."""
    speed: bool = True
    """Measure decode latency, self-speculative decoding and HF assisted generation; false: quality only."""
    data: list[str] = field(default_factory=list)
    """More data to score quality on: a tokenize output folder (its held-out split) or text files
    (.jsonl/.json/.txt/.parquet, globs)."""
    data_tokens: int = _num(16384, gt=0)
    """Tokens scored from each eval.data entry."""
    prompt_tokens: int = _num(32, gt=0)
    """Decode latency: prompt length."""
    new_tokens: int = _num(32, ge=2)
    """Decode latency: tokens generated."""
    latency_batches: list[int] = field(default_factory=lambda: [1, 8])
    """Decode latency: batch sizes."""
    repeats: int = _num(3, gt=0)
    """Timings per measurement (the median is kept)."""
    draft_tokens: int = _num(4, gt=0)
    """Fixed drafts: tokens an exit drafts per round in self-speculative decoding and HF assisted generation."""
    speculative_prompts: int = _num(8, gt=0)
    """Self-speculative decoding: held-out prompts measured (the first prompt_tokens of as many sequences; as
    many more, if there are, choose the confidence-stopped policy)."""
    speculative_batches: list[int] = field(default_factory=lambda: [1, 4, 8])
    """Self-speculative decoding: batch sizes measured (greedy; sampled at batch 1); 1 must be among them."""
    draft_taus: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    """Confidence-stopped drafts: the taus (stop below this top-1 probability) the choice is made among."""
    max_drafts: list[int] = field(default_factory=lambda: [2, 4, 8])
    """Confidence-stopped drafts: the draft caps the choice is made among."""
    sampling_temperature: float = _num(1.0, gt=0)
    """Self-speculative decoding: the temperature of the sampled measurements (no top-k or top-p cut)."""

    def validate(self, path: str) -> None:
        for name, values, ok in (("latency_batches", self.latency_batches, lambda b: b >= 1),
                                 ("speculative_batches", self.speculative_batches, lambda b: b >= 1),
                                 ("max_drafts", self.max_drafts, lambda d: d >= 1),
                                 ("draft_taus", self.draft_taus, lambda t: 0 < t < 1)):
            if not values or not all(ok(v) for v in values):
                raise ConfigError(f"{path}.{name}: {values} is not a non-empty list of "
                                  + ("taus in (0, 1)" if name == "draft_taus" else "integers >= 1"))
        if 1 not in self.speculative_batches:  # batch 1 chooses what generate(speculative=True) uses
            raise ConfigError(f"{path}.speculative_batches: {self.speculative_batches} must include 1")


@dataclass
class ExportConfig:
    depths: list[int] = field(default_factory=list)
    """Exits that export-exits writes as standalone HF checkpoints (RUN/export/exit-K); empty: every exit."""
    after_evaluate: bool = False
    """Run export-exits as the chain's last stage (make pipeline, in place or on SLURM); else on request."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir).resolve()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def reads_cached_targets(self) -> bool:
        """Whether any exits train-exits trains read RUN/teacher (else the teacher stage has no reader)."""
        return any(c.train.reads_cached_targets for _, c, _ in self.exit_runs())

    def exit_runs(self) -> list[tuple[str, "Config", Path]]:
        """What train-exits trains: (name, recipe, output folder) for the exits, then each baseline.
        Each recipe has no baselines of its own, so adding one later leaves the exits' hash alone."""
        main = dataclasses.replace(self, train=dataclasses.replace(self.train, baselines=[]))
        runs = [("exits", main, TRAIN_EXITS.dir(self))]
        for name in self.train.baselines:
            if name == "tuned_lens":
                recipe = dataclasses.replace(main, exits=dataclasses.replace(main.exits, kind="tuned_lens"))
            else:
                recipe = dataclasses.replace(main, train=dataclasses.replace(main.train, objective="ce"))
            runs.append((name, recipe, self.run_dir / "baselines" / name))
        return runs

    def hash(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): what a stage's output depends on, not
        how it runs (execution fields)."""
        data = self.to_dict()
        for section in dataclasses.fields(self):
            for f in dataclasses.fields(getattr(self, section.name)):
                if f.metadata.get("execution", False):
                    del data[section.name][f.name]
        chosen = {name: data[name] for name in (sections or data)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- site settings for SLURM


@dataclass
class JobConfig:
    """sbatch resources of one kind of job."""

    nodes: int = _num(1, gt=0)
    """Nodes per job."""
    tasks_per_node: int = _num(1, gt=0)
    """Processes per node (training: one per GPU)."""
    cpus_per_task: int = _num(1, gt=0)
    """CPU cores per process."""
    gpus_per_node: int = _num(0, ge=0)
    """GPUs per node; 0: none requested."""
    mem: str = "8G"
    """Memory per node (sbatch --mem)."""
    time: str = "01:00:00"
    """Time limit (sbatch --time)."""


@dataclass
class NodeConfig:
    """What one node of the site has: the plan refuses requests beyond it (0 or empty: not checked)."""

    cpus: int = _num(0, ge=0)
    """CPU cores per node."""
    memory: str = ""
    """Host memory per node, e.g. "1000G" (what a job's mem "0" stands for)."""
    gpus: int = _num(0, ge=0)
    """GPUs per node."""
    gpu_memory: str = ""
    """Memory per GPU, e.g. "141G"."""
    disk: str = ""
    """Free space where run.dir lives, e.g. "50T"."""


@dataclass
class ThroughputConfig:
    """Sustained rates per device (a GPU, or one process of a CPU-only job) that the plan divides work by.
    Defaults: one H200 in bf16 (LLaMA-3-8B-shaped, README "Planning a run"); a CPU site gives its own."""

    tokenize_tokens_per_s: float = _num(400_000.0, gt=0.0)
    """Tokenize: tokens per second per CPU core of a task."""
    teacher_flops: float = _num(4.9e14, gt=0.0)
    """Teacher-logits: model FLOP/s of the backbone forward, head and top-k per device."""
    train_flops: float = _num(4.75e14, gt=0.0)
    """Search- and train-exits: model FLOP/s of the prefix forward and the exits' steps per device."""
    evaluate_flops: float = _num(4.9e14, gt=0.0)
    """Evaluate: model FLOP/s of its forwards (decode-speed measurements come on top)."""
    network_bytes_per_s: float = _num(2.5e10, gt=0.0)
    """ZeRO-3: bytes per second each device gathers the partitioned backbone at (between nodes)."""
    tensor_parallel_bytes_per_s: float = _num(3.6e11, gt=0.0)
    """model.tensor_parallel: all-reduce bus bandwidth between a node's GPUs (the default assumes NVLink on
    H100/H200 SXM; not measured here: give your site's, e.g. from nccl-tests' all_reduce_perf)."""


@dataclass
class ClusterConfig:
    """configs/cluster/*.yaml: where and how jobs run; never edited inside the sbatch scripts."""

    partition: str = ""
    """Partition; empty: the cluster's default."""
    account: str = ""
    """Account to charge; empty: the user's default."""
    env_setup: str = ""
    """Shell run at the top of every job, e.g. "source .venv/bin/activate"."""
    slurm_conf: str = ""
    """SLURM_CONF for sbatch/squeue/scontrol; empty: the site's default."""
    hub_offline: bool = False
    """Jobs run with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set (compute nodes without internet: models and
    datasets come from the HF cache); false: jobs may reach the hub, whatever the submitting shell set."""
    tracking_uri: str = ""
    """MLflow server every job logs to (e.g. http://login1:5000 from `make mlflow-server`) when the recipe
    names none; empty: the sqlite file of the run root (one writer at a time on a shared filesystem)."""
    array_tasks: int = _num(2, ge=0)
    """Tasks of the array stages (tokenize, teacher-logits); 0: as many as the plan needs to fit each task in
    its time limit."""
    sbatch_args: list[str] = field(default_factory=list)
    """Anything else for sbatch, e.g. ["--qos=high"]."""
    tokenize: JobConfig = field(default_factory=JobConfig)
    """Each array task of tokenize (CPU only: it needs no GPU)."""
    teacher: JobConfig = field(default_factory=JobConfig)
    """Each array task of teacher-logits (one GPU on a GPU site). With model.tensor_parallel N, a task is
    N such processes on one node: N times the GPUs and the memory."""
    train: JobConfig = field(default_factory=JobConfig)
    """The train-exits job."""
    evaluate: JobConfig = field(default_factory=JobConfig)
    """The evaluate job (and export-exits'); with model.tensor_parallel N, N such processes on one node."""
    node: NodeConfig = field(default_factory=NodeConfig)
    """What one node has (make plan checks requests against it)."""
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    """Rates per device the plan's wall times come from."""
    requeue_grace_s: int = _num(300, ge=0)
    """Seconds before a job's time limit at which SLURM signals it to stop at a safe point and requeue
    itself (sbatch --signal); 0: no requeue."""


# ---------------------------------------------------------------- loading


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(arm) for arm in typing.get_args(tp))
    if tp in (int, float, str, bool):
        return {int: "an int", float: "a float", str: "a string", bool: "a boolean"}[tp]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        if typing.get_origin(item) is Literal:
            return f"a list, each {_type_name(item)}"
        return f"a list of {_type_name(item).split(' ', 1)[1]}s"
    return tp.__name__


def _coerce(value, tp, path: str):
    origin = typing.get_origin(tp)
    fail = ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, path)
    if _is_union(tp):  # the first arm that takes the value; a list goes to the list arm, which names the bad item
        for arm in typing.get_args(tp):
            if isinstance(value, list) and typing.get_origin(arm) is list:
                return _coerce(value, arm, path)
            try:
                return _coerce(value, arm, path)
            except ConfigError:
                pass
        raise fail
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail
        return value
    if origin is list:
        if not isinstance(value, list):
            raise fail
        return [_coerce(v, typing.get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise fail
        return value
    if tp is int:
        # 1e6 and 1_000_000 are fine in YAML for a token count, 1.5 and True are not
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise fail from None
            if number.is_integer():
                return int(number)
            raise fail
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise fail from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _check_range(value, meta: dict, path: str) -> None:
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for key, sign, ok in bounds:
        if meta.get(key) is not None and not ok(value, meta[key]):
            raise ConfigError(f"{path}: must be {sign} {meta[key]}, got {value!r}")


def _build(cls, raw: dict, path: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        if name in raw:
            where = f"{path}.{name}" if path else name
            values[name] = _coerce(raw[name], hints[name], where)
            _check_range(values[name], f.metadata, where)
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = yaml.safe_load(text) if text else ""


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    return _load(Config, path, overrides)


def load_cluster_config(path: str | Path) -> ClusterConfig:
    return _load(ClusterConfig, path, ())


def _load(cls, path: str | Path, overrides: typing.Sequence[str]):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return _build(cls, raw, "")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- reference


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def reference(cls=Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key of a config class, with its type, default and meaning: (key, type, default, doc)."""
    rows, hints, docs = [], typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += reference(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _type_name(tp).removeprefix("an ").removeprefix("a ")
        rows.append((key, kind, json.dumps(default), docs.get(f.name, "")))
    return rows


def reference_markdown(cls=Config) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind} | `{default}` | {doc} |" for key, kind, default, doc in reference(cls)]
    return "\n".join(lines) + "\n"


def reference_text(cls=Config) -> str:
    """For --help: one block per key."""
    return "\n".join(f"  {key} ({kind}, default {default})\n      {doc}" for key, kind, default, doc in reference(cls))


REFERENCE_DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
REFERENCE_START, REFERENCE_END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def reference_in_docs() -> str:
    """The reference block as docs/config.md holds it."""
    return REFERENCE_DOC.read_text().split(REFERENCE_START)[1].split(REFERENCE_END)[0]


if __name__ == "__main__":  # python -m pipeline.config: rewrite docs/config.md's reference from the dataclasses
    text = REFERENCE_DOC.read_text()
    REFERENCE_DOC.write_text(text.replace(REFERENCE_START + reference_in_docs(), REFERENCE_START + reference_markdown()))
