# ruff: noqa: E501  (the page is HTML and JS, not Python: its lines are markup)
"""The console's one HTML page (:mod:`fleet.console`): inline CSS, JS and SVG, nothing fetched
from elsewhere, so it works offline and under the console's Content-Security-Policy.

It polls ``/api/overview``, ``/api/devices`` and ``/api/releases`` (or ``/api/devices/ID`` on a
device page, ``#device/ID``) every ``__POLL_MS__`` milliseconds and renders them; every string from
the fleet goes through ``esc()``. ``body[data-refreshes]`` counts the renders (tests read it).
"""

from typing import Final

PAGE: Final = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgepack fleet console</title>
<style>
:root { --ok:#2e8b57; --bad:#c0392b; --fly:#2f6fdf; --off:#8a8f98; --wait:#e3e6ea; --ink:#1d2228;
        --mute:#5b6470; --line:#d9dde2; --bg:#f6f7f9; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--ink);
       background:var(--bg); }
header { display:flex; gap:1.5em; align-items:baseline; padding:.7em 1.2em; background:#1d2228; color:#fff; }
header h1 { font-size:1.1em; margin:0; } header a { color:#cfe0ff; text-decoration:none; }
header .live { margin-left:auto; font-size:.85em; color:#aab; }
header .live.err { color:#ffb4a8; }
main { padding:1em 1.2em; max-width:1500px; }
section { background:#fff; border:1px solid var(--line); border-radius:6px; padding:.8em 1em; margin-bottom:1em; }
h2 { font-size:1.05em; margin:.1em 0 .6em; } h3 { font-size:1em; margin:.2em 0; }
table { border-collapse:collapse; width:100%; font-size:.92em; }
th, td { text-align:left; padding:.25em .5em; border-bottom:1px solid var(--line); white-space:nowrap; }
th { color:var(--mute); font-weight:600; } td.num { text-align:right; font-variant-numeric:tabular-nums; }
.muted { color:var(--mute); } .small { font-size:.85em; }
.badge { display:inline-block; padding:0 .5em; border-radius:3px; font-size:.85em; background:var(--wait); }
.s-online,.s-committed,.s-finished,.s-done,.s-ok { background:#d7f0e1; color:#17603a; }
.s-offline,.s-lost,.s-revoked,.s-unknown { background:#eceef1; color:#555; }
.s-aborted,.s-failed,.s-rolled_back,.s-timed_out,.s-bad { background:#f8d9d5; color:#8e2417; }
.s-running,.s-dispatched,.s-downloading,.s-installed,.s-open { background:#dbe6fb; color:#1d4aa0; }
.s-paused,.s-soaking { background:#fcefd0; color:#7a5600; }
.rollout { border-top:1px solid var(--line); padding:.7em 0; } .rollout:first-of-type { border-top:0; }
.reason { margin:.3em 0; padding:.3em .6em; border-left:3px solid var(--bad); background:#fdf1ef; }
.reason.paused { border-color:#d89c00; background:#fdf7e6; }
.wave { display:grid; grid-template-columns:7em 1fr 24em; gap:.6em; align-items:center; margin:.2em 0; }
.bar { display:flex; height:14px; background:var(--wait); border-radius:3px; overflow:hidden; }
.bar span { display:block; height:100%; }
.c { background:var(--ok); } .f { background:var(--bad); } .i { background:var(--fly); } .o { background:var(--off); }
.charts { display:flex; flex-wrap:wrap; gap:1em; margin-top:.5em; }
.chart { border:1px solid var(--line); border-radius:4px; padding:.4em .6em; }
.filters { display:flex; gap:.8em; align-items:center; margin-bottom:.5em; }
.filters select, .filters input { font:inherit; padding:.15em .3em; }
.kv { display:grid; grid-template-columns:12em 1fr; gap:.15em .8em; }
.kv div:nth-child(odd) { color:var(--mute); }
a { color:#1d4aa0; }
</style></head>
<body data-refreshes="0">
<header><h1>edgepack fleet <span id="fleet"></span></h1>
<a href="#">Overview</a><a href="#devices">Devices</a><a href="#releases">Releases</a><a href="#rollouts">Rollouts</a>
<span class="live" id="live">connecting…</span></header>
<main id="main"></main>
<script>
"use strict";
const POLL_MS = __POLL_MS__;
let refreshes = 0;
const esc = v => String(v ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const num = (v, d = 1) => v === null || v === undefined ? "—" : Number(v).toFixed(d);
const pct = v => v === null || v === undefined ? "—" : (v >= 0 ? "+" : "") + (100 * v).toFixed(1) + "%";
const mb = b => b === null || b === undefined ? "—" : (b / 1048576).toFixed(0);
const age = s => s === null || s === undefined ? "—" : s < 90 ? s.toFixed(0) + " s" : s < 5400 ? (s / 60).toFixed(0) + " min" : (s / 3600).toFixed(1) + " h";
const when = ts => ts ? new Date(ts * 1000).toLocaleTimeString() : "—";
const badge = s => `<span class="badge s-${esc(s)}">${esc(s)}</span>`;
async function get(path) {
  // location.origin: never a URL with user:password@ in it (fetch refuses those).
  const r = await fetch(location.origin + path, {headers: {"Accept": "application/json"}});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
function route() {
  const h = decodeURIComponent(location.hash.slice(1));
  if (h.startsWith("device/")) return {device: h.slice(7)};
  return {params: new URLSearchParams(h.includes("=") ? h : "")};
}

function waveRow(w) {
  const part = (n, cls, what) => n ? `<span class="${cls}" style="width:${(100 * n / Math.max(w.size, 1)).toFixed(2)}%" title="${n} ${what}"></span>` : "";
  return `<div class="wave" data-wave="${w.wave}" data-size="${w.size}" data-committed="${w.committed}" data-failed="${w.failed}" data-inflight="${w.in_flight}" data-offline="${w.offline}">
    <div>wave ${w.wave} ${badge(w.phase)}</div>
    <div class="bar">${part(w.committed, "c", "committed")}${part(w.failed, "f", "failed")}${part(w.in_flight, "i", "in flight")}${part(w.offline, "o", "offline")}</div>
    <div class="small"><b>${w.committed}</b> committed · <b>${w.failed}</b> failed · <b>${w.in_flight}</b> in flight · <b>${w.offline}</b> offline · ${w.pending} pending / ${w.size}
    ${w.median_regression && w.median_regression.decode !== null ? " · median decode regression " + pct(w.median_regression.decode) : ""}</div></div>`;
}

function barChart(title, m, fmt, scaleMax) {
  // Two bars, before and after, on one scale; an inline SVG (no chart library).
  const W = 300, H = 58, x0 = 52, len = W - x0 - 56;
  const max = scaleMax ?? Math.max(m.before ?? 0, m.after ?? 0, 1e-9) * 1.05;
  const row = (y, label, v, color) => v === null || v === undefined
    ? `<text x="0" y="${y + 11}" class="small" fill="#5b6470">${label}</text><text x="${x0}" y="${y + 11}" fill="#8a8f98" font-size="11">not measured</text>`
    : `<text x="0" y="${y + 11}" font-size="11" fill="#5b6470">${label}</text><rect x="${x0}" y="${y}" width="${(len * v / max).toFixed(1)}" height="14" rx="2" fill="${color}"></rect><text x="${x0 + len * v / max + 4}" y="${y + 11}" font-size="11">${fmt(v)}</text>`;
  return `<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)}">
    <text x="0" y="10" font-size="11" font-weight="600">${esc(title)}</text>
    ${row(18, "before", m.before, "#8a8f98")}${row(38, "after", m.after, m.after !== null && m.before !== null && m.after < m.before * 0.95 ? "#c0392b" : "#2e8b57")}</svg>`;
}

function compareCharts(cmp) {
  if (!cmp.length) return `<div class="muted small">no committed device with gate figures yet</div>`;
  return `<div class="charts">${cmp.map(c => `<div class="chart" data-profile="${esc(c.profile)}"><h3>${esc(c.profile)} <span class="muted small">${c.devices} committed</span></h3>
    ${barChart("decode tok/s (median, n=" + c.decode_tok_s.n_after + ")", c.decode_tok_s, v => v.toFixed(1))}
    ${barChart("fidelity agreement (median)", c.agreement, v => v.toFixed(3), 1)}</div>`).join("")}</div>`;
}

function rolloutCard(r) {
  const reason = r.reason && (r.status === "aborted" || r.status === "paused")
    ? `<div class="reason ${esc(r.status)}" data-status="${esc(r.status)}"><b>${r.status === "aborted" ? "Aborted" : "Paused"}:</b> ${esc(r.reason)}</div>`
    : r.reason ? `<div class="small muted">${esc(r.reason)}</div>` : "";
  const hist = (r.history || []).slice(-6).map(h => `<div class="small"><span class="muted">${when(h.ts)}</span> ${esc(h.text)}</div>`).join("");
  const fails = (r.failures || []).slice(0, 5).map(f => `<div class="small">${devLink(f.device)} ${badge(f.state)} ${esc(f.reason)}</div>`).join("");
  return `<div class="rollout" data-rollout="${esc(r.rollout)}" data-status="${esc(r.status)}">
    <h3>${esc(r.rollout)} ${badge(r.status)} <span class="muted small">release ${esc(r.release)} · wave ${r.wave}/${r.waves} · created ${when(r.created)}</span></h3>
    ${reason}${(r.progress || []).map(waveRow).join("")}
    ${compareCharts(r.compare || [])}
    ${fails ? `<div style="margin-top:.4em"><b class="small">failed devices</b>${fails}</div>` : ""}
    <details><summary class="small muted">history</summary>${hist}</details></div>`;
}

const devLink = d => `<a href="#device/${encodeURIComponent(d)}">${esc(d)}</a>`;

function deviceTable(doc, params) {
  const opt = (vals, cur) => `<option value="">all</option>` + vals.map(v => `<option${v === cur ? " selected" : ""}>${esc(v)}</option>`).join("");
  const rows = doc.devices.map(d => `<tr data-device="${esc(d.device)}"><td>${devLink(d.device)}</td><td>${badge(d.state)}</td><td>${esc(d.profile)}</td>
    <td>${esc(d.bundle)}</td><td class="num">${num(d.decode_tok_s)}</td><td class="num">${num(d.ttft_ms, 0)}</td><td class="num">${mb(d.rss_bytes)}</td>
    <td class="num">${num(d.temperature_c)}</td><td class="num">${age(d.health_age_s)}</td>
    <td>${d.last_gate ? badge(d.last_gate.ok ? "ok" : "bad") + " " + esc((d.last_gate.failures || [])[0] || "") : "—"}</td>
    <td>${d.rollout_state ? badge(d.rollout_state) : "—"}</td></tr>`).join("");
  return `<section id="devices"><h2>Devices <span class="muted small"><span id="device-total">${doc.total}</span> in the fleet, <span id="device-matched">${doc.matched}</span> match${doc.matched > doc.devices.length ? ", first " + doc.devices.length + " shown" : ""}</span></h2>
    <div class="filters"><label>profile <select id="f-profile">${opt(doc.profiles, params.get("profile") || "")}</select></label>
    <label>state <select id="f-state">${opt(doc.states, params.get("state") || "")}</select></label>
    <label>device <input id="f-q" size="14" value="${esc(params.get("q") || "")}"></label></div>
    <table><thead><tr><th>device</th><th>state</th><th>profile</th><th>bundle</th><th>tok/s</th><th>TTFT ms</th><th>RSS MB</th><th>°C</th><th>health age</th><th>last gate</th><th>latest rollout</th></tr></thead>
    <tbody id="device-rows">${rows}</tbody></table></section>`;
}

function releasesTable(rels) {
  const rows = rels.flatMap(r => r.profiles.map((p, i) => `<tr data-release="${esc(r.release)}" data-profile="${esc(p.profile)}">
    <td>${i ? "" : esc(r.release) + " " + (r.verified ? badge("ok") : `<span class="badge s-bad" title="${esc(r.problem)}">does not verify</span>`)}</td>
    <td>${esc(p.profile)}</td><td>${esc(p.bundle)}</td><td>${esc(p.precision)} ${esc(p.quant)}</td><td>${esc(p.runtime)}</td>
    <td class="num">${p.delta_ppl_pct === null ? "—" : "+" + num(p.delta_ppl_pct, 2) + "%"}</td><td class="num">${num(p.expected_decode_tok_s)}</td>
    <td class="num">${num(p.expected_ttft_ms, 0)}</td></tr>`)).join("");
  return `<section id="releases"><h2>Releases</h2><table><thead><tr><th>release</th><th>profile</th><th>bundle</th><th>precision</th><th>runtime</th><th>Δ perplexity</th><th>expected tok/s</th><th>expected TTFT ms</th></tr></thead>
    <tbody>${rows || `<tr><td colspan="8" class="muted">no release rolled out yet</td></tr>`}</tbody></table></section>`;
}

async function renderFleet(params) {
  const q = new URLSearchParams();
  for (const k of ["profile", "state", "q"]) if (params.get(k)) q.set(k, params.get(k));
  const [ov, devs, rels] = await Promise.all([get("/api/overview"), get("/api/devices?" + q), get("/api/releases")]);
  document.getElementById("fleet").textContent = ov.fleet;
  const counts = Object.entries(ov.devices.by_state).map(([s, n]) => `${badge(s)} ${n}`).join(" ");
  const html = `<section id="rollouts"><h2>Rollouts <span class="muted small">${ov.rollout_count} recorded · devices ${counts}</span></h2>
      ${ov.rollouts.map(rolloutCard).join("") || `<div class="muted">no rollout yet: edgepack rollout start RELEASE</div>`}</section>
    ${deviceTable(devs, params)}${releasesTable(rels)}`;
  const open = [...document.querySelectorAll("details[open]")].map(d => d.parentElement.dataset.rollout);
  const focus = document.activeElement && document.activeElement.id;
  document.getElementById("main").innerHTML = html;
  for (const id of open) { const d = document.querySelector(`.rollout[data-rollout="${CSS.escape(id || "")}"] details`); if (d) d.open = true; }
  for (const id of ["f-profile", "f-state", "f-q"]) {
    const el = document.getElementById(id);
    el.addEventListener(id === "f-q" ? "change" : "input", filterChanged);
    if (id === focus) el.focus();
  }
}

function filterChanged() {
  const p = new URLSearchParams();
  for (const [id, k] of [["f-profile", "profile"], ["f-state", "state"], ["f-q", "q"]]) {
    const v = document.getElementById(id).value; if (v) p.set(k, v);
  }
  location.hash = p.toString();
}

async function renderDevice(id) {
  const d = await get("/api/devices/" + encodeURIComponent(id));
  const row = d.row || {}, rec = d.record || {};
  document.getElementById("fleet").textContent = rec.fleet || "";
  const kv = [["state", badge(row.state || "unknown")], ["profile", esc(row.profile)], ["bundle", esc(row.bundle)],
    ["digest", `<code class="small">${esc(row.digest)}</code>`], ["agent", esc(rec.agent_version)], ["arch / CPU", esc(rec.arch) + " · " + esc(rec.cpu_model)],
    ["decode tok/s", num(row.decode_tok_s)], ["TTFT ms", num(row.ttft_ms, 0)], ["RSS MB", mb(row.rss_bytes)],
    ["temperature °C", num(row.temperature_c)], ["health age", age(row.health_age_s)],
    ["last gate", row.last_gate ? badge(row.last_gate.ok ? "ok" : "bad") + " " + esc((row.last_gate.failures || []).join("; ")) : "—"],
    ["installed bundles", (rec.bundles || []).map(b => esc(`${b.role || "-"}: ${b.model} v${b.version} ${b.quant}`)).join("<br>")]];
  const hist = d.history.map(h => { const t = h.target, b = t.before || {}, a = t.after || {};
    return `<tr data-history-rollout="${esc(h.rollout)}"><td>${esc(h.rollout)} ${badge(h.status)}</td><td>${esc(h.release)}</td><td>${t.wave ?? "—"}</td><td>${badge(t.state)}</td>
      <td>${esc(t.reason)}</td><td class="num">${num(b.decode_tok_s)} → ${num(a.decode_tok_s)}</td><td class="num">${num(b.agreement, 3)} → ${num(a.agreement, 3)}</td>
      <td class="small">${h.notes.map(n => `<div>${when(n.ts)} ${esc(n.text)}</div>`).join("")}</td></tr>`; }).join("");
  document.getElementById("main").innerHTML = `<section><p><a href="#">← the fleet</a></p><h2 id="device-id">${esc(d.device)}</h2>
    <div class="kv">${kv.map(([k, v]) => `<div>${k}</div><div>${v}</div>`).join("")}</div></section>
    <section id="device-history"><h2>History</h2><table><thead><tr><th>rollout</th><th>release</th><th>wave</th><th>state</th><th>reason</th><th>decode tok/s</th><th>agreement</th><th>notes</th></tr></thead>
    <tbody>${hist || `<tr><td colspan="8" class="muted">in no rollout</td></tr>`}</tbody></table></section>`;
}

let timer = null;
async function tick() {
  clearTimeout(timer);
  const live = document.getElementById("live");
  try {
    const r = route();
    await (r.device !== undefined ? renderDevice(r.device) : renderFleet(r.params));
    live.textContent = "live · updated " + new Date().toLocaleTimeString();
    live.className = "live";
  } catch (e) {
    live.textContent = "not updating: " + e.message;
    live.className = "live err";
  } finally {
    document.body.dataset.refreshes = String(++refreshes);
    timer = setTimeout(tick, POLL_MS);
  }
}
window.addEventListener("hashchange", () => {
  tick();
  const id = location.hash.slice(1);
  if (["devices", "releases", "rollouts"].includes(id)) document.getElementById(id)?.scrollIntoView();
});
tick();
</script></body></html>
"""
