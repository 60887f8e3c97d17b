"""`python -m bench`: every scenario of issues 4, 14 and 15, zpipe against raw pyzmq,
the in-process floor and its peers (pipeline-lib, multiprocessing.Pool, Ray Data
when installed) measured in the same run, printed as one table.

    python -m bench                  # the full run (a few minutes on 2 cores)
    python -m bench --quick          # smaller counts: a smoke test
    python -m bench --only latency   # one scenario (or several: --only small,arrays)
    python -m bench --only batched,bytes,smallarrays,tcp,many,pool,ray   # issue 14's
    python -m bench --only batching,latest,concurrency                   # issue 15's
    python -m bench --markdown       # the table as Markdown, for BENCHMARKS.md
    python -m bench --json out.json  # also write every figure
    python -m bench --repeat 7       # best of 7 runs per figure (full: 5, quick: 1)

Progress goes to stderr, the table to stdout. Exit status 1 if a scenario
could not run (ERROR), else 0, whether targets pass or fail.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import report, suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke test)")
    parser.add_argument("--only", metavar="NAME", action="append", default=[],
                        help=f"run only these scenarios: {', '.join(suite.SCENARIOS)} "
                             "(repeat or separate with commas)")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="best of N runs per figure (default: 5, with --quick 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)

    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in suite.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; "
                     f"choose from {', '.join(suite.SCENARIOS)}")
    names = names or list(suite.SCENARIOS)

    started = time.monotonic()
    rows = suite.run(names, args.quick, args.repeat)
    elapsed = time.monotonic() - started
    info = report.machine()
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])

    if args.markdown:
        print(report.markdown(rows, info, command))
    else:
        print(report.text_table(rows))
    suite.step(f"done in {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "machine": info, "quick": args.quick,
                       "seconds": elapsed, "rows": [vars(r) for r in rows]}, out, indent=2)
    return 1 if any(r.result == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
