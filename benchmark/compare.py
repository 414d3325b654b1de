"""Two or more benchmark/run.py results side by side: every program's mean eval curve with its one-standard-
error band in one PNG, and a table of final evals.

    python benchmark/compare.py --env-id CartPole-v1 --out benchmark/results/cartpole-vs-sb3 \
        dqn.py=benchmark/results/cartpole sb3=benchmark/results/cartpole-sb3

--until-step N compares runs of different lengths at one step: evals after N are dropped, and the table's
final eval is each seed's last one at or before N (its step shown). --window-from M adds each seed's mean over its
evals from step M on: one eval is a few games, and a window of them says more than the last one alone.
"""

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from run import RunResult, command_line, file_stem, mean_and_se, output_folder, plot_groups, steps_range


def load_results(folder: Path, env_id: str, seeds=None, until_step=None) -> list:
    """The per-seed curves a run.py folder holds for env_id (only `seeds`, and only evals at or before
    `until_step`, where given), as RunResults."""
    path = folder / f"{file_stem(env_id)}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a benchmark/run.py result for {env_id}")
    curves = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            if (seeds is None or int(row["seed"]) in seeds) and (until_step is None or int(row["step"]) <= until_step):
                curves[int(row["seed"])].append(row)
    if not curves:
        which = "no runs" if seeds is None else f"none of seeds {min(seeds)}..{max(seeds)}"
        if until_step is not None:
            which += f" with an eval at or before step {until_step}"
        raise ValueError(f"{path} holds {which}: nothing to compare")
    return [RunResult(env_id, seed, float(rows[-1]["wall_seconds"]), rows) for seed, rows in sorted(curves.items())]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--threshold", type=float, default=None, help="a dashed line at this return")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=None,
                        help="compare only seeds first-seed..first-seed+N-1 of each folder (default: all)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--until-step", type=int, default=None,
                        help="drop evals after this env step, so runs of different lengths end at the same step")
    parser.add_argument("--window-from", type=int, default=None,
                        help="also give each seed's mean eval over its evals from this env step on")
    parser.add_argument("programs", nargs="+", metavar="LABEL=FOLDER", help="a label and a run.py results folder")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.until_step is not None and args.until_step < 1:
        parser.error("--until-step must be at least 1")
    if args.window_from is not None and args.until_step is not None and args.window_from > args.until_step:
        parser.error("--window-from must not be past --until-step")
    seeds = None if args.seeds is None else range(args.first_seed, args.first_seed + args.seeds)
    groups = []
    for item in args.programs:
        label, _, folder = item.partition("=")
        if not folder:
            parser.error(f"{item!r}: give LABEL=FOLDER")
        try:
            groups.append((label, load_results(Path(folder), args.env_id, seeds, args.until_step)))
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
    # each group's per-seed columns: the finals, then the window's means; refused before anything is written
    per_seed_columns = [[[r.final for r in results]] for _, results in groups]
    if args.window_from is not None:
        for (label, results), columns in zip(groups, per_seed_columns):
            windows = {r.seed: [float(row["eval_mean"]) for row in r.curve if int(row["step"]) >= args.window_from]
                       for r in results}
            empty = [seed for seed, window in windows.items() if not window]
            if empty:
                parser.error(f"{label}: a seed has no eval from step {args.window_from} on (seed {empty[0]}); "
                             "give a smaller --window-from")
            columns.append([sum(window) / len(window) for window in windows.values()])
    out = output_folder(parser, args.out)
    plot_groups(out / f"{file_stem(args.env_id)}.png", args.env_id, groups, args.threshold)
    header = "| program | seeds | steps | final eval mean ± SE | per-seed finals |"
    if args.window_from is not None:
        header += f" mean eval from {args.window_from} on ± SE | per-seed means |"
    lines = [header, "|---" * header.count(" |") + "|"]
    for (label, results), values in zip(groups, per_seed_columns):
        columns = [label, str(len(results)), steps_range([r.steps for r in results])]
        for per_seed in values:
            mean, se = mean_and_se(per_seed)
            columns += [f"{mean:.2f} ± {se:.2f}", ", ".join(f"{value:.1f}" for value in per_seed)]
        lines.append("| " + " | ".join(columns) + " |")
    table = "\n".join(lines)
    print(table)
    command = command_line(__file__, argv)
    (out / "summary.md").write_text(f"# {args.env_id}: {', '.join(label for label, _ in groups)}\n\n{table}\n\n"
                                    f"- command (from the repository root): `{command}`\n"
                                    "- each folder's summary.md gives its own command, commit and machine\n")


if __name__ == "__main__":
    main()
