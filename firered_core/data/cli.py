"""``firered-data``: run a curation pipeline, or write a planted-defect demo set to try it on.

    firered-data run CONFIG.yaml [key.sub=value ...]
    firered-data demo OUT_DIR [--clean N] [--per-defect N] [--size PX]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import FireRedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="firered-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the pipeline a config describes")
    run.add_argument("config", help="YAML or TOML pipeline config")
    run.add_argument("overrides", nargs="*", help="key.sub=value (stages by name: stages.photometric.fence=2)")
    demo = sub.add_parser("demo", help="write a planted-defect data set (with truth.json and masks/) to try")
    demo.add_argument("out")
    demo.add_argument("--clean", type=int, default=60)
    demo.add_argument("--per-defect", type=int, default=3)
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--masks", type=int, default=6)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "demo":
            from .planted import make_planted

            truth = make_planted(args.out, clean=args.clean, per_defect=args.per_defect, size=args.size,
                                 seed=args.seed, masks=args.masks)
            print(f"{len(truth)} rows written under {args.out} (truth.json: the planted class of each row)")
            return 0
        from .config import load_pipeline_config
        from .pipeline import run_pipeline

        result = run_pipeline(load_pipeline_config(args.config, args.overrides))
        for s in result.summary:
            print(f"{s['stage']:>16}: in {s['in']:>6}  keep {s.get('keep', 0):>6}  drop {s.get('drop', 0):>6}"
                  f"  add {s.get('add', 0):>5}")
            for problem in s.get("problems", []):
                print(f"firered-data: error: stage {s['stage']}: {problem}", file=sys.stderr)
        print(f"rows per task: {json.dumps(result.rows_per_task)}")
        print(f"data: {result.data}  decisions: {result.decisions}  report: {result.output / 'report/index.html'}")
        return 0
    except FireRedError as exc:
        print(f"firered-data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
