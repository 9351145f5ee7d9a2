"use strict";
// The fleet console: one EventSource (/console/stream) feeds maps of robots, events,
// alerts and gateways; the page re-renders at most every RENDER_MS, whatever the update
// rate. Every value from the server is put in the page with textContent, never as HTML.
// The robot page (chart, events, commands) is robot.js.

const RENDER_MS = 150;
const STALE_S = 60;     // older than this: "stale"
const LOST_S = 600;     // older than this: "lost"
const TRACK = 40;       // positions kept per robot for the floor view
const TAGS_UP_TO = 30;  // a map with more robots than this draws no name tags
const EVENTS_SHOWN = 100;
const SILENCE_MINUTES = 60;
const COMMAND_TIMEOUT_S = 10;
// The gateway's built-in commands an operator may send from the console (edge_agent).
const GATEWAY_COMMANDS = ["ping", "get_status", "get_robots", "flush_outbox", "requeue_rejected"];
const SVG = "http://www.w3.org/2000/svg";

// Counters a test or benchmark reads (frames received, objects, time spent rendering).
// ``hellos`` counts stream (re)connections: more than one means the stream broke.
window.consoleStats = {hellos: 0, frames: 0, objects: 0, renders: 0, renderMs: 0, floorMs: 0};

const st = {
  me: null,
  robots: new Map(),
  alerts: new Map(),
  events: new Map(),     // "sn/event_id" -> event
  gateways: new Map(),   // "org/gateway" -> presence and heartbeat
  runs: new Map(),       // "org/gateway" -> its latest poll run (GET /ingestion-runs)
  gatewayCmd: new Map(), // "org/gateway" -> its command cell, kept across renders
  tracks: new Map(),
  rowEls: new Map(),   // sn -> its table row
  changed: new Set(),  // sns whose row must be rebuilt
  floorDirty: false,
  eventsDirty: false,
  alertsDirty: false,
  gatewaysDirty: false,
  sort: {key: "robot_sn", dir: 1},
  timer: null,
};

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function ageSeconds(iso) {
  const t = iso ? Date.parse(iso) : NaN;
  return Number.isNaN(t) ? Infinity : Math.max(0, (Date.now() - t) / 1000);
}

function fmtAge(s) {
  if (!Number.isFinite(s)) return "never";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function schedule() {
  if (st.timer === null) st.timer = setTimeout(() => { st.timer = null; render(); }, RENDER_MS);
}

// -- incoming --------------------------------------------------------------------------
function onRobots(items) {
  for (const r of items) {
    const old = st.robots.get(r.robot_sn);
    if (old && old.last_updated && r.last_updated && r.last_updated < old.last_updated) continue;
    st.robots.set(r.robot_sn, r);
    st.changed.add(r.robot_sn);
    st.floorDirty = true;
    if (typeof r.x === "number" && typeof r.y === "number") {
      const t = st.tracks.get(r.robot_sn) || [];
      const last = t[t.length - 1];
      if (!last || last[0] !== r.x || last[1] !== r.y) t.push([r.x, r.y]);
      if (t.length > TRACK) t.shift();
      st.tracks.set(r.robot_sn, t);
    }
  }
  schedule();
}

function onAlerts(items) {
  for (const a of items) st.alerts.set(a.id, a);
  st.alertsDirty = true;
  schedule();
}

// Recent positions from the server's history: the tracks survive a reload.
function onTracks(bySn) {
  for (const [sn, points] of Object.entries(bySn)) {
    const live = st.tracks.get(sn) || [];
    const t = points.concat(live.filter((p) => {
      const last = points[points.length - 1];
      return !last || last[0] !== p[0] || last[1] !== p[1];
    }));
    st.tracks.set(sn, t.slice(-TRACK));
  }
  st.floorDirty = true;
  schedule();
}

function onEvents(items) {
  for (const e of items) st.events.set(`${e.robot_sn}/${e.event_id}`, e);
  const newest = [...st.events.entries()].sort((a, b) => eventOrder(a[1], b[1]));
  for (const [k] of newest.slice(EVENTS_SHOWN)) st.events.delete(k);
  st.eventsDirty = true;
  if (window.robotPage) window.robotPage.onEvents(items);
  schedule();
}

function onGateways(items) {
  for (const g of items) st.gateways.set(`${g.org_id}/${g.gateway_id}`, g);
  st.gatewaysDirty = true;
  schedule();
}

function eventOrder(a, b) {  // newest received first
  const x = a.upload_time || "", y = b.upload_time || "";
  return x < y ? 1 : x > y ? -1 : 0;
}

// -- fleet table -----------------------------------------------------------------------
function sortValue(r, key) {
  if (key === "age") return ageSeconds(r.last_updated);
  const v = r[key];
  return v === null || v === undefined ? "" : v;
}

function visibleRobots() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  const status = document.getElementById("filter-status").value;
  const org = document.getElementById("filter-org").value;
  const {key, dir} = st.sort;
  return [...st.robots.values()].filter((r) =>
    (!status || (r.status || "unknown") === status) && (!org || r.org_id === org) &&
    (!q || [r.robot_sn, r.org_id, r.gateway_id, r.status, r.map_name, r.charge_state]
      .some((v) => v && String(v).toLowerCase().includes(q)))
  ).sort((a, b) => {
    const x = sortValue(a, key), y = sortValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || (a.robot_sn < b.robot_sn ? -1 : 1);
  });
}

