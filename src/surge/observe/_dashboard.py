"""The dashboard page served at ``/_surge/``: one self-contained document.

No CDN, no build step: inline CSS, inline JavaScript and SVG charts, so it
works on a machine without internet. It polls ``/_surge/stats`` each
second, keeps the last five minutes of rates and p99 in the browser, and
lists the dead letters of every subscription that has some, with buttons
that POST to ``/_surge/dlq/replay`` and ``/_surge/dlq/purge``.
"""

from __future__ import annotations

__all__ = ("PAGE",)

_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>surge dashboard</title>
<style>
:root { --fg:#1d2330; --muted:#6b7385; --line:#e2e6ee; --bg:#f7f8fb; --bad:#c62828;
        --ok:#2e7d32; --accent:#3559c7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
header { padding:12px 20px; background:#fff; border-bottom:1px solid var(--line);
         display:flex; gap:16px; align-items:baseline; flex-wrap:wrap; }
header h1 { font-size:18px; margin:0; }
#status { color:var(--muted); }
#status.down { color:var(--bad); font-weight:600; }
main { padding:16px 20px; }
table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--line); }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:right;
         white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
th { font-weight:600; color:var(--muted); font-size:12px; text-transform:uppercase; }
tr.slow td:first-child::after { content:" slowest"; color:#b26a00; font-size:11px; }
td.bad { color:var(--bad); font-weight:600; }
.cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(340px, 1fr));
         gap:12px; margin-top:16px; }
