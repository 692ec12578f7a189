"""Distillation losses against teacher targets, with their gradients computed in closed form.

Every loss here is a per-position KL(teacher || student) (cross-entropy on the tokens is the
special case of a one-hot teacher), so its gradient with respect to the student's logits is
`total_mass * q - teacher_mass`, with q = softmax(logits). Writing that gradient down instead of
asking autograd for it saves a handful of [n, V] passes per chunk (two logsumexps, a scatter copy
and their backward), which on CPU is most of a chunk's time outside the head's two matmuls.

`chunked_loss_sum` runs a loss over a whole batch of hidden states chunk by chunk, computing each
chunk's gradient on the spot, so [batch, seq, vocab] float32 logits never exist at once, in the
forward or the backward pass.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.targets import TARGET_IDS, TARGET_LOGPROBS, SparseTarget, TargetFormat

TINY = 1e-30  # floor for a student's mass outside the top-k ids (its log is taken)


def sparse_kl(student_logits: torch.Tensor, target: SparseTarget,
              with_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position KL(teacher || student) as the target encodes it, [n, V] -> [n], and, when
    `with_grad`, its gradient with respect to the logits ([n, V] fp32).

    Top-k: exact KL between the (top-k + rest bucket) coarse-grainings of both distributions.
    Sampled: the unbiased Monte-Carlo estimate mean_j(log p(x_j) - log q(x_j)).
    One-hot (weights 1, log-probs 0): next-token cross-entropy.
    """
    logq = student_logits.float().log_softmax(-1)
    kl = (target.weights * (target.logprobs - logq.gather(-1, target.ids))).sum(-1)
    if target.rest is None and not with_grad:
        return kl, None
    q = logq.exp_()  # in place: the log-probs at the ids are all the KL needed
    total = target.weights.sum(-1) + (0 if target.rest is None else target.rest)  # the teacher's mass (1 but for
    if target.rest is None:                                                        # a one-hot with no label)
        grad = q.mul_(total.unsqueeze(-1)).scatter_add_(-1, target.ids, -target.weights) if with_grad else None
        return kl, grad
    q_at_ids = q.gather(-1, target.ids)
    q_rest = q.scatter_(-1, target.ids, 0.0).sum(-1).clamp_(min=TINY)  # a sum over the rest: no cancellation
    kl = kl + torch.xlogy(target.rest, target.rest) - target.rest * q_rest.log()
    if not with_grad:
        return kl, None
    # outside the ids: d/dz_j = q_j (total - rest / q_rest); at an id i: q_i total - p_i
    grad = q.mul_((total - target.rest / q_rest).unsqueeze(-1))
    return kl, grad.scatter_(-1, target.ids, q_at_ids * total.unsqueeze(-1) - target.weights)


def full_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
            with_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full-vocabulary KL(p || q) per position, [n, V] x [n, V] -> [n], and, when `with_grad`, its
    gradient q - p with respect to the student's logits."""
    logq = student_logits.float().log_softmax(-1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - logq)).sum(-1)
    return kl, (logq.exp_().sub_(teacher_logprobs.exp()) if with_grad else None)


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B*T]: position t predicts token t+1; a sequence's last position gets -100 (none)."""
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1).flatten()


def one_hot_target(labels: torch.Tensor) -> SparseTarget:
    """Next-token labels as a target whose KL is the cross-entropy; label -100 weighs nothing."""
    known = labels != -100
    ids = labels.clamp(min=0).unsqueeze(-1)
    return SparseTarget(ids, torch.zeros(ids.shape), known.float().unsqueeze(-1), rest=None)


# loss_of_chunk(student_logits, start, stop, with_grad) -> (per-position loss [n], d loss / d logits or None)
ChunkLoss = Callable[[torch.Tensor, int, int, bool], tuple[torch.Tensor, torch.Tensor | None]]


