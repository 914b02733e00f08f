#!/usr/bin/env python3
"""Checks an `ft bench` output directory: report.html parses as HTML (every element closed, in
order), its results table holds exactly the figures of the variants' metrics.jsonl files (final
evaluation losses, tokens/s, peak memory, training and wall time, gains and forgetting against the base
model's losses in results.json), report.md holds the same rows, and there is one SVG plot per
figure with one line per variant.

    check_bench_report.py OUT_DIR
"""
import json
import os
import sys
from html.parser import HTMLParser

VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class Report(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.rows, self.cell, self.in_results = [], [], None, False
        self.svgs = self.polylines = 0

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == "results":
            self.in_results = True
        if tag == "svg":
            self.svgs += 1
        if tag == "polyline":
            self.polylines += 1
        if tag in VOID:
            return
        self.stack.append(tag)
        if self.in_results and tag == "tr":
            self.rows.append([])
        if self.in_results and tag in ("td", "th"):
            self.cell = ""

    def handle_startendtag(self, tag, attrs):
        if tag == "polyline":
            self.polylines += 1

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            sys.exit(f"check_bench_report: </{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        self.stack.pop()
        if self.in_results and tag in ("td", "th"):
            self.rows[-1].append(self.cell)
            self.cell = None
        if tag == "table" and self.in_results:
            self.in_results = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def figures(run_dir, target, general):
    train, evals, eval_seconds = [], {}, 0.0
    for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8"):
        j = json.loads(line)
        if j["type"] == "train":
            train.append(j)
        elif j["type"] == "eval":
            if evals.get(j["set"]) and evals[j["set"]][-1][0] == j["step"]:
                continue  # an evaluation repeated by a resume
            evals.setdefault(j["set"], []).append((j["step"], j["loss"]))
            eval_seconds += j["eval_time_s"]  # in file order, as ft bench sums them
    peak = max(j.get("peak_device_mib", j.get("peak_rss_mib", 0)) for j in train)
    seconds = sum(j["step_time_s"] for j in train)
    return {"target": evals[target][-1][1], "general": evals[general][-1][1], "tokens_per_s": train[-1]["tokens_per_s"],
            "peak": peak, "seconds": seconds, "wall": seconds + eval_seconds}


def main(out):
    results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    parser = Report()
    parser.feed(open(os.path.join(out, "report.html"), encoding="utf-8").read())
    parser.close()
    if parser.stack:
        sys.exit(f"check_bench_report: unclosed elements {parser.stack}")
    header, base_row, *rows = parser.rows
    col = {name: i for i, name in enumerate(header)}
    base = results["baseline"]
    t, g = results["target_set"], results["general_set"]
    if base_row[col["target loss"]] != f"{base[t]:.4f}" or base_row[col["general loss"]] != f"{base[g]:.4f}":
        sys.exit(f"check_bench_report: the base row {base_row} disagrees with results.json {base}")
    if len(rows) != len(results["variants"]):
        sys.exit(f"check_bench_report: {len(rows)} rows for {len(results['variants'])} variants")
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    checked = 0
    for row, v in zip(rows, results["variants"]):
        f = figures(v["run_dir"], t, g)
        want = {"variant": v["name"], "target loss": f"{f['target']:.4f}", "general loss": f"{f['general']:.4f}",
                "tokens/s": f"{f['tokens_per_s']:.0f}", "peak memory (MiB)": f"{f['peak']:.0f}",
                "train time (s)": f"{f['seconds']:.1f}", "wall time (s)": f"{f['wall']:.1f}", "target gain": f"{base[t] - f['target']:+.4f}",
                "forgetting": f"{f['general'] - base[g]:+.4f}"}
        for name, value in want.items():
            if row[col[name]] != value:
                sys.exit(f"check_bench_report: {v['name']}: {name} is {row[col[name]]!r} in report.html, "
                         f"{value!r} from {v['run_dir']}/metrics.jsonl")
            checked += 1
        if "| " + " | ".join(row) + " |" not in md:
            sys.exit(f"check_bench_report: report.md lacks the row {row}")
    # Plots: target, general and training loss (a line per variant), memory and speed bars.
    if parser.svgs != 5 or parser.polylines != 3 * len(rows):
        sys.exit(f"check_bench_report: {parser.svgs} plots with {parser.polylines} lines; expected 5 and {3 * len(rows)}")
    print(f"bench report OK: {len(rows)} variants, {checked} figures equal to the metrics files, {parser.svgs} plots")


if __name__ == "__main__":
    main(sys.argv[1])
