"""``seg-rt submit``: a job to a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sb = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    sb.add_argument("job", help="job YAML file")
    sb.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    sb.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    sb.set_defaults(func=cmd_submit)


def cmd_submit(args) -> int:
    from seg_rt.cluster.jobs.submit import submit

    job_id, status = submit(args.job, args.address, follow=args.follow)
    print(job_id if status is None else f"{job_id} {status}")
    return 0 if status in (None, "SUCCEEDED") else 1
