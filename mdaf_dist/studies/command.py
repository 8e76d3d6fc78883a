"""`mdaf study run STUDY.yaml --out DIR [...]` and `mdaf study report DIR [--format json]`."""

from __future__ import annotations

import argparse

from mdaf_dist.files import dumps
from mdaf_dist.studies.grid import expand
from mdaf_dist.studies.runner import LaunchSettings, StudyRunner
from mdaf_dist.studies.spec import load_study


def run(args: argparse.Namespace) -> int:
    if args.action == "run":
        plan = expand(load_study(args.study), args.overrides)
        settings = LaunchSettings(
            args.scheduler, args.scheduler_args, args.max_parallel, args.dryrun, resources=args.resources, pending_timeout=args.pending_timeout
        )
        status = StudyRunner(plan, args.out, settings).run()
        unfinished = False
        for state in ("failed", "cancelled"):
            cells = sorted(cell for cell, record in status.items() if record.get("state") == state)
            if cells:
                print(f"{len(cells)} cell(s) {state} (errors in {args.out}/status.json): {', '.join(cells)}")
                unfinished = True
        if not unfinished and not args.dryrun:
            print(f"all {len(status)} cells done; next: mdaf study report {args.out}")
        return 1 if unfinished else 0
    from mdaf_dist.studies.report import write_report  # matplotlib only when reporting

    report = write_report(args.dir)
    print(dumps(report.data).rstrip() if args.format == "json" else report.markdown)
    return 0
