#!/usr/bin/env python3
"""Load benchmark: wasmlb beside NGINX, HAProxy and the hyper floor on the same backends, in one run.

Usage: bench/run.py [--duration S] [--reps N] [--quick] [--targets LIST]
                    [--sections LIST] [--baseline OLD_WASMLB] [--tls] [--tcp]
                    [--idle-connections N] [--pgo] [--out BENCHMARKS.md]

Installs what it needs (nginx haproxy wrk nghttp2-client, with apt-get), builds
the release binaries (wasmlb, demo-backend, and bench/hyper-floor: the smallest
proxy hyper allows), starts 4 demo-backend servers (one process, pinned to
CPU 1), then for each target (direct to one backend, NGINX 1 worker, HAProxy
1 thread, the hyper floor, wasmlb 1 worker thread with round-robin and with
least-connections, and with --baseline an earlier wasmlb binary as
wasmlb-before) pinned to CPU 0 runs `wrk -t1` pinned to CPU 1 at 64 and 256
connections, in interleaved repetitions (target order rotates each rep). Per
target and connection count it reports the median over the repetitions of:
requests/s, ratio to direct, p50/p99 latency (wrk), CPU microseconds per
request (from /proc/PID/task/*/schedstat, summed over the target's
processes and threads) and its ratio to NGINX's and the hyper floor's, and
the target's peak RSS (VmHWM; wasmlb runs with `plugin_cache_dir` set, and
its plugins are read from that disk cache, warmed first with `wasmlb
--check`, as on a restart). Then the cost ladder (the hyper floor, then
wasmlb adding one layer per rung), latency at a fixed 20k requests/s (h2load
--rps, per-request log), NGINX and wasmlb with 1 and 2 workers, the resident
memory each proxy holds for 10,000 idle keep-alive client connections (each
made one request; fewer if the open-file limit is lower), the issue-14 goals
met or missed, with --tls the same certificate (openssl, P-256) served by
NGINX, HAProxy and wasmlb: requests/s and CPU per request over keep-alive TLS
connections, and new TLS handshakes per second (`Connection: close`, every
request a full handshake) with the issue-15 goals, with --tcp TCP mode
(HAProxy `mode tcp`, NGINX `stream`, wasmlb `mode = "tcp"` in front of
bench/tcp_backend.py): a 1 GiB transfer (MiB/s, CPU ms per GiB) and
connections/s with CPU us per connection, with the issue-16 goals, with
--pgo also wasmlb built with profile-guided optimization (bench/pgo.py) as
the target wasmlb-pgo (round-robin) beside the plain build, and
writes the tables to BENCHMARKS.md with the machine it ran on. Method: ../shared/PERF-NOTES.md (pin, interleave, compare only inside one
run).
"""

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client",
         "openssl": "openssl"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def install():
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None
               and not Path("/usr/sbin", tool).exists()]
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq"] + missing, check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def tool(name):
    return shutil.which(name) or str(Path("/usr/sbin", name))


def build():
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "-p", "wasmlb", "-p", "demo-backend",
                    "-p", "hyper-floor"], cwd=ROOT, check=True)
    return ROOT / "target/release/wasmlb", ROOT / "target/release/demo-backend"