class _ChunkedLoss(torch.autograd.Function):
    """Per-input sums over positions of a loss of `head(hidden)`, for several [n, d] hidden states
    (one per exit); the backward returns the gradients computed chunk by chunk during the forward
    (the head is frozen: only the hidden states need one). Chunks are the outer loop, so what a
    chunk's loss needs from the teacher is made once for every exit."""

    @staticmethod
    def forward(ctx, head, loss_of_chunk, chunk, *hidden):
        grads = [torch.zeros_like(h) if h.requires_grad else None for h in hidden]
        totals = torch.zeros(len(hidden), dtype=torch.float32, device=hidden[0].device)
        for start in range(0, hidden[0].shape[0], chunk):
            stop = min(start + chunk, hidden[0].shape[0])
            for i, (h, grad) in enumerate(zip(hidden, grads)):
                piece = h[start:stop].detach().requires_grad_(grad is not None)
                with torch.enable_grad():
                    logits = head(piece)
                loss, grad_logits = loss_of_chunk(logits.detach(), start, stop, grad is not None)
                if grad is not None:  # through the head (bf16 under autocast) back to the hidden states
                    grad[start:stop] = torch.autograd.grad(logits, piece, grad_logits.to(logits.dtype))[0]
                totals[i] += loss.sum()
        ctx.save_for_backward(*grads)
        return totals

    @staticmethod
    def backward(ctx, grad_totals):
        grads = [None if g is None else grad_totals[i] * g for i, g in enumerate(ctx.saved_tensors)]
        return (None, None, None, *grads)


def chunked_loss_sum(hidden: list[torch.Tensor], head: torch.nn.Module, loss_of_chunk: ChunkLoss,
                   chunk: int) -> torch.Tensor:
    """[len(hidden)]: for each [n, d] hidden state, the sum over positions of
    `loss_of_chunk(head(hidden[start:stop]), start, stop, ...)`."""
    return _ChunkedLoss.apply(head, loss_of_chunk, chunk, *hidden)


def exit_losses(forward: Callable, head: torch.nn.Module, depths: list[int], batch: dict[str, torch.Tensor],
                fmt: TargetFormat | None, chunk: int, objective: str = "kl", loss_positions: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-exit mean loss over one micro-batch: [len(depths)], differentiable.

    `forward(input_ids, full=...)` is a BalconyModel (or the DeepSpeed engine around one).
    objective "kl": KL(teacher || exit), the teacher being the cached targets in `batch` (`fmt`),
    or with `fmt=None` the backbone's own full forward in the same pass (exact full-vocabulary KL).
    objective "ce": next-token cross-entropy on the tokens themselves (the EE-Tuning baseline).
    `loss_positions` < 1 (train.loss_positions): the loss reads that share of the positions, drawn by
    `generator` (the same for every exit), so the head and loss cost that share; the exit layers still
    see every position.
    """
    input_ids = batch["input_ids.npy"].long()
    count = input_ids.numel()
    keep = None
    if loss_positions < 1:
        keep = torch.randperm(count, generator=generator)[: max(1, round(loss_positions * count))].sort().values
        keep = keep.to(input_ids.device)

    def pick(rows: torch.Tensor) -> torch.Tensor:
        return rows if keep is None else rows[keep]

    positions = count if keep is None else len(keep)
    online = objective == "kl" and fmt is None
    exits, final = forward(input_ids, full=online)
    if online:
        teacher_hidden, teacher = pick(final.reshape(count, -1)), {}

        def loss_of_chunk(logits, start, stop, with_grad):
            if start not in teacher:  # once per chunk, for every exit
                teacher.clear()
                with torch.no_grad():
                    teacher[start] = head(teacher_hidden[start:stop]).float().log_softmax(-1)
            return full_kl(logits, teacher[start], with_grad)
    else:
        if objective == "ce":
            labels = pick(next_token_labels(input_ids))
            target, positions = one_hot_target(labels), int((labels != -100).sum())
        else:
            target = fmt.target(pick(batch[TARGET_IDS].flatten(0, 1)), pick(batch[TARGET_LOGPROBS].flatten(0, 1)))

        def loss_of_chunk(logits, start, stop, with_grad):
            return sparse_kl(logits, target.rows(start, stop), with_grad)

    hidden = [pick(exits[d].reshape(count, -1)) for d in depths]
    return chunked_loss_sum(hidden, head, loss_of_chunk, chunk) / positions
