"""``seg-rt run``: a batch job (YAML) over Ray workers, resumable."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_ray_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run a batch job (YAML) over Ray workers; resumable")
    r.add_argument("job", help="job YAML file")
    add_ray_args(r)
    r.add_argument("--workers", type=int, default=None, help="override the job's worker count")
    r.add_argument(
        "--start-timeout",
        type=float,
        default=None,
        help="seconds to wait for every worker to be placed and load the model (default 300)",
    )
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from seg_rt.cluster.jobs.driver import START_TIMEOUT_S, run_job
    from seg_rt.cluster.jobs.spec import load_job

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.start_timeout is not None and not args.start_timeout > 0:
        raise ValueError(f"--start-timeout must be > 0 seconds, got {args.start_timeout}")
    spec, base = load_job(args.job)
    result = run_job(
        spec,
        base,
        address=args.address,
        workers=args.workers,
        progress=not args.no_progress,
        ray_temp_dir=args.ray_temp_dir,
        start_timeout=args.start_timeout or START_TIMEOUT_S,
    )
    summary = {
        "total": result.total,
        "done": result.done,
        "skipped": result.skipped,
        "failed": result.failed,
        "restarts": result.restarts,
        "seconds": round(result.seconds, 2),
    }
    print(
        json.dumps(summary)
        if args.json
        else f"{result.done} done, {result.skipped} already there, {len(result.failed)} failed"
    )
    if result.failed:
        print(f"seg-rt: error: {len(result.failed)} item(s) failed; see manifest.jsonl", file=sys.stderr)
        return 1
    return 0
