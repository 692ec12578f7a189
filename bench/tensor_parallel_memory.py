"""Host memory of one rank holding a backbone whole or split (model.tensor_parallel), measured.

    python bench/tensor_parallel_memory.py                    # builds the model, runs both, writes the JSON
    torchrun --nproc-per-node 2 bench/tensor_parallel_memory.py --split 2 --folder F   # one measurement

A random-weight Llama of 16 layers, hidden 2048, MLP 8192, 16 heads / 8 KV heads, vocabulary 32,000
(1.07B parameters, 4.3 GB of fp32 safetensors) is loaded by pipeline.backbone.load_backbone, every
weight is read once (as a forward reads them), and each rank reports its memory from /proc: RSS,
its anonymous and file-backed parts (the safetensors are memory-mapped: file pages are shared by the
ranks of a machine and reclaimable) and PSS (shared pages divided among the processes mapping them).
Writes results/tensor-parallel/host_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def memory_gib() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    out = {key: int(status.split(key + ":")[1].split()[0]) / 2**20 for key in ("VmRSS", "RssAnon", "RssFile")}
    out["Pss"] = int(Path("/proc/self/smaps_rollup").read_text().split("\nPss:")[1].split()[0]) / 2**20
    return {key: round(value, 3) for key, value in out.items()}


def measure(folder: str, split: int) -> None:
    from torch.distributed.tensor import DTensor

    from pipeline.backbone import load_backbone
    from pipeline.config import ModelConfig
    from pipeline.distributed import group_device

    group_device(split)
    before = memory_gib()
    backbone = load_backbone(ModelConfig(backbone=folder, tensor_parallel=split))
    with torch.no_grad():  # a forward reads every weight: page in what this rank holds
        for parameter in backbone.parameters():
            (parameter.to_local() if isinstance(parameter, DTensor) else parameter).sum()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print(json.dumps({"split": split, "rank": rank, "before_load": before, "after_reading_weights": memory_gib()}))


def main() -> None:
    import transformers

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                          tie_word_embeddings=False)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(scratch)
        del model
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        script = [str(Path(__file__).resolve()), "--folder", scratch]
        for split in (1, 2):
            command = ([sys.executable, *script, "--split", "1"] if split == 1 else
                       [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(split),
                        *script, "--split", str(split)])
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
            results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    record = {"command": "python bench/tensor_parallel_memory.py", "parameters": params,
              "weights_gib": params * 4 / 2**30, "ranks": results}
    path = ROOT / "results" / "tensor-parallel" / "host_memory.json"
    path.write_text(json.dumps(record, indent=1))
    for r in results:
        m = r["after_reading_weights"]
        print(f"tensor_parallel {r['split']} rank {r['rank']}: PSS {m['Pss']:.2f} GiB, RSS {m['VmRSS']:.2f} GiB "
              f"({m['RssAnon']:.2f} anonymous, {m['RssFile']:.2f} mapped from the weight files) of "
              f"{record['weights_gib']:.2f} GiB of weights")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder")
    parser.add_argument("--split", type=int)
    args = parser.parse_args()
    measure(args.folder, args.split) if args.folder else main()
