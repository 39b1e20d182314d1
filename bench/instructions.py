#!/usr/bin/env python3
"""Instructions per proxied request, counted under valgrind (callgrind).

Usage: bench/instructions.py [--requests N] [--conns C] [--build] [--cache-sim]
                             [--top K] [--extra TOML] [hyper-floor] [NAME=BINARY ...]
       bench/instructions.py --ladder [--build | BINARY]

CPU time per request on this 2-core VM moves by 10 % and more between runs
(neighbours, the load generator sharing a core), far more than most single
changes to the request path are worth. An instruction count does not move:
this script runs wasmlb (1 worker thread, round-robin, in front of the 4
`demo-backend` servers bench/run.py uses) under `valgrind --tool=callgrind`,
sends 2,000 warm-up requests, zeroes the counters, sends N more with
`h2load --h1` over C connections, and reports the instructions wasmlb
executed per request (every thread of it), and with --top the K functions
with the most inclusive instructions per request. Two or more binaries are
measured one after the other and compared with the first; `hyper-floor`
names bench/hyper-floor (the smallest proxy hyper allows), measured the
same way.

The binary must be built with the host's `valgrind` feature (rustix's own
vDSO lookup crashes under valgrind): with --build the script builds the
current tree that way into target/valgrind/release/wasmlb and measures it.
Instructions are not time (a cache miss or a system call costs more than
its count says, and the kernel's share is not counted), so confirm a change
with bench/run.py; but a change that removes instructions from every
request shows here exactly.

With --cache-sim, valgrind also simulates the caches (the host CPU's L1
instruction and data caches and its last level, as valgrind reads them) and
each target's line gives its L1 instruction-cache misses (I1 misses) and L1
data-cache misses (D1 misses, reads plus writes) per request: the code and
data a request touches that did not stay in L1 since the request before it.
Simulated, so repeatable like the instruction count, and slower (about 2x).

With --ladder the script measures bench/run.py's cost ladder this way: the
hyper floor, then the one wasmlb binary with each rung's configuration
(`run.LADDER`), and prints the Markdown table (each rung's instructions per
request and what it added over the rung before); with --out it also writes
it as the last section of that file (BENCHMARKS.md), replacing the one
before (bench/run.py keeps that section when it rewrites the file).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VALGRIND_BUILD = ROOT / "target/valgrind/release/wasmlb"


def build():
    """The current tree's wasmlb with the `valgrind` feature."""
    run.log("building wasmlb with --features valgrind into target/valgrind")
    subprocess.run(["cargo", "build", "--release", "-p", "wasmlb", "--features", "valgrind"],
                   cwd=ROOT, check=True,
                   env={**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target/valgrind")})
    return VALGRIND_BUILD


def h2load(port, requests, conns):
    """Requests that succeeded, of `requests` sent over `conns` connections."""
    out = subprocess.run(["taskset", "-c", "1", run.tool("h2load"), "--h1", f"-c{conns}", "-t1",
                          "-n", str(requests), f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    done = re.search(r"(\d+) succeeded", out)
    return int(done.group(1)) if done else 0


def measure(binary, addrs, requests, conns, extra, top, cache_sim=False):
    """(instructions per request, [(inclusive per request, function)] of the top,
    {"I1 misses": .., "D1 misses": ..} per request with `cache_sim`, else {})."""
    work = Path(tempfile.mkdtemp(prefix="wasmlb-instructions-"))
    port = run.free_port()
    conf = work / "wasmlb.toml"
    conf.write_text(run.wasmlb_conf(port, addrs, "round-robin", extra))
    out = work / "callgrind.out"
    if binary == "hyper-floor":
        argv = [run.HYPER_FLOOR, f"127.0.0.1:{port}"] + addrs
    else:
        argv = [binary, "--config", conf, "--threads", "1", "--log-level", "warn"]
    sim = ["--cache-sim=yes"] if cache_sim else []
    proc = run.Proc(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + sim + argv,
                    cpus="0")
    try:
        run.wait_port(port, timeout=180)
        h2load(port, 2000, conns)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], capture_output=True,
                       check=True)
        done = h2load(port, requests, conns)
        subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)],
                       capture_output=True, check=True)
    finally:
        proc.stop()
    time.sleep(0.5)
    dumps = [f for f in work.glob("callgrind.out*")
             if "measured" in f.read_text(errors="replace")[:4000]]
    run.log(f"{binary}: callgrind dumps in {work}")
    if not dumps or done == 0:
        sys.exit(f"{binary}: no measured dump ({done} requests succeeded)")
    # Each event's total over the dumps (Ir: instructions; with the cache
    # simulation also I1mr, D1mr, D1mw and the rest).
    events = {}
    for dump in dumps:
        text = dump.read_text(errors="replace")
        names = re.search(r"^events: (.*)$", text, re.M)
        counts = re.search(r"^(?:summary|totals): (.*)$", text, re.M)
        if names and counts:
            for name, count in zip(names.group(1).split(), counts.group(1).split()):
                events[name] = events.get(name, 0) + int(count)
    total = events.get("Ir", 0)
    functions = []
    if top:
        annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100"]
                                   + [str(d) for d in dumps], capture_output=True,
                                   text=True).stdout
        for line in annotated.splitlines():
            m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(?:\S+:)?(.*)", line)
            if m:
                functions.append((int(m.group(1).replace(",", "")) / done, m.group(2).strip()))
        functions = functions[:top]
    misses = {"I1 misses": events.get("I1mr", 0) / done,
              "D1 misses": (events.get("D1mr", 0) + events.get("D1mw", 0)) / done} \
        if cache_sim else {}
    return total / done, functions, misses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--build", action="store_true",
                    help="build the current tree with the valgrind feature and measure it")
    ap.add_argument("--top", type=int, default=0, help="list the K costliest functions")
    ap.add_argument("--cache-sim", action="store_true",
                    help="also simulate the caches: L1 instruction and data misses per request")
    ap.add_argument("--extra", default="", help="TOML added to [upstream.app]")
    ap.add_argument("--ladder", action="store_true",
                    help="the cost ladder (run.LADDER) for one binary, as a Markdown table")
    ap.add_argument("--out", help="with --ladder: write the table as this file's last section "
                                  "(BENCHMARKS.md)")
    ap.add_argument("targets", nargs="*",
                    help="NAME=BINARY (built with --features valgrind), or hyper-floor")
    args = ap.parse_args()
    run.install()
    if shutil.which("valgrind") is None:
        run.log("installing valgrind")
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    targets = [t.split("=", 1) if "=" in t else (t, t) for t in args.targets]
    if args.build or not targets:
        targets.append(("current", str(build())))
    demo = ROOT / "target/release/demo-backend"
    if not demo.exists() or not run.HYPER_FLOOR.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "demo-backend", "-p", "hyper-floor"],
                       cwd=ROOT, check=True)
    backends, addrs = run.start_backends(demo)
    if args.ladder:
        try:
            ladder(targets, addrs, args)
        finally:
            backends.stop()
        return
    results = []
    try:
        for name, binary in targets:
            per_request, functions, misses = measure(binary, addrs, args.requests, args.conns,
                                                     args.extra, args.top, args.cache_sim)
            results.append((name, per_request))
            misses = "".join(f", {v:,.0f} {k}" for k, v in misses.items())
            print(f"{name}: {per_request:,.0f} instructions per request{misses}", flush=True)
            for count, function in functions:
                print(f"  {count:>10,.0f}  {function[:150]}")
    finally:
        backends.stop()
    if len(results) > 1:
        first = results[0][1]
        for name, per_request in results[1:]:
            print(f"{name} against {results[0][0]}: {per_request - first:+,.0f} "
                  f"({(per_request / first - 1) * 100:+.1f} %)")


