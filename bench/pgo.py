#!/usr/bin/env python3
"""Profile-guided (PGO) release build of wasmlb.

Usage: bench/pgo.py    # prints the path of the built binary (target/pgo/<host>/release/wasmlb)

1. Builds wasmlb with LLVM instrumentation (`rustc -Cprofile-generate`) into
   target/pgo-generate.
2. Trains it: 4 demo-backend servers, then the benchmark's own loads, 2 s each:
   round-robin, least-connections and every cost-ladder config (retries,
   timeouts, outlier detection, health checks, the JSON access log) under
   `wrk` GETs at 64 and 256 connections, POSTs with a 4 KiB body, TLS
   (keep-alive and a full handshake per request), and TCP mode.
3. Merges the profiles with llvm-profdata (the rustup component llvm-tools,
   installed if missing; it matches the toolchain's LLVM).
4. Builds wasmlb again with the profile (`-Cprofile-use`) into target/pgo.

The plugins the binary embeds are built as usual (build-support clears
RUSTFLAGS for them). Takes two full release builds, about 20 minutes on 2
cores, and about 2 minutes of training. The method is rustc's own (the rustc
book, "Profile-guided Optimization"); NGINX and HAProxy as Debian ships them
are not built this way, so `bench/run.py --pgo` reports this build beside the
plain one (as wasmlb-pgo), never in its place.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the benchmark's helpers: targets, wrk, TLS, TCP)

ROOT = run.ROOT
POST_SCRIPT = 'wrk.method = "POST"\nwrk.body = string.rep("x", 4096)\n'


def host_triple():
    out = subprocess.run(["rustc", "-vV"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines()
                if line.startswith("host: "))


def llvm_profdata(triple):
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    tool = Path(sysroot, "lib", "rustlib", triple, "bin", "llvm-profdata")
    if not tool.exists():
        run.log("installing the rustup component llvm-tools")
        subprocess.run(["rustup", "component", "add", "llvm-tools"], cwd=ROOT, check=True)
    return tool


def cargo_build(triple, target_dir, rustflags):
    # --target keeps RUSTFLAGS off build scripts and proc macros.
    subprocess.run(["cargo", "build", "--release", "-p", "wasmlb", "--target", triple,
                    "--target-dir", target_dir], cwd=ROOT, check=True,
                   env={**os.environ, "RUSTFLAGS": rustflags})
    return Path(target_dir, triple, "release", "wasmlb")


def train(binary, demo):
    """Runs the instrumented `binary` under the training loads (see the module doc)."""
    work = Path(tempfile.mkdtemp(prefix="wasmlb-pgo-"))
    run.WASMLB["binary"] = binary
    backend_proc, addrs = run.start_backends(demo)
    try:
        names = ["wasmlb-rr", "wasmlb-lc"] + [f"ladder-{i}" for i in range(len(run.LADDER))]
        for conns in (64, 256):
            for name in names:
                run.log(f"training: {name}, {conns} connections")
                run.measure(name, work, addrs, binary, conns, 2, backend_proc)
        script = work / "post.lua"
        script.write_text(POST_SCRIPT)
        run.log("training: POST 4 KiB bodies")
        proc, port = run.start_target("wasmlb-rr", work, addrs, binary)
        try:
            subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", "-d2s", "-s", script,
                            f"http://127.0.0.1:{port}/"], capture_output=True, check=True)
        finally:
            proc.stop()
        cert, key, both = run.make_certificate(work)
        run.TLS.update(cert=cert, key=key, both=both)
        for handshakes in (False, True):
            run.log(f"training: TLS, {'handshakes' if handshakes else 'keep-alive'}")
            run.measure_tls("wasmlb-rr", work, addrs, binary, 64 if not handshakes else 16, 2,
                            handshakes)
    finally:
        backend_proc.stop()
    tcp_backend = run.Proc([sys.executable, ROOT / "bench" / "tcp_backend.py", run.TCP_BYTES],
                           cpus="1")
    try:
        listening = re.search(r"listening on (\S+)", tcp_backend.p.stdout.readline()).group(1)
        run.log("training: TCP mode")
        run.measure_tcp("wasmlb-rr", work, listening, 2)
    finally:
        tcp_backend.stop()


def build_pgo(demo):
    """Builds wasmlb with PGO (the steps in the module doc); returns its path."""
    triple = host_triple()
    profdata_tool = llvm_profdata(triple)
    profiles = ROOT / "target" / "pgo-profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    for old in profiles.glob("*.prof*"):
        old.unlink()
    run.log("PGO: building the instrumented binary")
    instrumented = cargo_build(triple, ROOT / "target" / "pgo-generate",
                               f"-Cprofile-generate={profiles}")
    train(instrumented, demo)
    raw = sorted(profiles.glob("*.profraw"))
    if not raw:
        sys.exit(f"PGO: training wrote no profile into {profiles}")
    merged = profiles / "merged.profdata"
    subprocess.run([profdata_tool, "merge", "-o", merged] + raw, check=True)
    run.log("PGO: building with the profile")
    return cargo_build(triple, ROOT / "target" / "pgo", f"-Cprofile-use={merged}")


def main():
    run.install()
    _, demo = run.build()
    print(build_pgo(demo))


if __name__ == "__main__":
    main()
