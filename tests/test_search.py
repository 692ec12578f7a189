"""Where the exits go (pipeline/search.py, stages/search_exits.py): the choice on synthetic
quality/cost tables, checked against brute force; and the stage on the real (truncated) backbone:
a whole pipeline with exits.depths auto, determinism, a rerun that does nothing, resume after kills."""
from __future__ import annotations

import itertools
import json
import random
import shutil

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.search import candidate_depths, choose_budgets, choose_count, pareto_front, served_kl
from pipeline.timing import CostLine

from conftest import ROOT, built_once, losses_by_step, pipeline_command, run_command, run_in_process, stage_command, tiny_config


def table(costs, losses):
    return [{"depth": i + 1, "relative_cost": c, "kl_to_full": k} for i, (c, k) in enumerate(zip(costs, losses))]


def test_choose_count_is_the_best_subset():
    """The dynamic program finds the subset with the least mean KL over budgets, as brute force does."""
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(2, 8)
        costs = sorted(rng.uniform(0.2, 0.95) for _ in range(n))
        losses = [rng.uniform(0.1, 4.0) for _ in range(n)]
        points, floor = table(costs, losses), rng.uniform(3.0, 6.0)
        for count in range(1, n + 1):
            chosen = choose_count(points, count, floor)
            assert len(chosen) == count and chosen == sorted(chosen)
            value = served_kl([p for p in points if p["depth"] in chosen], costs[0], floor)
            best = min(served_kl(list(subset), costs[0], floor) for subset in itertools.combinations(points, count))
            assert value == pytest.approx(best, abs=1e-12)


def test_the_floor_decides_between_cheap_and_good():
    """Two candidates, keep one: a cheap mediocre exit (cost .5, KL 1) or a dear good one (cost .9, KL .1).
    Budgets .5-1 below the kept exit get the floor: a bad floor makes the cheap exit worth more."""
    points = table([0.5, 0.9], [1.0, 0.1])
    assert served_kl(points[:1], 0.5, 2.0) == pytest.approx(1.0)  # (1 - .5) * 1 / .5
    assert served_kl(points[1:], 0.5, 2.0) == pytest.approx((0.4 * 2.0 + 0.1 * 0.1) / 0.5)
    assert served_kl(points, 0.7, 2.0) == pytest.approx((0.2 * 1.0 + 0.1 * 0.1) / 0.3)  # budgets from .7 on only
    assert choose_count(points, 1, floor_kl=2.0) == [1]
    assert choose_count(points, 1, floor_kl=1.05) == [2]  # .4 * 1.05 + .01 = .43 < .5


def test_budgets_pareto_and_errors():
    points = table([0.3, 0.4, 0.5, 0.6, 0.7], [3.0, 3.5, 1.5, 1.6, 0.5])  # depths 2 and 4 are dominated
    assert pareto_front(points) == [1, 3, 5]
    assert choose_budgets(points, [0.45, 0.65, 0.99]) == [1, 3, 5]
    assert choose_budgets(points, [0.55, 0.58]) == [3]  # two budgets, one exit
    with pytest.raises(ConfigError, match=r"exits.budgets: 0.2 is below the cheapest candidate's cost 0.300 \(depth 1\)"):
        choose_budgets(points, [0.2])
    with pytest.raises(ConfigError, match="exits.count: 6 is more than the 5 candidates"):
        choose_count(points, 6, 4.0)
    assert choose_count(points, 3, 4.0) == [1, 3, 5]  # no dominated exit when the front has enough


def test_cost_line():
    line = CostLine.fit([5, 10, 20], [0.002 + 0.001 * x for x in (5, 10, 20)], layers=20)
    assert line.fixed_s == pytest.approx(0.002) and line.per_layer_s == pytest.approx(0.001)
    assert line.relative_cost(10) == pytest.approx(12 / 22) and line.fixed_share == pytest.approx(2 / 22)
    assert line.summary()["speedup_cap"] == pytest.approx(11) and "no exit decodes more than 11.00x faster" in line.describe()
    with pytest.raises(ValueError, match="do not grow with depth"):
        CostLine.fit([5, 10, 20], [0.03, 0.02, 0.01], layers=20)


