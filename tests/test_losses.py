"""The losses' closed-form gradients against autograd through the textbook formulas, and chunking."""
import pytest
import torch

from pipeline.config import TeacherConfig
from pipeline.losses import chunked_loss_sum, exit_losses, full_kl, next_token_labels, one_hot_target, sparse_kl
from pipeline.targets import TargetFormat

VOCAB = 300


def _teacher(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, VOCAB, generator=g) * 3).log_softmax(-1)


def _target(kind: str, teacher: torch.Tensor):
    cfg = TeacherConfig(k=20, logprob_bits=16) if kind == "topk" else TeacherConfig(format="sampled", samples=8, logprob_bits=16)
    fmt = TargetFormat(cfg, VOCAB)
    ids, values = fmt.select(teacher.clone(), torch.rand(len(teacher), 8))
    return fmt.target(*fmt.decode(fmt.encode(ids, values), len(ids)))


def _textbook_sparse_kl(logits, target):
    """KL against (top-k + rest) or the sampled estimate, written as the definitions read."""
    logq = logits.log_softmax(-1)
    kl = (target.weights * (target.logprobs - logq.gather(-1, target.ids))).sum(-1)
    if target.rest is not None:
        rest = logits.scatter(-1, target.ids, float("-inf")).logsumexp(-1) - logits.logsumexp(-1)
        kl = kl + torch.xlogy(target.rest, target.rest) - target.rest * rest
    return kl


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_sparse_kl_value_and_gradient_equal_autograd(kind):
    target = _target(kind, _teacher())
    logits = (torch.randn(40, VOCAB) * 2).requires_grad_()
    reference = _textbook_sparse_kl(logits, target)
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    kl, grad = sparse_kl(logits.detach(), target, with_grad=True)
    assert torch.allclose(kl, reference, atol=1e-5)
    assert torch.allclose(grad, reference_grad, atol=1e-6)
    assert torch.equal(sparse_kl(logits.detach(), target)[0], kl)


def test_full_kl_and_cross_entropy_gradients_equal_autograd():
    teacher = _teacher()
    logits = torch.randn(40, VOCAB, requires_grad=True)
    reference = (teacher.exp() * (teacher - logits.log_softmax(-1))).sum(-1)
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    kl, grad = full_kl(logits.detach(), teacher, with_grad=True)
    assert torch.allclose(kl, reference, atol=1e-5) and torch.allclose(grad, reference_grad, atol=1e-6)

    labels = torch.randint(0, VOCAB, (40,))
    labels[[3, 7]] = -100  # no next token: no loss, no gradient
    reference = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    ce, grad = sparse_kl(logits.detach(), one_hot_target(labels), with_grad=True)
    assert torch.allclose(ce, reference, atol=1e-5) and torch.allclose(grad, reference_grad, atol=1e-6)
    assert ce[3] == 0 and not grad[3].any()


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_sum_matches_unchunked_value_and_gradient(autocast):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=False).requires_grad_(False)
    target = _target("topk", _teacher())
    hidden = [torch.randn(40, 16, requires_grad=True) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chunked = chunked_loss_sum(hidden, head, lambda logits, a, b, g: sparse_kl(logits, target.rows(a, b), g), chunk=7)
    weights = torch.tensor([0.5, 2.0])  # each sum's gradient scales with its own weight
    grad_chunked = torch.autograd.grad((chunked * weights).sum(), hidden)
    whole = torch.stack([_textbook_sparse_kl(head(h), target).sum() for h in hidden])
    grad_whole = torch.autograd.grad((whole * weights).sum(), hidden)
    # bf16 matmuls round logits to ~3 significant digits: the sums and gradients agree to that
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-4)
    assert chunked.shape == (2,) and torch.allclose(chunked, whole, **tolerance)
    for a, b in zip(grad_chunked, grad_whole):
        assert torch.allclose(a, b, **tolerance)


def test_a_share_of_positions_is_the_loss_on_those_positions():
    """train.loss_positions: the mean loss over a random subset of positions drawn by the given generator
    (the same for every exit), with no gradient at the others; exit layers still see every position."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=False).requires_grad_(False)
    input_ids = torch.randint(0, VOCAB, (2, 20))
    hidden = {1: torch.randn(2, 20, 16, requires_grad=True), 2: torch.randn(2, 20, 16, requires_grad=True)}
    forward = lambda ids, full: (hidden, None)  # noqa: E731 - what a BalconyModel returns
    losses = exit_losses(forward, head, [1, 2], {"input_ids.npy": input_ids}, None, 8, "ce", loss_positions=0.25,
                         generator=torch.Generator().manual_seed(7))
    keep = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:10].sort().values
    labels = next_token_labels(input_ids)[keep]
    known = labels != -100
    for loss, h in zip(losses, hidden.values()):
        logits = head(h.reshape(40, -1)[keep])[known]
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels[known]), atol=1e-5)
    grad = torch.autograd.grad(losses.sum(), hidden[1])[0].reshape(40, -1)
    assert grad[keep].abs().sum() > 0 and grad[[i for i in range(40) if i not in keep]].abs().sum() == 0
