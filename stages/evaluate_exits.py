"""evaluate: every exit (and the baselines) against the full model on the held-out token shards.

    python stages/evaluate_exits.py --config configs/demo.yaml [key.path=value ...]

Writes RUN/eval/metrics.json (schema in docs/stages.md), RUN/eval/table.md and RUN/eval/plot.png,
and logs them to MLflow with metric names per exit (exit1_kl, lens1_kl, full_perplexity, ...).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


from pipeline.backbone import backbone_fingerprint, load_backbone
from pipeline.balcony import WEIGHTS, BalconyModel
from pipeline.config import Config
from pipeline.distributed import group_device, rank_zero_view, writes_files
from pipeline.evaluation import check_baselines, eval_sets, evaluate, tensor_sha256
from pipeline.registry import EVALUATE, TOKENIZE, TRAIN_EXITS
from pipeline.report import mlflow_metrics, write_evaluation
from pipeline.search import resolve_depths
from pipeline.shards import FORMAT_VERSION, PARTS, claim_directory, file_sha256, manifest_hash
from pipeline.stage import run_stage
from pipeline.tracking import close_pipeline, stage_run

STAGE = EVALUATE
OUTPUTS = ("metrics.json", "table.md", "plot.png")


def run(cfg: Config, task: tuple[int, int]) -> None:
    cfg = resolve_depths(cfg)
    out, exits_dir = STAGE.dir(cfg), TRAIN_EXITS.dir(cfg)
    device = group_device(cfg.model.tensor_parallel)  # one process, or one group whose rank 0 writes
    backbone = load_backbone(cfg.model, device)
    fingerprint = backbone_fingerprint(cfg.model, backbone)
    model = BalconyModel.from_pretrained(backbone, exits_dir, fingerprint, cfg.exits.depths).to(device).eval()
    folders = [folder for _, _, folder in cfg.exit_runs()[1:]] + [Path(f) for f in cfg.eval.baselines]
    baselines = [BalconyModel.from_pretrained(backbone, folder, fingerprint).to(device).eval() for folder in folders]
    check_baselines(baselines, folders)
    sets = eval_sets(cfg)
    header = {"stage": STAGE.tag, "config_hash": cfg.hash("eval"), "input_manifest_hash": manifest_hash(TOKENIZE.dir(cfg)),
              "eval_data_sha256": {name: tensor_sha256(seqs) for name, seqs in sets.items()},
              "backbone_fingerprint": fingerprint, "exits_sha256": file_sha256(exits_dir / WEIGHTS),
              "baselines_sha256": [file_sha256(folder / WEIGHTS) for folder in folders]}
    lead = writes_files()
    pinned = out / PARTS / "header.json"  # what the scores there (finished or not: a killed run) are of
    if lead and pinned.exists() and any(json.loads(pinned.read_text()).get(k) != v for k, v in header.items()):
        # scores are derived from the inputs alone and cheap to redo: new inputs replace them
        print(f"{STAGE.name}: the exits, baselines, data or settings changed since {out} was scored; scoring again")
        shutil.rmtree(out)
    claim_directory(out, header, write=lead)
    (done,) = rank_zero_view((out / "metrics.json").exists())
    if done:
        print(f"{STAGE.name}: {out / 'metrics.json'} exists for these exits and data; nothing to do")
    elif not lead:  # scores beside rank 0, which writes
        evaluate(cfg, model, baselines, sets, device)
        return
    else:
        with stage_run(cfg, STAGE.tag, header["config_hash"]) as tracker:
            metrics = {"format_version": FORMAT_VERSION, **header, **evaluate(cfg, model, baselines, sets, device)}
            write_evaluation(out, metrics, cfg.eval.latency_batches if cfg.eval.speed else [])
            tracker.metrics(mlflow_metrics(metrics))
            for name in OUTPUTS:
                tracker.artifact(out / name)
        print((out / "table.md").read_text())
        print(f"{STAGE.name}: wrote " + ", ".join(str(out / name) for name in OUTPUTS))
    if not lead:
        return
    metrics = json.loads((out / "metrics.json").read_text())
    close_pipeline(cfg, mlflow_metrics(metrics), [out / name for name in OUTPUTS])


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
