"""Teacher targets: the only place where the cached target format is encoded and decoded.

Formats (`teacher.format`):
- `topk`: the k most likely tokens per position, with log-probs normalised over the FULL
  vocabulary. The mass outside them, 1 - sum(exp(logp)), is kept as one "rest" bucket so the
  target stays a distribution. Biased: the loss never sees how the rest is spread.
- `sampled`: n ids drawn from the teacher distribution per position (with repetition). The mean
  over draws of log p(x) - log q(x) is an unbiased estimate of KL(p || q) and its gradient
  (Anshumann et al., ACL 2025, "Sparse Logit Sampling"), at the cost of variance.

Bytes. Ids are bit-packed in ceil(log2 V) bits; log-probs are quantised uniformly on
[-LOGPROB_RANGE, 0] in `teacher.logprob_bits` bits (probabilities below e^-24 clamp). A top-k
position is k ids and k log-probs. n draws from a peaked distribution hold far fewer distinct
tokens, so a sampled position stores each distinct token once: its id, its log-prob and how many
draws it took (the draws are exchangeable: their order carries nothing); most are drawn once, so a
flag says which were drawn more, and only those carry a count. Decoding expands the counts back
into n draws sorted by id, so the loss and its gradient are those of the draws themselves, bit for
bit. A sequence's targets are one uint8 array (`TARGETS_KEY`): top-k a row per position; sampled
the distinct counts of every position, then every position's ids, log-probs and drawn-more-than-
once flags, then the draw counts of the flagged, each stream bit-packed. Packing runs in torch, on
the device of the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError, ShardError

LOGPROB_RANGE = 24.0  # nats
TARGETS_KEY = "targets.npy"  # one sequence's encoded targets, in a teacher shard
# a micro-batch's decoded targets, [B, T, entries] each: what the training loop reads
TARGET_IDS, TARGET_LOGPROBS = "target_ids", "target_logprobs"


@dataclass
class SparseTarget:
    """Decoded targets for n positions: the loss is sum(weights * (logprobs - log q[ids])) (+ rest)."""

    ids: torch.Tensor  # [n, m] int64
    logprobs: torch.Tensor  # [n, m] teacher log p(ids)
    weights: torch.Tensor  # [n, m] p(ids) for top-k; 1/n per draw for sampled
    rest: torch.Tensor | None  # [n] mass outside the ids (top-k only)

    def rows(self, start: int, stop: int) -> "SparseTarget":
        return SparseTarget(self.ids[start:stop], self.logprobs[start:stop], self.weights[start:stop],
                            None if self.rest is None else self.rest[start:stop])


# ---------------------------------------------------------------- bit packing


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., m] non-negative ints < 2**bits -> [..., ceil(m * bits / 8)] uint8, little-endian bits."""
    shifts = torch.arange(bits, device=values.device)
    flat = ((values.long().unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., m*bits]
    pad = (-flat.shape[-1]) % 8
    flat = torch.nn.functional.pad(flat, (0, pad)).unflatten(-1, (-1, 8))
    return (flat << torch.arange(8, device=values.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: [..., nbytes] uint8 -> [..., count] int64."""
    flat = ((packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1).flatten(-2)
    flat = flat[..., : count * bits].unflatten(-1, (count, bits))
    return (flat << torch.arange(bits, device=packed.device)).sum(-1)


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


# ---------------------------------------------------------------- formats


class TargetFormat:
    """Selects each position's targets from full-vocabulary logits, and encodes / decodes a sequence's."""

    def __init__(self, cfg: TeacherConfig, vocab_size: int):
        self.kind, self.vocab_size = cfg.format, vocab_size
        self.entries = cfg.k if cfg.format == "topk" else cfg.samples
        if cfg.format == "topk" and cfg.k >= vocab_size:
            raise ConfigError(f"teacher.k: must be below the vocabulary size {vocab_size}, got {cfg.k}")
        self.id_bits = max(1, math.ceil(math.log2(vocab_size)))
        self.logprob_bits = cfg.logprob_bits
        self.count_bits = max(1, math.ceil(math.log2(self.entries)))  # sampled: distinct - 1 and count - 2 < n
        self.step = LOGPROB_RANGE / (2**cfg.logprob_bits - 1)

    @classmethod
    def from_manifest(cls, manifest: dict, path) -> "TargetFormat":
        """The format a teacher manifest records; refuses one this code cannot decode exactly."""
        description = manifest["target_format"]
        kind, entries = description["format"], description["entries"]
        cfg = TeacherConfig(format=kind, k=entries if kind == "topk" else 64,
                            samples=entries if kind == "sampled" else 24, logprob_bits=description["logprob_bits"])
        fmt = cls(cfg, description["vocab_size"])
        if fmt.describe() != description:
            raise ShardError(f"{path}: target_format {description} is not a format this version reads "
                             f"({fmt.describe()}); rerun teacher-logits into a new run.dir")
        return fmt

    def describe(self) -> dict:
        """The parameters recorded in the manifest; a reader refuses shards whose format differs."""
        out = {"format": self.kind, "entries": self.entries, "vocab_size": self.vocab_size, "id_bits": self.id_bits,
               "logprob_bits": self.logprob_bits, "logprob_range": LOGPROB_RANGE}
        return out if self.kind == "topk" else {**out, "count_bits": self.count_bits}

    def bytes_per_position(self, distinct: float | None = None, repeated: float | None = None) -> float:
        """Target bytes per position; sampled: for a mean of `distinct` tokens per position of which a share
        `repeated` is drawn more than once (both the teacher's: a sharper teacher has fewer of each)."""
        if self.kind == "topk":
            return packed_bytes(self.entries, self.id_bits) + packed_bytes(self.entries, self.logprob_bits)
        per_id = self.id_bits + self.logprob_bits + 1 + repeated * self.count_bits
        return (self.count_bits + distinct * per_id) / 8

    def select(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which ids to keep per position: [n, V] fp32 logits -> (ids [n, m], log-probs over the full vocab).

        Overwrites `logits` (it runs in place to spare a second [n, V] buffer, a tenth of the
        stage's time on CPU). Sampling is inverse-CDF with caller-supplied uniforms, so the draws
        do not depend on how positions are batched or chunked.
        """
        if self.kind == "topk":
            values, ids = logits.topk(self.entries, dim=-1)
            top = values[:, :1]
            log_norm = logits.sub_(top).exp_().sum(-1, keepdim=True).log_().add_(top)
            return ids, values - log_norm
        top = logits.amax(-1, keepdim=True)
        unnormalised = logits.sub_(top).exp_()  # p * Z / e^top, in place
        cdf = unnormalised.cumsum(-1)
        total = cdf[:, -1:]
        ids = torch.searchsorted(cdf, uniforms * total).clamp_(max=self.vocab_size - 1)
        return ids, unnormalised.gather(-1, ids).log() - total.log()

    def _levels(self, logprobs: torch.Tensor) -> torch.Tensor:
        return (-logprobs / self.step).round().clamp_(0, 2**self.logprob_bits - 1).long()

    def _logprobs(self, levels: torch.Tensor) -> torch.Tensor:
        return -levels.float() * self.step

    def _quantised(self, ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each position's entries as stored: log-prob levels; sampled draws in id order (their order carries
        nothing)."""
        if self.kind == "sampled":
            ids, order = ids.sort(-1)
            logprobs = logprobs.gather(-1, order)
        return ids, self._levels(logprobs)

    def stored(self, ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What decode(encode(ids, logprobs)) gives back: log-probs quantised; draws sorted by id."""
        ids, levels = self._quantised(ids, logprobs)
        return ids, self._logprobs(levels)

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor) -> np.ndarray:
        """One sequence's targets, [T, m] ids and log-probs -> a uint8 array (`TARGETS_KEY`)."""
        ids, levels = self._quantised(ids, logprobs)
        if self.kind == "topk":
            packed = torch.cat([pack_bits(ids, self.id_bits), pack_bits(levels, self.logprob_bits)], dim=-1)
            return packed.cpu().numpy()
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # where each distinct id's run of draws begins
        starts = first.flatten().nonzero().squeeze(1)
        counts = torch.diff(starts, append=starts.new_tensor([ids.numel()]))  # runs never cross positions
        repeated = counts > 1  # ~1 in 4 on SmolLM2: a flag each, and a count for those alone
        streams = [(first.sum(-1) - 1, self.count_bits), (ids.flatten()[starts], self.id_bits),
                   (levels.flatten()[starts], self.logprob_bits), (repeated, 1), (counts[repeated] - 2, self.count_bits)]
        return torch.cat([pack_bits(values, bits) for values, bits in streams]).cpu().numpy()

    def _distinct(self, data: torch.Tensor, positions: int) -> torch.Tensor:
        """A sampled sequence's distinct ids per position, [T], from the head of its encoded array."""
        return unpack_bits(data[:packed_bytes(positions, self.count_bits)], self.count_bits, positions) + 1

    def stored_entries(self, data: np.ndarray, positions: int) -> int:
        """(id, log-prob) entries an encoded sequence stores: T x k for top-k, its distinct ids for sampled."""
        if self.kind == "topk":
            return positions * self.entries
        return int(self._distinct(torch.as_tensor(data), positions).sum())

    def decode(self, data: np.ndarray | torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of encode: -> (ids [T, m] int64, log-probs [T, m] float32)."""
        data = torch.as_tensor(data)
        if self.kind == "topk":
            id_bytes = packed_bytes(self.entries, self.id_bits)
            ids = unpack_bits(data[:, :id_bytes], self.id_bits, self.entries)
            return ids, self._logprobs(unpack_bits(data[:, id_bytes:], self.logprob_bits, self.entries))
        head = packed_bytes(positions, self.count_bits)
        total = int(self._distinct(data, positions).sum()) if data.numel() >= head else 0
        sizes = [packed_bytes(total, bits) for bits in (self.id_bits, self.logprob_bits, 1)]
        if total == 0 or data.numel() < head + sum(sizes):
            raise ShardError(f"sampled targets of {data.numel()} bytes, fewer than the {head + sum(sizes)} that "
                             f"{positions} positions with {total} distinct ids take")
        ids, levels, repeated = (unpack_bits(piece, bits, total).to(dtype) for piece, bits, dtype in
                                 zip(data[head:head + sum(sizes)].split(sizes), (self.id_bits, self.logprob_bits, 1),
                                     (torch.long, torch.long, torch.bool)))
        many = int(repeated.sum())
        if data.numel() != head + sum(sizes) + packed_bytes(many, self.count_bits):
            raise ShardError(f"sampled targets of {data.numel()} bytes, expected "
                             f"{head + sum(sizes) + packed_bytes(many, self.count_bits)} for {positions} positions "
                             f"with {total} distinct ids, {many} drawn more than once")
        counts = torch.ones(total, dtype=torch.long)
        counts[repeated] = unpack_bits(data[head + sum(sizes):], self.count_bits, many) + 2
        ids, levels = (values.repeat_interleave(counts).view(positions, self.entries) for values in (ids, levels))
        return ids, self._logprobs(levels)

    def decode_batch(self, encoded: list, positions: int) -> dict[str, torch.Tensor]:
        """Encoded sequences -> the micro-batch arrays the loss reads: TARGET_IDS, TARGET_LOGPROBS [B, T, m]."""
        ids, logprobs = zip(*(self.decode(data, positions) for data in encoded))
        return {TARGET_IDS: torch.stack(ids), TARGET_LOGPROBS: torch.stack(logprobs)}

    def target(self, ids: torch.Tensor, logprobs: torch.Tensor) -> SparseTarget:
        """Decoded [n, m] ids and log-probs as the loss reads them."""
        if self.kind == "topk":
            weights = logprobs.exp()
            return SparseTarget(ids, logprobs, weights, rest=(1.0 - weights.sum(-1)).clamp_(min=0.0))
        return SparseTarget(ids, logprobs, torch.full_like(logprobs, 1.0 / self.entries), rest=None)

    def reconstruct(self, target: SparseTarget) -> torch.Tensor:
        """The full [n, V] log-distribution a top-k target stands for (rest spread evenly)."""
        others = self.vocab_size - self.entries
        fill = torch.log(target.rest.clamp(min=1e-30) / others).unsqueeze(-1)
        full = fill.expand(-1, self.vocab_size).clone()
        return full.scatter_(-1, target.ids, target.logprobs)
