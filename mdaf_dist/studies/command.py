"""`mdaf study run STUDY.yaml --out DIR [...]` and `mdaf study report DIR [--format json]`."""

from __future__ import annotations

import argparse

from mdaf_dist.files import dumps
from mdaf_dist.studies.grid import expand
from mdaf_dist.studies.runner import LaunchSettings, StudyRunner
from mdaf_dist.studies.spec import load_study


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options stand between the study file and the overrides (`run S.yaml --out D k=v`):
    plain argparse takes both positionals at once, before the options."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{run,report}", parser_class=_IntermixedParser)
    run_p = sub.add_parser("run", help="prepare the data and train every cell of a study (resumable)")
    run_p.add_argument("study", help="study file, e.g. configs/studies/table3_ablations.yaml")
    run_p.add_argument("--out", required=True, help="the study's directory (created; a re-run resumes it)")
    run_p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler: local_cwd (default), slurm, kubernetes, ...")
    run_p.add_argument("--scheduler-args", default="", help="the scheduler's options as `torchx run -cfg` takes them, e.g. partition=gpu,time=4:00:00")
    run_p.add_argument("--resources", default="", help="what each rank asks the scheduler for, over the study file's, e.g. cpu_per_rank=4,memMB_per_rank=8192,gpu_per_rank=1")
    run_p.add_argument("--pending-timeout", type=float, default=300.0, metavar="SECONDS", help="fail a job pending this long for a reason that does not clear by waiting (e.g. PartitionConfig; default 300)")
    run_p.add_argument("--max-parallel", type=int, default=1, help="cells running at once (default 1)")
    run_p.add_argument("--dryrun", action="store_true", help="print each cell's job as the scheduler would get it; run and write nothing")
    run_p.add_argument("overrides", nargs="*", help="dotted overrides for every cell, e.g. prepare.input=UserBehavior.csv.zip train.max_epochs=3")
    report_p = sub.add_parser("report", help="the study's tables beside the paper's numbers, and its plots")
    report_p.add_argument("dir", help="a study directory written by `mdaf study run`")
    report_p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="what to print (both are written to DIR/report)")


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
