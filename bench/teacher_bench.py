"""Benchmark the teacher-logits stage: throughput vs a bare forward pass, and bytes vs fidelity.

    python bench/teacher_bench.py [--batch 4] [--seq 512] [--repeats 3]

Every figure is a ratio or a size measured in this run on this machine; no absolute time is
compared with anything recorded elsewhere. With CUDA present it also times a LLaMA-3-8B-shaped
randomly initialised model in bf16 (batch 8 x 2048).
"""
from __future__ import annotations

import argparse
import dataclasses
import zlib

import torch

from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.config import ModelConfig, TeacherConfig, load_config
from pipeline.decoder import Decoder
from pipeline.shards import TOKENS_KEY, encode_shard
from pipeline.targets import TargetFormat
from pipeline.teacher import FidelityMeter, Teacher

from common import BACKBONE, DEMO, compare, corpus_batch


def throughput(backbone, ids: torch.Tensor, repeats: int, cfg: TeacherConfig) -> dict:
    teacher = Teacher(backbone, TargetFormat(cfg, backbone.config.vocab_size), cfg)
    keys = [f"b{i}" for i in range(len(ids))]

    @torch.inference_mode()
    def bare():
        backbone(input_ids=ids, use_cache=False).logits.float().cpu()

    def stage():
        targets = teacher.targets(ids.cpu().numpy(), keys)
        encode_shard({"__key__": k, TOKENS_KEY: i, **t} for k, i, t in zip(keys, ids.cpu().numpy(), targets))

    bare_s, stage_s = compare(bare, stage, repeats)
    tokens = ids.numel()
    return {"bare_tok_s": tokens / bare_s, "stage_tok_s": tokens / stage_s, "ratio": bare_s / stage_s}


@torch.inference_mode()
def fidelity_table(backbone, ids: torch.Tensor) -> list[dict]:
    hidden = backbone(input_ids=ids, output_hidden_states=True, use_cache=False)
    teacher = hidden.logits.flatten(0, 1).float().log_softmax(-1)
    # the probe student of the stage: the logit lens one layer below the top
    decoder = Decoder(backbone)
    student = decoder.logits(decoder.norm(hidden.hidden_states[-2])).flatten(0, 1).float()
    uniforms = torch.rand(teacher.shape[0], 64, generator=torch.Generator().manual_seed(0))
    variants = [(f"top-{k}, 12-bit log-probs", TeacherConfig(k=k)) for k in (16, 32, 64, 128)]
    variants += [(f"top-64, {b}-bit log-probs", TeacherConfig(k=64, logprob_bits=b)) for b in (8, 10)]
    variants += [(f"sampled n={n}, {b}-bit log-probs", TeacherConfig(format="sampled", samples=n, logprob_bits=b))
                 for n in (16, 32, 64) for b in (12, 8)]
    rows = []
    for name, cfg in variants:
        fmt = TargetFormat(cfg, backbone.config.vocab_size)
        meter = FidelityMeter()
        draws = uniforms[:, : cfg.samples] if cfg.format == "sampled" else None
        ids, values = fmt.select(teacher.clone(), draws)
        encoded = fmt.encode(ids, values)  # the positions as one sequence: a shard's bytes but for padding
        meter.update(fmt, teacher, fmt.target(*fmt.decode(encoded, len(ids))), student)
        entries = fmt.stored_entries(encoded, len(ids))
        row = {"format": name, "bytes_per_token": encoded.nbytes / len(ids), "entries_per_token": entries / len(ids),
               # what a general-purpose lossless compressor would still take off (level 1: a teacher's pace)
               "zlib_bytes_per_token": len(zlib.compress(encoded.tobytes(), 1)) / len(ids)}
        if cfg.format == "sampled":  # the share of distinct draws drawn more than once (they carry a count)
            draws = fmt.decode(encoded, len(ids))[0]  # in id order: a token's draws are one run
            same_as_next = draws[:, 1:] == draws[:, :-1]
            run_starts = torch.cat([torch.ones_like(same_as_next[:, :1]), ~same_as_next], 1)
            row["repeated_share"] = float((run_starts[:, :-1] & same_as_next).sum()) / entries
        rows.append({**row, **meter.summary()})
    return rows


