"""Target formats: bit packing, encode -> decode, the losses' estimators, chunked teacher targets."""
import math

import pytest
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError
from pipeline.losses import full_kl, sparse_kl
from pipeline.targets import LOGPROB_RANGE, TargetFormat, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [1, 3, 8, 10, 16, 17])
def test_bit_packing_round_trip(bits):
    values = torch.randint(0, 2**bits, (5, 7, 33))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, math.ceil(33 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 33), values)


def _logprobs(n=16, vocab=1000, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * scale).log_softmax(-1)


@pytest.mark.parametrize("compact", [True, False])
def test_topk_round_trip_equals_topk_of_logits(compact):
    logprobs = _logprobs()
    fmt = TargetFormat(TeacherConfig(k=32, compact=compact, logprob_bits=12), vocab_size=1000)
    target = fmt.decode(fmt.encode(*fmt.select(logprobs.clone(), None)))
    values, ids = logprobs.topk(32, dim=-1)
    assert torch.equal(target.ids, ids)
    tolerance = fmt.step / 2 + 1e-6 if compact else 1e-2
    kept = values > -LOGPROB_RANGE
    assert torch.all((target.logprobs - values).abs()[kept] <= tolerance)
    total = target.weights.sum(-1) + target.rest
    assert torch.allclose(total, torch.ones_like(total), atol=0.02)
    assert torch.allclose(target.rest, 1 - values.exp().sum(-1), atol=0.02)


def test_compact_is_smaller_than_naive():
    naive = TargetFormat(TeacherConfig(k=64, compact=False), vocab_size=128256)
    compact = TargetFormat(TeacherConfig(k=64, logprob_bits=10), vocab_size=128256)
    assert naive.bytes_per_position() == 64 * 6
    assert compact.bytes_per_position() == 64 * 17 // 8 + 64 * 10 // 8 == 216
    with pytest.raises(ConfigError, match="teacher.k: must be below the vocabulary size 1000"):
        TargetFormat(TeacherConfig(k=1000), vocab_size=1000)


def test_topk_rest_bucket_is_exact_when_it_holds_one_token():
    teacher, student = _logprobs(vocab=50, seed=1), _logprobs(vocab=50, seed=2) * 1.3
    fmt = TargetFormat(TeacherConfig(k=49, compact=False), vocab_size=50)
    target = fmt.decode(fmt.encode(*fmt.select(teacher.clone(), None)))
    assert torch.allclose(sparse_kl(student, target)[0], full_kl(student, teacher)[0], rtol=2e-3, atol=2e-3)


def test_topk_underestimates_the_kl():
    teacher, student = _logprobs(seed=3), _logprobs(seed=4)
    fmt = TargetFormat(TeacherConfig(k=8, compact=False), vocab_size=1000)
    target = fmt.decode(fmt.encode(*fmt.select(teacher.clone(), None)))
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
    fmt = TargetFormat(TeacherConfig(format="sampled", samples=draws, compact=False), vocab_size=vocab)
    uniforms = torch.rand(replicas, draws, generator=torch.Generator().manual_seed(7))
    target = fmt.decode(fmt.encode(*fmt.select(teacher.expand(replicas, -1).clone(), uniforms)))
    estimates = sparse_kl(student.expand(replicas, -1), target)[0]
    assert abs(estimates.mean() - exact) < tolerance, (float(estimates.mean()), float(exact), tolerance)
    assert estimates.std() > 0  # a real estimator, not the exact value in disguise
    # draws follow the teacher distribution
    freq = torch.bincount(target.ids.flatten(), minlength=vocab).float() / target.ids.numel()
    assert torch.allclose(freq, teacher[0].exp(), atol=0.01)


def test_compact_sampled_round_trip():
    teacher = _logprobs(vocab=300)
    fmt = TargetFormat(TeacherConfig(format="sampled", samples=24), vocab_size=300)
    ids, values = fmt.select(teacher.clone(), torch.rand(16, 24))
    target = fmt.decode(fmt.encode(ids, values))
    assert torch.equal(target.ids, ids) and target.rest is None
    assert torch.all((target.logprobs - values).abs() <= fmt.step / 2 + 1e-6)
