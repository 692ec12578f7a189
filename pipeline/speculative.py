"""Self-speculative decoding: an exit drafts, the full model verifies, one KV cache serves both.

The draft model (layers[:k] + exit k) and the full model share layers[:k], so one cache holds slots
0..L-1 for the backbone's layers and slot L for the exit's layer. A round, for every sequence of a batch:

1. draft: feed the last token, then each drafted one, through layers[:k] and the exit, keeping the
   hidden state after layer k; a sequence stops proposing once the exit's top-1 probability falls
   below `tau` or it has `max_draft` drafts (a round whose first draft is unsure proposes none and
   has cost only the exit's layer and head on top of plain decoding);
2. verify: run only layers[k:] over those hidden states (the prefix is NOT recomputed) and take the
   full model's distribution at each position;
3. accept: greedy, the drafts up to the first one that is not the full model's argmax; sampling, each
   draft x with probability min(1, p(x) / q(x)), and at the first rejection a token from the residual
   max(p - q, 0), normalised (Leviathan et al. 2023; Chen et al. 2023). Either way one more token of
   the full model's own follows, so the output has the full model's distribution (greedy: its greedy
   output, up to floating-point ties) and a round yields 1 to max_draft + 1 tokens.

Ragged batches: prompts come left-padded with an attention mask, as to HF generate. Every sequence
of a batch feeds the same positions of a round, and accepts its own number of them. The cache is
kept right-aligned: after each round a sequence that accepted fewer tokens than the batch's most is
shifted right in every slot (its keys are already rotated, so a shift changes nothing they mean) and
the columns it vacates join its left padding. A sequence's tokens stay contiguous, so sliding-window
and chunked masks, which count cache columns, see the distances they would see alone; finished
sequences leave the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.balcony import BalconyModel
from pipeline.decoder import cache_slot


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen from logits, as HF generate does: the argmax (greedy), or a draw from
    softmax(logits / temperature) cut to the `top_k` most likely tokens and then to the smallest set
    holding `top_p` of the probability. Drafts and verification use the same settings."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0, top_k >= 0 and top_p in (0, 1], got {self}")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from (greedy: the softmax, whose argmax is the token)."""
        logits = logits.float()
        if not self.do_sample:
            return torch.softmax(logits, dim=-1)
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            sorted_probs = ordered.softmax(-1)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # the most likely token always stays
            logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
        return torch.softmax(logits, dim=-1)

    def choose(self, probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of [..., V] probabilities."""
        if not self.do_sample:
            return probs.argmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


@dataclass(frozen=True)
class DraftPolicy:
    """How many tokens an exit drafts per round."""

    max_draft: int = 4
    """At most this many drafts per round."""
    tau: float = 0.0
    """Stop drafting when the exit's top-1 probability falls below this (0: always max_draft drafts)."""

    def __post_init__(self):
        if self.max_draft < 1 or not 0 <= self.tau < 1:
            raise ValueError(f"draft policy needs max_draft >= 1 and tau in [0, 1), got {self}")


@dataclass
class SpeculativeStats:
    """Counts over every sequence's rounds (a round: one verification of one sequence's drafts)."""

    rounds: int = 0
    drafted: int = 0  # drafts proposed to the verifier
    accepted: int = 0  # drafts the verifier kept
    batch_rounds: int = 0  # verification passes over the batch
    draft_steps: int = 0  # exit evaluations over the batch (a round's last may be the one that stopped it)
    trace: list[tuple[int, int, int, bool]] = field(default_factory=list)
    """Per verification pass: rows, exit evaluations, drafts verified, whether the last draft needed its own
    prefix pass (what the cost model prices: pipeline/speculative_speed.py)."""

    def merge(self, other: "SpeculativeStats") -> None:
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.batch_rounds += other.batch_rounds
        self.draft_steps += other.draft_steps
        self.trace += other.trace

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens a round yields: its accepted drafts and the verifier's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def draft_length(self) -> float:
        """Mean drafts proposed per round."""
        return self.drafted / self.rounds if self.rounds else 0.0

    def summary(self) -> dict[str, float]:
        return {"acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round,
                "draft_length": self.draft_length, "rounds": self.rounds,
                "draft_steps_per_round": self.draft_steps / self.batch_rounds if self.batch_rounds else 0.0}


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What to draw from after a rejected draft: max(p - q, 0) normalised (p itself where p == q)."""
    rest = (p - q).clamp_min(0)
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp_min(1e-30), p)


class _SharedCache:
    """One KV cache for the backbone (slots 0..L-1) and exit k (slot L), kept right-aligned over a batch."""

    def __init__(self, model: BalconyModel, depth: int, attention_mask: torch.Tensor):
        self.decoder, self.exit, self.layers = model.decoder, model.exits[str(depth)], model.num_layers
        self.cache, self.config = self.decoder.cache([self.exit.layer_type])  # slot L: the exit layer
        self.mask = attention_mask.long()  # [B, columns]: 1 where a cache column holds one of the row's tokens
        self.committed = attention_mask.shape[1]  # columns every slot holds at the start of a round

    def _columns(self, slot: int) -> int:
        return self.cache.layers[slot].get_seq_length() if self.cache.layers[slot].is_initialized else 0

    def _run(self, layers: list[tuple[int, torch.nn.Module]], hidden: torch.Tensor, positions: torch.Tensor):
        """Layers (slot, module) whose slots hold the same columns, over `hidden` at `positions` [B, q]."""
        queries, first = hidden.shape[1], layers[0][0]
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), self._columns(first) + queries - self.committed)], 1)
        kinds = {self.config.layer_types[slot]: slot for slot, _ in reversed(layers)}  # the first slot of each type
        arguments = {kind: self.decoder.layer_arguments(hidden, positions, {kind}, self.cache, slot, self.config,
                                                        attention_mask=mask)[kind] for kind, slot in kinds.items()}
        for slot, layer in layers:
            hidden = layer(hidden, **arguments[self.config.layer_types[slot]])
        return hidden

    def backbone(self, hidden, start: int, stop: int, positions):
        return self._run([(i, self.decoder.layers[i]) for i in range(start, stop)], hidden, positions)

    def exit_hidden(self, hidden, positions):
        """The exit's layer (on its own slot) and norm: what its logits are made from."""
        with cache_slot(self.exit.layer, self.layers):
            return self.exit.norm(self._run([(self.layers, self.exit.layer)], hidden, positions))

    def exit_logits(self, hidden, positions):
        return self.decoder.logits(self.exit_hidden(hidden, positions))

    def full_logits(self, hidden):
        return self.decoder.logits(self.decoder.norm(hidden))

    def commit(self, kept: torch.Tensor) -> None:
        """Keep the first kept[b] positions fed this round for row b, and right-align the rows: every slot
        ends `max(kept)` columns after the last commit, a row with fewer shifted right into its padding."""
        most = int(kept.max())
        shift = most - kept
        self.decoder.realign(self.cache, shift, self.committed + most)
        columns = torch.arange(self.mask.shape[1] + most, device=shift.device)
        grown = torch.cat([self.mask, self.mask.new_ones(len(self.mask), most)], 1)
        self.mask = torch.where(columns >= shift[:, None], grown.gather(1, (columns - shift[:, None]).clamp_min(0)), 0)
        self.committed += most

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


@torch.no_grad()
def speculative_generate(model: BalconyModel, input_ids: torch.Tensor, depth: int, max_new_tokens: int,
                         policy: DraftPolicy = DraftPolicy(), sampling: Sampling = Sampling(),
                         attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                         pad_token_id: int | None = None, generator: torch.Generator | None = None,
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Decode [B, P] prompts (left-padded, with `attention_mask`, as for HF generate) with exit `depth`
    drafting for the full model. Returns the prompts and their new tokens ([B, P + longest], finished
    rows padded with `pad_token_id`, else eos), and the round counts."""
    if str(depth) not in model.exits:
        raise ValueError(f"no exit at depth {depth}; exits: {model.depths}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device, k, L = input_ids.device, depth, model.num_layers
    run, stats, embed = _SharedCache(model, depth, attention_mask), SpeculativeStats(), model.decoder.embed
    lengths = attention_mask.long().sum(1)  # a row's tokens in the cache (its next position)

    # prefill: the prompts through the prefix, the exit (to fill its slot) and the rest; the first token is the full model's
    positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    hidden_k = run.backbone(embed(input_ids), 0, k, positions)
    run.exit_hidden(hidden_k, positions)
    last = run.full_logits(run.backbone(hidden_k, k, L, positions)[:, -1:])[:, 0]
    pending = sampling.choose(sampling.probs(last), generator)  # [B]: the next token to feed
    rows = torch.arange(len(input_ids), device=device)  # the batch rows still decoding
    generated: list[list[int]] = [[int(t)] for t in pending]

    def finished(row: int) -> bool:
        out = generated[row]
        return len(out) >= max_new_tokens or (eos_token_id is not None and out[-1] == eos_token_id)

    while True:
        live = torch.tensor([not finished(int(r)) for r in rows], device=device)
        if not bool(live.all()):
            rows, pending, lengths = rows[live], pending[live], lengths[live]
            if not len(rows):
                break
            run.keep_rows(live.nonzero()[:, 0])
        room = max(max_new_tokens - len(generated[int(r)]) for r in rows) - 1  # drafts past the end are wasted
        most = min(policy.max_draft, room)

        # 1. draft
        fed, drafts, draft_probs, states = [pending], [], [], []
        proposing = torch.ones(len(rows), dtype=torch.bool, device=device)
        proposed = torch.zeros(len(rows), dtype=torch.long, device=device)
        steps = 0
        for step in range(most + 1):
            pos = (lengths + step)[:, None]
            states.append(run.backbone(embed(fed[-1][:, None]), 0, k, pos))
            if step == most:  # the last draft needs only the prefix (the verifier runs from layer k)
                break
            q = sampling.probs(run.exit_logits(states[-1], pos)[:, 0])
            steps += 1
            proposing &= q.max(-1).values >= policy.tau
            if not bool(proposing.any()):
                break
            proposed += proposing.long()
            drafts.append(sampling.choose(q, generator))
            draft_probs.append(q)
            fed.append(drafts[-1])
        count = len(drafts)

        # 2. verify: layers[k:] only, over the last token and every draft
        positions = lengths[:, None] + torch.arange(count + 1, device=device)
        p = sampling.probs(run.full_logits(run.backbone(torch.cat(states, 1), k, L, positions)))  # [B, count+1, V]

        # 3. accept, per row, up to its first rejected draft (or all it proposed), then one token of the full model
        if count:
            x, q = torch.stack(drafts, 1), torch.stack(draft_probs, 1)
            if sampling.do_sample:
                ratio = p.gather(-1, x[..., None])[..., 0] / q.gather(-1, x[..., None])[..., 0]
                kept = torch.rand(ratio.shape, generator=generator, device=device) <= ratio
            else:
                kept = x == p[:, :count].argmax(-1)
            kept &= torch.arange(count, device=device) < proposed[:, None]
            accepted = kept.long().cumprod(1).sum(1)
        else:
            accepted = torch.zeros(len(rows), dtype=torch.long, device=device)
        target = p[torch.arange(len(rows)), accepted]
        if count and sampling.do_sample:
            rejected = accepted < proposed
            at = accepted.clamp_max(count - 1)
            target = torch.where(rejected[:, None], residual(target, q[torch.arange(len(rows)), at]), target)
        chosen = sampling.choose(target, generator)

        # the exit's slot lacks the last draft when a row kept every draft of a full-length round
        if count == most and bool((accepted == count).any()):
            run.exit_hidden(states[-1], (lengths + count)[:, None])
        run.commit(accepted + 1)
        for i, row in enumerate(rows.tolist()):
            generated[row] += [int(t) for t in (x[i, : accepted[i]] if count else [])] + [int(chosen[i])]
        lengths, pending = lengths + accepted + 1, chosen
        stats.rounds += len(rows)
        stats.batch_rounds += 1
        stats.draft_steps += steps
        stats.trace.append((len(rows), steps, count, count == most))
        stats.drafted += int(proposed.sum())
        stats.accepted += int(accepted.sum())

    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    outputs = []
    for out in generated:
        out = out[:max_new_tokens]
        if eos_token_id is not None and eos_token_id in out:
            out = out[: out.index(eos_token_id) + 1]
        outputs.append(out)
    width = max(len(out) for out in outputs)
    new = torch.tensor([out + [pad] * (width - len(out)) for out in outputs], device=device, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1), stats