HYPER_FLOOR = ROOT / "target/release/hyper-floor"
# --baseline: an earlier wasmlb binary, run as the target "wasmlb-before".
BASELINE = {"binary": None}
WASMLB = {"binary": None}
# --pgo: wasmlb built by bench/pgo.py, run as the target "wasmlb-pgo".
PGO = {"binary": None}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def descendants(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return out


def task_files(pid, name):
    """The text of /proc/P/task/T/`name` for every thread T of pid and its descendants
    (threads that exit meanwhile are skipped)."""
    for p in descendants(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                yield Path(f"/proc/{p}/task/{t}/{name}").read_text()
            except OSError:
                pass


def cpu_ns(pid):
    """CPU time of pid's processes and threads, in ns (schedstat field 1)."""
    total = 0
    for text in task_files(pid, "schedstat"):
        try:
            total += int(text.split()[0])
        except (IndexError, ValueError):
            pass
    return total


def cpu_ticks(pid):
    """(user, system) clock ticks of pid's processes and threads (/proc/PID/task/TID/stat
    utime and stime). The kernel samples these at each timer tick, so they only split
    cpu_ns's exact total into its user-space and kernel shares."""
    user = system = 0
    for text in task_files(pid, "stat"):
        try:
            fields = text.rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
        except (IndexError, ValueError):
            pass
    return user, system


def rss_kib(pid, field="VmRSS"):
    """Sum of `field` (VmRSS: resident now; VmHWM: peak) over pid's processes, in KiB."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def peak_rss_kib(pid):
    """Sum of VmHWM over pid's processes, in KiB."""
    return rss_kib(pid, "VmHWM")


class Proc:
    def __init__(self, argv, cpus=None, **kw):
        if cpus is not None:
            argv = ["taskset", "-c", cpus] + [str(a) for a in argv]
        self.p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, **kw)

    @property
    def pid(self):
        return self.p.pid

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def start_backends(demo):
    proc = Proc([demo] + ["127.0.0.1:0"] * 4, cpus="1")
    addrs = []
    while len(addrs) < 4:
        line = proc.p.stdout.readline()
        if not line:
            raise RuntimeError("demo-backend exited")
        m = re.search(r"listening on (\S+)", line)
        if m:
            addrs.append(m.group(1))
    return proc, addrs


def make_certificate(workdir):
    """A self-signed P-256 certificate for bench.test: (cert, key, cert+key for HAProxy)."""
    cert, key, both = workdir / "cert.pem", workdir / "key.pem", workdir / "both.pem"
    subprocess.run([tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=bench.test",
                    "-addext", "subjectAltName=DNS:bench.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    both.write_text(cert.read_text() + key.read_text())
    return cert, key, both


# Set by main() with --tls: the certificate every TLS target serves.
TLS = {}


def nginx_preamble(workdir, workers):
    """The main-context lines every NGINX config here shares."""
    return f"""worker_processes {workers};
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 30000; use epoll; multi_accept on; }}
"""


def nginx_conf(workdir, port, addrs, workers=1):
    servers = "\n".join(f"        server {a};" for a in addrs)
    tls = ""
    listen = f"127.0.0.1:{port} backlog=4096"
    if TLS.get("on"):
        listen += " ssl"
        # TLS 1.3 as the others negotiate it: NGINX before 1.23.4 leaves it
        # out of its default `ssl_protocols`, and then resumes with TLS 1.2
        # abbreviated handshakes (no key exchange), not the same work.
        tls = (f"ssl_certificate {TLS['cert']};\n        ssl_certificate_key {TLS['key']};\n"
               "        ssl_protocols TLSv1.2 TLSv1.3;")
    return nginx_preamble(workdir, workers) + f"""http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    tcp_nodelay on;
    upstream backends {{
{servers}
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        {tls}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
"""


def haproxy_maxconn():
    """What the open-file limit lets HAProxy accept (it needs 2 x maxconn + 14 descriptors)."""
    import resource
    return min(30000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 14) // 2)


def haproxy_conf(port, addrs):
    servers = "\n".join(f"    server b{i} {a}" for i, a in enumerate(addrs))
    return f"""global
    nbthread 1
    maxconn {haproxy_maxconn()}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client  30s
    timeout server  30s
    timeout http-keep-alive 65s
frontend fe
    bind 127.0.0.1:{port}{f" ssl crt {TLS['both']}" if TLS.get("on") else ""}
    default_backend be
backend be
    balance roundrobin
{servers}
"""


def wasmlb_conf(port, addrs, plugin, extra="", plugin_cache=None):
    """wasmlb's config: one listener on `port`, upstream `app` with `plugin` over
    `addrs`, `extra` TOML in [upstream.app], and with `plugin_cache` (a folder)
    the plugin disk cache there (README, "Plugin disk cache")."""
    backends = ", ".join(f'{{ address = "{a}" }}' for a in addrs)
    server = f'[server]\nplugin_cache_dir = "{plugin_cache}"\n' if plugin_cache else ""
    tls = (f'[listener.tls]\ncertificates = [ {{ cert = "{TLS["cert"]}", key = "{TLS["key"]}" }} ]\n'
           if TLS.get("on") else "")
    return f"""[[listener]]
address = "127.0.0.1:{port}"
upstream = "app"
{tls}
[upstream.app]
plugin = "{plugin}"
backends = [ {backends} ]
{extra}
{server}"""


# The built-in plugin each wasmlb target runs (the ladder, the baseline and
# the PGO build run round-robin too).
PLUGINS = {"wasmlb-rr": "round-robin", "wasmlb-lc": "least-connections"}


def plugin_cache(workdir):
    """The plugin disk cache folder every wasmlb target of a run shares."""
    return workdir / "plugin-cache"


def warm_plugin_cache(wasmlb, workdir, addrs):
    """Fill the run's plugin disk cache with the benchmark's plugins through
    `wasmlb --check`, so that every measured start reads them instead of
    compiling, as a restarted wasmlb with `plugin_cache_dir` does (README,
    "Plugin disk cache"); a start that compiles peaks about 4.5 MiB higher."""
    for plugin in sorted(set(PLUGINS.values())):
        conf = workdir / f"warm-{plugin}.toml"
        conf.write_text(wasmlb_conf(free_port(), addrs, plugin,
                                    plugin_cache=plugin_cache(workdir)))
        subprocess.run([wasmlb, "--check", "--config", conf], capture_output=True, check=True)


# The cost ladder: wasmlb round-robin with one layer added per rung (TOML for
# [upstream.app]). The plugin call and the metrics cannot be turned off; the
# first rung includes them (see BENCHMARKS.md for their criterion figures).
LADDER = [
    ("no retries, no passive failure counting", "retries = 0\nmax_fails = 0\n"),
    ("+ retries = 2 (default)", "max_fails = 0\n"),
    ("+ max_fails = 1 (default: the defaults)", ""),
    ("+ request_timeout_ms", "request_timeout_ms = 30000\n"),
    ("+ outlier_detection", "request_timeout_ms = 30000\n"
     "[upstream.app.outlier_detection]\nconsecutive_5xx = 5\n"),
    ("+ health_check", "request_timeout_ms = 30000\n"
     "[upstream.app.outlier_detection]\nconsecutive_5xx = 5\n"
     "[upstream.app.health_check]\ninterval_ms = 2000\n"),
    # The access log (issue 17's goal: <= 5 % CPU per request over the rung
    # before); a file next to the config, in the run's temporary directory.
    ("+ access_log (json, to a file)", "request_timeout_ms = 30000\n"
     "[upstream.app.outlier_detection]\nconsecutive_5xx = 5\n"
     "[upstream.app.health_check]\ninterval_ms = 2000\n"
     "[access_log]\npath = \"access.log\"\nformat = \"json\"\n"),
]


# The heading of the section bench/instructions.py --ladder writes at the end
# of BENCHMARKS.md; this script keeps it when it rewrites the file.
INSTRUCTIONS_SECTION = "## The cost ladder in instructions"


def start_target(name, workdir, addrs, wasmlb, threads=1, cpus="0"):
    """Start target `name`; returns (Proc or None, port)."""
    if name == "direct":
        return None, int(addrs[0].rsplit(":", 1)[1])
    port = free_port()
    if name == "nginx":
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, port, addrs, threads))
        proc = Proc([tool("nginx"), "-c", conf, "-e", workdir / "nginx-error.log"], cpus=cpus)
    elif name == "haproxy":
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_conf(port, addrs))
        proc = Proc([tool("haproxy"), "-f", conf], cpus=cpus)
    elif name == "hyper-floor":
        proc = Proc([HYPER_FLOOR, f"127.0.0.1:{port}"] + addrs, cpus=cpus)
    else:
        binary, extra = wasmlb, ""
        if name.startswith("ladder-"):
            plugin, extra = "round-robin", LADDER[int(name.split("-")[1])][1]
        elif name == "wasmlb-before":
            plugin, binary = "round-robin", BASELINE["binary"]
        elif name == "wasmlb-pgo":
            plugin, binary = "round-robin", PGO["binary"]
        else:
            plugin = PLUGINS[name]
        conf = workdir / f"{name}.toml"
        # The build before issue 14 has no plugin disk cache (nor its key).
        cache = None if name == "wasmlb-before" else plugin_cache(workdir)
        conf.write_text(wasmlb_conf(port, addrs, plugin, extra, cache))
        proc = Proc([binary, "--config", conf, "--threads", threads, "--log-level", "warn"],
                    cpus=cpus)
    wait_port(port)
    return proc, port


