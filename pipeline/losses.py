"""Distillation losses against sparse teacher targets, and the exact KL for an online teacher.

`kl_to_target` and `exact_kl` take one chunk of positions ([n, V] student logits).
`chunked_kl_sum` runs them over a whole batch of hidden states chunk by chunk, computing each
chunk's gradient on the spot, so [batch, seq, vocab] float32 logits never exist at once, in the
forward or the backward pass.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.targets import SparseTarget, TargetFormat


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


def kl_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(p || q) per position from both log-distributions: [n, V] x [n, V] -> [n]."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)


def exact_kl(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(p || q) per position, q given as logits: [n, V] x [n, V] -> [n]."""
    return kl_from_logprobs(teacher_logprobs, student_logits.float().log_softmax(-1))


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B*T]: position t predicts token t+1; a sequence's last position gets -100 (none)."""
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1).flatten()


class _ChunkedKL(torch.autograd.Function):
    """sum_positions KL over [n, d] hidden states; the backward returns the gradients computed
    chunk by chunk during the forward (the head is frozen: only the hidden states need one)."""

    @staticmethod
    def forward(ctx, hidden, head, kl_of_chunk, chunk):
        grads = torch.zeros_like(hidden) if hidden.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            piece = hidden[start:stop].detach().requires_grad_(grads is not None)
            with torch.enable_grad():
                kl = kl_of_chunk(head(piece), start, stop).sum()
            if grads is not None:
                grads[start:stop] = torch.autograd.grad(kl, piece)[0]
            total += kl.detach()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grads,) = ctx.saved_tensors
        return grad_output * grads, None, None, None


def chunked_kl_sum(hidden: torch.Tensor, head: torch.nn.Module,
                   kl_of_chunk: Callable[[torch.Tensor, int, int], torch.Tensor], chunk: int) -> torch.Tensor:
    """Sum over positions of `kl_of_chunk(student_logits[start:stop], start, stop)` for [n, d] hidden."""
    return _ChunkedKL.apply(hidden, head, kl_of_chunk, chunk)


def exit_losses(forward: Callable, head: torch.nn.Module, depths: list[int], batch: dict[str, torch.Tensor],
                fmt: TargetFormat | None, chunk: int, objective: str = "kl") -> torch.Tensor:
    """Per-exit mean loss over one micro-batch: [len(depths)], differentiable.

    `forward(input_ids, full=...)` is a BalconyModel (or the DeepSpeed engine around one).
    objective "kl": KL(teacher || exit), the teacher being the cached targets in `batch` (`fmt`),
    or with `fmt=None` the backbone's own full forward in the same pass (exact full-vocabulary KL).
    objective "ce": next-token cross-entropy on the tokens themselves (the EE-Tuning baseline).
    """
    input_ids = batch["input_ids.npy"].long()
    positions = input_ids.numel()
    online = objective == "kl" and fmt is None
    exits, final = forward(input_ids, full=online)
    if objective == "ce":
        labels = next_token_labels(input_ids)

        def loss_of_chunk(logits, start, stop):
            return torch.nn.functional.cross_entropy(logits.float(), labels[start:stop], reduction="none")
        positions = int((labels != -100).sum())
    elif online:
        teacher_hidden = final.reshape(positions, -1)

        def loss_of_chunk(logits, start, stop):
            with torch.no_grad():
                teacher = head(teacher_hidden[start:stop]).float().log_softmax(-1)
            return exact_kl(teacher, logits)
    else:
        target = fmt.decode({k: v.flatten(0, 1) for k, v in batch.items() if k in (fmt.ids_key, fmt.logprobs_key)})

        def loss_of_chunk(logits, start, stop):
            return kl_to_target(logits, target.rows(start, stop))

    return torch.stack([chunked_kl_sum(exits[d].reshape(input_ids.numel(), -1), head, loss_of_chunk, chunk) / positions
                        for d in depths])
