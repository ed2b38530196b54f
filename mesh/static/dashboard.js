// storemesh fleet dashboard: polls /v1/fleet/* and draws with inline SVG. No dependencies.
"use strict";

const POLL_MS = 1500;          // refresh period
const SKU_LIST_EVERY = 6;      // refresh the SKU list every 6th poll (~9 s)
const SVG = "http://www.w3.org/2000/svg";
const state = { sku: new URLSearchParams(location.search).get("sku"), polls: 0, skus: [],
                offset: 0 };  // server clock - browser clock (ms), from /v1/fleet/health

function serverNow() {
  return Date.now() + state.offset;
}

// --- helpers ---------------------------------------------------------------------------

async function getJSON(path) {
  const resp = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (resp.status === 401) {  // no HQ session (expired, logged out, cloud restarted)
    location.assign("/login");
    throw Object.assign(new Error("not logged in"), { status: 401 });
  }
  const body = await resp.json();
  if (!resp.ok) {
    const err = new Error((body.error && body.error.message) || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function replaceRows(table, rows, empty, cols) {
  const tbody = table.tBodies[0];
  tbody.replaceChildren(...(rows.length ? rows :
    [el("tr", {}, el("td", { colspan: cols, class: "muted" }, empty))]));
}

function ago(ms, now) {
  if (ms === null || ms === undefined) return "never";
  return duration(Math.max(0, now - ms)) + " ago";
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return ms + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
  if (ms < 3600000) return Math.round(ms / 60000) + " min";
  if (ms < 86400000) return (ms / 3600000).toFixed(1) + " h";
  return (ms / 86400000).toFixed(1) + " d";
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  if (n < 1073741824) return (n / 1048576).toFixed(1) + " MiB";
  return (n / 1073741824).toFixed(2) + " GiB";
}

function lagClass(ms) {
  if (ms === null || ms === undefined) return "muted";
  return ms > 600000 ? "bad" : ms > 60000 ? "warn" : "ok";
}

// An idle store whose live peers report nothing we lack is current, however old its
// newest envelope; otherwise the age of the newest envelope is how stale our view may be.
function freshness(x) {
  if (x.backlog === 0) return "ok";
  return lagClass(x.lag_ms);
}

function clock(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// --- charts ----------------------------------------------------------------------------

// Horizontal bars, one group per label; series: [{key, cls, title}].
function barChart(target, items, series, fmt) {
  const rowH = 18 * series.length + 10, labelW = 120, width = 520, valueW = 80;
  const height = Math.max(rowH * items.length, 24);
  const max = Math.max(1, ...items.flatMap(it => series.map(s => Math.abs(it[s.key] || 0))));
  const barW = width - labelW - valueW;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%",
                            role: "img", class: "bars" });
  if (!items.length) root.append(svg("text", { x: 4, y: 16, class: "muted" }, "no data"));
  items.forEach((it, i) => {
    const y0 = i * rowH + 4;
    root.append(svg("text", { x: 0, y: y0 + rowH / 2, class: "label" }, it.label));
    series.forEach((s, j) => {
      const v = it[s.key] || 0;
      const w = Math.max(v > 0 ? 1 : 0, Math.round(barW * Math.max(0, v) / max));
      const y = y0 + j * 18;
      const rect = svg("rect", { x: labelW, y, width: w, height: 14, rx: 2,
                                 class: s.cls + (v < 0 ? " neg" : "") });
      rect.append(svg("title", {}, `${it.label} ${s.title}: ${fmt(v)}`));
      root.append(rect);
      root.append(svg("text", { x: labelW + w + 4, y: y + 11,
                                class: "value" + (v < 0 ? " bad" : "") }, fmt(v)));
    });
  });
  target.replaceChildren(root);
}

// Columns per hour.
function columnChart(target, hourly) {
  const width = 520, height = 150, left = 34, bottom = 20, top = 8;
  const max = Math.max(1, ...hourly.map(h => h.units));
  const colW = (width - left) / Math.max(1, hourly.length);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%",
                            role: "img", class: "columns" });
  const plotH = height - bottom - top;
  root.append(svg("line", { x1: left, y1: top + plotH, x2: width, y2: top + plotH,
                            class: "axis" }));
  root.append(svg("text", { x: left - 4, y: top + 8, class: "tick end" }, max));
  root.append(svg("text", { x: left - 4, y: top + plotH, class: "tick end" }, 0));
  hourly.forEach((h, i) => {
    const hgt = Math.round(plotH * h.units / max);
    const x = left + i * colW + 1;
    const rect = svg("rect", { x, y: top + plotH - hgt, width: Math.max(1, colW - 2),
                               height: hgt, class: "sales" });
    const at = new Date(h.hour_ms);
    rect.append(svg("title", {}, `${at.getHours()}:00 — ${h.sales} sales, ${h.units} units`));
    root.append(rect);
    const last = i === hourly.length - 1;
    if (i % 6 === 0 || last) {
      root.append(svg("text", { x: last ? width : x + colW / 2, y: height - 5,
                                class: "tick " + (last ? "end" : "mid") },
                      `${String(at.getHours()).padStart(2, "0")}:00`));
    }
  });
  target.replaceChildren(root);
}

