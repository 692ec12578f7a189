"""Every stage's names, defined once: what `make stage-NAME` and `run_pipeline.py --stages` call it,
its script, the directory it writes, what marks it finished, and the tag in its manifest and MLflow
runs. The launcher, the stages and the tests read them from here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.shards import MANIFEST


@dataclass(frozen=True)
class Stage:
    """Every name of one stage, defined here only."""

    name: str  # `make stage-NAME`, `run_pipeline.py --stages NAME`, log lines
    script: str  # stages/SCRIPT
    output: str  # the directory it writes, RUN/OUTPUT
    done: str  # what a finished stage leaves behind, relative to RUN
    tag: str  # the "stage" of its header, manifest and MLflow runs (as the first format version named it)

    def dir(self, cfg) -> Path:
        """RUN/OUTPUT for a Config."""
        return cfg.run_dir / self.output


TOKENIZE = Stage("tokenize", "tokenize_corpus.py", "tokens", f"tokens/{MANIFEST}", "tokenize")
TEACHER_LOGITS = Stage("teacher-logits", "teacher_logits.py", "teacher", f"teacher/{MANIFEST}", "teacher")
# with exits.depths auto: candidate exits at many depths, scored; the chosen depths feed train-exits
SEARCH_EXITS = Stage("search-exits", "search_exits.py", "search", "search/result.json", "search-exits")
TRAIN_EXITS = Stage("train-exits", "train_exits.py", "exits", "exits/balcony_config.json", "train-exits")
EVALUATE = Stage("evaluate", "evaluate_exits.py", "eval", "eval/metrics.json", "evaluate")
# every exit as a standalone HF checkpoint: on request, or last in the chain with export.after_evaluate
EXPORT_EXITS = Stage("export-exits", "export_exits.py", "export", "export", "export-exits")
STAGES = {stage.name: stage for stage in (TOKENIZE, TEACHER_LOGITS, SEARCH_EXITS, TRAIN_EXITS, EVALUATE, EXPORT_EXITS)}  # in order


def export_folder(cfg, depth: int) -> Path:
    """RUN/export/exit-K: exit K as a standalone HF checkpoint."""
    return EXPORT_EXITS.dir(cfg) / f"exit-{depth}"