def ladder(targets, addrs, args):
    """Print the cost ladder in instructions per request: the hyper floor,
    then the last of `targets` with each of `run.LADDER`'s configurations."""
    if len(targets) != 1:
        sys.exit("--ladder measures one wasmlb binary (or --build)")
    binary = targets[0][1]
    rows = [("hyper floor", measure("hyper-floor", addrs, args.requests, args.conns, "", 0)[0])]
    print(f"hyper floor: {rows[0][1]:,.0f} instructions per request", flush=True)
    for label, extra in run.LADDER:
        per_request = measure(binary, addrs, args.requests, args.conns, extra, 0)[0]
        print(f"wasmlb {label}: {per_request:,.0f} instructions per request", flush=True)
        rows.append((f"wasmlb: {label}", per_request))
    floor = rows[0][1]
    lines = ["| rung | instructions/request | added | x hyper floor |",
             "| --- | --- | --- | --- |"]
    before = None
    for label, per_request in rows:
        added = "" if before is None else f"{per_request - before:+,.0f}"
        lines.append(f"| {label} | {per_request:,.0f} | {added} | {per_request / floor:.2f} |")
        before = per_request
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        head = out.read_text().partition(run.INSTRUCTIONS_SECTION)[0] if out.exists() else ""
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out.write_text(
            head.rstrip("\n") + "\n\n" + run.INSTRUCTIONS_SECTION + "\n\n"
            f"Written by `bench/instructions.py --ladder` on {when}: instructions per "
            f"proxied request under callgrind (wasmlb with 1 worker thread, round-robin, "
            f"{args.requests:,} requests after 2,000 to warm up, `h2load --h1` over "
            f"{args.conns} connections, the 4 `demo-backend` servers), every thread of the "
            "target counted, the kernel not. On a quiet machine runs of one binary agree "
            "within about 0.5 %, unlike the CPU time above (a busy one wakes the proxy for "
            "fewer requests at a time: a few % more); each rung adds one layer to the one "
            "before, as in the cost ladder above.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