function batteryCell(level) {
  const td = el("td", {class: "battery"});
  if (typeof level !== "number") { td.textContent = "–"; return td; }
  const bar = el("div", {class: "bar", title: `${level} %`});
  const fill = el("div", {class: "fill" + (level < 20 ? " low" : level < 50 ? " mid" : "")});
  fill.style.width = `${Math.max(0, Math.min(100, level))}%`;
  bar.append(fill);
  td.append(bar, el("span", {class: "pct"}, `${level} %`));
  return td;
}

function staleClass(age) {
  return age > LOST_S ? "lost" : age > STALE_S ? "stale" : "fresh";
}

function buildRow(r, age) {
  const tr = el("tr", {"data-sn": r.robot_sn, class: staleClass(age)});
  const pos = typeof r.x === "number" && typeof r.y === "number"
    ? `${r.x.toFixed(1)}, ${r.y.toFixed(1)}` + (typeof r.yaw === "number" ? ` ∠${Math.round(r.yaw)}°` : "")
    : "";
  const sn = el("td", {class: "sn"});
  sn.append(el("a", {href: `#robot/${encodeURIComponent(r.robot_sn)}`}, r.robot_sn));
  tr.append(
    sn, el("td", {class: "org"}, r.org_id),
    el("td", {class: "gateway"}, r.gateway_id),
    el("td", {class: `status s-${String(r.status || "unknown").toLowerCase()}`}, r.status || "unknown"),
    batteryCell(r.battery_level),
    el("td", {class: "charge"}, r.charge_state || (r.is_charging ? "charging" : "")),
    el("td", {class: "map"}, r.map_name || ""), el("td", {class: "pos"}, pos),
    el("td", {class: "last-seen", title: r.last_updated || ""}, fmtTime(r.last_updated)),
    el("td", {class: "age"}, fmtAge(age)));
  return tr;
}

// Rows are kept by sn and rebuilt only when their robot changed; the rest only age.
function renderFleet() {
  const rows = visibleRobots();
  const body = document.querySelector("#robots tbody");
  for (const sn of st.changed) st.rowEls.delete(sn);  // shown or not: rebuilt when needed
  st.changed.clear();
  const trs = [];
  for (const r of rows) {
    const age = ageSeconds(r.last_updated);
    let tr = st.rowEls.get(r.robot_sn);
    if (!tr) {
      tr = buildRow(r, age);
      st.rowEls.set(r.robot_sn, tr);
    } else {
      const cls = staleClass(age), text = fmtAge(age), cell = tr.lastChild;
      if (tr.className !== cls) tr.className = cls;
      if (cell.textContent !== text) cell.textContent = text;
    }
    trs.push(tr);
  }
  const same = trs.length === body.children.length && trs.every((tr, i) => body.children[i] === tr);
  if (!same) body.replaceChildren(...trs);
  document.getElementById("total").textContent =
    `(${rows.length} shown of ${st.robots.size})`;
  // counts by status over the whole fleet, and the status and org filter choices
  const counts = new Map();
  const orgs = new Set();
  for (const r of st.robots.values()) {
    const s = r.status || "unknown";
    counts.set(s, (counts.get(s) || 0) + 1);
    if (r.org_id) orgs.add(r.org_id);
  }
  const ul = document.getElementById("counts");
  ul.replaceChildren(...[...counts].sort().map(([s, n]) =>
    el("li", {"data-status": s, class: `s-${s.toLowerCase()}`}, `${s}: ${n}`)));
  syncOptions("filter-status", [...counts.keys()].sort());
  syncOptions("filter-org", [...orgs].sort());
}

function syncOptions(id, values) {
  const sel = document.getElementById(id);
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (have.join("\u0000") === values.join("\u0000")) return;
  const keep = sel.value;
  sel.replaceChildren(sel.options[0], ...values.map((v) => el("option", {value: v}, v)));
  sel.value = values.includes(keep) ? keep : "";
}

