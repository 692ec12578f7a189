"""Target formats: bit packing, encode -> decode, the losses' estimators, chunked teacher targets."""
import math
from collections import Counter

import pytest
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError, ShardError
from pipeline.losses import full_kl, sparse_kl
from pipeline.targets import LOGPROB_RANGE, SparseTarget, TargetFormat, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [1, 3, 8, 10, 16, 17])
def test_bit_packing_round_trip(bits):
    values = torch.randint(0, 2**bits, (5, 7, 33))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, math.ceil(33 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 33), values)


def _logprobs(n=16, vocab=1000, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * scale).log_softmax(-1)


def round_trip(fmt: TargetFormat, ids: torch.Tensor, values: torch.Tensor):
    """Targets as a teacher shard gives them back: encoded as one sequence, decoded, as the loss reads them."""
    return fmt.target(*fmt.decode(fmt.encode(ids, values), len(ids)))


def test_topk_round_trip_equals_topk_of_logits():
    logprobs = _logprobs()
    fmt = TargetFormat(TeacherConfig(k=32, logprob_bits=12), vocab_size=1000)
    target = round_trip(fmt, *fmt.select(logprobs.clone(), None))
    values, ids = logprobs.topk(32, dim=-1)
    assert torch.equal(target.ids, ids)
    kept = values > -LOGPROB_RANGE
    assert torch.all((target.logprobs - values).abs()[kept] <= fmt.step / 2 + 1e-6)
    total = target.weights.sum(-1) + target.rest
    assert torch.allclose(total, torch.ones_like(total), atol=0.02)
    assert torch.allclose(target.rest, 1 - values.exp().sum(-1), atol=0.02)


def test_topk_bytes():
    fmt = TargetFormat(TeacherConfig(k=64, logprob_bits=10), vocab_size=128256)
    assert fmt.bytes_per_position() == 64 * 17 // 8 + 64 * 10 // 8 == 216
    ids, values = fmt.select(_logprobs(n=5, vocab=128256), None)
    assert fmt.encode(ids, values).nbytes == 5 * 216
    with pytest.raises(ConfigError, match="teacher.k: must be below the vocabulary size 1000"):
        TargetFormat(TeacherConfig(k=1000), vocab_size=1000)


def test_topk_rest_bucket_is_exact_when_it_holds_one_token():
    teacher, student = _logprobs(vocab=50, seed=1), _logprobs(vocab=50, seed=2) * 1.3
    fmt = TargetFormat(TeacherConfig(k=49, logprob_bits=16), vocab_size=50)
    target = round_trip(fmt, *fmt.select(teacher.clone(), None))
    assert torch.allclose(sparse_kl(student, target)[0], full_kl(student, teacher)[0], rtol=2e-3, atol=2e-3)


def test_topk_underestimates_the_kl():
    teacher, student = _logprobs(seed=3), _logprobs(seed=4)
    fmt = TargetFormat(TeacherConfig(k=8, logprob_bits=16), vocab_size=1000)
    target = round_trip(fmt, *fmt.select(teacher.clone(), None))
    # coarse-graining can only lose information (data processing inequality)
    assert torch.all(sparse_kl(student, target)[0] <= full_kl(student, teacher)[0] + 1e-2)


def test_sampled_estimator_is_unbiased():
    vocab, draws, replicas = 40, 12, 4000
    teacher = _logprobs(n=1, vocab=vocab, seed=5, scale=1.5)
    student = _logprobs(n=1, vocab=vocab, seed=6, scale=1.5)
    exact = full_kl(student, teacher)[0][0]
    # the variance of one draw of log p(x) - log q(x), x ~ p, sets the tolerance
    diff = teacher[0] - student[0]
    variance = (teacher[0].exp() * (diff - exact) ** 2).sum()
    tolerance = 4 * math.sqrt(variance / (draws * replicas))
    fmt = TargetFormat(TeacherConfig(format="sampled", samples=draws, logprob_bits=16), vocab_size=vocab)
    uniforms = torch.rand(replicas, draws, generator=torch.Generator().manual_seed(7))
    target = round_trip(fmt, *fmt.select(teacher.expand(replicas, -1).clone(), uniforms))
    estimates = sparse_kl(student.expand(replicas, -1), target)[0]
    assert abs(estimates.mean() - exact) < tolerance, (float(estimates.mean()), float(exact), tolerance)
    assert estimates.std() > 0  # a real estimator, not the exact value in disguise
    # draws follow the teacher distribution
    freq = torch.bincount(target.ids.flatten(), minlength=vocab).float() / target.ids.numel()
    assert torch.allclose(freq, teacher[0].exp(), atol=0.01)


