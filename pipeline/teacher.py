"""The frozen backbone as a teacher: token batches -> compact per-sample targets, chunk by chunk.

The backbone body runs once per batch; the LM head, log-softmax and target selection then run
over `teacher.chunk_size` positions at a time, so [batch, seq, vocab] float32 never exists.
A few positions per batch are also checked against the full distribution (FidelityMeter).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.decoder import Decoder
from pipeline.losses import full_kl, sparse_kl
from pipeline.targets import TARGETS_KEY, SparseTarget, TargetFormat


def sample_uniforms(seed: int, key: str, length: int, draws: int) -> torch.Tensor:
    """The uniforms behind one sequence's draws: a function of (seed, sample key) only."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
    return torch.rand(length, draws, generator=generator)


class FidelityMeter:
    """How much the stored targets lose, on probe positions where the full distribution is known.

    - target_kl: KL(p || reconstructed top-k distribution, rest spread evenly) (top-k only);
    - tail_mass: mean mass outside the stored ids (top-k only);
    - lens_kl_*: for a realistic student (the logit lens one layer below the top), the KL the targets
      estimate vs the exact KL: `bias` is the relative error of the mean, `rel_rmse` the per-position noise.
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, fmt: TargetFormat, teacher_logprobs: torch.Tensor, target: SparseTarget,
               student_logits: torch.Tensor) -> None:
        exact = full_kl(student_logits, teacher_logprobs)[0]
        estimate = sparse_kl(student_logits, target)[0]
        values = {"lens_kl_exact": exact.sum(), "lens_kl_estimate": estimate.sum(),
                  "lens_kl_sq_error": ((estimate - exact) ** 2).sum()}
        if target.rest is not None:
            values["tail_mass"] = target.rest.sum()
            values["target_kl"] = full_kl(fmt.reconstruct(target), teacher_logprobs)[0].sum()
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += len(exact)

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {}
        mean = {name: value / self.count for name, value in self.sums.items()}
        out = {"lens_kl_exact": mean["lens_kl_exact"],
               "lens_kl_bias": (mean["lens_kl_estimate"] - mean["lens_kl_exact"]) / mean["lens_kl_exact"],
               "lens_kl_rel_rmse": mean["lens_kl_sq_error"] ** 0.5 / mean["lens_kl_exact"]}
        out.update({k: mean[k] for k in ("target_kl", "tail_mass") if k in mean})
        return out


class Teacher:
    def __init__(self, backbone, fmt: TargetFormat, cfg: TeacherConfig):
        self.decoder, self.fmt, self.cfg = Decoder(backbone), fmt, cfg
        self.device = next(backbone.parameters()).device
        # The probe student: the logit lens one layer below the top. On SmolLM2 its KL to the full
        # model is ~3 nats, the scale of a working exit (half-depth lenses are at ~17 nats).
        self.lens_depth = max(1, self.decoder.num_layers - 1)
        self.fidelity = FidelityMeter()

    def _forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states, and the probe student's ones when fidelity probes are on."""
        captured = {}
        hook = None
        if self.cfg.fidelity_positions:
            def keep(module, args, output):
                captured["h"] = output[0] if isinstance(output, tuple) else output
            hook = self.decoder.layers[self.lens_depth - 1].register_forward_hook(keep)
        try:
            hidden = self.decoder.final_hidden(input_ids)
        finally:
            if hook is not None:
                hook.remove()
        return hidden, captured.get("h")

    @torch.inference_mode()
    def targets(self, input_ids: np.ndarray, keys: list[str]) -> list[dict[str, np.ndarray]]:
        """[B, T] token ids (and their sample keys) -> one dict of target arrays per sample."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        batch, length = ids.shape
        hidden, lens_hidden = self._forward(ids)
        hidden = hidden.reshape(batch * length, -1)
        if lens_hidden is not None:
            lens_hidden = lens_hidden.reshape(batch * length, -1)
        uniforms = None
        if self.fmt.kind == "sampled":
            uniforms = torch.cat([sample_uniforms(self.cfg.seed, k, length, self.fmt.entries) for k in keys])
            uniforms = uniforms.to(self.device)
        probes = torch.linspace(0, batch * length - 1, self.cfg.fidelity_positions).long().tolist()
        chosen, values = [], []
        for start in range(0, batch * length, self.cfg.chunk_size):
            stop = min(start + self.cfg.chunk_size, batch * length)
            logits = self.decoder.logits(hidden[start:stop]).float()
            rows = [p - start for p in probes if start <= p < stop]
            probe_logprobs = logits[rows].log_softmax(-1) if rows else None  # before select overwrites logits
            ids_chunk, values_chunk = self.fmt.select(logits, None if uniforms is None else uniforms[start:stop])
            chosen.append(ids_chunk)
            values.append(values_chunk)
            if rows:
                self._probe(probe_logprobs, self.fmt.target(*self.fmt.stored(ids_chunk[rows], values_chunk[rows])),
                            lens_hidden[[start + r for r in rows]])
        chosen, values = torch.cat(chosen).view(batch, length, -1), torch.cat(values).view(batch, length, -1)
        return [{TARGETS_KEY: self.fmt.encode(chosen[b], values[b])} for b in range(batch)]

    def _probe(self, teacher_logprobs, target, lens_hidden) -> None:
        student_logits = self.decoder.logits(self.decoder.norm(lens_hidden)).float()
        self.fidelity.update(self.fmt, teacher_logprobs, target, student_logits)