// -- alerts ----------------------------------------------------------------------------
function renderAlerts() {
  const live = [...st.alerts.values()].filter((a) => a.state !== "resolved")
    .sort((a, b) => (a.opened_at < b.opened_at ? 1 : -1));
  const body = document.querySelector("#alerts tbody");
  const frag = document.createDocumentFragment();
  for (const a of live) {
    const tr = el("tr", {"data-alert-id": a.id, class: `sev-${a.severity} st-${a.state}`});
    tr.append(el("td", {class: "severity"}, a.severity), el("td", {class: "rule"}, a.rule),
      el("td", {class: "subject"}, `${a.subject_type} ${a.subject_id}`),
      el("td", {class: "org"}, a.org), el("td", {class: "state"}, a.state),
      el("td", {class: "opened"}, fmtTime(a.opened_at)),
      el("td", {class: "acked-by"}, a.acknowledged_by || ""));
    const silenced = a.silenced_until && Date.parse(a.silenced_until) > Date.now();
    if (silenced) {
      tr.querySelector("td.state").append(
        el("span", {class: "silenced"}, ` silenced until ${fmtTime(a.silenced_until)}`));
    }
    if (st.me && st.me.operator) {
      const td = el("td", {class: "op-only"});
      if (a.state === "open") {
        const b = el("button", {type: "button", class: "ack", "data-alert-id": a.id}, "Acknowledge");
        b.addEventListener("click", () => alertAction(a.id, "ack", {}, b));
        td.append(b);
      }
      if (!silenced) {
        const b = el("button", {type: "button", class: "silence", "data-alert-id": a.id,
          title: `no notifications for this rule and subject for ${SILENCE_MINUTES} min`},
          "Silence 1 h");
        b.addEventListener("click", () => alertAction(a.id, "silence", {minutes: SILENCE_MINUTES}, b));
        td.append(b);
      }
      tr.append(td);
    }
    frag.append(tr);
  }
  body.replaceChildren(frag);
  document.getElementById("alert-count").textContent = `(${live.length} open or acknowledged)`;
}

async function alertAction(id, action, body, button) {
  button.disabled = true;
  const r = await post(`/alerts/${encodeURIComponent(id)}/${action}`, body);
  if (r.ok) onAlerts([await r.json()]);
  else { button.disabled = false; button.title = `failed (${r.status})`; }
}

