"""evaluate: every exit (and the baselines) against the full model on the held-out token shards.

    python stages/evaluate_exits.py --config configs/demo.yaml [key.path=value ...]

Writes RUN/eval/metrics.json (schema in the README), RUN/eval/table.md and RUN/eval/plot.png,
and logs them to MLflow with metric names per exit (exit1_kl, lens1_kl, full_perplexity, ...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbone import backbone_fingerprint, load_backbone, load_tokenizer, tokenizer_fingerprint
from pipeline.balcony import WEIGHTS, BalconyModel
from pipeline.config import Config
from pipeline.evaluation import decode_latency, markdown_table, plot, score_batch, speculative_speedup, variants_of
from pipeline.shards import TOKENS_KEY, claim_directory, file_sha256, manifest_hash, read_manifest, read_shard
from pipeline.stage import run_stage
from pipeline.tracking import close_pipeline, stage_run

STAGE = "evaluate"
FORMAT_VERSION = 1


def heldout_sequences(cfg: Config, tokens_dir) -> torch.Tensor:
    manifest = read_manifest(tokens_dir, "tokenize", expect={
        "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(cfg.model)), "seq_len": cfg.data.seq_len})
    rows = [s[TOKENS_KEY] for record in manifest["splits"]["heldout"]["shards"] for s in read_shard(tokens_dir, record)]
    rows = rows[: cfg.eval.max_sequences or None]
    return torch.as_tensor(np.stack(rows)).long()


def evaluate(cfg: Config, task: tuple[int, int]) -> None:
    out, tokens_dir, exits_dir = cfg.run_dir / "eval", cfg.run_dir / "tokens", cfg.run_dir / "exits"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_backbone(cfg.model, device)
    fingerprint = backbone_fingerprint(cfg.model, lm)
    model = BalconyModel.from_pretrained(lm, exits_dir, fingerprint, cfg.exits.depths).to(device).eval()
    baseline = None
    if cfg.eval.baseline_exits:
        baseline = BalconyModel.from_pretrained(lm, cfg.eval.baseline_exits, fingerprint).to(device).eval()
    sequences = heldout_sequences(cfg, tokens_dir)
    header = {"stage": STAGE, "config_hash": cfg.hash("eval"), "input_manifest_hash": manifest_hash(tokens_dir),
              "backbone_fingerprint": fingerprint, "exits_sha256": file_sha256(exits_dir / WEIGHTS),
              "baseline_sha256": file_sha256(baseline_path) if (baseline_path := _baseline_weights(cfg)) else None}
    claim_directory(out, header)
    if (out / "metrics.json").exists():
        print(f"{STAGE}: {out / 'metrics.json'} exists for these exits and data; nothing to do")
    else:
        measure(cfg, model, baseline, sequences, header, out, device)
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    close_pipeline(cfg, mlflow_metrics(rows), [out / "metrics.json", out / "plot.png", out / "table.md"])


def measure(cfg: Config, model: BalconyModel, baseline: BalconyModel | None, sequences: torch.Tensor,
            header: dict, out: Path, device: torch.device) -> None:
    variants = variants_of(model, baseline)
    with stage_run(cfg, STAGE, header["config_hash"]) as tracker:
        with tqdm(total=sequences.numel(), unit="tok", unit_scale=True, desc=f"{STAGE} quality") as bar:
            for batch in sequences.split(cfg.eval.batch_size):
                score_batch(model, baseline, variants, batch.to(device), cfg.eval.chunk_size)
                bar.update(batch.numel())
        rows = [{"name": v.name, "kind": v.kind, "depth": v.depth, "relative_cost": v.cost, **v.metrics()}
                for v in variants]
        latency = {}
        for batch_size in cfg.eval.latency_batches:
            prompt = sequences[:1, : cfg.eval.prompt_tokens].repeat(batch_size, 1).to(device)
            for depth in [None, *model.depths]:
                latency[(batch_size, depth)] = decode_latency(model, depth, prompt, cfg.eval.new_tokens, cfg.eval.repeats)
            print(f"{STAGE}: decode latency at batch {batch_size}: " + ", ".join(
                f"{'full' if d is None else f'exit@{d}'} {latency[(batch_size, d)] * 1e3:.1f} ms/token"
                for d in [None, *model.depths]))
        prompt = sequences[:1, : cfg.eval.prompt_tokens].to(device)
        for row in rows:
            depth = None if row["kind"] == "full" else row["depth"]
            if row["kind"] in ("full", "balcony"):
                row["latency_ms"] = {str(b): latency[(b, depth)] * 1e3 for b in cfg.eval.latency_batches}
                row["speedup"] = {str(b): latency[(b, None)] / latency[(b, depth)] for b in cfg.eval.latency_batches}
                row["ideal_speedup"] = 1 / row["relative_cost"]
            if row["kind"] == "balcony":
                row["speculative"] = speculative_speedup(model, depth, prompt, cfg.eval.new_tokens,
                                                         cfg.eval.draft_tokens, cfg.eval.repeats)
                print(f"{STAGE}: self-speculative with exit@{depth}: acceptance {row['speculative']['acceptance_rate']:.2f}, "
                      f"speedup {row['speculative']['speedup']:.2f}x over greedy full-depth decoding")
        metrics = {"format_version": FORMAT_VERSION, **header, "num_layers": model.num_layers,
                   "depths": model.depths, "heldout_sequences": len(sequences), "heldout_tokens": sequences.numel(),
                   "device": device.type, "rows": rows}
        write_outputs(out, metrics, cfg.eval.latency_batches)
        tracker.metrics(mlflow_metrics(rows))
        for name in ("metrics.json", "table.md", "plot.png"):
            tracker.artifact(out / name)
    print((out / "table.md").read_text())
    print(f"{STAGE}: wrote {out / 'metrics.json'}, {out / 'table.md'}, {out / 'plot.png'}")


def _baseline_weights(cfg: Config) -> Path | None:
    return Path(cfg.eval.baseline_exits) / WEIGHTS if cfg.eval.baseline_exits else None


def mlflow_metrics(rows: list[dict]) -> dict[str, float]:
    """Names by exit ordinal (exit1 = shallowest), so runs with other depths line up in the UI."""
    kinds = {"balcony": "exit", "logit_lens": "lens", "ce_exit": "ce"}
    prefixes = {}
    for kind, short in kinds.items():
        depths = sorted(row["depth"] for row in rows if row["kind"] == kind)
        prefixes.update({(kind, d): f"{short}{i}" for i, d in enumerate(depths, 1)})
    out = {}
    for row in rows:
        prefix = "full" if row["kind"] == "full" else prefixes[(row["kind"], row["depth"])]
        out.update({f"{prefix}_depth": row["depth"], f"{prefix}_relative_cost": row["relative_cost"],
                    f"{prefix}_perplexity": row["perplexity"], f"{prefix}_kl": row["kl_to_full"],
                    f"{prefix}_top1": row["top1_agreement"]})
        for batch, value in row.get("speedup", {}).items():
            out[f"{prefix}_speedup_b{batch}"] = value
            out[f"{prefix}_latency_ms_b{batch}"] = row["latency_ms"][batch]
        if "speculative" in row:
            out[f"{prefix}_spec_acceptance"] = row["speculative"]["acceptance_rate"]
            out[f"{prefix}_spec_speedup"] = row["speculative"]["speedup"]
    return out


def write_outputs(out, metrics: dict, batches: list[int]) -> None:
    """Each file under a temporary name, then renamed: metrics.json last, as the mark of completion."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".table.md.tmp").write_text(markdown_table(metrics["rows"], batches))
    os.replace(out / ".table.md.tmp", out / "table.md")
    plot(metrics["rows"], out / ".plot.tmp.png")
    os.replace(out / ".plot.tmp.png", out / "plot.png")
    (out / ".metrics.json.tmp").write_text(json.dumps(metrics, indent=1))
    os.replace(out / ".metrics.json.tmp", out / "metrics.json")


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], evaluate)
