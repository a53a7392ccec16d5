#!/usr/bin/env python3
"""Step 05: compare every run in the results folder and write one report.

    python 05_performance_comparison.py --results-dir ./results --generate-plots \
        --output-report comparison_report.html
    python 05_performance_comparison.py --format md      # Markdown instead of HTML

Each run is compared with the matching single-device run from step 02 on the same
machine (host, device model, torch version; same model, image size, per-device batch,
precision, layout, compile setting and data):

    speedup             = throughput_N / throughput_baseline
    scaling efficiency  = throughput_N / (N x throughput_baseline)

N is the number of GPUs DataParallel splits each batch over, or the DDP world size.
Beside the report goes a CSV of its main table (same name, .csv); with --generate-plots
every figure is also saved as a PNG. Files that are not valid results are listed in the
report with the reason, never fatal. An existing file is replaced only when it is 05's own
output (a previous report, its CSV or figures); anything else is refused with exit status
2. A disk that fails while the report is written (full, read-only) ends with one line and
exit status 1, the previous report left as it was.
"""

import argparse
import sys
from pathlib import Path

from labs import cli, files, launcher_env

FORMATS = ("html", "md")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.OneLineParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), metavar="DIR",
                        help="folder with the JSON result files of steps 01-04 "
                             "(default: results)")
    parser.add_argument("--output-report", type=Path, metavar="PATH",
                        help="report file to write (default: comparison_report.html, or "
                             ".md with --format md); the table's CSV goes beside it")
    parser.add_argument("--format", choices=FORMATS, default="html",
                        help="html: one self-contained file with the figures embedded; "
                             "md: Markdown (default: html)")
    parser.add_argument("--generate-plots", action="store_true",
                        help="also save every figure as a PNG beside the report")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.output_report is None:
        args.output_report = Path(f"comparison_report.{args.format}")
    return args


if __name__ == "__main__":
    cli.check_early(parse_args)  # --help and typos: answered before pandas and matplotlib load

# Only now the heavy imports: pandas and matplotlib take seconds (torch is never loaded).
from labs.report import (analysis, environment, loading, model_plots, output,  # noqa: E402
                         plots, render)


def main(argv=None) -> None:
    args = parse_args(argv)  # bad input: one line, exit status 2, nothing written
    # An unwritable folder, or a report or CSV that is not 05's own, fails now, not at the end.
    out = output.plan(args.output_report, args.results_dir)

    # 1. Load: every *.json file; a bad one is listed with its reason, never fatal.
    folder = loading.load_folder(args.results_dir)

    # 2. Analyse: one row per run, repeats aggregated, each run matched with its baseline.
    runs = analysis.run_frame(folder)
    table = analysis.compare(runs)

    # 3. Per machine (host and device model): its figures, and its own step 01's all-reduce.
    figures: list[plots.Plot] = []

    def kept(drawn):  # every figure drawn is also saved with --generate-plots
        figures.extend(drawn if isinstance(drawn, list) else [drawn])
        return drawn

    def machine_figures(machine):
        return kept(plots.machine_plots(machine.rows, machine.slug))

    def bandwidth_figure(machine):
        if not machine.step01:
            return None
        series, why_not = environment.allreduce_series(machine.step01, folder.file_of)
        return kept(plots.allreduce_plot(series, why_not, machine.slug))

    def scaling_figure(machine, curves):
        return kept(model_plots.scaling_plot(curves, machine.slug))

    def timeline_figure(machine, timelines, more_ranks):
        return kept(model_plots.timeline_plot(timelines, more_ranks, machine.slug))

    def communicate_figure(machine, points):
        return kept(model_plots.communicate_plot(points, machine.slug))

    # 4. Render: the same context becomes HTML (autoescaped) or Markdown.
    context = render.build_context(folder, table, machine_figures, launcher_env.command_line(),
                                   bandwidth_figure, scaling_figure, timeline_figure,
                                   communicate_figure)
    to_save = [f for f in figures if args.generate_plots and f.png is not None]
    if args.format == "html":
        text = render.html(context)  # figures embedded as data URIs, always
    else:
        text = render.markdown(context, {f.key: out.png(f.key).name for f in to_save})

    # 5. Write, each file atomically: the figures, the table's CSV, then the report. Every
    #    target was checked first: nothing is written when one of them is not 05's own.
    out.check_pngs(f.key for f in to_save)
    for figure in to_save:
        write(out.png(figure.key), figure.png)
    write(out.csv, render.csv(table))
    write(out.report, text)

    counts = context["counts"]
    print(f"report   {out.report}\ntable    {out.csv}")
    if args.generate_plots:
        print(f"plots    {len(to_save)} PNG file(s) beside the report")
    print(f"runs     {counts['runs']} on {counts['machines']} machine(s): {counts['rows']} "
          f"table row(s) in {counts['configurations']} configuration(s), "
          f"{counts['unfinished']} unfinished, {counts['skipped']} file(s) skipped")
    for name, reason in folder.skipped:
        print(f"skipped  {name}: {reason}")
    for name, parts in folder.parts_skipped.items():
        print(f"partly   {name}: {len(parts)} part(s) skipped, each named in the report's "
              f"step-01 details")


def write(path: Path, content) -> None:
    """``files.write_atomic``; a disk that fails (full, read-only, gone) ends 05 with one
    line and exit status 1. The atomic writer has removed its temporary file, and the
    file at ``path`` is as it was: files written before it are complete."""
    try:
        files.write_atomic(path, content)
    except OSError as err:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: cannot write {path}: "
                         f"{err.strerror or err}; {path.name} is left as it was\n")
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
