"""Quality of every exit against the full model, and of the baselines at the same depths (speed:
pipeline/timing.py; the table and plot: pipeline/report.py).

Variants scored on held-out sequences, all from one backbone pass per batch:
- `full`: the backbone itself (cost 1);
- `exit@k`: the Balcony exits (layers[:k] + exit layer + exit norm + head; cost (k+1)/L);
- `lens@k`: the logit lens (the backbone's final norm + head on the hidden state after k layers;
  cost k/L): what the exit layer buys over no exit layer at all;
- baselines trained by the same stage on the same data, when `eval.baselines` names them:
  `tuned@k`, the tuned lens (an affine map into the final norm and head; cost k/L), and `ce@k`,
  exits trained on next-token cross-entropy instead of KL (EE-Tuning; cost (k+1)/L).

Metrics per variant: perplexity on the next token, KL(full || variant) per token over the full
vocabulary, and top-1 agreement with the full model; all computed chunk by chunk.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbone import load_tokenizer, tokenizer_fingerprint
from pipeline.balcony import BalconyModel
from pipeline.config import Config, DataConfig, EvalConfig
from pipeline.corpus import ShardPacker, ShardSpec, document_encoder
from pipeline.errors import ConfigError, InputError
from pipeline.losses import next_token_labels
from pipeline.registry import TOKENIZE
from pipeline.shards import MANIFEST, TOKENS_KEY, read_manifest, read_shard
from pipeline.sources import stream_documents
from pipeline.stage import stop_at_time_limit
from pipeline.speculative_speed import best_choice, measure_speculative
from pipeline.timing import measure_speed


def heldout_sequences(cfg: Config, tokens_dir, limit: int) -> torch.Tensor:
    """The held-out split of a tokenize stage's output (this run's, or another run's), `limit` sequences at most."""
    manifest = read_manifest(tokens_dir, TOKENIZE.tag, expect={
        "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(cfg.model)), "seq_len": cfg.data.seq_len})
    rows = [s[TOKENS_KEY] for record in manifest["splits"]["heldout"]["shards"] for s in read_shard(tokens_dir, record)]
    return torch.as_tensor(np.stack(rows[: limit or None])).long()


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:16]


SOURCES = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def file_sequences(cfg: Config, pattern: str) -> torch.Tensor:
    """Documents of text files (each + EOS, in file order) packed into eval.data_tokens worth of sequences."""
    source = SOURCES.get(Path(pattern).suffix)
    if source is None:
        raise ConfigError(f"eval.data: {pattern!r} is neither a tokenize output folder nor a file of "
                          f"{', '.join(SOURCES)}")
    data = DataConfig(source=source, files=[pattern], text_field=cfg.data.text_field, shuffle_buffer=0,
                      seq_len=cfg.data.seq_len)
    packer = ShardPacker(ShardSpec("heldout", 0, max(1, cfg.eval.data_tokens // cfg.data.seq_len)), cfg.data.seq_len)
    encode = document_encoder(load_tokenizer(cfg.model))
    for text in stream_documents(data, key="eval.data"):
        packer.add(encode([text])[0])
        if packer.full:
            return torch.as_tensor(packer.sequences()).long()
    whole = packer.filled // cfg.data.seq_len
    if whole == 0:
        raise InputError(f"eval.data: {pattern} holds {packer.filled} tokens, less than one sequence of {cfg.data.seq_len}")
    return torch.as_tensor(packer.buffer[: whole * cfg.data.seq_len].reshape(whole, -1)).long()


def eval_sets(cfg: Config) -> dict[str, torch.Tensor]:
    """What to score: this run's held-out tokens, then each eval.data entry (a tokenize output
    folder: its held-out split; else text files)."""
    sets = {"heldout": heldout_sequences(cfg, TOKENIZE.dir(cfg), cfg.eval.max_sequences)}
    for entry in cfg.eval.data:
        if (Path(entry) / MANIFEST).exists():
            sets[entry] = heldout_sequences(cfg, Path(entry), max(1, cfg.eval.data_tokens // cfg.data.seq_len))
        else:
            sets[entry] = file_sequences(cfg, entry)
    return sets


@dataclass
class Variant:
    name: str
    kind: str  # full | balcony | logit_lens | ce_exit
    depth: int
    cost: float
    sums: dict[str, float] = field(default_factory=lambda: {"nll": 0.0, "kl": 0.0, "agree": 0.0})
    counts: dict[str, int] = field(default_factory=lambda: {"nll": 0, "kl": 0})

    def metrics(self) -> dict[str, float]:
        return {"perplexity": float(torch.tensor(self.sums["nll"] / self.counts["nll"]).exp()),
                "kl_to_full": self.sums["kl"] / self.counts["kl"],
                "top1_agreement": self.sums["agree"] / self.counts["kl"]}


BASELINE_KINDS = {"tuned_lens": ("tuned", 0), "ce_exit": ("ce", 1)}  # kind: (name prefix, layers beyond depth k)


def baseline_kind(baseline: BalconyModel) -> str:
    """What exported exits are, from their balcony_config.json: a tuned lens, or CE-trained exits."""
    if baseline.kind == "tuned_lens":
        return "tuned_lens"
    if baseline.meta.get("objective") == "ce":
        return "ce_exit"
    raise ValueError("eval.baselines: only a tuned lens (exits.kind=tuned_lens) or CE-trained exits "
                     f"(train.objective=ce) are baselines; got {baseline.kind} exits trained on {baseline.meta.get('objective')}")


def check_baselines(baselines: list[BalconyModel], folders: list[Path]) -> None:
    """Refuses a baseline (naming its folder) that is neither a tuned lens nor CE exits."""
    for folder, baseline in zip(folders, baselines):
        try:
            baseline_kind(baseline)
        except ValueError as e:
            raise ConfigError(f"{e} in {folder}") from None


def variants_of(model: BalconyModel, baselines: list[BalconyModel]) -> list[Variant]:
    layers = model.num_layers
    out = [Variant("full", "full", layers, 1.0)]
    out += [Variant(f"exit@{k}", "balcony", k, (k + 1) / layers) for k in model.depths]
    out += [Variant(f"lens@{k}", "logit_lens", k, k / layers) for k in model.depths]
    for baseline in baselines:
        kind = baseline_kind(baseline)
        prefix, extra = BASELINE_KINDS[kind]
        out += [Variant(f"{prefix}@{k}", kind, k, (k + extra) / layers) for k in baseline.depths]
    return out


@torch.no_grad()
def score_batch(model: BalconyModel, baselines: list[BalconyModel], variants: list[Variant],
                input_ids: torch.Tensor, chunk: int) -> None:
    """Add one batch [B, T] to every variant's sums."""
    taps: dict[int, torch.Tensor] = {}
    exits, final = model(input_ids, full=True, taps=taps)
    n = input_ids.numel()
    labels = next_token_labels(input_ids)
    norm, head = model.decoder.norm, model.logits
    hidden = {"full": final}
    hidden.update({f"exit@{k}": h for k, h in exits.items()})
    hidden.update({f"lens@{k}": norm(h) for k, h in taps.items()})
    for baseline in baselines:
        prefix = BASELINE_KINDS[baseline_kind(baseline)][0]
        hidden.update({f"{prefix}@{k}": h for k, h in baseline(input_ids)[0].items()})
    flat = {name: h.reshape(n, -1) for name, h in hidden.items()}
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # one [chunk, vocab] of logits per variant and no log-softmax: with a large vocabulary the head's
        # matmul and every pass over its output dominate. KL(full || v) = sum p log p - sum p z_v + lse(z_v)
        # (the probabilities sum to 1), so each variant needs its logits' logsumexp and one dot with p.
        full_logits = head(flat["full"][start:stop]).float()
        full_top1 = full_logits.argmax(-1)
        full_lse = full_logits.logsumexp(-1)
        full_probs = (full_logits - full_lse[:, None]).exp_()
        full_neg_entropy = torch.linalg.vecdot(full_probs, full_logits) - full_lse
        del full_logits
        chunk_labels = labels[start:stop]
        known = chunk_labels != -100
        for variant in variants:
            logits = head(flat[variant.name][start:stop]).float()
            lse = logits.logsumexp(-1)
            nll = lse[known] - logits[known].gather(-1, chunk_labels[known].unsqueeze(-1))[:, 0]
            variant.sums["nll"] += float(nll.sum())
            variant.counts["nll"] += int(known.sum())
            kl = full_neg_entropy - torch.linalg.vecdot(full_probs, logits) + lse
            variant.sums["kl"] += float(kl.clamp_min(0).sum())  # >= 0; rounding leaves ~1e-6 at the full model
            variant.sums["agree"] += float((logits.argmax(-1) == full_top1).sum())
            variant.counts["kl"] += stop - start


def score(model: BalconyModel, baselines: list[BalconyModel], variants: list[Variant], sequences: torch.Tensor,
          settings: EvalConfig, device: torch.device, desc: str) -> list[dict]:
    """Every variant's metrics on `sequences` (batches of settings.batch_size), as rows."""
    with tqdm(total=sequences.numel(), unit="tok", unit_scale=True, desc=desc) as bar:
        for batch in sequences.split(settings.batch_size):
            stop_at_time_limit(f"during {desc}, scored again after the requeue", model.decoder.tensor_parallel)
            score_batch(model, baselines, variants, batch.to(device), settings.chunk_size)
            bar.update(batch.numel())
    return [{"name": v.name, "kind": v.kind, "depth": v.depth, "relative_cost": v.cost, **v.metrics()} for v in variants]


def quality(cfg: Config, model: BalconyModel, baselines: list[BalconyModel], sequences: torch.Tensor,
            device: torch.device, name: str) -> list[dict]:
    """Perplexity, KL to the full model and top-1 agreement of every variant on `sequences`."""
    return score(model, baselines, variants_of(model, baselines), sequences, cfg.eval, device, f"evaluate quality ({name})")


def evaluate(cfg: Config, model: BalconyModel, baselines: list[BalconyModel], sets: dict[str, torch.Tensor],
             device: torch.device) -> dict:
    """metrics.json's measurements: every variant's quality on the held-out tokens (with speed when
    eval.speed) and on each eval.data set."""
    sequences = sets["heldout"]
    rows = quality(cfg, model, baselines, sequences, device, "heldout")
    other_data = [{"data": name, "sequences": len(seqs), "tokens": seqs.numel(),
                   "rows": quality(cfg, model, baselines, seqs, device, name)}
                  for name, seqs in sets.items() if name != "heldout"]
    speed = {"cost_line": None}
    if cfg.eval.speed:
        stop_at_time_limit("before the speed measurements, scored again after the requeue", model.decoder.tensor_parallel)
        speed["cost_line"] = measure_speed(cfg.eval, model, rows, sequences.to(device))
        speed["speculative"] = measure_speculative(model, cfg.eval, sequences.to(device), speed["cost_line"])
        speed["speculative_choice"] = best_choice(speed["speculative"])
    return {"num_layers": model.num_layers, "depths": model.depths, "heldout_sequences": len(sequences),
            "heldout_tokens": sequences.numel(), "device": device.type, "rows": rows, **speed, "other_data": other_data}