def parse_duration_ms(s):
    """wrk's `1.23us` / `4.56ms` / `7.89s` / `1.00m` in ms; NaN if unparsable."""
    m = re.match(r"([\d.]+)(us|ms|s|m)\b", s or "")
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def percentile(out, q):
    m = re.search(rf"^\s*{q}%\s+(\S+)", out, re.M)
    return parse_duration_ms(m.group(1) if m else None)


def run_wrk(port, conns, duration):
    for attempt in range(2):
        out = subprocess.run(
            ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency",
             f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, check=True).stdout
        if re.search(r"Requests/sec:", out) and re.search(r"requests in", out):
            break
        log(f"  unexpected wrk output (attempt {attempt + 1}):\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50, p99 = percentile(out, 50), percentile(out, 99)
    if p50 != p50 or p99 != p99:
        log(f"  could not read wrk's latency distribution:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors or socket_errors:
        log(f"  wrk reported errors on port {port}: {errors and errors.group(0)} "
            f"{socket_errors and socket_errors.group(0)}")
    return rps, total, p50, p99


def run_fixed_rate(port, rate, duration):
    """p50/p99 in ms at `rate` requests/s over 64 connections (h2load --rps per client)."""
    with tempfile.NamedTemporaryFile(suffix=".log") as f:
        per_client = rate / 64
        subprocess.run(
            ["taskset", "-c", "1", tool("h2load"), "--h1", "-c64", "-t1",
             f"--rps={per_client}", "-D", str(duration), f"--log-file={f.name}",
             f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, check=True)
        lat = sorted(int(line.split("\t")[2]) / 1000.0
                     for line in Path(f.name).read_text().splitlines() if line.count("\t") >= 2)
    if not lat:
        return float("nan"), float("nan"), 0
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return pick(0.50), pick(0.99), len(lat) / duration


def measure(name, workdir, addrs, wasmlb, conns, duration, backend_proc, threads=1, cpus="0"):
    proc, port = start_target(name, workdir, addrs, wasmlb, threads, cpus)
    try:
        # Warm up connections and caches.
        subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", "-d1s",
                        f"http://127.0.0.1:{port}/"], capture_output=True, check=True)
        measured = backend_proc.pid if proc is None else proc.pid
        before, ticks_before = cpu_ns(measured), cpu_ticks(measured)
        rps, total, p50, p99 = run_wrk(port, conns, duration)
        used = cpu_ns(measured) - before
        user, system = (a - b for a, b in zip(cpu_ticks(measured), ticks_before))
        rss = peak_rss_kib(measured)
    finally:
        if proc:
            proc.stop()
    cpu_us = used / 1000.0 / max(total, 1)
    # The kernel's share of the exact total, as its tick samples split it.
    sys_us = cpu_us * system / (user + system) if user + system else float("nan")
    return {"rps": rps, "p50": p50, "p99": p99, "cpu_us": cpu_us, "sys_us": sys_us,
            "rss_mib": rss / 1024.0}


def measure_tls(name, workdir, addrs, wasmlb, conns, duration, handshakes):
    """Over TLS: keep-alive requests, or (handshakes) a new connection and full
    handshake per request (`Connection: close`). requests/s and CPU us each."""
    TLS["on"] = True
    try:
        proc, port = start_target(name, workdir, addrs, wasmlb)
    finally:
        TLS["on"] = False
    url = f"https://127.0.0.1:{port}/"
    close = ["-H", "Connection: close"] if handshakes else []
    try:
        protocol = negotiated(port)
        subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", "-d1s"] + close + [url],
                       capture_output=True, check=True)
        before = cpu_ns(proc.pid)
        out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}",
                              f"-d{duration}s"] + close + [url],
                             capture_output=True, text=True, check=True).stdout
        used = cpu_ns(proc.pid) - before
    finally:
        proc.stop()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        log(f"  {name}: {errors.group(0)}")
    return {"rps": rps, "cpu_us": used / 1000.0 / max(total, 1), "protocol": protocol}


