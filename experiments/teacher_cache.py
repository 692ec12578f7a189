"""The teacher cache's frontier: held-out exit KL after the demo's training against the bytes per token
of the teacher targets it learned from. configs/demo.yaml throughout; only the target format changes.

    make teacher-cache                       # = python experiments/teacher_cache.py
    python experiments/teacher_cache.py --rows sampled-32,sampled-16

The demo's tokens are made once (BASE/tokens); each row runs the real teacher-logits, train-exits and
evaluate stages in BASE/ROW (tokens linked), without the tuned-lens baseline, decode-speed measurements
or the out-of-domain set: the frontier is held-out KL per byte. A row whose evaluation exists is not run
again, so the experiment resumes after an interruption. Results: results/teacher-cache/{frontier.json,
table.md,plot.png}: per row its commands, the teacher manifest's bytes per token (shards whole, and the
targets alone), the (id, log-prob) entries stored per token, the wall seconds of each stage with
the load it ran under, and per exit the held-out KL to the full model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from exit_study import row_names, stage_command

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
# the demo's chain but for what the frontier does not read, with fp32 matmuls: the rows compare formats, and
# bf16 autocast is ~10x slower than fp32 on CPUs without avx512_bf16 (a 512 x 576 x 1536 matmul on the AMD
# EPYC these rows ran on: 122 ms against 12 ms)
COMMON = ["train.baselines=[]", "eval.speed=false", "eval.data=[]", "train.autocast_bf16=false"]
# log-prob bits: a sampled target's gradient does not read them (tests/test_targets.py), so 8 bits train the
# same exits as 12 and only the logged loss is coarser; top-k weighs its ids by them and keeps 12
ROWS = {
    # the draws of the demo's targets (64, 12-bit): the same exits, the draws stored once per distinct token
    "sampled-64": ["teacher.format=sampled", "teacher.samples=64", "teacher.logprob_bits=8"],
    "sampled-32": ["teacher.format=sampled", "teacher.samples=32", "teacher.logprob_bits=8"],
    "sampled-16": ["teacher.format=sampled", "teacher.samples=16", "teacher.logprob_bits=8"],
    "top-64": ["teacher.format=topk", "teacher.k=64", "teacher.logprob_bits=12"],
}
# (stage, script, its output folder in the run)
STAGES = [("teacher-logits", "teacher_logits.py", "teacher"), ("train-exits", "train_exits.py", "exits"),
          ("evaluate", "evaluate_exits.py", "eval")]


def run(command: list[str], log: Path) -> float:
    """Run one stage, its output appended to `log`; its wall seconds."""
    start = time.perf_counter()
    with open(log, "a") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - start


def run_row(name: str, base: Path) -> dict:
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tokens").exists():
        (folder / "tokens").symlink_to((base / "tokens").resolve())
    overrides = [f"run.dir={folder}", *COMMON, *ROWS[name]]
    commands, seconds, load = {}, {}, {}
    for stage, script, output in STAGES:
        resumed = (folder / output).exists()  # begun by an interrupted run: its time is not this run's
        commands[stage] = stage_command(script, 1, overrides, CONFIG)
        elapsed = run(commands[stage], folder / "row.log")
        if not resumed:
            seconds[stage] = elapsed
            load[stage] = os.getloadavg()[1]  # the 5-minute load at its end: ~2 means the stage ran alone
    return {"overrides": ROWS[name], "seconds": seconds, "load": load,
            "commands": {stage: " ".join(str(c).replace(str(ROOT) + "/", "") for c in command)
                         for stage, command in commands.items()},
            **figures(folder)}


def figures(folder: Path) -> dict:
    """A finished run's target bytes (its teacher manifest) and held-out exit quality (its evaluation)."""
    teacher = json.loads((folder / "teacher" / "manifest.json").read_text())
    splits = teacher["splits"].values()
    tokens = sum(s["tokens"] for s in splits)
    rows = json.loads((folder / "eval" / "metrics.json").read_text())["rows"]
    return {
        "shard_bytes_per_token": sum(s["bytes"] for s in splits) / tokens,
        # a run of the earlier per-draw format recorded no target bytes: every draw's id and log-prob
        "target_bytes_per_token": teacher.get("target_bytes_per_token", per_draw_bytes(teacher["target_format"])),
        "entries_per_token": teacher.get("target_entries_per_token", teacher["target_format"]["entries"]),
        "heldout_kl": {row["name"]: row["kl_to_full"] for row in rows if row["kind"] == "balcony"},
        "perplexity": {row["name"]: row["perplexity"] for row in rows if row["kind"] in ("balcony", "full")},
    }


