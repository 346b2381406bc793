"""Join the runs of several ``adalomo experiment`` outputs into one report (table and plots).

    PYTHONPATH=src python benchmarks/merge_experiments.py OUT_DIR RUN_DIR [RUN_DIR ...] [--note TEXT ...]

For one experiment split over separate invocations with the same settings (a device call's time limit can
cut one short): see ``adalomo.experiments.report.merge_results`` for what must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adalomo.experiments import report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args(argv)
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in a.dirs]
    try:
        res = report.merge_results(parts, a.dirs, a.note)
    except ValueError as e:
        raise SystemExit(f"merge_experiments: {e}") from None
    paths = report.write_all(res, Path(a.out))
    print(f"{len(res['runs'])} runs -> {paths['md']}", file=sys.stderr)


if __name__ == "__main__":
    main()
