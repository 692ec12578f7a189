"""export-exits: each exit of RUN/exits as a standalone Hugging Face checkpoint -> RUN/export/exit-K/.

    python stages/export_exits.py --config configs/demo.yaml [export.depths=[17]]
    make stage-export-exits CONFIG=...; or last in `make pipeline` with export.after_evaluate=true

Exit k becomes a checkpoint of the backbone's own class with k+1 layers (pipeline/export.py) that
plain transformers, `lm_eval --model hf` and assisted generation load as they are. Each folder is
written under a temporary name and renamed into place; a rerun writes the same bytes again.
"""
from __future__ import annotations


from pipeline.backbone import backbone_fingerprint, load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel, read_exits_config
from pipeline.config import Config
from pipeline.distributed import group_device, writes_files
from pipeline.errors import ConfigError
from pipeline.export import evaluation_scores, export_exit
from pipeline.registry import EVALUATE, EXPORT_EXITS, TRAIN_EXITS, export_folder
from pipeline.stage import run_stage

STAGE = EXPORT_EXITS


def run(cfg: Config, task: tuple[int, int]) -> None:
    exits_dir = TRAIN_EXITS.dir(cfg)
    available = read_exits_config(exits_dir)["depths"]
    depths = cfg.export.depths or available
    missing = [d for d in depths if d not in available]
    if missing:
        raise ConfigError(f"export.depths: no exit at depth {missing[0]} in {exits_dir} (exits: {available})")
    device = group_device(cfg.model.tensor_parallel)  # and its dtype (model.dtype auto); a group gathers its slices
    backbone = load_backbone(cfg.model, device)
    model = BalconyModel.from_pretrained(backbone, exits_dir, backbone_fingerprint(cfg.model, backbone)).to(device).eval()
    tokenizer = load_tokenizer(cfg.model)
    for depth in depths:
        scores = evaluation_scores(EVALUATE.dir(cfg) / "metrics.json", exits_dir, depth)
        folder = export_exit(model, depth, export_folder(cfg, depth), tokenizer, cfg.model.backbone, scores)
        if writes_files():
                print(f"{STAGE.name}: exit {depth} -> {folder} ({depth + 1} layers; AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
