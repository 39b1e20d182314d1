#!/usr/bin/env bash
# wasmlb quickstart: build, start three demo backends and the balancer in front
# of them, send requests, and show how they spread. Everything listens on
# 127.0.0.1 with ports the OS picks. With a terminal attached it keeps running
# until Ctrl-C so you can send your own requests; otherwise it stops by itself.
set -euo pipefail
cd "$(dirname "$0")"

REQUESTS="${REQUESTS:-12}"
PLUGIN="${PLUGIN:-round-robin}"

if command -v rustup >/dev/null 2>&1; then
  # The toolchain rust-toolchain.toml pins, with the wasm32-wasip2 target
  # the plugins build for.
  rustup toolchain install >/dev/null 2>&1 || rustup toolchain install
fi
command -v curl >/dev/null 2>&1 || { echo "quickstart needs curl (apt-get install curl)" >&2; exit 1; }
command -v make >/dev/null 2>&1 || { echo "quickstart needs make to build jemalloc (apt-get install make)" >&2; exit 1; }

echo "==> building wasmlb and the demo backends (release; the first build takes a few minutes)"
cargo build --release --quiet -p wasmlb -p demo-backend

work=target/quickstart
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# Wait until file $1 has at least $2 lines matching $3 (bounded: 30 s).
wait_lines() {
  for _ in $(seq 300); do
    [ "$(grep -c "$3" "$1" 2>/dev/null || true)" -ge "$2" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2; cat "$1" >&2; exit 1
}

./target/release/demo-backend 127.0.0.1:0 127.0.0.1:0 127.0.0.1:0 >"$work/backends.out" &
pids+=($!)
wait_lines "$work/backends.out" 3 "listening on"
mapfile -t addrs < <(awk '/listening on/ {print $4}' "$work/backends.out")

cat >"$work/wasmlb.toml" <<TOML
[[listener]]
address = "127.0.0.1:0"
upstream = "demo"

[upstream.demo]
plugin = "$PLUGIN"
backends = [
  { address = "${addrs[0]}" },
  { address = "${addrs[1]}" },
  { address = "${addrs[2]}" },
]
TOML
echo "==> config ($work/wasmlb.toml):"
sed 's/^/    /' "$work/wasmlb.toml"

./target/release/wasmlb --config "$work/wasmlb.toml" >"$work/wasmlb.out" &
pids+=($!)
wait_lines "$work/wasmlb.out" 1 "listening on"
url=$(awk '/listening on/ {print $4; exit}' "$work/wasmlb.out")
echo "==> wasmlb ($PLUGIN) listening on $url; sending $REQUESTS requests"

for i in $(seq "$REQUESTS"); do
  printf '    request %2d -> %s\n' "$i" "$(curl -s --noproxy '*' "$url/")"
done | tee "$work/responses.out"

echo "==> spread:"
awk '{print $NF}' "$work/responses.out" | sort | uniq -c | awk '{printf "    %s: %d requests\n", $2, $1}'

if [ -t 0 ] && [ -t 1 ]; then
  echo "==> still running: try  curl $url/   (Ctrl-C to stop)"
  wait
fi
