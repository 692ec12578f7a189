"""Token-efficiency study of exit recipes on the embedded default (SmolLM2-135M, exits 14/17/20).

Every row trains exits with the real train-exits stage and scores them with the real evaluate
stage, on one shared set of tokens and cached teacher targets, so rows differ only in the recipe:

    make study                                   # = python experiments/exit_study.py --base runs/study
    python experiments/exit_study.py --rows paper,lr2e-3_1k --base runs/study

The base run directory holds the study data (STUDY_DATA below: tokens and teacher targets), made
by the first call (~13 min on 2 cores) with the real tokenize and teacher-logits stages.
Each row gets its own run directory under BASE/rows/ (tokens and targets linked, not copied);
a row whose evaluation exists is not run again, so the study resumes after an interruption.
Results: results/exit-study/rows.json (every figure, with the exact commands) and table.md.
Wall times are this machine's, measured in this study (2 cores shared by nothing else).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "experiments" / "study.yaml"  # the demo recipe before the study, frozen
DEMO_TOKENS = 163_840  # the demo's budget before this study: rows compare at it unless they say otherwise
# The data every row shares (the four classic collections of the corpus, Austen, the Bible, Milton and
# Shakespeare: the study predates the modern-English collections), and what every row's evaluation
# skips (decode speed is measured in `make demo`).
STUDY_DATA = ["data.files=[assets/corpus/austen.jsonl,assets/corpus/bible.jsonl,assets/corpus/milton.jsonl,assets/corpus/shakespeare.jsonl]",
              "data.train_tokens=327680", "data.heldout_tokens=16384"]
COMMON = [*STUDY_DATA, "eval.speed=false"]


def recipe(lr: float, tokens_per_step: int, micro_batch: int, tokens: int = DEMO_TOKENS, schedule: str = "cosine",
           init: str = "last_layer", autocast: bool = False, nproc: int = 1, warmup: float = 0.01,
           kind: str = "balcony", objective: str = "kl", chunk: int = 1024, data_tokens: int = 0,
           online: bool = False, teacher: tuple[str, ...] = (), beta2: float = 0.999, positions: float = 1.0) -> dict:
    """Every training key spelled out, so a row means the same whatever configs/demo.yaml says later.
    `data_tokens`: train on only the first shards worth that many tokens (several epochs if `tokens` is more);
    `online`: the backbone's own full forward as the teacher (exact KL) instead of cached targets;
    `teacher`: teacher-logits overrides for targets made for this row (another format or size);
    `positions`: the share of positions the head and loss read (train.loss_positions)."""
    overrides = [f"train.lr={lr}", f"train.tokens_per_step={tokens_per_step}", f"train.micro_batch_size={micro_batch}",
                 f"train.max_steps={tokens // tokens_per_step}", f"train.schedule={schedule}",
                 f"train.warmup_fraction={warmup}", f"train.autocast_bf16={str(autocast).lower()}",
                 f"train.objective={objective}", f"train.chunk_size={chunk}", f"exits.init={init}",
                 f"exits.kind={kind}", f"train.online_teacher={str(online).lower()}", f"train.adam_beta2={beta2}",
                 f"train.loss_positions={positions}", "train.checkpoint_every=100000"]
    return {"nproc": nproc, "tokens": tokens, "data_tokens": data_tokens, "teacher": list(teacher), "overrides": overrides}


# targets of the same bytes per position as top-64 (64 x (16-bit id + 12-bit log-prob) = 224 B): 64 draws
SAMPLED_64 = ("teacher.format=sampled", "teacher.samples=64")

# configs/demo.yaml's recipe at the study's tokens: two epochs of 163,840 with the loss on a quarter of the positions
DEMO_RECIPE = dict(lr=4e-3, tokens_per_step=512, micro_batch=1, init="next_layer", autocast=True, schedule="wsd",
                   teacher=SAMPLED_64, positions=0.25, tokens=2 * DEMO_TOKENS, data_tokens=DEMO_TOKENS)

ROWS = {
    # today's demo recipe: the paper's lr and schedule, 8,192 tokens per step, 2 ranks x 1 thread
    "paper": recipe(5e-4, 8192, 4, nproc=2),
    "lr2e-3_1k": recipe(2e-3, 1024, 2),
    "next_layer": recipe(2e-3, 1024, 2, init="next_layer"),
    "next_layer_bf16": recipe(2e-3, 1024, 2, init="next_layer", autocast=True),
    "online_teacher": recipe(2e-3, 1024, 2, init="next_layer", autocast=True, online=True),
    "lr1e-3": recipe(1e-3, 1024, 2, init="next_layer", autocast=True),
    "lr4e-3": recipe(4e-3, 1024, 2, init="next_layer", autocast=True),
    "last_layer_lr4e-3": recipe(4e-3, 1024, 2, autocast=True),
    "lr8e-3": recipe(8e-3, 1024, 2, init="next_layer", autocast=True),
    "512_per_step": recipe(2e-3, 512, 1, init="next_layer", autocast=True),
    "512_lr4e-3": recipe(4e-3, 512, 1, init="next_layer", autocast=True),
    "wsd_lr4e-3": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, schedule="wsd"),
    "beta2_0.95": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, beta2=0.95),
    "online_lr4e-3": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, online=True),
    "2_ranks": recipe(4e-3, 1024, 1, init="next_layer", autocast=True, nproc=2),
    "chunk_512": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, chunk=512),
    "sampled_64": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, teacher=SAMPLED_64),
    # the two that beat lr4e-3 at 1,024 tokens per step (sampled targets, WSD) at the demo's 512, alone and together
    "sampled_64_512": recipe(4e-3, 512, 1, init="next_layer", autocast=True, teacher=SAMPLED_64),
    "512_wsd": recipe(4e-3, 512, 1, init="next_layer", autocast=True, schedule="wsd"),
    "512_wsd_sampled_64": recipe(4e-3, 512, 1, init="next_layer", autocast=True, schedule="wsd", teacher=SAMPLED_64),
    "topk_128": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, teacher=("teacher.k=128",)),
    # a cheaper step (the head and loss on a quarter of the positions): at equal tokens, and at twice them
    "positions_0.25": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, positions=0.25),
    "positions_0.25_2x": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, positions=0.25, tokens=2 * DEMO_TOKENS),
    "2x_tokens": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, tokens=2 * DEMO_TOKENS),
    "2_epochs": recipe(4e-3, 1024, 2, init="next_layer", autocast=True, tokens=2 * DEMO_TOKENS, data_tokens=DEMO_TOKENS),
    # the demo's recipe with the cheaper step: twice the steps at the same cost, on fresh tokens or
    # as two epochs of the same (which costs no more teacher time)
    "512_wsd_sampled_64_pos0.25_2x": recipe(**DEMO_RECIPE | {"data_tokens": 0}),
    "512_wsd_sampled_64_pos0.25_2_epochs": recipe(**DEMO_RECIPE),
    # the baselines, trained like the demo's exits
    "tuned_lens": recipe(**DEMO_RECIPE, kind="tuned_lens"),
    "ce_exits": recipe(**DEMO_RECIPE, objective="ce"),
}


def row_names(spec: str, rows: dict) -> list[str] | None:
    """The rows a comma-separated --rows names; None, after a one-line error, if one is unknown."""
    names = [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in rows]
    if unknown:
        print(f"error: --rows: unknown row {unknown[0]!r} (rows: {', '.join(rows)})", file=sys.stderr)
        return None
    return names


def stage_command(script: str, nproc: int, overrides: list[str], config: Path = BASE_CONFIG) -> list[str]:
    python = Path(sys.executable)
    args = [str(ROOT / "stages" / script), "--config", str(config), *overrides]
    if nproc > 1:
        return [str(python.parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    return [str(python), *args]


def subset_teacher(teacher: Path, tokens: int) -> Path:
    """A teacher folder with the first train shards of `teacher` worth `tokens` (linked, with a
    manifest listing only them, beside it): a smaller dataset for rows that take several epochs over it."""
    folder = teacher.parent / "subsets" / str(tokens) / "teacher"
    if (folder / "manifest.json").exists():
        return folder
    manifest = json.loads((teacher / "manifest.json").read_text())
    shards, total = [], 0
    for record in manifest["splits"]["train"]["shards"]:
        if total < tokens:
            shards.append(record)
            total += record["tokens"]
    manifest["splits"]["train"] = {"shards": shards, "samples": sum(r["samples"] for r in shards), "tokens": total,
                                   "bytes": sum(r["bytes"] for r in shards)}
    folder.mkdir(parents=True)
    for name in [r["file"] for r in shards] + ["heldout"]:
        (folder / name).symlink_to((teacher / name).resolve())
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def other_teacher(base: Path, overrides: list[str]) -> Path:
    """Targets of another format for the same tokens, made once by the teacher-logits stage."""
    folder = base / "teachers" / "_".join(o.split(".", 1)[1].replace("=", "-") for o in overrides)
    if not (folder / "teacher" / "manifest.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "tokens").exists():
            (folder / "tokens").symlink_to((base / "tokens").resolve())
        with open(folder / "teacher.log", "w") as log:
            subprocess.run(stage_command("teacher_logits.py", 1, [f"run.dir={folder}", *STUDY_DATA, *overrides]),
                           check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return folder / "teacher"


def run_row(name: str, row: dict, base: Path) -> dict:
    run_dir = base / "rows" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher = other_teacher(base, row["teacher"]) if row["teacher"] else base / "teacher"
    teacher_run = teacher.parent  # the run directory the teacher-logits stage made them in
    if row["data_tokens"]:
        teacher = subset_teacher(teacher, row["data_tokens"])
    for stage_dir, source in (("tokens", base / "tokens"), ("teacher", teacher)):  # linked, never copied or written
        if not (run_dir / stage_dir).exists():
            (run_dir / stage_dir).symlink_to(source.resolve())
    overrides = [f"run.dir={run_dir}", *COMMON, *row["teacher"], *row["overrides"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if row["nproc"] > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    train = stage_command("train_exits.py", row["nproc"], overrides)
    evaluate = stage_command("evaluate_exits.py", 1, overrides)
    metrics_file = run_dir / "eval" / "metrics.json"
    timing_file = run_dir / "train_seconds.json"
    if not timing_file.exists():
        started = time.perf_counter()
        with open(run_dir / "train.log", "w") as log:
            subprocess.run(train, env=env, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        # the 15-minute load average at the end: ~2 on these 2 cores when nothing else ran beside the row
        timing_file.write_text(json.dumps({"train_seconds": time.perf_counter() - started,
                                           "load_average": os.getloadavg()[2]}))
    if not metrics_file.exists():
        with open(run_dir / "eval.log", "w") as log:
            subprocess.run(evaluate, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    metrics = json.loads(metrics_file.read_text())
    show = lambda argv: " ".join(argv).replace(f"{ROOT}/", "")  # paths relative to the repository
    return {"name": name, "tokens": row["tokens"], "data_tokens": row["data_tokens"] or None, "nproc": row["nproc"],
            **json.loads(timing_file.read_text()),
            "commands": {**({"teacher": show(stage_command("teacher_logits.py", 1, [
                             f"run.dir={teacher_run}", *STUDY_DATA, *row["teacher"]]))} if row["teacher"] else {}),
                         "train": ("OMP_NUM_THREADS=1 " if row["nproc"] > 1 else "") + show(train),
                         "evaluate": show(evaluate)},
            "heldout_tokens": metrics["heldout_tokens"], "rows": metrics["rows"]}


def per_exit(rows: list[dict], key: str, spec: str) -> str:
    return " / ".join(format(x[key], spec) for x in sorted(rows, key=lambda x: x["depth"]))


def table(results: list[dict]) -> str:
    """One line per recipe: per-exit KL / top-1 / perplexity of what it trained, tokens, wall time;
    last, the logit lens (no training) on the same held-out tokens."""
    lines = ["| recipe | tokens | train wall s (load) | KL per exit | top-1 per exit | perplexity per exit | full ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        trained = [x for x in r["rows"] if x["kind"] not in ("full", "logit_lens")]
        full = next(x for x in r["rows"] if x["kind"] == "full")
        load = f" ({r['load_average']:.1f})" if "load_average" in r else ""
        lines.append(f"| {r['name']} | {r['tokens']:,} | {r['train_seconds']:,.0f}{load} | {per_exit(trained, 'kl_to_full', '.2f')} | "
                     f"{per_exit(trained, 'top1_agreement', '.3f')} | {per_exit(trained, 'perplexity', ',.0f')} | "
                     f"{full['perplexity']:.1f} |")
    if results:
        lens = [x for x in results[0]["rows"] if x["kind"] == "logit_lens"]
        lines.append(f"| logit lens (no training) | 0 | 0 | {per_exit(lens, 'kl_to_full', '.2f')} | "
                     f"{per_exit(lens, 'top1_agreement', '.3f')} | {per_exit(lens, 'perplexity', ',.0f')} | |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Held-out KL per exit of every recipe (and the logit lens), one group of bars per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = [x for x in results[0]["rows"] if x["kind"] == "logit_lens"]
    groups = [(r["name"], [x for x in r["rows"] if x["kind"] not in ("full", "logit_lens")]) for r in results]
    groups.append(("logit lens", lens))
    depths = sorted(x["depth"] for x in lens)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(groups)), 4.2))
    width = 0.8 / len(depths)
    for i, depth in enumerate(depths):
        values = [next(x["kl_to_full"] for x in rows if x["depth"] == depth) for _, rows in groups]
        ax.bar([g + (i - (len(depths) - 1) / 2) * width for g in range(len(groups))], values, width, label=f"exit {depth}")
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], rotation=35, ha="right")
    ax.set(ylabel="held-out KL(full || exit), nats/token", yscale="log", title="exit recipes, SmolLM2-135M, 2 CPU cores")
    ax.axhline(1.5, color="gray", linestyle=":", label="target 1.5")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_study_data(base: Path) -> None:
    """The study's tokens and teacher targets in `base` (the stages skip what is complete)."""
    command = [sys.executable, str(ROOT / "stages" / "run_pipeline.py"), "--config", str(BASE_CONFIG),
               "--stages", "tokenize,teacher-logits", f"run.dir={base}", *STUDY_DATA]
    subprocess.run(command, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "study", help="run dir with tokens + teacher targets")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated subset of {','.join(ROWS)} ('' rewrites table and plot only)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "exit-study")
    args = parser.parse_args()
    names = row_names(args.rows, ROWS)
    if names is None:
        return 2
    make_study_data(args.base)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "rows.json"
    results = {r["name"]: r for r in json.loads(results_file.read_text())} if results_file.exists() else {}
    for name in names:
        print(f"==> {name}", flush=True)
        results[name] = run_row(name, ROWS[name], args.base)
        write_results(results, args.out)
        print(table([results[name]]), flush=True)
    write_results(results, args.out)  # also with no row to run: the table and plot from rows.json
    return 0


def write_results(results: dict[str, dict], out: Path) -> None:
    ordered = [results[n] for n in ROWS if n in results]
    if ordered:
        (out / "rows.json").write_text(json.dumps(ordered, indent=1))
        (out / "table.md").write_text(table(ordered))
        plot(ordered, out / "plot.png")


if __name__ == "__main__":
    sys.exit(main())