.card { background:#fff; border:1px solid var(--line); border-radius:6px; padding:10px 12px; }
.card h3 { margin:0 0 6px; font-size:13px; }
.chart { display:block; width:100%; height:70px; }
.legend { font-size:12px; color:var(--muted); display:flex; justify-content:space-between; }
section.dlq { margin-top:20px; }
.dlq h2 { font-size:15px; }
.dlq .group { background:#fff; border:1px solid var(--line); border-radius:6px;
              margin-bottom:12px; padding:8px 12px; }
.dlq ul { list-style:none; margin:0; padding:0; }
.dlq li { border-top:1px solid var(--line); padding:6px 0; display:flex; gap:10px;
          align-items:flex-start; }
.dlq li .what { flex:1; min-width:0; }
.dlq .err { color:var(--bad); font-family:ui-monospace, monospace; font-size:12px;
            word-break:break-word; }
.dlq .meta { color:var(--muted); font-size:12px; }
.dlq details pre { max-height:200px; overflow:auto; font-size:11px; background:var(--bg);
                   padding:6px; }
button { font:inherit; font-size:12px; padding:3px 10px; border-radius:4px; cursor:pointer;
         border:1px solid var(--line); background:#fff; }
button.replay { border-color:var(--accent); color:var(--accent); }
button.purge { border-color:var(--bad); color:var(--bad); }
#message { margin-left:auto; color:var(--muted); }
#message.error { color:var(--bad); }
label.token { font-size:12px; color:var(--muted); }
label.token input { width:140px; font-size:12px; }
.empty { color:var(--muted); }
</style>
</head>
<body>
<header>
  <h1>surge <span id="app">-</span></h1>
  <span id="status">connecting...</span>
  <span id="message"></span>
  <label class="token">admin token <input id="token" type="password" autocomplete="off"></label>
</header>
<main>
  <table id="subs">
    <thead><tr>
      <th>subscription</th><th>rate/s</th><th>errors/s</th><th>in flight</th><th>backlog</th>
      <th>p50</th><th>p99</th><th>latency p99</th><th>handled</th><th>failed</th>
      <th>retried</th><th>dead letters</th>
    </tr></thead>
    <tbody></tbody>
  </table>
  <div class="cards" id="charts"></div>
  <section class="dlq">
    <h2>Dead letters</h2>
    <div id="dlq"><p class="empty">none</p></div>
  </section>
</main>
<script>
"use strict";
const base = location.pathname.replace(/\/(index\.html)?$/, "");
const root = base.endsWith("/_surge") ? base : "/_surge";
const KEEP = 300;               // seconds of history in the charts
const history = {};             // subscription -> [{t, rate, p99}]
const dlqSeen = {};             // subscription -> dead letter count last listed
let busy = false;
const $ = (sel) => document.querySelector(sel);
const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("surge-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("surge-token", tokenInput.value));

function ms(v) {
  if (v === null || v === undefined) return "-";
  return v < 1 ? (v * 1000).toFixed(1) + " ms" : v.toFixed(2) + " s";
}
function n(v) { return v === null || v === undefined ? "-" : v.toLocaleString("en"); }
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function say(text, error) {
  const m = $("#message");
  m.textContent = text;
  m.className = error ? "error" : "";
}

function row(name, s) {
  const cells = [
    ["rate", s.rate.toFixed(1)], ["error_rate", s.error_rate.toFixed(1)],
    ["in_flight", n(s.in_flight)], ["backlog", n(s.backlog)], ["p50", ms(s.p50)],
    ["p99", ms(s.p99)], ["latency_p99", ms(s.latency_p99)], ["succeeded", n(s.succeeded)],
    ["failed", n(s.failed)], ["retried", n(s.retried)], ["dead_letters", n(s.dead_letters)],
  ];
  let tr = document.querySelector(`tr[data-sub="${CSS.escape(name)}"]`);
  if (!tr) {
    tr = el("tr", {"data-sub": name}, el("td", {}, name));
    for (const [field] of cells) tr.append(el("td", {"data-field": field}));
    $("#subs tbody").append(tr);
  }
  for (const [field, text] of cells) {
    const td = tr.querySelector(`td[data-field="${field}"]`);
    td.textContent = text;
    td.classList.toggle("bad", (field === "error_rate" && s.error_rate > 0) ||
                               (field === "dead_letters" && s.dead_letters > 0));
  }
  return tr;
}

function path(points, key, w, h, max) {
  if (!points.length) return "";
  const t1 = points[points.length - 1].t, t0 = t1 - KEEP;
  return points.map((p, i) => {
    const x = ((p.t - t0) / KEEP) * w;
    const y = h - 2 - ((p[key] || 0) / max) * (h - 6);
    return (i ? "L" : "M") + x.toFixed(1) + "," + y.toFixed(1);
  }).join(" ");
}

function chart(name) {
  const id = "chart-" + name;
  let card = document.getElementById(id);
  if (!card) {
    card = el("div", {"class": "card", id});
    card.innerHTML = `<h3></h3>
      <svg class="chart" viewBox="0 0 300 70" preserveAspectRatio="none">
        <path class="rate" fill="none" stroke="#3559c7" stroke-width="1.5"/>
        <path class="p99" fill="none" stroke="#c77b35" stroke-width="1.5"
              stroke-dasharray="3 2"/></svg>
      <div class="legend"><span class="l-rate"></span><span class="l-p99"></span></div>`;
    card.querySelector("h3").textContent = name;
    $("#charts").append(card);
  }
  const pts = history[name];
  const maxRate = Math.max(1, ...pts.map((p) => p.rate));
  const maxP99 = Math.max(0.001, ...pts.map((p) => p.p99 || 0));
  card.querySelector("path.rate").setAttribute("d", path(pts, "rate", 300, 70, maxRate));
  card.querySelector("path.p99").setAttribute("d", path(pts, "p99", 300, 70, maxP99));
  card.querySelector(".l-rate").textContent = "rate (max " + maxRate.toFixed(1) + "/s)";
  card.querySelector(".l-p99").textContent = "p99 (max " + ms(maxP99) + "), last 5 min";
}

function authorized(headers) {
  if (tokenInput.value) headers["authorization"] = "Bearer " + tokenInput.value;
  return headers;
}

async function act(verb, sub, ids) {
  const headers = authorized({"content-type": "application/json"});
  const body = JSON.stringify(ids ? {subscription: sub, ids} : {subscription: sub});
  try {
    const r = await fetch(`${root}/dlq/${verb}`, {method: "POST", headers, body});
    const j = await r.json();
    if (!r.ok) { say(`${verb} refused: ${j.error}`, true); return; }
    say(`${verb}: ${j.count} dead letter${j.count === 1 ? "" : "s"} of ${sub}`);
    dlqSeen[sub] = -1;
    await tick();
  } catch (e) { say(`${verb} failed: ${e}`, true); }
}

async function listDead(name, count) {
  let group = document.querySelector(`.group[data-sub="${CSS.escape(name)}"]`);
  if (!count) { if (group) group.remove(); delete dlqSeen[name]; return; }
  if (dlqSeen[name] === count && group) return;
  const r = await fetch(`${root}/dlq?subscription=${encodeURIComponent(name)}`,
                        {headers: authorized({})});
  if (!r.ok) return;
  const letters = (await r.json()).dead_letters;
  dlqSeen[name] = count;
  const fresh = el("div", {"class": "group", "data-sub": name});
  const all = el("button", {"class": "replay replay-all"}, "replay all");
  all.onclick = () => act("replay", name, null);
  const purgeAll = el("button", {"class": "purge purge-all"}, "purge all");
  purgeAll.onclick = () => {
    if (confirm(`Purge every dead letter of ${name}?`)) act("purge", name, null);
  };
  fresh.append(el("h3", {}, `${name}: ${letters.length} `, all, " ", purgeAll));
  const ul = el("ul");
  for (const d of letters) {
    const replay = el("button", {"class": "replay"}, "replay");
    replay.onclick = () => act("replay", name, [d.id]);
    const purge = el("button", {"class": "purge"}, "purge");
    purge.onclick = () => act("purge", name, [d.id]);
    const when = new Date(d.failed_at * 1000).toISOString().replace("T", " ").slice(0, 19);
    const details = el("details", {}, el("summary", {}, "event and traceback"),
                       el("pre", {}, d.body + "\n\n" + d.traceback));
    ul.append(el("li", {"data-id": d.id},
      el("div", {"class": "what"},
        el("div", {"class": "err"}, `${d.error_type}: ${d.error}`),
        el("div", {"class": "meta"},
           `${d.topic} ${d.id} - ${d.attempts} attempts - failed ${when} UTC`),
        details),
      replay, purge));
  }
  fresh.append(ul);
  if (group) group.replaceWith(fresh); else $("#dlq").append(fresh);
}

async function tick() {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch(`${root}/stats`, {cache: "no-store", headers: authorized({})});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const s = await r.json();
    $("#app").textContent = s.app + (s.processes > 1 ? ` (${s.processes} workers)` : "");
    const st = $("#status");
    st.textContent = "live, " + new Date().toLocaleTimeString();
    st.className = "";
    const now = Date.now() / 1000;
    let slowest = null, slowP99 = 0;
    for (const [name, sub] of Object.entries(s.subscriptions)) {
      row(name, sub);
      const h = history[name] || (history[name] = []);
      h.push({t: now, rate: sub.rate, p99: sub.p99});
      while (h.length && h[0].t < now - KEEP) h.shift();
      chart(name);
      if ((sub.p99 || 0) > slowP99) { slowP99 = sub.p99; slowest = name; }
      await listDead(name, sub.dead_letters || 0);
    }
    for (const tr of document.querySelectorAll("#subs tbody tr")) {
      tr.classList.toggle("slow", tr.dataset.sub === slowest &&
                                  Object.keys(s.subscriptions).length > 1);
    }
    if (!document.querySelector("#dlq .group")) {
      if (!document.querySelector("#dlq .empty"))
        $("#dlq").append(el("p", {"class": "empty"}, "none"));
    } else {
      const e = document.querySelector("#dlq .empty");
      if (e) e.remove();
    }
  } catch (e) {
    const st = $("#status");
    st.textContent = "disconnected: " + e.message;
    st.className = "down";
  } finally {
    busy = false;
  }
}
tick();
setInterval(tick, 1000);
</script>
</body>
</html>
"""

PAGE = _HTML.encode()