def per_draw_target(fmt: TargetFormat, ids: torch.Tensor, values: torch.Tensor):
    """The draws as the earlier per-draw format stored them (every draw's id and quantised log-prob, weight
    1/n each), in id order: the reference the distinct-token form must give back."""
    ids, order = ids.sort(-1)
    levels = (-values.gather(-1, order) / fmt.step).round().clamp(0, 2**fmt.logprob_bits - 1)
    return SparseTarget(ids, -levels * fmt.step, torch.full(ids.shape, 1.0 / fmt.entries), rest=None)


@pytest.mark.parametrize("draws", [1, 7, 64])
def test_sampled_stores_each_distinct_token_once_and_trains_as_every_draw(draws):
    """Stored once per distinct token with its count, the draws decode to exactly the per-draw targets (in
    id order): the loss and its gradient are the same bit for bit; in draw order, the same up to rounding."""
    teacher, student = _logprobs(n=64, vocab=300, seed=8, scale=3.0), _logprobs(n=64, vocab=300, seed=9)
    fmt = TargetFormat(TeacherConfig(format="sampled", samples=draws), vocab_size=300)
    ids, values = fmt.select(teacher.clone(), torch.rand(64, draws, generator=torch.Generator().manual_seed(10)))
    encoded = fmt.encode(ids, values)
    distinct = sum(len(set(row.tolist())) for row in ids)
    repeated = sum(sum(c > 1 for c in Counter(row.tolist()).values()) for row in ids)
    assert fmt.stored_entries(encoded, 64) == distinct < 64 * draws or draws == 1
    # distinct ids per position; every distinct id, its log-prob and a flag; a count for the flagged
    assert encoded.nbytes == sum(math.ceil(count * bits / 8) for count, bits in (
        (64, fmt.count_bits), (distinct, fmt.id_bits), (distinct, fmt.logprob_bits), (distinct, 1),
        (repeated, fmt.count_bits)))
    if draws > 1:  # what make plan counts from a teacher's distinct and repeated shares: the same, but for padding
        assert abs(64 * fmt.bytes_per_position(distinct / 64, repeated / distinct) - encoded.nbytes) <= 5
    ours, reference = round_trip(fmt, ids, values), per_draw_target(fmt, ids, values)
    for name in ("ids", "logprobs", "weights"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name
    kl, grad = sparse_kl(student, ours, with_grad=True)
    reference_kl, reference_grad = sparse_kl(student, reference, with_grad=True)
    assert torch.equal(kl, reference_kl) and torch.equal(grad, reference_grad)
    # the draws in the order they were drawn: the same sums, added in another order
    unsorted = per_draw_target(fmt, ids, values)
    unsorted.ids, unsorted.logprobs = ids, -(-values / fmt.step).round().clamp(0, 2**fmt.logprob_bits - 1) * fmt.step
    assert torch.allclose(sparse_kl(student, unsorted)[0], kl, rtol=1e-6, atol=1e-6)
    assert torch.equal(fmt.target(*fmt.stored(ids, values)).ids, ours.ids)


def test_sampled_gradient_does_not_read_the_log_probs():
    """The sampled estimator's gradient is q - (draw frequencies): log-prob bits change the logged loss only."""
    teacher, student = _logprobs(vocab=300, seed=11), _logprobs(vocab=300, seed=12)
    uniforms = torch.rand(16, 32, generator=torch.Generator().manual_seed(13))
    targets = []
    for bits in (6, 16):
        fmt = TargetFormat(TeacherConfig(format="sampled", samples=32, logprob_bits=bits), vocab_size=300)
        targets.append(round_trip(fmt, *fmt.select(teacher.clone(), uniforms)))
    (coarse_kl, coarse_grad), (fine_kl, fine_grad) = (sparse_kl(student, t, with_grad=True) for t in targets)
    assert torch.equal(coarse_grad, fine_grad) and not torch.equal(coarse_kl, fine_kl)


def test_a_truncated_sampled_sequence_is_refused():
    fmt = TargetFormat(TeacherConfig(format="sampled", samples=8), vocab_size=300)
    encoded = fmt.encode(*fmt.select(_logprobs(vocab=300, scale=2.0), torch.rand(16, 8)))
    with pytest.raises(ShardError, match=r"sampled targets of \d+ bytes, expected \d+ for 16 positions with \d+ "
                                         r"distinct ids, \d+ drawn more than once"):
        fmt.decode(encoded[:-1], 16)
    with pytest.raises(ShardError, match=r"sampled targets of 3 bytes, fewer than the \d+ that 16 positions with 0"):
        fmt.decode(encoded[:3], 16)
