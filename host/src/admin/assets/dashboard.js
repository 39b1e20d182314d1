// The wasmlb dashboard: polls GET /upstreams once a second and renders each
// upstream's backends, plugin and a requests/s chart; its buttons call the
// same admin API (PUT .../backends/{address}/state, PUT .../plugin,
// POST /reload) with the same bearer token. Every value from the API is
// written with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 1000;
const WINDOW = 60; // samples kept for the chart and the share, one per poll
const COLORS = ["#1a73e8", "#e8710a", "#188038", "#d93025", "#9334e6", "#12b5cb", "#e52592", "#7cb342", "#f9ab00", "#5f6368"];
const TOKEN_KEY = "wasmlb-admin-token";

const upstreams = new Map(); // name -> view state
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timer = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.includes("-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function showMessage(text, isError) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
  m.hidden = !text;
}

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined && typeof body !== "string") {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers, body, cache: "no-store" });
  if (r.status === 401) {
    document.getElementById("token-form").hidden = false;
    throw new Unauthorized("the admin API wants a bearer token");
  }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${data.error || r.statusText}`);
  return data;
}

function shortDigest(d) {
  return d && d.startsWith("sha256:") ? "sha256:" + d.slice(7, 19) : d || "";
}

function upstreamView(name) {
  let v = upstreams.get(name);
  if (v) return v;
  const builtins = (document.body.dataset.builtins || "").split(",").filter(Boolean);
  const select = el("select", { class: "swap-to", "aria-label": "built-in strategy" },
    ...builtins.map((b) => el("option", { value: b, textContent: b })));
  const swap = el("button", { type: "button", class: "swap", textContent: "Swap plugin" });
  const plugin = {
    name: el("b", { class: "plugin-name" }),
    digest: el("code", { class: "plugin-digest" }),
    status: el("span", { class: "plugin-status" }),
    failures: el("span", { class: "plugin-failures" }),
    fallbacks: el("span", { class: "plugin-fallbacks" }),
  };
  const promote = el("button", { type: "button", class: "promote", textContent: "Promote shadow" });
  const shadow = {
    line: el("div", { class: "shadow", hidden: true }),
    text: el("span", { class: "shadow-text" }),
    shares: el("span", { class: "shadow-shares" }),
  };
  shadow.line.append(shadow.text, " ", shadow.shares, " ", promote);
  promote.addEventListener("click", () => act(promote, "POST", `/upstreams/${encodeURIComponent(name)}/shadow/promote`,
    undefined, (r) => `upstream ${name}: promoted ${r.plugin}`));
  const tbody = el("tbody");
  const head = el("tr", {}, ...["backend", "state", "health", "admin", "in flight", "req/s", "share", "requests", "rtt ms", "weight", ""]
    .map((h) => el("th", { textContent: h })));
  const canvas = el("canvas", { class: "chart", width: 800, height: 160 });
  const section = el("section", { class: "upstream", "data-upstream": name },
    el("h2", { textContent: "upstream " + name }),
    el("div", { class: "plugin" },
      el("span", {}, "plugin ", plugin.name), plugin.digest, plugin.status,
      el("span", {}, "failures ", plugin.failures), el("span", {}, "fallbacks ", plugin.fallbacks),
      el("span", {}, select, " ", swap)),
    shadow.line,
    el("table", {}, el("thead", {}, head), tbody),
    canvas);
  swap.addEventListener("click", () => act(swap, "PUT", `/upstreams/${encodeURIComponent(name)}/plugin`,
    { plugin: select.value }, (r) => `upstream ${name}: swapped to ${r.plugin || select.value}`));
  document.getElementById("upstreams").append(section);
  v = { name, section, plugin, shadow, tbody, canvas, rows: new Map(), last: null, samples: [] };
  upstreams.set(name, v);
  return v;
}

function backendRow(v, b, color) {
  const key = b.address;
  let row = v.rows.get(key);
  if (row) return row;
  const cells = {};
  for (const c of ["state", "health", "admin", "inflight", "rps", "share", "requests", "rtt", "weight"]) {
    cells[c] = el("td", { class: c + (["inflight", "rps", "requests", "rtt", "weight"].includes(c) ? " num" : "") });
  }
  const drain = el("button", { type: "button", class: "drain", textContent: "Drain" });
  const ready = el("button", { type: "button", class: "ready", textContent: "Ready" });
  // By id (as of the latest poll): an address would need percent-encoding.
  const path = () => `/upstreams/${encodeURIComponent(v.name)}/backends/${row.id}/state`;
  drain.addEventListener("click", () => act(drain, "PUT", path(), "drain", () => `${b.address}: drain`));
  ready.addEventListener("click", () => act(ready, "PUT", path(), "ready", () => `${b.address}: ready`));
  const tr = el("tr", { "data-backend": b.address },
    el("td", {}, el("span", { class: "swatch" }), b.address),
    cells.state, cells.health, cells.admin, cells.inflight, cells.rps, cells.share,
    cells.requests, cells.rtt, cells.weight, el("td", {}, drain, " ", ready));
  tr.querySelector(".swatch").style.background = color;
  row = { tr, cells, drain, ready, id: b.id };
  v.rows.set(key, row);
  v.tbody.append(tr);
  return row;
}

function render(list, now) {
  const names = new Set();
  for (const u of list) {
    names.add(u.name);
    const v = upstreamView(u.name);
    const p = u.plugin;
    v.plugin.name.textContent = p.name;
    v.plugin.digest.textContent = shortDigest(p.digest);
    v.plugin.digest.title = p.digest;
    v.plugin.status.textContent = `${p.status}, breaker ${p.breaker}` + (u.panic ? ", panic mode" : "");
    v.plugin.status.className = "plugin-status state " + (p.status === "ok" ? "state-healthy" : "state-unhealthy");
    v.plugin.failures.textContent = String(Object.values(p.failures || {}).reduce((a, n) => a + n, 0));
    v.plugin.failures.title = JSON.stringify(p.failures || {});
    v.plugin.fallbacks.textContent = String(p.fallbacks);
    const sh = u.shadow;
    v.shadow.line.hidden = !sh;
    if (sh) {
      v.shadow.text.textContent = `shadow ${sh.plugin} ${shortDigest(sh.digest)} (${sh.sample_percent} %): ` +
        `agree ${sh.agree}, differ ${sh.differ}, errors ${sh.errors}` + (sh.dropped ? `, dropped ${sh.dropped}` : "");
      v.shadow.shares.textContent = "last minute, live / shadow: " + (sh.share_last_minute || [])
        .map((r) => `${r.backend} ${r.live_percent.toFixed(1)} % / ${r.shadow_percent.toFixed(1)} %`).join("; ");
    }

    // Requests per backend since the previous poll.
    const dt = v.last ? Math.max((now - v.last.t) / 1000, 0.001) : 0;
    const deltas = new Map();
    for (const b of u.backends) {
      const before = v.last && v.last.requests.get(b.address);
      deltas.set(b.address, before === undefined ? 0 : Math.max(b.requests - before, 0));
    }
    if (v.last) v.samples.push({ dt, deltas });
    if (v.samples.length > WINDOW) v.samples.shift();
    v.last = { t: now, requests: new Map(u.backends.map((b) => [b.address, b.requests])) };

    const windowTotal = new Map();
    let total = 0;
    for (const s of v.samples) {
      for (const [a, n] of s.deltas) { windowTotal.set(a, (windowTotal.get(a) || 0) + n); total += n; }
    }
    const present = new Set();
    u.backends.forEach((b, i) => {
      present.add(b.address);
      const row = backendRow(v, b, COLORS[i % COLORS.length]);
      const c = row.cells;
      c.state.textContent = b.state;
      c.state.className = "state state-" + b.state;
      c.health.textContent = b.check_passing ? "passing" : "failing";
      c.health.className = "health state " + (b.check_passing ? "state-healthy" : "state-unhealthy");
      c.admin.textContent = b.admin_state;
      c.inflight.textContent = String(b.in_flight);
      c.rps.textContent = dt ? (deltas.get(b.address) / dt).toFixed(1) : "–";
      const share = total ? (100 * (windowTotal.get(b.address) || 0)) / total : 0;
      c.share.textContent = total ? share.toFixed(1) + "%" : "–";
      if (total) {
        const bar = el("span", { class: "share-bar" });
        bar.style.width = (share / 2).toFixed(0) + "px";
        c.share.append(bar);
      }
      c.requests.textContent = String(b.requests);
      c.rtt.textContent = b.rtt_ms ? b.rtt_ms.toFixed(2) : "–";
      c.weight.textContent = b.effective_weight === b.weight ? String(b.weight) : `${b.effective_weight}/${b.weight}`;
      row.drain.disabled = b.admin_state === "drain";
      row.ready.disabled = b.admin_state === "ready";
      row.color = COLORS[i % COLORS.length];
      row.id = b.id;
    });
    for (const [a, row] of v.rows) {
      if (!present.has(a)) { row.tr.remove(); v.rows.delete(a); }
    }
    drawChart(v);
  }
  for (const [n, v] of upstreams) {
    if (!names.has(n)) { v.section.remove(); upstreams.delete(n); }
  }
}

// Requests/s per backend over the last WINDOW polls, stacked: each band's
// height is one backend's rate, the top edge is the upstream's total, so the
// bands' thickness is each backend's share of the traffic.
function drawChart(v) {
  const canvas = v.canvas;
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 800, h = canvas.clientHeight || 160;
  if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  let max = 1;
  for (const s of v.samples) {
    let total = 0;
    for (const n of s.deltas.values()) total += n / s.dt;
    max = Math.max(max, total);
  }
  max = niceCeil(max);
  g.strokeStyle = "#d8dee8"; g.fillStyle = "#5e6b7d"; g.font = "11px system-ui, sans-serif"; g.lineWidth = 1;
  for (let k = 0; k <= 4; k++) {
    const y = pad.t + ((h - pad.t - pad.b) * k) / 4;
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke();
    g.fillText(String(Math.round(max - (max * k) / 4)), 4, y + 4);
  }
  g.fillText("req/s per backend, stacked, last " + WINDOW + " s", pad.l, h - 4);
  if (v.samples.length < 2) return;
  const x = (i) => pad.l + ((w - pad.l - pad.r) * (WINDOW - v.samples.length + i)) / (WINDOW - 1);
  const y = (rps) => h - pad.b - ((h - pad.t - pad.b) * rps) / max;
  const below = v.samples.map(() => 0);
  for (const [address, row] of v.rows) {
    const above = v.samples.map((s, i) => below[i] + (s.deltas.get(address) || 0) / s.dt);
    g.beginPath();
    above.forEach((r, i) => (i === 0 ? g.moveTo(x(i), y(r)) : g.lineTo(x(i), y(r))));
    for (let i = below.length - 1; i >= 0; i--) g.lineTo(x(i), y(below[i]));
    g.closePath();
    g.globalAlpha = 0.75; g.fillStyle = row.color || "#5f6368"; g.fill();
    g.globalAlpha = 1; g.strokeStyle = row.color || "#5f6368"; g.lineWidth = 1.5;
    g.beginPath();
    above.forEach((r, i) => (i === 0 ? g.moveTo(x(i), y(r)) : g.lineTo(x(i), y(r))));
    g.stroke();
    above.forEach((r, i) => { below[i] = r; });
  }
}

function niceCeil(n) {
  const p = Math.pow(10, Math.floor(Math.log10(n)));
  for (const m of [1, 2, 5, 10]) if (n <= m * p) return m * p;
  return 10 * p;
}

async function act(button, method, path, body, describe) {
  button.disabled = true;
  try {
    const r = await api(method, path, body);
    showMessage(describe(r), false);
  } catch (e) {
    showMessage(e.message, true);
  } finally {
    button.disabled = false;
    await poll();
  }
}

async function poll() {
  clearTimeout(timer);
  const status = document.getElementById("status");
  try {
    const list = await api("GET", "/upstreams");
    document.getElementById("token-form").hidden = true;
    render(list, performance.now());
    status.textContent = `${list.length} upstream${list.length === 1 ? "" : "s"} · updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    status.textContent = e instanceof Unauthorized ? "token needed" : "admin API unreachable: " + e.message;
  }
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    token = fromHash;
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname);
  }
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = document.getElementById("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    poll();
  });
  const reload = document.getElementById("reload");
  reload.addEventListener("click", () => act(reload, "POST", "/reload", undefined,
    (r) => `config reloaded in ${Number(r.elapsed_ms || 0).toFixed(1)} ms; upstreams: ${(r.upstreams || []).join(", ")}`));
  poll();
});