def negotiated(port):
    """The TLS version and cipher suite an OpenSSL client (as wrk's) negotiates
    with the target on `port`, e.g. "TLSv1.3 TLS_AES_128_GCM_SHA256"."""
    out = subprocess.run([tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}",
                          "-servername", "bench.test", "-brief"], input="",
                         capture_output=True, text=True, timeout=20)
    text = out.stdout + out.stderr
    version = re.search(r"Protocol version: (\S+)", text)
    cipher = re.search(r"Ciphersuite: (\S+)", text)
    return " ".join(m.group(1) for m in (version, cipher) if m) or "?"


TCP_BYTES = 1 << 30


def tcp_target_conf(name, workdir, port, addr):
    """The TCP-mode config of `name` (HAProxy `mode tcp`, NGINX `stream`,
    wasmlb `mode = "tcp"`) in front of `addr`; returns the argv to run it."""
    if name == "nginx":
        module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
        if not module.exists():  # Debian builds `stream` as a dynamic module
            log("installing libnginx-mod-stream")
            subprocess.run(["apt-get", "install", "-y", "-qq", "libnginx-mod-stream"], check=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        conf = workdir / "nginx-stream.conf"
        conf.write_text(f"load_module {module};\n" + nginx_preamble(workdir, 1) + f"""stream {{
    upstream b {{ server {addr}; }}
    server {{ listen 127.0.0.1:{port} backlog=4096; proxy_pass b; }}
}}
""")
        return [tool("nginx"), "-c", conf, "-e", workdir / "nginx-error.log"]
    if name == "haproxy":
        conf = workdir / "haproxy-tcp.cfg"
        conf.write_text(f"""global
    nbthread 1
    maxconn {haproxy_maxconn()}
defaults
    mode tcp
    timeout connect 5s
    timeout client  30s
    timeout server  30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
    server b0 {addr}
""")
        return [tool("haproxy"), "-f", conf]
    conf = workdir / "wasmlb-tcp.toml"
    conf.write_text(f"""[[listener]]
address = "127.0.0.1:{port}"
upstream = "app"
mode = "tcp"

[upstream.app]
plugin = "round-robin"
backends = [ {{ address = "{addr}" }} ]
""")
    binary = BASELINE["binary"] if name == "wasmlb-before" else WASMLB["binary"]
    return [binary, "--config", conf, "--threads", "1", "--log-level", "warn"]


def tcp_transfer(port):
    """Read TCP_BYTES through the target on one connection; seconds taken."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"B")
        buf = bytearray(1 << 20)
        got = 0
        while True:
            n = s.recv_into(buf)
            if n == 0:
                break
            got += n
    if got != TCP_BYTES:
        raise RuntimeError(f"transfer got {got} bytes of {TCP_BYTES}")
    return time.monotonic() - start


def tcp_connections(port, duration, workers=4):
    """Open, use (`C` -> `ok`) and close connections from `workers` threads
    for `duration` s; the number completed."""
    import threading
    done = [0] * workers
    stop = time.monotonic() + duration

    def loop(i):
        while time.monotonic() < stop:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"C")
                while s.recv(16):
                    pass
            done[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def measure_tcp(name, workdir, addr, duration):
    """One target in TCP mode: a 1 GiB transfer (MiB/s, CPU ms per GiB) and
    connections/s with CPU us per connection (the target's CPU only)."""
    port = free_port()
    proc = Proc(tcp_target_conf(name, workdir, port, addr), cpus="0")
    try:
        wait_port(port)
        tcp_transfer(port)  # warm-up
        before = cpu_ns(proc.pid)
        seconds = tcp_transfer(port)
        per_gib = (cpu_ns(proc.pid) - before) / 1e6
        before = cpu_ns(proc.pid)
        n = tcp_connections(port, duration)
        per_conn = (cpu_ns(proc.pid) - before) / 1e3 / max(n, 1)
    finally:
        proc.stop()
    return {"mib_s": TCP_BYTES / (1 << 20) / seconds, "cpu_ms_gib": per_gib,
            "conns_s": n / duration, "cpu_us_conn": per_conn}


IDLE_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def read_response(sock):
    """Read one HTTP/1.1 response with a Content-Length body from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed before the response body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response {head[:40]!r}")


def idle_memory(name, workdir, addrs, wasmlb, count):
    """Resident memory the target holds for `count` idle keep-alive client
    connections, each of which has made one request: (MiB in total, KiB per connection)."""
    proc, port = start_target(name, workdir, addrs, wasmlb)
    socks = []
    try:
        # Warm up (backend connections, allocator arenas) before the baseline.
        subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", "-d1s",
                        f"http://127.0.0.1:{port}/"], capture_output=True, check=True)
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        batch = 500
        for start in range(0, count, batch):
            opened = []
            for _ in range(min(batch, count - start)):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(IDLE_REQUEST)
                opened.append(s)
            for s in opened:
                read_response(s)
            socks.extend(opened)
        time.sleep(1.0)
        after = rss_kib(proc.pid)
    finally:
        for s in socks:
            s.close()
        proc.stop()
    grown = max(after - before, 0)
    return grown / 1024.0, grown / count


def machine():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1048576:.0f} GiB"
    except (OSError, ValueError):
        pass
    versions = []
    for cmd in (["nginx", "-v"], ["haproxy", "-v"]):
        r = subprocess.run([tool(cmd[0])] + cmd[1:], capture_output=True, text=True)
        first = (r.stdout or r.stderr).splitlines()[0] if (r.stdout or r.stderr) else cmd[0]
        versions.append(first.strip())
    return f"{os.cpu_count()} CPUs ({cpu}){mem}, {platform.system()} {platform.release()}; " \
           + "; ".join(versions)


def idle_connection_count(wanted):
    """`wanted`, lowered to what the open-file limit allows. Raises the limit (and,
    as root, its hard limit) first; the targets inherit it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(limit, 65536), max(limit, 65536)))
        limit = max(limit, 65536)
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    # HAProxy needs about 2 descriptors per connection it accepts (maxsock).
    usable = limit // 2 - 100
    if usable < wanted:
        log(f"open-file limit {limit}: measuring {usable} idle connections, not {wanted}")
        return usable
    return wanted


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 rep (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--idle-connections", type=int, default=10_000,
                    help="idle keep-alive connections for the memory figure (default 10000)")
    ap.add_argument("--targets", default="direct,nginx,haproxy,hyper-floor,wasmlb-rr,wasmlb-lc",
                    help="comma-separated subset of the targets (direct is always run)")
    ap.add_argument("--sections", default="load,ladder,fixed,idle,scaling",
                    help="comma-separated subset of the sections to run (default all): load "
                         "(wrk at 64 and 256 connections), ladder (the cost of each layer), "
                         "fixed (20k requests/s), idle (idle connection memory), scaling "
                         "(1 and 2 worker threads)")
    ap.add_argument("--tls", action="store_true",
                    help="also measure TLS (keep-alive and handshakes/s) beside NGINX and HAProxy")
    ap.add_argument("--tcp", action="store_true",
                    help="also measure TCP mode (1 GiB transfer, connections/s) beside HAProxy "
                         "mode tcp and NGINX stream")
    ap.add_argument("--baseline", help="an earlier wasmlb binary to run beside this one, "
                                       "as the target wasmlb-before (a before/after table)")
    ap.add_argument("--pgo", action="store_true",
                    help="also build wasmlb with profile-guided optimization (bench/pgo.py, "
                         "about 20 minutes more) and run it as the target wasmlb-pgo")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if args.quick:
        args.duration, args.reps = 2, 1
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs at least 2 CPUs (target on CPU 0, load and backends on CPU 1)")
    install()
    wasmlb, demo = build()
    WASMLB["binary"] = wasmlb
    if args.baseline:
        BASELINE["binary"] = Path(args.baseline).resolve()
    if args.pgo:
        import pgo
        PGO["binary"] = pgo.build_pgo(demo)
    count = idle_connection_count(args.idle_connections)
    known = ["direct", "nginx", "haproxy", "hyper-floor", "wasmlb-before", "wasmlb-rr",
             "wasmlb-pgo", "wasmlb-lc"]
    wanted = set(args.targets.split(",")) | {"direct"}
    if args.baseline:
        wanted.add("wasmlb-before")
    if args.pgo:
        wanted.add("wasmlb-pgo")
    elif "wasmlb-pgo" in wanted:
        sys.exit("the target wasmlb-pgo needs --pgo")
    unknown = wanted - set(known)
    if unknown:
        sys.exit(f"unknown targets {sorted(unknown)} (known: {known})")
    targets = [t for t in known if t in wanted]
    conn_levels = [64, 256]
    results = {}
    with tempfile.TemporaryDirectory(prefix="wasmlb-bench-") as tmp:
        workdir = Path(tmp)
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / d).mkdir()
        backend_proc, addrs = start_backends(demo)
        try:
            warm_plugin_cache(wasmlb, workdir, addrs)
            for rep in range(args.reps if "load" in sections else 0):
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for conns in conn_levels:
                    for name in order:
                        log(f"rep {rep + 1}/{args.reps}: {name}, {conns} connections")
                        r = measure(name, workdir, addrs, wasmlb, conns, args.duration,
                                    backend_proc)
                        results.setdefault((name, conns), []).append(r)
            fixed = {}
            for name in targets if "fixed" in sections else []:
                log(f"fixed 20k rps: {name}")
                proc, port = start_target(name, workdir, addrs, wasmlb)
                try:
                    fixed[name] = run_fixed_rate(port, 20_000, args.duration)
                finally:
                    if proc:
                        proc.stop()
            idle = {}
            for name in targets if "idle" in sections else []:
                if name == "direct":
                    continue
                log(f"{count} idle keep-alive connections: {name}")
                idle[name] = idle_memory(name, workdir, addrs, wasmlb, count)
            scaling = {}
            for conns in conn_levels if "scaling" in sections else []:
                for name in ("nginx", "wasmlb-rr"):
                    for threads, cpus in ((1, "0"), (2, "0,1")):
                        log(f"{name} with {threads} worker(s), {conns} connections")
                        scaling[(name, threads, conns)] = measure(
                            name, workdir, addrs, wasmlb, conns, args.duration, backend_proc,
                            threads=threads, cpus=cpus)
            tcp = {}
            if args.tcp:
                tcp_backend = Proc([sys.executable, ROOT / "bench" / "tcp_backend.py",
                                    TCP_BYTES], cpus="1")
                m = re.search(r"listening on (\S+)", tcp_backend.p.stdout.readline())
                try:
                    tcp_targets = ["haproxy", "nginx", "wasmlb-rr"]
                    if args.baseline:
                        tcp_targets.append("wasmlb-before")
                    for rep in range(args.reps):
                        k = rep % len(tcp_targets)
                        for name in tcp_targets[k:] + tcp_targets[:k]:
                            log(f"TCP rep {rep + 1}: {name}")
                            tcp.setdefault(name, []).append(
                                measure_tcp(name, workdir, m.group(1), args.duration))
                finally:
                    tcp_backend.stop()
            tls = {}
            if args.tls:
                cert, key, both = make_certificate(workdir)
                TLS.update(cert=cert, key=key, both=both)
                tls_targets = ["nginx", "haproxy", "wasmlb-rr"]
                for rep in range(args.reps):
                    for kind in ("keep-alive", "handshakes"):
                        for name in tls_targets[rep % 3:] + tls_targets[:rep % 3]:
                            log(f"TLS rep {rep + 1}: {name}, {kind}")
                            tls.setdefault((kind, name), []).append(measure_tls(
                                name, workdir, addrs, wasmlb, 64 if kind == "keep-alive" else 16,
                                args.duration, kind == "handshakes"))
            ladder = {}
            rungs = ["hyper-floor"] + [f"ladder-{i}" for i in range(len(LADDER))]
            for rep in range(args.reps if "ladder" in sections else 0):
                for conns in conn_levels:
                    for name in rungs[rep % len(rungs):] + rungs[:rep % len(rungs)]:
                        log(f"ladder rep {rep + 1}: {name}, {conns} connections")
                        ladder.setdefault((name, conns), []).append(
                            measure(name, workdir, addrs, wasmlb, conns, args.duration,
                                    backend_proc))
        finally:
            backend_proc.stop()

    med = lambda rs, k: statistics.median(r[k] for r in rs)
    lines = [
        "# Benchmarks",
        "",
        f"Written by `bench/run.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}.",
        "",
        f"Each target alone on CPU 0; `wrk -t1` and the 4 `demo-backend` servers on CPU 1; "
        f"{args.duration} s per run, median of {args.reps} interleaved repetition(s). "
        "CPU us/request counts every thread of the target (for direct: the backend process); "
        "its kernel share is split off by the kernel's tick samples (utime/stime), so it is "
        "approximate. "
        "hyper-floor is `bench/hyper-floor`, the smallest proxy hyper allows (the floor "
        "for any proxy built on hyper). Compare only inside one run.",
    ]
    goals = []
    if results:
        lines += [
            "",
            "| conns | target | requests/s | ratio to direct | p50 / p99 ms | CPU us per request "
            "| of it in the kernel | CPU x NGINX | CPU x hyper floor | peak RSS MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for conns in conn_levels:
            direct = med(results[("direct", conns)], "rps")
            cpu = {n: med(results[(n, conns)], "cpu_us") for n in targets}
            for name in targets:
                rs = results[(name, conns)]
                vs = lambda ref: (f"{cpu[name] / cpu[ref]:.2f}" if ref in cpu
                                  and name != "direct" else "")
                lines.append(
                    f"| {conns} | {name} | {med(rs, 'rps'):,.0f} | {med(rs, 'rps') / direct:.2f} "
                    f"| {med(rs, 'p50'):.2f} / {med(rs, 'p99'):.2f} | {cpu[name]:.1f} | "
                    f"{med(rs, 'sys_us'):.1f} | "
                    f"{vs('nginx')} | {vs('hyper-floor')} | {med(rs, 'rss_mib'):.1f} |")
            for who in ("wasmlb-rr", "wasmlb-pgo"):
                if who in cpu and "nginx" in cpu:
                    r = cpu[who] / cpu["nginx"]
                    goals.append((f"CPU per request at {conns} connections <= 1.10x NGINX", who,
                                  f"{r:.2f}x", r <= 1.10))
                    ratio = (med(results[(who, conns)], "rps")
                             / med(results[("nginx", conns)], "rps"))
                    goals.append((f"requests/s ratio to direct at {conns} connections >= 0.9x "
                                  "NGINX's", who, f"{ratio:.2f}x", ratio >= 0.9))
                    rss = med(results[(who, conns)], "rss_mib")
                    limit = med(results[("nginx", conns)], "rss_mib") + 10
                    if conns == 256:
                        goals.append(("peak RSS at 256 connections <= NGINX's + 10 MiB", who,
                                      f"{rss:.1f} MiB (limit {limit:.1f})", rss <= limit))
                if who in cpu and "hyper-floor" in cpu:
                    r = cpu[who] / cpu["hyper-floor"]
                    goals.append((f"CPU per request at {conns} connections <= 1.15x the hyper "
                                  "floor", who, f"{r:.2f}x", r <= 1.15))
    if ladder:
        lines += ["", "The cost ladder: wasmlb round-robin adding one layer per rung (same "
                  "pinning; each rung's CPU us per request, and what the rung added over the one "
                  "before). The first wasmlb rung already has the plugin call and the metrics, "
                  "which cannot be turned off.", "",
                  "| rung | " + " | ".join(f"{c} conns: CPU us/request (added)" for c in
                                            conn_levels) + " |",
                  "| --- | " + " | ".join("---" for _ in conn_levels) + " |"]
        labels = ["hyper floor"] + [f"wasmlb: {label}" for label, _ in LADDER]
        prev = {}
        for name, label in zip(rungs, labels):
            cells = []
            for conns in conn_levels:
                c = med(ladder[(name, conns)], "cpu_us")
                cells.append(f"{c:.2f} ({c - prev[conns]:+.2f})" if conns in prev
                             else f"{c:.2f}")
                prev[conns] = c
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        last, before = rungs[-1], rungs[-2]
        lines += ["", "Goal (issue 17), the access log's cost:", "", "| goal | measured | |",
                  "| --- | --- | --- |"]
        for conns in conn_levels:
            r = med(ladder[(last, conns)], "cpu_us") / med(ladder[(before, conns)], "cpu_us")
            lines.append(f"| access_log <= 1.05x CPU per request, {conns} connections | "
                         f"{r:.3f}x | {'met' if r <= 1.05 else 'missed'} |")
    if fixed:
        lines += ["", "Fixed rate (h2load --h1, 64 connections, target 20,000 requests/s):", "",
                  "| target | achieved requests/s | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
        for name in targets:
            p50, p99, achieved = fixed[name]
            lines.append(f"| {name} | {achieved:,.0f} | {p50:.2f} | {p99:.2f} |")
        for who in ("wasmlb-rr", "wasmlb-pgo"):
            if who in fixed and "nginx" in fixed:
                r = fixed[who][1] / fixed["nginx"][1]
                goals.append(("p99 at a fixed 20k requests/s <= 1.1x NGINX's", who,
                              f"{r:.2f}x", r <= 1.1))
    if scaling:
        lines += ["", "Scaling: 1 worker pinned to CPU 0, and 2 workers unpinned on CPUs 0 and 1, "
                  "which they share with wrk and the backends (this machine has 2 cores, so the "
                  "2-worker figures measure contention as much as scaling):", "",
                  "| conns | target | workers | requests/s | p50 / p99 ms | CPU us per request |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for (name, threads, conns), r in sorted(scaling.items(), key=lambda kv: (kv[0][2],
                                                                                 kv[0][0],
                                                                                 kv[0][1])):
            lines.append(f"| {conns} | {name} | {threads} | {r['rps']:,.0f} | "
                         f"{r['p50']:.2f} / {r['p99']:.2f} | {r['cpu_us']:.1f} |")
    if idle:
        lines += ["", f"Memory held by {count:,} idle keep-alive client connections (each made "
                  "one request; growth of the target's resident set, VmRSS summed over its "
                  "processes):", "", "| target | MiB in total | KiB per connection |",
                  "| --- | --- | --- |"]
        for name, (mib, kib) in idle.items():
            lines.append(f"| {name} | {mib:.1f} | {kib:.1f} |")
        for who in ("wasmlb-rr", "wasmlb-pgo"):
            if who in idle:
                kib = idle[who][1]
                goals.append(("memory per idle keep-alive connection <= 4 KiB", who,
                              f"{kib:.1f} KiB", kib <= 4))
    tls_goals = []
    if tls:
        lines += ["", "TLS (the same self-signed P-256 certificate; the protocol column is what "
                  "an OpenSSL client, as wrk, negotiates with each target): keep-alive is 64 "
                  "connections reused, handshakes is 16 connections each closed after one "
                  "request (`Connection: close`), so every request is a new handshake (wrk "
                  "resumes sessions from the server's tickets: TLS 1.3 PSK with an X25519 key "
                  "exchange).", "",
                  "| load | target | protocol | requests/s | CPU us per request | CPU x NGINX |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for kind in ("keep-alive", "handshakes"):
            cpu = {n: med(rs, "cpu_us") for (k, n), rs in tls.items() if k == kind}
            for (k, name), rs in tls.items():
                if k != kind:
                    continue
                lines.append(f"| {kind} | {name} | {rs[0]['protocol']} | {med(rs, 'rps'):,.0f} | "
                             f"{cpu[name]:.1f} | {cpu[name] / cpu['nginx']:.2f} |")
        r = med(tls[("keep-alive", "wasmlb-rr")], "cpu_us") / med(tls[("keep-alive", "nginx")],
                                                                   "cpu_us")
        tls_goals.append(("CPU per request over TLS <= 1.10x NGINX", f"{r:.2f}x", r <= 1.10))
        h = med(tls[("handshakes", "wasmlb-rr")], "rps") / med(tls[("handshakes", "nginx")], "rps")
        tls_goals.append(("TLS handshakes/s >= NGINX's", f"{h:.2f}x", h >= 1.0))
        lines += ["", "Goals (issue 15), wasmlb-rr in this run:", "", "| goal | measured | |",
                  "| --- | --- | --- |"]
        for goal, measured, met in tls_goals:
            lines.append(f"| {goal} | {measured} | {'met' if met else 'missed'} |")
    if tcp:
        lines += ["", "TCP mode (HAProxy `mode tcp`, NGINX `stream`, wasmlb `mode = \"tcp\"`; "
                  "one Python backend on CPU 1, the target alone on CPU 0): one 1 GiB transfer "
                  "(backend to client), and connections opened, used for 2 bytes and closed "
                  "by 4 client threads. CPU is the target's only.", "",
                  "| target | MiB/s | CPU ms per GiB | connections/s | CPU us per connection |",
                  "| --- | --- | --- | --- | --- |"]
        for name, rs in tcp.items():
            lines.append(f"| {name} | {med(rs, 'mib_s'):,.0f} | {med(rs, 'cpu_ms_gib'):.0f} | "
                         f"{med(rs, 'conns_s'):,.0f} | {med(rs, 'cpu_us_conn'):.1f} |")
        g = med(tcp["wasmlb-rr"], "cpu_ms_gib") / med(tcp["haproxy"], "cpu_ms_gib")
        c = med(tcp["wasmlb-rr"], "cpu_us_conn") / med(tcp["haproxy"], "cpu_us_conn")
        lines += ["", "Goals (issue 16), wasmlb in this run:", "", "| goal | measured | |",
                  "| --- | --- | --- |",
                  f"| CPU per GiB <= 1.10x HAProxy's | {g:.2f}x | {'met' if g <= 1.1 else 'missed'} |",
                  f"| CPU per connection <= 1.10x HAProxy's | {c:.2f}x | "
                  f"{'met' if c <= 1.1 else 'missed'} |"]
    if goals:
        lines += ["", "Goals (issue 14) in this run:", "", "| goal | target | measured | |",
                  "| --- | --- | --- | --- |"]
        for goal, who, measured, met in goals:
            lines.append(f"| {goal} | {who} | {measured} | {'met' if met else 'missed'} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    # bench/instructions.py --ladder keeps its own section (instructions per
    # request, which do not move between runs): carried over as it is.
    kept = out.read_text().partition(INSTRUCTIONS_SECTION)[2] if out.exists() else ""
    if kept:
        text += "\n" + INSTRUCTIONS_SECTION + kept
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
