"""One DeepSpeed ZeRO-2 step (one rank, gloo) on each named family's tiny model: the exits' loss
(exact KL to the model's own output) on one batch before and after. Prints {family: [before, after]}
as JSON on its last line. Run by tests/test_families.py in a process of its own."""
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

import deepspeed  # noqa: E402
import torch  # noqa: E402

from families import tiny  # noqa: E402
from pipeline.balcony import BalconyModel  # noqa: E402
from pipeline.distributed import init_distributed  # noqa: E402
from pipeline.losses import exit_losses  # noqa: E402

DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
             "gradient_clipping": 1.0}


def main(names: list[str]) -> dict:
    init_distributed()
    out = {}
    for name in names:
        backbone = tiny(name)
        model = BalconyModel(backbone, [1, 2])
        batch = {"input_ids.npy": torch.randint(3, backbone.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))}
        params = [p for p in model.exits.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=DS_CONFIG)
        loss = lambda: exit_losses(engine, model.logits, model.depths, batch, None, chunk=16).mean()
        before = loss()
        engine.backward(before)
        engine.step()
        with torch.no_grad():
            out[name] = [float(before), float(loss())]
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
