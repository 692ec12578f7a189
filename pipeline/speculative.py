"""Self-speculative greedy decoding: an exit drafts, the full model verifies, one KV cache serves both.

The draft model (layers[:k] + exit k) and the full model share layers[:k], so one cache holds:
slots 0..L-1 for the backbone layers and slot L for the exit layer. A round:

1. draft: feed the last token, then each drafted one, through layers[:k] (filling slots 0..k-1)
   and the exit (slot L); keep each hidden state after layer k;
2. verify: run only layers[k:] over those hidden states (the prefix is NOT recomputed) and take
   the full model's greedy token at each position;
3. accept the drafted tokens up to the first disagreement, plus the full model's own token there,
   and crop every slot back to the accepted length.

The output is the full model's greedy output (up to floating-point ties); the saving is the
drafted tokens that are accepted, each costing k+1 instead of L layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.balcony import BalconyModel
from pipeline.decoder import cache_slot


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class _SharedCacheRunner:
    def __init__(self, model: BalconyModel, depth: int):
        self.model, self.depth, self.layers = model, depth, model.num_layers
        self.decoder, self.exit = model.decoder, model.exits[str(depth)]
        self.cache, self.config = self.decoder.cache([self.exit.layer_type])  # slot L: the exit layer

    def _layer(self, layer, slot, hidden, positions):
        kind = self.config.layer_types[slot]
        arguments = self.decoder.layer_arguments(hidden, positions, {kind}, self.cache, slot, self.config)
        return layer(hidden, **arguments[kind])

    def backbone(self, hidden, start: int, stop: int, positions):
        for index in range(start, stop):
            hidden = self._layer(self.decoder.layers[index], index, hidden, positions)
        return hidden

    def exit_logits(self, hidden, positions):
        with cache_slot(self.exit.layer, self.layers):
            out = self._layer(self.exit.layer, self.layers, hidden, positions)
        return self.decoder.logits(self.exit.norm(out))

    def full_logits(self, hidden):
        return self.decoder.logits(self.decoder.norm(hidden))

    def crop(self, slots: range, remove: int) -> None:
        """Drop the last `remove` positions (0: none) of each slot (Decoder.crop)."""
        for slot in slots:
            self.decoder.crop(self.cache, slot, remove)


@torch.no_grad()
def speculative_generate(model: BalconyModel, input_ids: torch.Tensor, depth: int, max_new_tokens: int,
                         draft_tokens: int = 4, eos_token_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of a [1, P] prompt with exit `depth` drafting `draft_tokens` per round."""
    if input_ids.shape[0] != 1:
        raise ValueError("speculative decoding runs one sequence at a time")
    run, stats, k, L = _SharedCacheRunner(model, depth), SpeculativeStats(), depth, model.num_layers
    embed = model.decoder.embed

    def positions(start: int, count: int = 1):
        return torch.arange(start, start + count, device=input_ids.device).unsqueeze(0)

    # prefill: the prompt through the prefix, the exit (to fill its slot) and the rest
    length = input_ids.shape[1]
    hidden_k = run.backbone(embed(input_ids), 0, k, positions(0, length))
    run.exit_logits(hidden_k, positions(0, length))
    final = run.full_logits(run.backbone(hidden_k, k, L, positions(0, length)))
    generated = [int(final[0, -1].argmax())]
    while len(generated) < max_new_tokens and generated[-1] != eos_token_id:
        token, drafts, states = generated[-1], [], []
        for i in range(draft_tokens):  # 1. draft
            states.append(run.backbone(embed(torch.tensor([[token]], device=input_ids.device)), 0, k, positions(length + i)))
            token = int(run.exit_logits(states[-1], positions(length + i))[0, -1].argmax())
            drafts.append(token)
        states.append(run.backbone(embed(torch.tensor([[token]], device=input_ids.device)), 0, k, positions(length + draft_tokens)))
        # 2. verify: layers[k:] only, over the last token and every draft
        verified = run.full_logits(run.backbone(torch.cat(states, dim=1), k, L,
                                                positions(length, draft_tokens + 1)))[0].argmax(-1).tolist()
        # 3. accept
        accepted = 0
        while accepted < draft_tokens and drafts[accepted] == verified[accepted]:
            accepted += 1
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + draft_tokens, stats.accepted + accepted
        run.crop(range(L), draft_tokens - accepted)
        if accepted == draft_tokens:  # the exit never saw the last draft: give its slot that position
            run.exit_logits(states[-1], positions(length + draft_tokens))
        run.crop(range(L, L + 1), max(0, draft_tokens - accepted - 1))
        length += accepted + 1
        generated += drafts[:accepted] + [verified[accepted]]
        if eos_token_id in generated:
            generated = generated[: generated.index(eos_token_id) + 1]
    new = torch.tensor([generated[:max_new_tokens]], device=input_ids.device)
    return torch.cat([input_ids, new], dim=1), stats
