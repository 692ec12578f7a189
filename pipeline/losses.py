"""Distillation losses against sparse teacher targets, and the exact KL for an online teacher.

All functions take one chunk of positions ([n, V] student logits); callers loop over chunks so
that [batch, seq, vocab] float32 never exists at once.
"""
from __future__ import annotations

import torch

from pipeline.targets import SparseTarget


def kl_to_target(student_logits: torch.Tensor, target: SparseTarget) -> torch.Tensor:
    """Per-position forward KL(teacher || student) as the target encodes it: [n, V] -> [n].

    Top-k: exact KL between the (top-k + rest bucket) coarse-grainings of both distributions.
    Sampled: the unbiased Monte-Carlo estimate mean_j(log p(x_j) - log q(x_j)).
    """
    logits = student_logits.float()
    lse = logits.logsumexp(-1, keepdim=True)
    student_at_ids = logits.gather(-1, target.ids) - lse
    kl = (target.weights * (target.logprobs - student_at_ids)).sum(-1)
    if target.rest is not None:
        student_rest = logits.scatter(-1, target.ids, float("-inf")).logsumexp(-1) - lse.squeeze(-1)
        kl = kl + torch.xlogy(target.rest, target.rest) - target.rest * student_rest
    return kl


def exact_kl(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(p || q) per position: [n, V] x [n, V] -> [n]."""
    student = student_logits.float().log_softmax(-1)
    return (teacher_logprobs.exp() * (teacher_logprobs - student)).sum(-1)
