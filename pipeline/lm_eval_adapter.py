"""lm-evaluation-harness adapter: score one Balcony exit (or a compute budget) on harness tasks.

    balcony-lm-eval run --model balcony \
        --model_args backbone=assets/smollm2-135m-instruct,exits=runs/demo/exits,exit=17 \
        --tasks arc_easy,lambada_openai,piqa,winogrande,mmlu --device cuda

`balcony-lm-eval` is the harness's own command line with the `balcony` model registered (the
harness discovers models only among its own modules, so plain `lm_eval` cannot see it).
model_args: backbone (HF folder or hub name), exits (RUN/exits; omit for the plain backbone),
exit=k or budget=f (omit both for the full model), plus any HFLM argument (batch_size, ...).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from pipeline.backbone import backbone_fingerprint, load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig


@register_model("balcony")
class BalconyLM(HFLM):
    def __init__(self, backbone: str, exits: str = "", exit: int | None = None, budget: float | None = None,
                 device: str = "cpu", trust_remote_code: bool = False, **kwargs):
        model_cfg = ModelConfig(backbone=backbone, trust_remote_code=bool(trust_remote_code))
        lm = load_backbone(model_cfg, device)
        depth = None
        if exits:
            balcony = BalconyModel.from_pretrained(lm, exits, backbone_fingerprint(model_cfg, lm)).to(device)
            depth = balcony.choose_exit(float(budget)) if budget is not None else (int(exit) if exit is not None else None)
            lm = balcony.view(depth)
        elif exit is not None or budget is not None:
            raise ValueError("exit / budget need exits=RUN/exits")
        self.balcony_depth = depth
        super().__init__(pretrained=lm, tokenizer=load_tokenizer(model_cfg), device=device, **kwargs)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
