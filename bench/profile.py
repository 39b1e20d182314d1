#!/usr/bin/env python3
"""Profile wasmlb's hot path: a flamegraph of one worker thread under wrk load.

Usage: bench/profile.py [--plugin round-robin] [--conns 64] [--seconds 5] [--out bench/flamegraph.svg]
                        [--folded FILE]

Installs what it needs (`linux-perf` and `wrk` with apt-get, `inferno` with
cargo install), builds the release binaries, starts the 4 demo-backend servers
and wrk on CPU 1 and wasmlb (1 worker thread) on CPU 0 as bench/run.py does,
samples wasmlb with `perf record --call-graph dwarf` while wrk runs, and
writes an SVG flamegraph (inferno) plus a text summary: the share of samples
spent in the kernel, in hyper (downstream and upstream), the connection pool,
the plugin call, headers, metrics, the allocator, the tokio scheduler, and
the top functions by self time. Figures are shares of wasmlb's own CPU time.
"""

import argparse
import collections
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

# Inclusive groups for the summary: a sample counts in a group when any of its
# frames matches.
GROUPS = {
    "kernel (system calls, TCP)": r"entry_SYSCALL_64",
    "hyper server connection (downstream)": r"Dispatcher<hyper::proto::h1::dispatch::Server",
    "hyper client connection (upstream)": r"Dispatcher<hyper::proto::h1::dispatch::Client",
    "upstream connection pool (wasmlb::proxy::pool)": r"^wasmlb::proxy::pool",
    "plugin selection (Upstream::select)": r"^wasmlb::upstream::Upstream::select",
    "  of which inside wasmtime": r"^wasmtime",
    "header rewriting (wasmlb::headers)": r"^wasmlb::headers",
    "request checks (wasmlb::request_rules)": r"^wasmlb::request_rules",
    "metrics (prometheus-client)": r"^prometheus_client",
    "malloc / free": r"^(__GI___libc_malloc|_int_malloc|__GI___libc_free|_int_free|_?mi_|mi_)",
    "tokio scheduler": r"^tokio::runtime::(scheduler|task)",
    "tokio timers": r"^tokio::runtime::time",
    "clock_gettime": r"clock_gettime",
    "retry bookkeeping (wasmlb::retry, TpsBudget)": r"^wasmlb::retry|TpsBudget",
}


def install():
    missing = []
    if shutil.which("perf") is None:
        missing.append("linux-perf")
    if shutil.which("wrk") is None:
        missing.append("wrk")
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq"] + missing, check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if shutil.which("inferno-flamegraph") is None:
        subprocess.run(["cargo", "install", "--locked", "inferno"], check=True)


def summarize(folded):
    total = 0
    groups = collections.Counter()
    leaf = collections.Counter()
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        for name, pattern in GROUPS.items():
            if any(re.search(pattern, f) for f in frames):
                groups[name] += n
    lines = ["inclusive share of sampled CPU time:"]
    lines += [f"  {groups[name] / max(total, 1) * 100:5.1f} %  {name}" for name in GROUPS]
    lines += ["", "top 15 functions by self time:"]
    lines += [f"  {n / max(total, 1) * 100:5.1f} %  {f[:110]}" for f, n in leaf.most_common(15)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plugin", default="round-robin")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=str(run.ROOT / "bench/flamegraph.svg"))
    ap.add_argument("--folded", help="also write the folded stacks (inferno-collapse-perf) here")
    args = ap.parse_args()
    install()
    wasmlb, demo = run.build()
    with tempfile.TemporaryDirectory(prefix="wasmlb-profile-") as tmp:
        workdir = Path(tmp)
        backends, addrs = run.start_backends(demo)
        port = run.free_port()
        conf = workdir / "wasmlb.toml"
        conf.write_text(run.wasmlb_conf(port, addrs, args.plugin))
        proxy = run.Proc([wasmlb, "--config", conf, "--threads", 1, "--log-level", "warn"],
                         cpus="0")
        try:
            run.wait_port(port)
            url = f"http://127.0.0.1:{port}/"
            subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{args.conns}", "-d2s", url],
                           capture_output=True, check=True)
            load = subprocess.Popen(["taskset", "-c", "1", "wrk", "-t1", f"-c{args.conns}",
                                     f"-d{args.seconds + 2}s", url],
                                    stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            data = workdir / "perf.data"
            subprocess.run(["perf", "record", "-F", "1999", "--call-graph", "dwarf,16384",
                            "-p", str(proxy.pid), "-o", data, "--", "sleep", str(args.seconds)],
                           capture_output=True, check=True)
            out, _ = load.communicate()
            rps = re.search(r"Requests/sec:\s+([\d.]+)", out or "")
            run.log(f"wrk: {rps.group(1) if rps else '?'} requests/s during the profile")
        finally:
            proxy.stop()
            backends.stop()
        script = subprocess.run(["perf", "script", "-i", data], capture_output=True,
                                check=True).stdout
        folded = subprocess.run(["inferno-collapse-perf"], input=script, capture_output=True,
                                check=True).stdout
        title = (f"wasmlb {args.plugin}, 1 worker thread, wrk -c{args.conns} "
                 "(perf --call-graph dwarf)")
        svg = subprocess.run(["inferno-flamegraph", "--title", title, "--width", "1600"],
                             input=folded, capture_output=True, check=True).stdout
        Path(args.out).write_bytes(svg)
        if args.folded:
            Path(args.folded).write_bytes(folded)
        print(summarize(folded.decode()))
        run.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
