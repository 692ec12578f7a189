"""evaluate: every exit (and the baselines) against the full model on the held-out token shards.

    python stages/evaluate_exits.py --config configs/demo.yaml [key.path=value ...]

Writes RUN/eval/metrics.json (schema in the README), RUN/eval/table.md and RUN/eval/plot.png,
and logs them to MLflow with metric names per exit (exit1_kl, lens1_kl, full_perplexity, ...).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from pipeline.backbone import backbone_fingerprint, load_backbone, load_tokenizer
from pipeline.balcony import WEIGHTS, BalconyModel
from pipeline.config import Config, DataConfig
from pipeline.corpus import ShardPacker, ShardSpec, document_encoder
from pipeline.sources import stream_documents
from pipeline.errors import ConfigError, InputError
from pipeline.evaluation import baseline_kind, heldout_sequences, score, variants_of
from pipeline.report import markdown_table, plot
from pipeline.timing import assisted_speedup, decode_latency, greedy_seconds, speculative_speedup
from pipeline.registry import EVALUATE, TOKENIZE, TRAIN_EXITS
from pipeline.search import resolve_depths
from pipeline.shards import FORMAT_VERSION, MANIFEST, PARTS, atomic_write, claim_directory, file_sha256, manifest_hash
from pipeline.stage import run_stage
from pipeline.tracking import close_pipeline, stage_run

STAGE = EVALUATE


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


def run(cfg: Config, task: tuple[int, int]) -> None:
    cfg = resolve_depths(cfg)
    out, tokens_dir, exits_dir = STAGE.dir(cfg), TOKENIZE.dir(cfg), TRAIN_EXITS.dir(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(cfg.model, device)
    fingerprint = backbone_fingerprint(cfg.model, backbone)
    model = BalconyModel.from_pretrained(backbone, exits_dir, fingerprint, cfg.exits.depths).to(device).eval()
    folders = [folder for _, _, folder in cfg.exit_runs()[1:]] + [Path(f) for f in cfg.eval.baselines]
    baselines = [BalconyModel.from_pretrained(backbone, folder, fingerprint).to(device).eval() for folder in folders]
    for folder, baseline in zip(folders, baselines):
        try:
            baseline_kind(baseline)
        except ValueError as e:
            raise ConfigError(f"{e} in {folder}") from None
    sets = eval_sets(cfg)
    header = {"stage": STAGE.tag, "config_hash": cfg.hash("eval"), "input_manifest_hash": manifest_hash(tokens_dir),
              "eval_data_sha256": {name: tensor_sha256(seqs) for name, seqs in sets.items()},
              "backbone_fingerprint": fingerprint, "exits_sha256": file_sha256(exits_dir / WEIGHTS),
              "baselines_sha256": [file_sha256(folder / WEIGHTS) for folder in folders]}
    pinned = out / PARTS / "header.json"  # what the scores there (finished or not: a killed run) are of
    written = json.loads(pinned.read_text()) if pinned.exists() else header
    if any(written.get(key) != value for key, value in header.items()):
        # scores are derived from the inputs alone and cheap to redo: new inputs replace them
        print(f"{STAGE.name}: the exits, baselines, data or settings changed since {out} was scored; scoring again")
        shutil.rmtree(out)
    claim_directory(out, header)
    if (out / "metrics.json").exists():
        print(f"{STAGE.name}: {out / 'metrics.json'} exists for these exits and data; nothing to do")
    else:
        measure(cfg, model, baselines, sets, header, out, device)
    metrics = json.loads((out / "metrics.json").read_text())
    close_pipeline(cfg, mlflow_metrics(metrics), [out / "metrics.json", out / "plot.png", out / "table.md"])


def quality(cfg: Config, model: BalconyModel, baselines: list[BalconyModel], sequences: torch.Tensor,
            device: torch.device, name: str) -> list[dict]:
    """Perplexity, KL to the full model and top-1 agreement of every variant on `sequences`."""
    return score(model, baselines, variants_of(model, baselines), sequences, cfg.eval, device,
                 f"{STAGE.name} quality ({name})")


def measure(cfg: Config, model: BalconyModel, baselines: list[BalconyModel], sets: dict[str, torch.Tensor],
            header: dict, out: Path, device: torch.device) -> None:
    sequences = sets["heldout"]
    with stage_run(cfg, STAGE.tag, header["config_hash"]) as tracker:
        rows = quality(cfg, model, baselines, sequences, device, "heldout")
        other_data = [{"data": name, "sequences": len(seqs), "tokens": seqs.numel(),
                       "rows": quality(cfg, model, baselines, seqs, device, name)}
                      for name, seqs in sets.items() if name != "heldout"]
        latency, batches = {}, cfg.eval.latency_batches if cfg.eval.speed else []
        for batch_size in batches:
            prompt = sequences[:1, : cfg.eval.prompt_tokens].repeat(batch_size, 1).to(device)
            for depth in [None, *model.depths]:
                latency[(batch_size, depth)] = decode_latency(model, depth, prompt, cfg.eval.new_tokens, cfg.eval.repeats)
            print(f"{STAGE.name}: decode latency at batch {batch_size}: " + ", ".join(
                f"{'full' if d is None else f'exit@{d}'} {latency[(batch_size, d)] * 1e3:.1f} ms/token"
                for d in [None, *model.depths]))
        prompt = sequences[:1, : cfg.eval.prompt_tokens].to(device)
        full_seconds = greedy_seconds(model, prompt, cfg.eval.new_tokens, cfg.eval.repeats) if cfg.eval.speed else 0.0
        for row in rows:
            depth = None if row["kind"] == "full" else row["depth"]
            if row["kind"] in ("full", "balcony") and cfg.eval.speed:
                row["latency_ms"] = {str(b): latency[(b, depth)] * 1e3 for b in batches}
                row["speedup"] = {str(b): latency[(b, None)] / latency[(b, depth)] for b in batches}
                row["ideal_speedup"] = 1 / row["relative_cost"]
            if row["kind"] == "balcony" and cfg.eval.speed:
                for key, measure_speedup in (("speculative", speculative_speedup), ("assisted", assisted_speedup)):
                    row[key] = measure_speedup(model, depth, prompt, cfg.eval.new_tokens, cfg.eval.draft_tokens,
                                               cfg.eval.repeats, full_seconds)
                for key, what in (("speculative", "self-speculative"), ("assisted", "HF assisted generation")):
                    print(f"{STAGE.name}: {what} with exit@{depth}: acceptance {row[key]['acceptance_rate']:.2f}, "
                          f"speedup {row[key]['speedup']:.2f}x over greedy full-depth decoding")
        metrics = {"format_version": FORMAT_VERSION, **header, "num_layers": model.num_layers,
                   "depths": model.depths, "heldout_sequences": len(sequences), "heldout_tokens": sequences.numel(),
                   "device": device.type, "rows": rows, "other_data": other_data}
        write_outputs(out, metrics, batches)
        tracker.metrics(mlflow_metrics(metrics))
        for name in ("metrics.json", "table.md", "plot.png"):
            tracker.artifact(out / name)
    print((out / "table.md").read_text())
    print(f"{STAGE.name}: wrote {out / 'metrics.json'}, {out / 'table.md'}, {out / 'plot.png'}")


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """The held-out rows' metrics, then each eval.data set's quality metrics prefixed `data1_`, ..."""
    out = row_metrics(metrics["rows"])
    for i, other in enumerate(metrics.get("other_data", []), 1):
        out.update({f"data{i}_{name}": value for name, value in row_metrics(other["rows"]).items()})
    return out


def row_metrics(rows: list[dict]) -> dict[str, float]:
    """Names by exit ordinal (exit1 = shallowest), so runs with other depths line up in the UI."""
    kinds = {"balcony": "exit", "logit_lens": "lens", "tuned_lens": "tuned", "ce_exit": "ce"}
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
        for key, short in (("speculative", "spec"), ("assisted", "assisted")):
            if key in row:
                out[f"{prefix}_{short}_acceptance"] = row[key]["acceptance_rate"]
                out[f"{prefix}_{short}_speedup"] = row[key]["speedup"]
    return out


def write_outputs(out, metrics: dict, batches: list[int]) -> None:
    """Each file written atomically, metrics.json last, as the mark of completion."""
    text = f"Held-out tokens of this run ({metrics['heldout_tokens']:,} tokens):\n\n" + markdown_table(metrics["rows"], batches)
    for other in metrics["other_data"]:
        text += f"\nQuality on {other['data']} ({other['tokens']:,} tokens):\n\n" + markdown_table(other["rows"], [])
    atomic_write(out / "table.md", text.encode())
    plot(metrics["rows"], out / "plot.png")
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1).encode())


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