// A state-changing request with the session cookie (the browser adds this Origin).
function post(url, body) {
  return fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

// Send a command and show its answer, or why there is none (timeout, refusal), in ``out``.
async function sendCommand(url, body, out, button) {
  button.disabled = true;
  out.className = "cmd-out pending";
  out.textContent = `${body.command}: waiting up to ${body.timeout} s…`;
  try {
    const r = await post(url, body);
    const answer = await r.json().catch(() => ({message: `HTTP ${r.status}`}));
    out.className = `cmd-out ${r.ok && answer.status !== "error" ? "ok" : r.status === 504 ? "timeout" : "failed"}`;
    out.textContent = r.ok ? `${body.command}: ${JSON.stringify(answer.result ?? answer, null, 1)}`
      : `${body.command}: ${r.status === 504 ? "timed out" : "refused"} (${r.status}): ${answer.message || ""}`;
  } catch (err) {
    out.className = "cmd-out failed";
    out.textContent = `${body.command}: ${err}`;
  } finally {
    button.disabled = false;
  }
}
window.sendCommand = sendCommand;

// -- events ----------------------------------------------------------------------------
function eventRow(e, withRobot) {
  const level = String(e.event_level || "info").toLowerCase();
  const tr = el("tr", {"data-event": `${e.robot_sn}/${e.event_id}`, class: `sev-${level}`});
  tr.append(el("td", {class: "time", title: e.upload_time || ""}, fmtTime(e.task_time || e.upload_time)),
    el("td", {class: "severity"}, level));
  if (withRobot) {
    const td = el("td", {class: "robot"});
    td.append(el("a", {href: `#robot/${encodeURIComponent(e.robot_sn)}`}, e.robot_sn));
    tr.append(td);
  }
  tr.append(el("td", {class: "type"}, e.event_type || e.callback_type || ""),
    el("td", {class: "detail"}, e.event_detail || ""));
  if (withRobot) tr.append(el("td", {class: "org"}, e.org_id));
  return tr;
}
window.eventRow = eventRow;

function renderEvents() {
  const list = [...st.events.values()].sort(eventOrder);
  document.querySelector("#events tbody").replaceChildren(...list.map((e) => eventRow(e, true)));
  document.getElementById("event-count").textContent = `(latest ${list.length})`;
}

// -- gateways --------------------------------------------------------------------------
function runText(run) {
  if (!run) return "none reported";
  const when = run.ended_at || run.started_at;
  const age = when ? ` · ${fmtAge(ageSeconds(typeof when === "number" ? new Date(when * 1000).toISOString() : when))} ago` : "";
  return `${run.status || "?"}${age}` + (run.errors ? ` · ${run.errors} errors` : "");
}

function gatewayCommandCell(key, g) {
  let td = st.gatewayCmd.get(key);
  if (td) return td;
  td = el("td", {class: "op-only command"});
  const select = el("select", {class: "cmd-name"});
  for (const c of GATEWAY_COMMANDS) select.append(el("option", {value: c}, c));
  const button = el("button", {type: "button", class: "cmd", "data-gateway": g.gateway_id}, "Send");
  const out = el("pre", {class: "cmd-out"});
  button.addEventListener("click", () => sendCommand(
    `/devices/${encodeURIComponent(g.gateway_id)}/commands`,
    {command: select.value, args: {}, timeout: COMMAND_TIMEOUT_S, org_id: g.org_id}, out, button));
  td.append(select, button, out);
  st.gatewayCmd.set(key, td);
  return td;
}

function renderGateways() {
  const body = document.querySelector("#gateways tbody");
  const rows = [];
  for (const [key, g] of [...st.gateways].sort()) {
    const beat = typeof g.heartbeat_at === "number" ? (Date.now() / 1000 - g.heartbeat_at) : Infinity;
    const tr = el("tr", {"data-gateway": key, class: `presence-${g.state}`});
    tr.append(el("td", {class: "gateway"}, g.gateway_id), el("td", {class: "org"}, g.org_id),
      el("td", {class: `presence s-${g.state}`}, g.state || "unknown"),
      el("td", {class: "heartbeat"}, Number.isFinite(beat) ? `${fmtAge(beat)} ago` : "none yet"),
      el("td", {class: "backlog"}, g.outbox_depth ?? ""),
      el("td", {class: "oldest"}, typeof g.outbox_oldest_age_s === "number" ? fmtAge(g.outbox_oldest_age_s) : ""),
      el("td", {class: "last-run"}, runText(g.last_run || st.runs.get(key))));
    if (st.me && st.me.operator) tr.append(gatewayCommandCell(key, g));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  document.getElementById("gateway-count").textContent = `(${rows.length})`;
}

async function loadRuns() {
  const r = await fetch("/ingestion-runs?limit=100", {credentials: "same-origin"});
  if (!r.ok) return;
  for (const run of (await r.json()).items.reverse()) st.runs.set(`${run.org_id}/${run.gateway_id}`, run);
  st.gatewaysDirty = true;
  schedule();
}

// -- floor view: per map, robots at (x, y) with heading, on a grid scaled to what is seen --
function niceStep(span) {
  const raw = span / 8, p = Math.pow(10, Math.floor(Math.log10(raw)));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw) || raw;
}

function renderFloor() {
  const byMap = new Map();
  for (const r of st.robots.values()) {
    if (typeof r.x !== "number" || typeof r.y !== "number") continue;
    const m = r.map_name || "(no map)";
    if (!byMap.has(m)) byMap.set(m, []);
    byMap.get(m).push(r);
  }
  const host = document.getElementById("floor");
  const W = 480, H = 320, PAD = 24;
  const figures = [];
  for (const [name, robots] of [...byMap].sort()) {
    const pts = robots.flatMap((r) => st.tracks.get(r.robot_sn) || [[r.x, r.y]]);
    let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
    for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
    const span = Math.max(x1 - x0, y1 - y0, 2);
    const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    const k = Math.min(W - 2 * PAD, H - 2 * PAD) / span;
    const sx = (x) => W / 2 + (x - cx) * k, sy = (y) => H / 2 - (y - cy) * k;  // y up
    const fig = el("figure", {class: "map", "data-map": name});
    fig.append(el("figcaption", {}, `${name} — ${robots.length} robot(s)`));
    const s = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H});
    const step = niceStep(span * (W / Math.min(W - 2 * PAD, H - 2 * PAD)));
    const gx0 = Math.floor((cx - W / 2 / k) / step) * step;
    const gy0 = Math.floor((cy - H / 2 / k) / step) * step;
    for (let gx = gx0; sx(gx) <= W; gx += step) s.append(svg("line", {class: "grid", x1: sx(gx), x2: sx(gx), y1: 0, y2: H}));
    for (let gy = gy0; sy(gy) >= 0; gy += step) s.append(svg("line", {class: "grid", y1: sy(gy), y2: sy(gy), x1: 0, x2: W}));
    const label = svg("text", {class: "scale", x: 6, y: H - 6});
    label.textContent = `grid ${step} m`;
    s.append(label);
    for (const r of robots) {
      const t = st.tracks.get(r.robot_sn) || [];
      if (t.length > 1) s.append(svg("polyline", {class: "track", "data-sn": r.robot_sn, points: t.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ")}));
      const yaw = typeof r.yaw === "number" ? r.yaw : 0;
      const g = svg("g", {class: `marker s-${String(r.status || "unknown").toLowerCase()}`,
        "data-sn": r.robot_sn, "data-x": r.x, "data-y": r.y,
        transform: `translate(${sx(r.x).toFixed(1)} ${sy(r.y).toFixed(1)}) rotate(${-yaw})`});
      g.append(svg("circle", {r: 7}), svg("line", {class: "heading", x1: 0, y1: 0, x2: 14, y2: 0}));
      const title = svg("title");
      title.textContent = `${r.robot_sn} (${r.x}, ${r.y}) yaw ${yaw}`;
      g.append(title);
      s.append(g);
      if (robots.length <= TAGS_UP_TO) {  // past that, names only on hover (title)
        const tag = svg("text", {class: "tag", x: sx(r.x) + 9, y: sy(r.y) - 9});
        tag.textContent = r.robot_sn;
        s.append(tag);
      }
    }
    fig.append(s);
    figures.push(fig);
  }
  host.replaceChildren(...figures);
}

function render() {
  const stats = window.consoleStats, t0 = performance.now();
  renderFleet();
  if (st.alertsDirty) renderAlerts();  // rebuilt only when changed: buttons stay put
  st.alertsDirty = false;
  if (st.eventsDirty) renderEvents();
  st.eventsDirty = false;
  if (st.gatewaysDirty || stats.renders % 7 === 0) renderGateways();  // heartbeat ages
  st.gatewaysDirty = false;
  const t1 = performance.now();
  if (st.floorDirty) renderFloor();  // the table ages every second; the floor need not
  st.floorDirty = false;
  const t2 = performance.now();
  stats.renders += 1;
  stats.renderMs += t2 - t0;
  stats.floorMs += t2 - t1;
}

function frame(handler) {
  return (e) => {
    const items = JSON.parse(e.data);
    window.consoleStats.frames += 1;
    window.consoleStats.objects += items.length;
    handler(items);
  };
}

// -- start -----------------------------------------------------------------------------
function link(text, cls) {
  const e = document.getElementById("link");
  e.textContent = text;
  e.className = `link ${cls}`;
}

async function start() {
  const r = await fetch("/console/me", {credentials: "same-origin"});
  if (r.status === 401) { location.replace("/"); return; }
  st.me = await r.json();
  document.getElementById("who").textContent =
    `${st.me.name} · ${st.me.role} · ${st.me.orgs.join(", ")}`;
  document.body.classList.toggle("operator", st.me.operator);
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/console/logout", {method: "POST", credentials: "same-origin"});
    location.replace("/");
  });
  for (const th of document.querySelectorAll("#robots th[data-key]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      st.sort = {key, dir: st.sort.key === key ? -st.sort.dir : 1};
      for (const h of document.querySelectorAll("#robots th")) h.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", st.sort.dir > 0 ? "ascending" : "descending");
      render();
    });
  }
  for (const id of ["search", "filter-status", "filter-org"]) {
    document.getElementById(id).addEventListener("input", schedule);
  }
  const es = new EventSource("/console/stream");
  es.addEventListener("open", () => link("live", "up"));
  es.addEventListener("hello", () => {
    window.consoleStats.hellos += 1;
    st.robots.clear();
    st.alerts.clear();
    st.events.clear();
    st.gateways.clear();
    st.rowEls.clear();
  });
  es.addEventListener("robots", frame(onRobots));
  es.addEventListener("tracks", (e) => onTracks(JSON.parse(e.data)));
  es.addEventListener("events", frame(onEvents));
  es.addEventListener("alerts", frame(onAlerts));
  es.addEventListener("gateways", frame(onGateways));
  es.addEventListener("error", async () => {
    link("reconnecting…", "down");
    if (es.readyState === EventSource.CLOSED) {
      const me = await fetch("/console/me", {credentials: "same-origin"});
      if (me.status === 401) location.replace("/");
    }
  });
  setInterval(schedule, 1000);  // the "stale" column ages even when nothing arrives
  loadRuns();
  if (window.robotPage) window.robotPage.start(st.me);
}

start();