// --- panels ----------------------------------------------------------------------------

function renderHealth(h) {
  const now = h.now_ms;
  state.offset = h.now_ms - Date.now();
  const online = h.stores.filter(s => s.status === "online").length;
  document.getElementById("card-online").textContent = `${online} / ${h.stores.length}`;
  document.getElementById("card-behind").textContent =
    h.stores.reduce((a, s) => a + s.analytics_behind, 0);
  const rows = h.stores.map(s => {
    const rejected = Object.entries(s.rejected).map(([k, v]) => `${k}: ${v}`).join(", ");
    return el("tr", { "data-store": s.store },
      el("td", {}, s.store),
      el("td", { class: s.status === "online" ? "ok" : "bad", "data-col": "status" }, s.status),
      el("td", { class: "num" }, s.peers_up),
      el("td", { class: "num " + (s.backlog ? "warn" : "muted"), "data-col": "backlog" },
         s.backlog === null ? "–" : s.backlog),
      el("td", { class: "num " + freshness(s), "data-col": "lag" }, duration(s.lag_ms)),
      el("td", {}, ago(s.last_seen_ms, now)),
      el("td", { class: "num", "data-col": "envelopes" }, s.envelopes),
      el("td", { class: "num" + (s.exceptions ? " warn" : "") }, s.exceptions),
      el("td", { class: rejected ? "warn small" : "muted small" }, rejected || "none"),
      el("td", { class: "num" }, bytes(s.wan_bytes.in)),
      el("td", { class: "num" }, bytes(s.wan_bytes.out)));
  });
  replaceRows(document.getElementById("stores"), rows, "no stores", 11);
  const nodes = h.stores.flatMap(s => s.nodes.map(n => el("tr", {},
    el("td", {}, s.store), el("td", {}, n.node_id), el("td", {}, n.role || "?"),
    el("td", { class: n.session === "up" ? "ok" : n.session ? "bad" : "muted" },
       n.session || "via store"),
    el("td", { class: "num" }, n.held_seq), el("td", { class: "num" }, n.aggregated_seq),
    el("td", { class: "num " + (n.backlog ? "warn" : "muted") }, n.backlog === null ? "–" : n.backlog),
    el("td", { class: "num " + freshness(n) }, duration(n.lag_ms)),
    el("td", {}, ago(n.last_seen_ms, now)))));
  replaceRows(document.getElementById("nodes"), nodes, "no nodes", 9);
  barChart(document.getElementById("wan-chart"),
    h.stores.map(s => ({ label: s.store, in: s.wan_bytes.in, out: s.wan_bytes.out })),
    [{ key: "in", cls: "in", title: "store → cloud" },
     { key: "out", cls: "out", title: "cloud → store" }], bytes);
}

function renderStock(entry) {
  const stores = entry ? entry.stores : [];
  barChart(document.getElementById("stock-chart"),
    stores.map(s => ({ label: s.store, on_hand: s.on_hand, available: s.available })),
    [{ key: "on_hand", cls: "onhand", title: "on hand" },
     { key: "available", cls: "avail", title: "available" }], v => String(v));
  const now = serverNow();
  const rows = stores.map(s => el("tr", { "data-store": s.store },
    el("td", {}, s.store),
    el("td", { class: "num", "data-col": "on_hand" }, s.on_hand),
    el("td", { class: "num", "data-col": "reserved" }, s.reserved),
    el("td", { class: "num" + (s.available < 0 ? " bad" : ""), "data-col": "available" },
       s.available),
    el("td", {}, ago(s.last_change_ms, now))));
  replaceRows(document.getElementById("stock-table"), rows,
    state.sku ? "no store has this SKU" : "no stock yet", 5);
}

function renderSales(s) {
  columnChart(document.getElementById("sales-chart"), s.hourly);
  document.getElementById("sales-sku").textContent = s.sku ? `(${s.sku})` : "(all SKUs)";
  const rows = s.by_store.map(r => el("tr", { "data-store": r.store },
    el("td", {}, r.store), el("td", { class: "num", "data-col": "sales" }, r.sales),
    el("td", { class: "num", "data-col": "units" }, r.units)));
  replaceRows(document.getElementById("sales-by-store"), rows, "no sales", 3);
  document.getElementById("sales-count").textContent = s.totals.sales;
  document.getElementById("sales-units").textContent = s.totals.units;
}

