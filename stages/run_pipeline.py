"""Run the pipeline's stages in order, in place or as a chain of SLURM jobs (`make pipeline`).

    python stages/run_pipeline.py --config configs/demo.yaml [key.path=value ...]
    python stages/run_pipeline.py --config C --cluster configs/cluster/local.yaml [--wait]
    python stages/run_pipeline.py --config C --cluster configs/cluster/local.yaml --status
    python stages/run_pipeline.py --config C --cluster configs/cluster/example-gpu.yaml --plan
    python stages/run_pipeline.py --config C --calibrate      # this node's throughput table for the plan
    python stages/run_pipeline.py --config C --stages teacher-logits        # one stage

The full chain opens one MLflow parent run that every stage run nests under. Before submitting,
the plan (pipeline/plan.py) is printed, and a chain that cannot fit the site is refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import launch
from pipeline.config import load_cluster_config, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.plan import make_plan, plan_table
from pipeline.tracking import fail_pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("--stages", default="",
                        help=f"comma-separated subset of {','.join(launch.STAGES)} (default: the whole chain, in "
                             "order; export-exits only with export.after_evaluate)")
    parser.add_argument("--cluster", type=Path, help="site settings (configs/cluster/*.yaml): submit to SLURM")
    parser.add_argument("--nproc", type=int, default=2, help="in place: train-exits processes (GPUs, or CPU ranks)")
    parser.add_argument("--wait", action="store_true", help="SLURM: wait for the jobs and fail if one fails")
    parser.add_argument("--status", action="store_true", help="SLURM: show the last submitted jobs of run.dir")
    parser.add_argument("--plan", action="store_true",
                        help="SLURM: print what the chain costs on the --cluster site and whether it fits; submit nothing")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this node's throughput (the site config's throughput: table) with the recipe's "
                             "backbone and shapes; runs nothing else")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] or launch.chain(cfg)
        unknown = [s for s in stages if s not in launch.STAGES]
        if unknown:
            raise PipelineError(f"--stages: unknown stage {unknown[0]!r} (stages: {', '.join(launch.STAGES)})")
        stages = [s for s in launch.STAGES if s in stages]  # always in pipeline order
        if args.calibrate:
            from pipeline.calibrate import calibrate, throughput_yaml

            rates = calibrate(cfg)
            print(f"calibrate: {args.config} on this node; for the site config:\n{throughput_yaml(rates)}")
            return 0
        if args.cluster is None:
            if args.status or args.wait or args.plan:
                raise PipelineError("--status / --wait / --plan: need --cluster (CLUSTER=slurm)")
            launch.run_in_place(cfg, args.config.resolve(), args.overrides, stages, args.nproc)
            return 0
        cluster = load_cluster_config(args.cluster)
        if args.status:
            lines, _, failed = launch.status(cluster, launch.load_jobs(cfg))
            print("\n".join(lines) or "no jobs")
            return 1 if failed else 0
        plan = make_plan(cfg, cluster, stages, site=str(args.cluster))
        print(f"plan: {args.config} on {args.cluster}\n{plan_table(plan, cfg, cluster)}\n", flush=True)
        if plan.problems:
            raise ConfigError(plan.problems[0] + (f" (and {len(plan.problems) - 1} more above)" if len(plan.problems) > 1 else ""))
        if args.plan:
            return 0
        array_tasks = {stage: plan.tasks(stage) for stage in stages}
        jobs = launch.submit(cfg, cluster, args.config.resolve(), args.overrides, stages, array_tasks)
        print(f"pipeline: jobs {' '.join(j.job_id for j in jobs) or '(none: all complete)'}; "
              f"logs in {cfg.run_dir / 'logs'}; `make status` shows them")
        if args.wait and jobs and not launch.wait(cluster, jobs):
            fail_pipeline(cfg)  # a job may have failed before its stage opened a run
            return 1
        return 0
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
