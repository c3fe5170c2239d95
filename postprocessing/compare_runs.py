"""Compare evaluated runs on one split: each run's metrics with their 95% intervals, and, for
two runs scored on the same queries, each direction's difference with a paired interval.

    python postprocessing/compare_runs.py outputs/run_a outputs/run_b            # last of eval.splits
    python postprocessing/compare_runs.py run_a run_b --split validation --json  # names in paths.output_dir

Reads each run's metrics.json, {split}.t2a_ranks.csv and {split}.a2t_per_clip.csv
(postprocessing/02_xmodal_retrieval.py), and its config.yaml: first come each run's checkpoint
and epoch, the config keys in which the runs differ, and a warning where they were scored on
different data or a checkpoint was replaced since scoring. The paired interval resamples the
split's clips, each query with itself in both runs: a difference whose interval excludes 0 is not what another
sample of clips would undo.
"""
import json

import utils.cli
from utils import compare
from utils.config import load_config
from utils.errors import UserError


def main():
    parser = utils.cli.make_parser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or run names")
    parser.add_argument("--split", help="split to compare (default: the last of the runs' "
                                        "eval.splits, evaluation for Clotho)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = parser.parse_args()
    if args.print_config:  # the config that finds runs by name
        utils.cli.print_config_if_asked(args, load_config(args.conf, args.overrides))
    conf_given = args.conf != parser.get_default("conf")
    runs = [utils.cli.find_run(r, args.conf, args.overrides, conf_given)[0] for r in args.runs]
    if len({r.resolve() for r in runs}) != len(runs):
        raise UserError("the same run is named twice")
    split = args.split or compare.default_split(runs)
    rows = compare.metrics_rows(runs, split)
    paired = None
    if len(runs) == 2:
        paired = {d: compare.paired_difference(*(compare.read_per_query(r, split, d) for r in runs),
                                               where=f"{runs[0]} and {runs[1]}")
                  for d in ("t2a", "a2t")}
    described = compare.describe_runs(runs)
    differences = compare.config_differences(runs)
    warnings = compare.input_warnings(runs, split)
    if args.json:
        print(json.dumps({"split": split, "runs": [str(r) for r in runs], "checkpoints": described,
                          "config_differences": differences, "warnings": warnings,
                          "metrics": [{"run": r, "direction": d, **m, "ci95": ci} for r, d, m, ci in rows],
                          "difference": paired}, indent=2))
    else:
        print(compare.format_runs(described, differences, warnings) + "\n")
        print(compare.format_comparison(rows, split, paired, names=(runs[0].name, runs[1].name)
                                        if paired else ("A", "B")))


if __name__ == "__main__":
    utils.cli.run(main)