function renderFleetSales(s) {
  document.getElementById("card-sales").textContent = s.totals.sales;
  document.getElementById("card-units").textContent = s.totals.units;
}

function renderExceptions(x) {
  document.getElementById("card-exceptions").textContent = x.totals.count;
  const rows = x.exceptions.map(e => el("tr", { "data-store": e.store },
    el("td", {}, clock(e.at_ms)), el("td", {}, e.store), el("td", { "data-col": "sku" }, e.sku),
    el("td", {}, e.origin), el("td", {}, e.kind),
    el("td", { class: "num bad", "data-col": "short" }, e.short)));
  replaceRows(document.getElementById("exceptions"), rows, "none — no oversells", 6);
}

function renderSkuList(skus) {
  const select = document.getElementById("sku");
  if (!state.sku && skus.length) state.sku = skus[0];
  const all = state.sku && !skus.includes(state.sku) ? [state.sku, ...skus] : skus;
  if (all.join("\n") === state.skus.join("\n")) return;
  state.skus = all;
  select.replaceChildren(...all.map(s => el("option", { value: s }, s)));
  if (state.sku) select.value = state.sku;
}

function renderSensors(f) {
  const now = serverNow();
  const rows = f.stores.map(r => el("tr", { "data-store": r.store },
    el("td", {}, r.store),
    el("td", { class: "num" + (r.review_open ? " bad" : ""), "data-col": "review_open" },
      r.review_open),
    el("td", {}, r.review_oldest_age_ms === null ? "–" : duration(r.review_oldest_age_ms)),
    el("td", { class: "num", "data-col": "auto_share" },
      r.auto_share === null ? "–" : Math.round(r.auto_share * 100) + " %"),
    el("td", { class: r.alerts.length ? "bad" : "", "data-col": "alerts" },
      r.alerts.length ? r.alerts.map(a => `${a.device} ${a.rule} (${ago(a.at_ms, now)})`)
        .join(", ") : "none"),
    el("td", { "data-col": "replenish" },
      r.replenish.map(i => i.sku).join(", ") || "none")));
  replaceRows(document.getElementById("sensors"), rows, "no stores", 6);
}

// --- the poll loop -----------------------------------------------------------------------

async function refresh() {
  const q = state.sku ? `&sku=${encodeURIComponent(state.sku)}` : "";
  const jobs = [
    getJSON("/v1/fleet/health").then(renderHealth),
    getJSON("/v1/fleet/exceptions?limit=20").then(renderExceptions),
    getJSON("/v1/fleet/sales?hours=24").then(renderFleetSales),
    getJSON("/v1/fleet/sensors").then(renderSensors),
  ];
  if (state.polls % SKU_LIST_EVERY === 0 || !state.sku) {
    jobs.push(getJSON("/v1/fleet/stock?limit=1000").then(b => renderSkuList(b.stock.map(e => e.sku))));
  }
  if (state.sku) {
    jobs.push(getJSON(`/v1/fleet/stock?limit=1${q}`).then(b => renderStock(b.stock[0]))
      .catch(e => { if (e.status === 404) renderStock(null); else throw e; }));
    jobs.push(getJSON(`/v1/fleet/sales?hours=24${q}`).then(renderSales));
  }
  const results = await Promise.allSettled(jobs);
  const failed = results.filter(r => r.status === "rejected");
  const conn = document.getElementById("conn");
  conn.textContent = failed.length ? `error: ${failed[0].reason.message}` : "live";
  conn.className = "pill " + (failed.length ? "bad" : "ok");
  document.getElementById("updated").textContent = "updated " + clock(serverNow());
  state.polls += 1;
  document.body.dataset.refreshes = String(state.polls);
}

async function loop() {
  try {
    await refresh();
  } catch (e) {
    console.error(e);
  }
  setTimeout(loop, POLL_MS);
}

async function account() {
  // who is logged in, and the session's CSRF token for logging out (mesh.hq)
  const me = await getJSON("/v1/hq/session");
  document.getElementById("account-name").textContent = `${me.user} (${me.role})`;
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/v1/hq/logout", { method: "POST", credentials: "same-origin",
                                   headers: { "X-CSRF-Token": me.csrf } });
    location.assign("/login");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  account().catch(e => console.error(e));
  document.getElementById("sku").addEventListener("change", ev => {
    state.sku = ev.target.value;
    const url = new URL(location.href);
    url.searchParams.set("sku", state.sku);
    history.replaceState(null, "", url);
    refresh();
  });
  loop();
});