def per_draw_bytes(description: dict) -> float:
    """Target bytes per token of a top-k or per-draw sampled description: every entry's id and log-prob."""
    return sum(-(-description["entries"] * description[bits] // 8) for bits in ("id_bits", "logprob_bits"))


def seconds(row: dict, stage: str) -> str:
    """A stage's wall seconds, with the load it ran under (~2: alone on the 2 cores); '-' for a stage
    resumed after an interruption."""
    if stage not in row.get("seconds", {}):
        return "-"
    return f"{row['seconds'][stage]:.0f} (load {row['load'][stage]:.1f})"


def table(results: dict[str, dict]) -> str:
    exits = sorted({e for r in results.values() for e in r["heldout_kl"]}, key=lambda e: int(e.split("@")[1]))
    lines = ["| targets | shard B/token | target B/token | entries/token | teacher s | train s | "
             + " | ".join(f"KL {e}" for e in exits) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(exits)]
    for name, r in results.items():
        kls = " | ".join(f"{r['heldout_kl'][e]:.3f}" for e in exits)
        lines.append(f"| {name} | {r['shard_bytes_per_token']:.1f} | {r['target_bytes_per_token']:.1f} | "
                     f"{r['entries_per_token']:.1f} | {seconds(r, 'teacher-logits')} | {seconds(r, 'train-exits')} | {kls} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    exits = sorted({e for r in results.values() for e in r["heldout_kl"]}, key=lambda e: int(e.split("@")[1]))
    for exit_name in exits:
        points = sorted((r["shard_bytes_per_token"], r["heldout_kl"][exit_name], name) for name, r in results.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=exit_name)
        for x, y, name in points:
            ax.annotate(name, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("teacher shard bytes per token")
    ax.set_ylabel("held-out KL to the full model (nats)")
    ax.set_title("Teacher cache: exit quality per byte (demo recipe)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "teacher-cache")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)} (none: '')")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "teacher-cache")
    parser.add_argument("--reference", nargs=3, metavar=("NAME", "RUN_DIR", "COMMAND"),
                        help="also record a run made elsewhere (e.g. by an earlier commit), with the command that made it")
    args = parser.parse_args()
    names = row_names(args.rows, ROWS)
    if names is None:
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "frontier.json"
    results = json.loads(results_path.read_text())["rows"] if results_path.exists() else {}

    def save() -> None:
        results_path.write_text(json.dumps({"config": "configs/demo.yaml", "common": COMMON, "rows": results}, indent=1))
        (args.out / "table.md").write_text(table(results))
        plot(results, args.out / "plot.png")

    if args.reference:
        name, folder, command = args.reference
        results[name] = {"commands": {"all": command}, **figures(Path(folder))}
        save()
    args.base.mkdir(parents=True, exist_ok=True)
    if names and not (args.base / "tokens" / "manifest.json").exists():
        run(stage_command("tokenize_corpus.py", 1, [f"run.dir={args.base}"], CONFIG), args.base / "tokenize.log")
    for name in names:
        if name in results:
            continue
        print(f"teacher-cache: row {name}", flush=True)
        results[name] = run_row(name, args.base)
        save()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