def llama3_8b_gpu(repeats: int) -> dict | None:
    if not torch.cuda.is_available():
        return None
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                         attn_implementation="sdpa")
    with torch.device("cuda"):
        backbone = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (8, 2048), device="cuda")

    def sync(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run

    cfg = TeacherConfig(k=64, chunk_size=2048, fidelity_positions=0)
    teacher = Teacher(backbone, TargetFormat(cfg, config.vocab_size), cfg)
    keys = [f"b{i}" for i in range(8)]
    @torch.inference_mode()
    def bare():
        backbone(input_ids=ids, use_cache=False).logits

    bare_s, stage_s = compare(sync(bare), sync(lambda: teacher.targets(ids.cpu().numpy(), keys)), repeats)
    return {"bare_tok_s": ids.numel() / bare_s, "stage_tok_s": ids.numel() / stage_s, "ratio": bare_s / stage_s,
            "device": torch.cuda.get_device_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    model = ModelConfig(backbone=str(BACKBONE))
    backbone, tokenizer = load_backbone(model), load_tokenizer(model)
    ids = corpus_batch(tokenizer, args.batch, args.seq)
    teacher = dataclasses.replace(load_config(DEMO).teacher, chunk_size=args.chunk, fidelity_positions=0)
    speed = throughput(backbone, ids, args.repeats, teacher)
    print(f"\nteacher-logits, SmolLM2-135M fp32 on CPU, batch {args.batch} x {args.seq}, the demo's targets "
          f"({teacher.format}, {teacher.samples if teacher.format == 'sampled' else teacher.k}), "
          f"median of {args.repeats} alternating runs")
    print(f"  bare forward (HF, full logits): {speed['bare_tok_s']:8.0f} tok/s")
    print(f"  stage path (targets + shard):   {speed['stage_tok_s']:8.0f} tok/s")
    print(f"  ratio stage / bare:             {speed['ratio']:8.3f}")
    print(f"\nbytes and fidelity on {ids.numel()} positions (student for the KL columns: logit lens at layer L-1)")
    header = (f"  {'format':30s} {'bytes/tok':>9s} {'zlib -1':>7s} {'ids/tok':>7s} {'repeated':>8s} {'KL(p||p^)':>10s} "
              f"{'tail mass':>9s} {'KL bias':>8s} {'KL noise':>8s}")
    print(header)
    for row in fidelity_table(backbone, ids):
        target_kl = f"{row['target_kl']:10.4f}" if "target_kl" in row else f"{'-':>10s}"
        tail = f"{row['tail_mass']:9.4f}" if "tail_mass" in row else f"{'-':>9s}"
        repeated = f"{row['repeated_share']:8.2f}" if "repeated_share" in row else f"{'-':>8s}"
        print(f"  {row['format']:30s} {row['bytes_per_token']:9.1f} {row['zlib_bytes_per_token']:7.1f} "
              f"{row['entries_per_token']:7.1f} {repeated} {target_kl} {tail} "
              f"{row['lens_kl_bias']:+8.3f} {row['lens_kl_rel_rmse']:8.3f}")
    gpu = llama3_8b_gpu(args.repeats)
    if gpu is None:
        print("\nGPU variant (LLaMA-3-8B shape, bf16, 8 x 2048): skipped, no CUDA device")
    else:
        print(f"\nGPU variant on {gpu['device']}: bare {gpu['bare_tok_s']:.0f} tok/s, stage {gpu['stage_tok_s']:.0f} tok/s, "
              f"ratio {gpu['ratio']:.3f}")


if __name__ == "__main__":
    main()
