#!/usr/bin/env python3
"""scripts/gpu-check.sh's filters against what the build registers: every --benchmark_filter regex
must select at least one of bench_model's benchmarks, and every pattern of its --gtest_filter at
least one of ft_tests' tests. A typo there would silently skip rows or tests on the GPU machine,
whose time is scarce. Also checks the script's shell syntax.

Usage: check_gpu_check_filters.py SCRIPT BENCH_MODEL FT_TESTS"""
import fnmatch
import re
import subprocess
import sys


def main(argv):
    if len(argv) != 4:
        print(__doc__)
        return 2
    script, bench, tests = argv[1:]
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    benchmarks = subprocess.run([bench, "--benchmark_list_tests"], capture_output=True, text=True,
                                check=True).stdout.split()
    listing = subprocess.run([tests, "--gtest_list_tests"], capture_output=True, text=True, check=True).stdout
    names, suite = [], ""
    for line in listing.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            suite = line.split()[0]
        else:
            names.append(suite + line.split()[0])
    failures = []
    # Filters given as --benchmark_filter='...' or to the script's bench function (bench SECONDS 'FILTER' NAME).
    bench_filters = re.findall(r"--benchmark_filter='([^']+)'", text)
    bench_filters += [m[1] for m in re.findall(r"""^bench ("[^"]*"|\S+) '([^']+)' \S+$""", text, re.M)]
    if len(bench_filters) < 6:
        failures.append(f"expected the benchmark processes' filters, found {len(bench_filters)}")
    for f in bench_filters:
        # Each alternative of a top-level BM_(a|b|...) group must select something on its own.
        m = re.fullmatch(r"BM_\((.*)\)", f)
        parts = [f]
        if m:
            depth, start, parts = 0, 0, []
            body = m.group(1)
            for i, c in enumerate(body):
                depth += c == "("
                depth -= c == ")"
                if c == "|" and depth == 0:
                    parts.append("BM_" + body[start:i])
                    start = i + 1
            parts.append("BM_" + body[start:])
        for p in parts:
            if not any(re.search(p, b) for b in benchmarks):
                failures.append(f"benchmark filter part '{p}' selects no benchmark")
    gtest_filters = re.findall(r"--gtest_filter='([^']+)'", text)
    # The CUDA tests' ctest regex must select the tests it names.
    gpu_re = re.search(r"^gpu_re='([^']+)'", text, re.M)
    if not gpu_re:
        failures.append("no gpu_re='...' (the CUDA tests' ctest regex) found")
    else:
        selected = [n for n in names if re.search(gpu_re.group(1), n)]
        for suite in ("LoraCuda.", "TrainCuda.", "NF4Kernel.", "LoraRowsKernel.", "SwigluKernel."):
            if not any(n.startswith(suite) for n in selected):
                failures.append(f"gpu_re '{gpu_re.group(1)}' selects no {suite}* test")
    for f in gtest_filters:
        for p in f.split(":"):
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                failures.append(f"test filter pattern '{p}' selects no test")
    for f in failures:
        print("gpu-check filters: " + f)
    print(f"gpu-check filters: {len(bench_filters)} benchmark filters, {len(gtest_filters)} test filters, "
          f"{len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
