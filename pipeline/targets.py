"""Teacher targets: the only place where the cached target format is encoded and decoded.

Formats (`teacher.format`):
- `topk`: the k most likely tokens per position, with log-probs normalised over the FULL
  vocabulary. The mass outside them, 1 - sum(exp(logp)), is kept as one "rest" bucket so the
  target stays a distribution. Biased: the loss never sees how the rest is spread.
- `sampled`: n ids drawn from the teacher distribution per position (with repetition). The mean
  over draws of log p(x) - log q(x) is an unbiased estimate of KL(p || q) and its gradient
  (Anshumann et al., ACL 2025, "Sparse Logit Sampling"), at the cost of variance.

Bytes: ids are bit-packed in ceil(log2 V) bits; log-probs are quantised uniformly on
[-LOGPROB_RANGE, 0] in `teacher.logprob_bits` bits (probabilities below e^-24 clamp). With
`teacher.compact: false` a format is stored naively (float16 log-probs, int32 ids) for comparison.
Packing runs in torch, on the device that computed the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError

LOGPROB_RANGE = 24.0  # nats


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


# ---------------------------------------------------------------- formats


class TargetFormat:
    """Encodes chunks of full-vocabulary log-probs into per-position arrays, and decodes them."""

    def __init__(self, cfg: TeacherConfig, vocab_size: int):
        self.kind, self.compact, self.vocab_size = cfg.format, cfg.compact, vocab_size
        self.entries = cfg.k if cfg.format == "topk" else cfg.samples
        if cfg.format == "topk" and cfg.k >= vocab_size:
            raise ConfigError(f"teacher.k: must be below the vocabulary size {vocab_size}, got {cfg.k}")
        self.id_bits = max(1, math.ceil(math.log2(vocab_size)))
        self.logprob_bits = cfg.logprob_bits
        self.step = LOGPROB_RANGE / (2**cfg.logprob_bits - 1)
        prefix = "topk" if cfg.format == "topk" else "sample"
        self.ids_key, self.logprobs_key = f"{prefix}_ids.npy", f"{prefix}_logprobs.npy"

    @classmethod
    def from_description(cls, description: dict) -> "TargetFormat":
        """The format a teacher manifest records; refuses one this code cannot decode exactly."""
        kind, entries = description["format"], description["entries"]
        cfg = TeacherConfig(format=kind, k=entries if kind == "topk" else 64,
                            samples=entries if kind == "sampled" else 24, compact=description["compact"],
                            logprob_bits=description["logprob_bits"] if description["compact"] else 12)
        fmt = cls(cfg, description["vocab_size"])
        if fmt.describe() != description:
            raise ConfigError(f"target_format: {description} is not a format this version reads ({fmt.describe()})")
        return fmt

    def describe(self) -> dict:
        """The parameters recorded in the manifest; a reader refuses shards whose format differs."""
        return {"format": self.kind, "entries": self.entries, "compact": self.compact, "vocab_size": self.vocab_size,
                "id_bits": self.id_bits if self.compact else 32,
                "logprob_bits": self.logprob_bits if self.compact else 16, "logprob_range": LOGPROB_RANGE}

    def bytes_per_position(self) -> int:
        if not self.compact:
            return self.entries * (4 + 2)
        return math.ceil(self.entries * self.id_bits / 8) + math.ceil(self.entries * self.logprob_bits / 8)

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

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.compact:
            return {self.ids_key: ids.to(torch.int32), self.logprobs_key: logprobs.to(torch.float16)}
        levels = (-logprobs / self.step).round().clamp_(0, 2**self.logprob_bits - 1)
        return {self.ids_key: pack_bits(ids, self.id_bits), self.logprobs_key: pack_bits(levels, self.logprob_bits)}

    def decode(self, arrays: dict[str, torch.Tensor]) -> SparseTarget:
        ids, values = arrays[self.ids_key], arrays[self.logprobs_key]
        if self.compact:
            ids = unpack_bits(ids, self.id_bits, self.entries)
            values = -unpack_bits(values, self.logprob_bits, self.entries).float() * self.step
        ids, logprobs = ids.long(), values.float()
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