def test_candidates_and_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((ROOT / "configs" / "demo.yaml").read_text())
    cfg = load_config(path, ["exits.depths=auto", "exits.count=3"])
    assert candidate_depths(cfg, 30) == list(range(8, 27, 2))  # 25% .. 90% of 30 layers, every 2nd
    with pytest.raises(ConfigError, match="is not a search"):
        candidate_depths(load_config(path, ["exits.depths=auto", "exits.count=3", "search.first=0.5",
                                            "search.last=0.5"]), 30)
    for overrides, message in [(["exits.depths=auto"], "exits.depths: auto needs exits.count"),
                               (["exits.depths=auto", "exits.count=2", "exits.budgets=[0.5]"], "one of them"),
                               (["exits.count=2"], "exits.count / exits.budgets: only with exits.depths auto"),
                               (["exits.depths=auto", "exits.budgets=[1.5]"], r"exits.budgets: each must be in \(0, 1\)"),
                               (["exits.depths=deep"], "exits.depths: expected a list of ints or one of 'auto'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, overrides)


# ---------------------------------------------------------------- the stage, on the real backbone

SEARCH = {"model": {"num_layers": 6},
          "data": {"train_tokens": 4096},  # 32 sequences: 16 steps of 256 tokens, 4 of them the search's
          "exits": {"depths": "auto", "count": 2},
          "search": {"first": 0.25, "last": 0.9, "stride": 1, "tokens": 1024, "heldout_tokens": 512, "cost": "layers"},
          "train": {"max_steps": 0},  # one pass over what the search leaves
          "eval": {"speed": False}}


def search_config(folder, tracking_uri, name, **extra):
    sections = {key: dict(value) for key, value in SEARCH.items()}
    for key, value in extra.items():
        sections.setdefault(key, {}).update(value)
    return tiny_config(folder, tracking_uri, name, **sections)


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory, tracking_uri, assets):
    """The whole chain with exits.depths auto, as `make pipeline ARGS="exits.depths=auto exits.count=2"`."""
    def build(folder):
        config = search_config(folder, tracking_uri, "run")
        return folder, config, run_command(pipeline_command(config, "--nproc", "1")).stdout

    return built_once(tmp_path_factory, "searched", build)


@pytest.mark.integration
def test_auto_depths_through_the_whole_chain(searched_run):
    folder, config, stdout = searched_run
    run = folder / "run"
    assert "==> [3/5] search-exits" in stdout and "==> [4/5] train-exits" in stdout
    scores = json.loads((run / "search" / "scores.json").read_text())
    result = json.loads((run / "search" / "result.json").read_text())
    candidates = [r["depth"] for r in scores["rows"] if r["kind"] == "balcony"]
    assert candidates == [2, 3, 4] and len(result["chosen"]) == 2 and set(result["chosen"]) <= set(candidates)
    kept = [r for r in scores["rows"] if r["depth"] in result["chosen"] and r["kind"] == "balcony"]
    assert result["mean_kl_over_budgets"] == served_kl(kept, result["budget_range"][0], result["floor"]["kl_to_full"])
    assert (run / "search" / "plot.png").stat().st_size > 0 and "**yes**" in (run / "search" / "table.md").read_text()
    # the candidates learned from the search's 4 steps, at the end of the epoch; the exits from the rest
    candidates_log = stdout[stdout.index("search-exits (candidates)"):stdout.index("==> [4/5]")]
    exits_log = stdout[stdout.index("==> [4/5]"):]
    assert max(losses_by_step(candidates_log)) == 4 and "from step" in candidates_log
    epoch = max(losses_by_step(candidates_log)) + max(losses_by_step(exits_log))
    header = json.loads((run / "exits" / ".parts" / "header.json").read_text())
    assert header["depths"] == result["chosen"] and header["search_steps"] == 4 and "initial_exits_sha256" in header
    assert f"{epoch - 4} steps x 256 tokens" in exits_log
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["depths"] == result["chosen"]


@pytest.mark.integration
def test_chosen_exits_start_from_their_candidates(searched_run):
    """train-exits' first loss at each chosen depth is the trained candidate's, not a fresh copy's."""
    folder, config, stdout = searched_run
    exits_log = stdout[stdout.index("==> [4/5]"):]
    shutil.copytree(folder / "run" / "tokens", folder / "fresh" / "tokens")
    shutil.copytree(folder / "run" / "teacher", folder / "fresh" / "teacher")
    result = json.loads((folder / "run" / "search" / "result.json").read_text())
    fresh = run_command(stage_command("train-exits", config, "run.dir=" + str(folder / "fresh"),
                                      f"exits.depths={result['chosen']}", "exits.count=0", "train.max_steps=1"))
    assert losses_by_step(exits_log)[1][0] < losses_by_step(fresh.stdout)[1][0]


@pytest.mark.integration
def test_rerun_is_a_no_op_and_a_new_count_only_chooses_again(searched_run, tmp_path):
    folder, config, _ = searched_run
    search = folder / "run" / "search"
    before = {p.name: p.stat().st_mtime_ns for p in search.iterdir() if p.is_file()}
    again = run_command(stage_command("search-exits", config))
    assert "nothing to do" in again.stdout and not losses_by_step(again.stdout)
    assert {p.name: p.stat().st_mtime_ns for p in search.iterdir() if p.is_file()} == before
    shutil.copytree(search, tmp_path / "other" / "search")  # a copy: the run's own choice stays for the other tests
    other_run = f"run.dir={tmp_path / 'other'}"
    other = run_command(stage_command("search-exits", config, other_run, "exits.count=1"))
    assert not losses_by_step(other.stdout)  # chosen from scores.json: no training
    assert len(json.loads((tmp_path / "other" / "search" / "result.json").read_text())["chosen"]) == 1
    code, _, stderr = run_in_process("evaluate", config, other_run)  # chosen for count 1, not 2
    assert code == 2 and "chosen with other settings (count 1" in stderr


@pytest.mark.integration
def test_deterministic_and_resumable_after_kills(searched_run, tmp_path, tracking_uri):
    """A second search on the same data, killed mid-training twice, gives the same losses and the same scores."""
    import os
    import signal
    import subprocess
    import time

    folder, _, stdout = searched_run
    config = search_config(tmp_path, tracking_uri, "again", train={"checkpoint_every": 1})
    for stage in ("tokens", "teacher"):
        shutil.copytree(folder / "run" / stage, tmp_path / "again" / stage)
    latest = tmp_path / "again" / "search" / "candidates" / "checkpoints" / "latest"
    for target in (1, 3):
        proc = subprocess.Popen(stage_command("search-exits", config), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 300
        while (not latest.exists() or int(latest.read_text().removeprefix("step")) < target) and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "again" / "search" / "scores.json").exists()
    final = run_command(stage_command("search-exits", config))
    assert "resumed from" in final.stdout
    first = stdout[stdout.index("search-exits (candidates)"):stdout.index("==> [4/5]")]
    assert losses_by_step(final.stdout).items() <= losses_by_step(first).items()
    scores = [json.loads((base / "search" / "scores.json").read_text()) for base in (folder / "run", tmp_path / "again")]
    assert scores[0]["rows"] == scores[1]["rows"]
    results = [json.loads((base / "search" / "result.json").read_text()) for base in (folder / "run", tmp_path / "again")]
    assert results[0]["chosen"] == results[1]["chosen"]
