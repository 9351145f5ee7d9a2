// The fleet console: one EventSource (/console/stream) feeds maps of robots, events,
// alerts and gateways; the page renders at most every RENDER_MS, whatever the update
// rate, and changes rows in place. Every value from the server is put in the page with
// textContent, never as HTML. The robot page (chart, events, commands) is robot.js.
//
// What needs attention is judged by the alert rules' own settings, which the stream's
// hello carries (st.rules): stale after robot_offline.silent_seconds, low battery at
// battery_low.warning while not charging, backlog above gateway_backlog.max_age_seconds;
// faults and stuck robots are their open alerts (and a stuck move state). No threshold
// is a constant here. ES modules, no globals: page.js holds what the robot page shares.

import {el, eventRow, fmtAge, fmtEpoch, fmtTime, post, sendCommand} from "./page.js";
import {robotPage} from "./robot.js";

const RENDER_MS = 150;
const TRACK = 40;        // positions kept per robot for the floor view
const TAGS_UP_TO = 30;   // a map with more robots than this draws no name tags
const FLOOR_UP_TO = 2000; // past this many positioned robots, the floor asks for a filter
const FLOOR_MS = 1000;   // the floor is redrawn at most this often
const MARKS_PER_STEP = 50;  // markers placed in one task: a refit moves every one
const EVENTS_SHOWN = 100;
const SILENCE_MINUTES = 60;
const COMMAND_TIMEOUT_S = 10;
const ROW_H = 30;        // px of one fleet row: the table renders only the rows in view
const OVERSCAN = 10;
const RESORT_MS = 2000;  // a large fleet's order is recomputed at most this often on updates
const COUNT_ALWAYS_UP_TO = 500;  // robots counted for the attention strip on every render
const COUNT_MS = 1000;   // past that, the strip is recounted at most this often
// What every gateway answers; the rest of its commands (plug-ins included) are read from
// its own get_status answer, not copied here.
const GATEWAY_COMMANDS = ["ping", "get_status"];
const SVG = "http://www.w3.org/2000/svg";

// Counters a test or benchmark reads (frames received, objects, time spent rendering) with
// import("/console/static/console.js"): the same module instance as the page's.
// ``hellos`` counts stream (re)connections: more than one means the stream broke.
// ``slowest`` keeps each step's longest run in ms (fleet, lists, counts, floor, floor-frame,
// floor-markers, frame), so a long task the benchmark sees can be put down to a step or to
// the browser's own work.
export const stats = {hellos: 0, frames: 0, objects: 0, renders: 0, renderMs: 0, floorMs: 0,
  rowsBuilt: 0, ready: false, slowest: {}};

const st = {
  me: null,
  rules: null,           // the alert rules' settings (hello)
  chargingStates: [],    // the charge states that count as charging (hello)
  robots: new Map(),    // "org/sn" -> robot: two orgs may have robots with the same sn
  alerts: new Map(),
  events: new Map(),     // "org/sn/event_id" -> event
  gateways: new Map(),   // "org/gateway" -> presence and heartbeat
  runs: new Map(),       // "org/gateway" -> its latest poll run (GET /ingestion-runs)
  gatewayCmd: new Map(), // "org/gateway" -> its command cell, kept across renders
  gatewayRows: new Map(), // "org/gateway" -> its row, refilled in place
  floors: new Map(),     // "org/gateway · map" -> its figure and markers, changed in place
  eventRows: new Map(),  // "org/sn/event_id" -> its row
  tracks: new Map(),     // "org/sn" -> recent positions
  byRobot: new Map(),    // "org/sn" -> {rule -> alert} of its open or acknowledged alerts
  rowEls: new Map(),     // "org/sn" -> its table row (only rows in view exist)
  fleetBox: {height: 0, top: 0},  // the fleet box as its observers last saw it
  changed: new Set(),    // "org/sn"s whose row must be refilled
  list: [],              // the fleet table's robots ("org/sn"), filtered and sorted
  listAt: 0,
  listDirty: true,
  alertRows: new Map(),  // alert id -> its row
  alertOrder: [],        // ids in the order shown
  alertsPending: 0,
  selected: new Set(),   // alert ids ticked for a bulk action
  pointerInAlerts: false,
  focusInAlerts: false,  // a keyboard user's place in the list: held like the pointer's
  floorDirty: false, floorAt: 0, attentionAt: 0, countTimer: null,
  eventsDirty: false, alertsDirty: false, gatewaysDirty: false,
  sort: {key: "robot_sn", dir: 1},
  filter: {q: "", org: "", site: "", status: "", attention: ""},
  timer: null,
  resting: false, restAgain: false,  // the rest of a render is under way, and again after it
  refocus: null,         // the alert whose row takes the focus back when refilled
};

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function ageSeconds(iso) {
  const t = iso ? Date.parse(iso) : NaN;
  return Number.isNaN(t) ? Infinity : Math.max(0, (Date.now() - t) / 1000);
}

// "(5 min ago)" that keeps ageing: a row is refilled only when its alert changes, so the
// words of every such span on the page (a few dozen rows) are rewritten every AGES_MS.
const AGES_MS = 10000;
function agoText(iso) { return `(${fmtAge(ageSeconds(iso))} ago)`; }
function agoSpan(iso) { return el("span", {class: "ago", "data-since": iso || ""}, agoText(iso)); }
function refreshAges() {
  for (const span of document.querySelectorAll("span.ago")) {
    const text = agoText(span.dataset.since);
    if (span.textContent !== text) span.textContent = text;
  }
}

function schedule() {
  if (st.timer === null) st.timer = setTimeout(() => { st.timer = null; render(); }, RENDER_MS);
}

function announce(text) {
  document.getElementById("announce").textContent = text;
}

// -- what needs attention -----------------------------------------------------------------
const SEVERITIES = ["info", "warning", "medium", "high", "critical"];
const sevRank = (s) => SEVERITIES.indexOf(s);

function siteOf(org, gateway) { return `${org}/${gateway || ""}`; }

// A robot is its org's: two orgs may each have a robot with the same sn (and a gateway of
// the same name), so robots, their rows, alerts, tracks and markers are keyed by both.
function robotKey(r) { return `${r.org_id}/${r.robot_sn}`; }
function alertRobotKey(a) { return `${a.org}/${a.subject_id}`; }

function gatewayOf(r) { return st.gateways.get(siteOf(r.org_id, r.gateway_id)); }

function charging(r) {
  const states = st.chargingStates;
  if (r.charge_state) return states.includes(String(r.charge_state).toLowerCase());
  return Boolean(r.is_charging);
}

// The flags of one robot, by the rules' settings. A robot behind an offline gateway is
// "unknown since" the gateway went: its last state is not news any more.
function flagsOf(r) {
  const rules = st.rules;
  const gw = gatewayOf(r);
  const alerts = st.byRobot.get(robotKey(r));
  const f = {unknown: null, fault: null, stuck: false, offline: false, stale: false, low: false};
  if (gw && gw.state === "offline") f.unknown = gw.since || null;
  const fault = alerts && alerts.get("robot_fault");
  if (fault) f.fault = fault;
  f.stuck = String(r.move_state || "").toLowerCase() === "stuck" ||
    Boolean(alerts && alerts.get("robot_stuck"));
  if (!f.unknown) {
    f.offline = String(r.status || "").toLowerCase() === "offline";
    f.stale = !f.offline && rules !== null &&
      ageSeconds(r.last_updated) >= rules.robot_offline.silent_seconds;
  }
  f.low = rules !== null && typeof r.battery_level === "number" && !charging(r) &&
    r.battery_level <= rules.battery_low.warning;
  return f;
}

function backlogged(g) {
  return st.rules !== null && typeof g.outbox_oldest_age_s === "number" &&
    g.outbox_oldest_age_s > st.rules.gateway_backlog.max_age_seconds;
}

// What each attention link filters by, and its label.
const ROBOT_KINDS = {
  fault: ["faulted", (f) => Boolean(f.fault)],
  stuck: ["stuck", (f) => f.stuck],
  offline: ["offline", (f) => f.offline],
  unknown: ["unknown (gateway offline)", (f) => Boolean(f.unknown)],
  stale: ["stale", (f) => f.stale],
  low: ["low battery", (f) => f.low],
};
const GATEWAY_KINDS = {
  "gw-offline": ["gateways offline", (g) => g.state === "offline"],
  backlog: ["gateways backlogged", backlogged],
};

// -- the one filter: search, org and site apply to every view ---------------------------
function siteOk(org, gateway) {
  const f = st.filter;
  return (!f.org || org === f.org) && (!f.site || siteOf(org, gateway) === f.site);
}

function has(q, ...values) {
  return !q || values.some((v) => v !== null && v !== undefined && String(v).toLowerCase().includes(q));
}

// What a search matches besides the robot's fields: its flags in the page's words.
function flagWords(r) {
  const f = flagsOf(r);
  return Object.entries(ROBOT_KINDS).filter(([, [, test]]) => test(f))
    .map(([kind, [label]]) => `${kind} ${label}`).join(" ");
}

function robotPasses(r) {  // search, org and site (the attention strip counts these)
  const q = st.filter.q;
  return siteOk(r.org_id, r.gateway_id) &&
    (has(q, r.robot_sn, r.org_id, r.gateway_id, r.status, r.map_name, r.charge_state,
      r.move_state) || (q !== "" && has(q, flagWords(r))));
}

function ruleTitle(rule) {
  return (st.rules && st.rules[rule] && st.rules[rule].title) || rule;
}

function alertSite(a) {
  if (a.subject_type === "gateway") return siteOf(a.org, a.subject_id);
  const r = st.robots.get(alertRobotKey(a));
  return r ? siteOf(r.org_id, r.gateway_id) : "";
}

function alertPasses(a) {
  const f = st.filter;
  if (f.org && a.org !== f.org) return false;
  if (f.site && alertSite(a) !== f.site) return false;
  return has(f.q, a.subject_id, a.org, a.rule, ruleTitle(a.rule), alertSite(a), detailText(a));
}

function eventPasses(e) {
  return siteOk(e.org_id, e.gateway_id) &&
    has(st.filter.q, e.robot_sn, e.org_id, e.gateway_id, e.event_type, e.event_detail);
}

function gatewayPasses(g) {
  const a = st.filter.attention;
  return siteOk(g.org_id, g.gateway_id) && has(st.filter.q, g.gateway_id, g.org_id) &&
    (!GATEWAY_KINDS[a] || GATEWAY_KINDS[a][1](g));
}

function filterChanged() {
  st.listDirty = true;
  st.listAt = 0;
  st.attentionAt = 0;  // the counts follow a new filter at once
  document.getElementById("fleet-scroll").scrollTop = 0;  // a new list starts at its top
  st.fleetBox.top = 0;
  st.alertsDirty = st.eventsDirty = st.gatewaysDirty = st.floorDirty = true;
  st.floorAt = 0;
  const a = st.filter.attention;
  const label = (ROBOT_KINDS[a] || GATEWAY_KINDS[a] || [])[0] ||
    (a.startsWith("alerts-") ? `${a.slice(7)} alerts` : "");
  document.getElementById("active-filter").hidden = !a;
  document.getElementById("active-name").textContent =
    label + (st.filter.site ? ` at ${st.filter.site}` : "");
  schedule();
}

// -- incoming --------------------------------------------------------------------------
function onRobots(items) {
  for (const r of items) {
    const key = robotKey(r);
    const old = st.robots.get(key);
    if (old && old.last_updated && r.last_updated && r.last_updated < old.last_updated) continue;
    st.robots.set(key, r);
    st.changed.add(key);
    st.floorDirty = true;
    if (typeof r.x === "number" && typeof r.y === "number") {
      const t = st.tracks.get(key) || [];
      const last = t[t.length - 1];
      if (!last || last[0] !== r.x || last[1] !== r.y) t.push([r.x, r.y]);
      if (t.length > TRACK) t.shift();
      st.tracks.set(key, t);
    }
  }
  st.listDirty = true;
  schedule();
}

function indexAlert(a) {
  if (a.subject_type !== "robot") return;
  const key = alertRobotKey(a);
  const mine = st.byRobot.get(key) || new Map();
  if (a.state === "resolved") mine.delete(a.rule);
  else mine.set(a.rule, a);
  if (mine.size) st.byRobot.set(key, mine);
  else st.byRobot.delete(key);
  st.changed.add(key);
}

function onAlerts(items) {
  let fresh = 0;
  const wasKnown = new Set(items.filter((a) => st.alerts.has(a.id)).map((a) => a.id));
  for (const a of items) {
    const known = st.alerts.has(a.id);
    st.alerts.set(a.id, a);
    indexAlert(a);
    if (!known && a.state === "open") fresh += 1;
  }
  if (fresh && stats.ready) {
    const worst = items.filter((a) => a.state === "open")
      .sort((a, b) => sevRank(b.severity) - sevRank(a.severity))[0];
    announce(`${fresh} new alert${fresh > 1 ? "s" : ""}` +
      (worst ? `, the worst ${worst.severity}: ${ruleTitle(worst.rule)} ${worst.subject_id}` : ""));
    // a new critical alert interrupts a screen reader (role=alert); the rest waits politely
    const critical = items.filter((a) => a.state === "open" && a.severity === "critical" && !wasKnown.has(a.id));
    if (critical.length) {
      document.getElementById("announce-critical").textContent = `Critical: ` +
        critical.slice(0, 3).map((a) => `${ruleTitle(a.rule)}, ${a.subject_type || ""} ${a.subject_id}`.replace(" ,", ",")).join("; ") +
        (critical.length > 3 ? `; and ${critical.length - 3} more` : "");
    }
  }
  st.alertsDirty = true;
  st.floorDirty = true;
  st.listDirty = true;
  schedule();
}

// Recent positions from the server's history (keyed "org/sn"): tracks survive a reload.
function onTracks(byRobot) {
  for (const [sn, points] of Object.entries(byRobot)) {
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
  for (const e of items) st.events.set(eventKey(e), e);
  const newest = [...st.events.entries()].sort((a, b) => eventOrder(a[1], b[1]));
  for (const [k] of newest.slice(EVENTS_SHOWN)) st.events.delete(k);
  st.eventsDirty = true;
  robotPage.onEvents(items);
  schedule();
}

function onGateways(items) {
  for (const g of items) {
    const key = siteOf(g.org_id, g.gateway_id);
    const old = st.gateways.get(key);
    st.gateways.set(key, g);
    if (!old || old.state !== g.state) {  // its robots become (or stop being) unknown
      for (const r of st.robots.values()) {
        if (r.org_id === g.org_id && r.gateway_id === g.gateway_id) st.changed.add(robotKey(r));
      }
      st.listDirty = st.floorDirty = true;
    }
  }
  st.gatewaysDirty = true;
  schedule();
}

function eventKey(e) { return `${e.org_id}/${e.robot_sn}/${e.event_id}`; }

function eventOrder(a, b) {  // newest received first
  const x = a.upload_time || "", y = b.upload_time || "";
  return x < y ? 1 : x > y ? -1 : 0;
}

// -- attention strip and sites --------------------------------------------------------------
function countLink(kind, n, label, site) {
  const li = el("li", {class: `chip k-${kind}` + (n ? " hot" : ""), "data-kind": kind});
  const a = el("a", {href: `#show/${kind}` + (site ? `/${site}` : ""), "data-count": n},
    `${label}: ${n}`);
  li.append(a);
  return li;
}

function renderAttention() {
  const counts = {};
  for (const k of Object.keys(ROBOT_KINDS)) counts[k] = 0;
  const sites = new Map();  // "org/gw" -> per-site counts
  const site = (org, gw) => {
    const key = siteOf(org, gw);
    if (!sites.has(key)) {
      sites.set(key, {org, gw, robots: 0, alerts: 0, fault: 0, stuck: 0, offline: 0,
        unknown: 0, stale: 0, low: 0});
    }
    return sites.get(key);
  };
  for (const r of st.robots.values()) {
    if (!robotPasses(r)) continue;
    const f = flagsOf(r), s = site(r.org_id, r.gateway_id);
    s.robots += 1;
    for (const [k, [, test]] of Object.entries(ROBOT_KINDS)) {
      if (test(f)) { counts[k] += 1; s[k] += 1; }
    }
  }
  const bySeverity = {};
  for (const a of st.alerts.values()) {
    if (a.state !== "open" || !alertPasses(a)) continue;
    bySeverity[a.severity] = (bySeverity[a.severity] || 0) + 1;
    const key = alertSite(a);
    if (key) {
      const [org, ...gw] = key.split("/");
      site(org, gw.join("/")).alerts += 1;
    }
  }
  const gws = [...st.gateways.values()].filter((g) => siteOk(g.org_id, g.gateway_id));
  for (const g of gws) site(g.org_id, g.gateway_id);
  const items = [];
  for (const sev of [...SEVERITIES].reverse()) {
    items.push(countLink(`alerts-${sev}`, bySeverity[sev] || 0, `${sev} alerts`));
  }
  for (const [k, [label]] of Object.entries(ROBOT_KINDS)) items.push(countLink(k, counts[k], label));
  for (const [k, [label, test]] of Object.entries(GATEWAY_KINDS)) {
    items.push(countLink(k, gws.filter(test).length, label));
  }
  const chips = document.getElementById("attention-counts");
  const sig = items.map((li) => li.textContent).join("|");
  if (chips.dataset.text !== sig) {  // replaced only when a count changed
    chips.dataset.text = sig;
    chips.replaceChildren(...items);
  }
  // one row per site, the most troubled first
  const rows = [...sites.values()].sort((a, b) =>
    (b.alerts + b.fault + b.unknown) - (a.alerts + a.fault + a.unknown) ||
    (a.org + a.gw < b.org + b.gw ? -1 : 1));
  const table = document.querySelector("#sites tbody");
  const sig2 = JSON.stringify(rows) + JSON.stringify(gws.map((g) => [g.state, g.outbox_depth,
    g.outbox_oldest_age_s === undefined ? null : Math.round(g.outbox_oldest_age_s / 60)]));
  if (table.dataset.text === sig2) return;
  table.dataset.text = sig2;
  table.replaceChildren(...rows.map((s) => {
    const key = siteOf(s.org, s.gw), g = st.gateways.get(key);
    const tr = el("tr", {"data-site": key});
    const name = el("td", {class: "site"});
    name.append(el("a", {href: `#show/site/${key}`}, s.gw || "(no gateway)"));
    const presence = g ? g.state || "unknown" : "unknown";
    tr.append(name, el("td", {class: "org"}, s.org),
      el("td", {class: `presence s-${presence}`}, presence),
      el("td", {class: "robots"}, s.robots));
    const linked = (kind, n) => {
      const td = el("td", {class: `n ${kind}` + (n ? " hot" : "")});
      if (n) td.append(el("a", {href: `#show/${kind}/${key}`}, n));
      else td.textContent = "0";
      return td;
    };
    tr.append(linked("alerts-open", s.alerts));
    for (const k of Object.keys(ROBOT_KINDS)) tr.append(linked(k, s[k]));
    const age = g && typeof g.outbox_oldest_age_s === "number" ? g.outbox_oldest_age_s : null;
    tr.append(el("td", {class: "backlog" + (g && backlogged(g) ? " hot" : "")},
      age === null ? "–" : `${g.outbox_depth ?? "?"} (oldest ${fmtAge(age)})`));
    return tr;
  }));
}

// -- fleet table (virtualised: only the rows in view exist) --------------------------------
function sortValue(r, key) {
  if (key === "age") return ageSeconds(r.last_updated);
  const v = r[key];
  return v === null || v === undefined ? "" : v;
}

function computeList() {
  const {status, attention} = st.filter;
  const kind = ROBOT_KINDS[attention];
  const {key, dir} = st.sort;
  const out = [];
  for (const r of st.robots.values()) {
    if (!robotPasses(r)) continue;
    if (status && shownStatus(r) !== status) continue;
    if (kind && !kind[1](flagsOf(r))) continue;
    out.push(r);
  }
  out.sort((a, b) => {
    const x = sortValue(a, key), y = sortValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || (a.robot_sn < b.robot_sn ? -1 :
      a.robot_sn > b.robot_sn ? 1 : a.org_id < b.org_id ? -1 : 1);
  });
  st.list = out.map(robotKey);
  st.listAt = performance.now();
  st.listDirty = false;
}

function batteryCell(r, low) {
  const level = r.battery_level;
  const td = el("td", {class: "battery" + (low ? " low" : "")});
  if (typeof level !== "number") { td.textContent = "–"; return td; }
  const bar = el("div", {class: "bar", title: `${level} %`});
  const fill = el("div", {class: "fill" + (low ? " low" : "")});  // red by the rule, else green
  fill.style.width = `${Math.max(0, Math.min(100, level))}%`;
  bar.append(fill);
  td.append(bar, el("span", {class: "pct"}, `${level} %`));
  return td;
}

// The status a robot is counted under: behind an offline gateway it is unknown, not the
// "working" it last reported (as the attention strip's "unknown (gateway offline)"); a
// robot that has not reported a status yet is "no status", not unknown.
const NO_STATUS = "no status";
function shownStatus(r) {
  return gatewayOf(r)?.state === "offline" ? "unknown" : r.status || NO_STATUS;
}

function statusClass(s) { return `s-${String(s).toLowerCase().replace(/[^a-z0-9_-]+/g, "-")}`; }

function staleClass(f) {
  return f.unknown ? "unknown" : f.stale ? "stale" : "fresh";
}

// The status cell says what matters most: unknown (gateway gone), fault, stuck, status.
function statusCell(r, f) {
  const status = String(r.status || NO_STATUS).toLowerCase();
  if (f.unknown) {
    return el("td", {class: "status s-unknown", title: `last reported ${status}`},
      `unknown since ${fmtEpoch(f.unknown)}`);
  }
  const td = el("td", {class: `status ${statusClass(status)}`});
  const tags = [];
  if (f.fault) tags.push(el("span", {class: `tag fault sev-${f.fault.severity}`}, `fault (${f.fault.severity})`));
  if (f.stuck) tags.push(el("span", {class: "tag stuck"}, "stuck"));
  if (f.low) tags.push(el("span", {class: "tag low"}, "low battery"));
  if (f.fault) td.className = "status s-fault";
  else if (f.stuck) td.className = "status s-stuck";
  td.append(el("span", {class: "word"}, status), ...tags);
  return td;
}

function fillRow(tr, r) {
  const f = flagsOf(r), age = ageSeconds(r.last_updated);
  const pos = typeof r.x === "number" && typeof r.y === "number"
    ? `${r.x.toFixed(1)}, ${r.y.toFixed(1)}` + (typeof r.yaw === "number" ? ` ∠${Math.round(r.yaw)}°` : "")
    : "";
  const sn = el("td", {class: "sn"});
  sn.append(el("a", {href: `#robot/${encodeURIComponent(r.robot_sn)}`}, r.robot_sn));
  tr.className = staleClass(f) + (f.fault ? " faulted" : "") + (f.stuck ? " stuck" : "");
  tr.replaceChildren(
    sn, el("td", {class: "org"}, r.org_id),
    el("td", {class: "gateway"}, r.gateway_id),
    statusCell(r, f), batteryCell(r, f.low),
    el("td", {class: "charge"}, r.charge_state || (r.is_charging ? "charging" : "")),
    el("td", {class: "map"}, r.map_name || ""), el("td", {class: "pos"}, pos),
    el("td", {class: "last-seen", title: r.last_updated || ""}, fmtTime(r.last_updated)),
    el("td", {class: "age"}, fmtAge(age)));
  stats.rowsBuilt += 1;
}

// Puts ``rows`` (or any children) in ``body`` in this order, moving only those out of place:
// a new event on top is one insertion. Every row taken out and put back (replaceChildren)
// had the browser build and lay out each again: at 1,000 robots, most of the page's
// objects every frame.
function placeRows(body, rows) {
  let at = body.firstChild;
  for (const tr of rows) {
    if (at === tr) at = at.nextSibling;
    else body.insertBefore(tr, at);
  }
  while (at) {
    const next = at.nextSibling;
    at.remove();
    at = next;
  }
}

function spacer(h) {
  const tr = el("tr", {class: "spacer", "aria-hidden": "true"});
  const td = el("td", {colspan: "10"});
  td.style.height = `${h}px`;
  tr.append(td);
  return tr;
}

function renderFleet() {
  const big = st.robots.size > 5000;
  if (st.listDirty && (!big || performance.now() - st.listAt > RESORT_MS || !st.list.length)) {
    computeList();
  }
  // the box's height and scroll as last seen by its observers: reading them here would
  // lay out the whole page (the floor's markers too) inside this task
  const {height, top: scrolled} = st.fleetBox;
  const n = st.list.length;
  const count = Math.ceil((height || 600) / ROW_H) + 2 * OVERSCAN;
  // a list that shrank under a scrolled box still shows its last rows, never none
  const first = Math.max(0, Math.min(Math.floor(scrolled / ROW_H) - OVERSCAN, n - count));
  const last = Math.min(n, first + count);
  const want = st.list.slice(first, last);
  const keep = new Set(want);
  for (const key of st.rowEls.keys()) if (!keep.has(key)) st.rowEls.delete(key);
  const trs = [];
  for (const key of want) {
    const r = st.robots.get(key);
    if (!r) continue;
    let tr = st.rowEls.get(key);
    if (!tr) {
      tr = el("tr", {"data-sn": r.robot_sn, "data-org": r.org_id});
      fillRow(tr, r);
      st.rowEls.set(key, tr);
    } else if (st.changed.has(key)) {
      fillRow(tr, r);  // in place: the row element stays
    } else {
      const f = flagsOf(r), cls = staleClass(f) + (f.fault ? " faulted" : "") + (f.stuck ? " stuck" : "");
      const text = fmtAge(ageSeconds(r.last_updated)), cell = tr.lastChild;
      if (tr.className !== cls) fillRow(tr, r);
      else if (cell.textContent !== text) cell.textContent = text;
    }
    trs.push(tr);
  }
  st.changed.clear();
  const body = document.querySelector("#robots tbody");
  const isSpacer = (tr) => tr?.classList.contains("spacer");
  const top = isSpacer(body.firstChild) ? body.firstChild : spacer(0);
  const bottom = body.lastChild !== top && isSpacer(body.lastChild) ? body.lastChild : spacer(0);
  top.firstChild.style.height = `${first * ROW_H}px`;
  bottom.firstChild.style.height = `${(n - last) * ROW_H}px`;
  placeRows(body, [top, ...trs, bottom]);
  document.getElementById("total").textContent = `(${n} shown of ${st.robots.size})`;
  // counts by status over the filtered fleet, and the status, org and site choices
  const counts = new Map(), orgs = new Set(), sites = new Set();
  for (const r of st.robots.values()) {
    if (r.org_id) orgs.add(r.org_id);
    if (r.gateway_id) sites.add(siteOf(r.org_id, r.gateway_id));
    if (!robotPasses(r)) continue;
    const s = shownStatus(r);
    counts.set(s, (counts.get(s) || 0) + 1);
  }
  for (const g of st.gateways.values()) { orgs.add(g.org_id); sites.add(siteOf(g.org_id, g.gateway_id)); }
  const ul = document.getElementById("counts");
  const text = [...counts].sort().map(([s, c]) => `${s}: ${c}`).join("|");
  if (ul.dataset.text !== text) {
    ul.dataset.text = text;
    ul.replaceChildren(...[...counts].sort().map(([s, c]) =>
      el("li", {"data-status": s, class: statusClass(s)}, `${s}: ${c}`)));
  }
  syncOptions("filter-status", [...counts.keys()].sort());
  syncOptions("filter-org", [...orgs].sort());
  syncOptions("filter-site", [...sites].sort());
}

function syncOptions(id, values, labels) {
  const sel = document.getElementById(id);
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (have.join("\u0000") === values.join("\u0000")) return;
  const keep = sel.value;
  sel.replaceChildren(sel.options[0], ...values.map((v) =>
    el("option", {value: v}, labels ? labels(v) : v)));
  sel.value = values.includes(keep) ? keep : "";
}

// -- alerts: severity, then age; rows stay put under the pointer ----------------------------
function detailText(a) {
  const d = a.detail || {};
  if (a.rule === "robot_fault" && (d.event_type || d.event_detail)) {  // what broke, in words
    return [d.event_type, d.event_detail].filter(Boolean).join(": ") +
      (d.event_level ? ` (${d.event_level})` : "");
  }
  const parts = [];
  for (const [k, v] of Object.entries(d)) {
    if (v === null || v === undefined || v === "" || k === "event_id") continue;
    parts.push(`${k.replace(/_/g, " ")}: ${typeof v === "object" ? JSON.stringify(v) : v}`);
  }
  return parts.join(" · ");
}

function alertShown(a) {
  const state = document.getElementById("alert-state").value;
  const rule = document.getElementById("alert-rule").value;
  const sev = document.getElementById("alert-severity").value;
  const silenced = a.silenced_until && Date.parse(a.silenced_until) > Date.now();
  if (state === "silenced" ? !silenced : state ? a.state !== state : a.state === "resolved") return false;
  return (!rule || a.rule === rule) && (!sev || a.severity === sev) && alertPasses(a);
}

function alertOrder(a, b) {  // most severe first, then the oldest (longest open) first
  return sevRank(b.severity) - sevRank(a.severity) ||
    (a.opened_at < b.opened_at ? -1 : a.opened_at > b.opened_at ? 1 : 0) ||
    (a.id < b.id ? -1 : 1);
}

function fillAlert(tr, a) {
  const silenced = a.silenced_until && Date.parse(a.silenced_until) > Date.now();
  const what = `${ruleTitle(a.rule)} on ${a.subject_type} ${a.subject_id}`;
  tr.className = `sev-${a.severity} st-${a.state}`;
  tr.dataset.rule = a.rule;
  const cells = [];
  if (st.me && st.me.operator) {
    const td = el("td", {class: "op-only pick"});
    if (a.state !== "resolved") {
      const box = el("input", {type: "checkbox", class: "pick", "aria-label": `select ${what}`});
      box.checked = st.selected.has(a.id);
      box.addEventListener("change", () => {
        if (box.checked) st.selected.add(a.id); else st.selected.delete(a.id);
        bulkButtons();
      });
      td.append(box);
    }
    cells.push(td);
  }
  const subject = el("td", {class: "subject"}, `${a.subject_type} `);
  if (a.subject_type === "robot") {
    subject.append(el("a", {href: `#robot/${encodeURIComponent(a.subject_id)}`}, a.subject_id));
  } else {
    subject.append(document.createTextNode(a.subject_id));
  }
  const opened = el("td", {class: "opened", title: a.opened_at}, `${fmtTime(a.opened_at)} `);
  opened.append(agoSpan(a.opened_at));
  const state = el("td", {class: "state"}, a.state);
  if (silenced) state.append(el("span", {class: "silenced"}, ` silenced until ${fmtTime(a.silenced_until)}`));
  cells.push(el("td", {class: "severity"}, a.severity), el("td", {class: "rule", title: a.rule}, ruleTitle(a.rule)),
    subject, el("td", {class: "site"}, alertSite(a)), el("td", {class: "detail"}, detailText(a)), state,
    opened,
    el("td", {class: "acked-by"}, a.acknowledged_by || ""));
  if (st.me && st.me.operator) {
    const td = el("td", {class: "op-only"});
    if (a.state === "open") {
      const b = el("button", {type: "button", class: "ack", "data-alert-id": a.id,
        "aria-label": `Acknowledge ${what}`}, "Acknowledge");
      b.addEventListener("click", () => alertAction(a.id, "ack", {}, b));
      td.append(b);
    }
    if (!silenced && a.state !== "resolved") {
      const b = el("button", {type: "button", class: "silence", "data-alert-id": a.id,
        "aria-label": `Silence 1 h: ${what}`,
        title: `no notifications for this rule and subject for ${SILENCE_MINUTES} min`}, "Silence 1 h");
      b.addEventListener("click", () => alertAction(a.id, "silence", {minutes: SILENCE_MINUTES}, b));
      td.append(b);
    }
    cells.push(td);
  }
  // a keyboard user keeps their place: the focus stays in the row it was in (on the same
  // kind of control, else the row's first), not lost to the page when the row is refilled
  let focused = tr.contains(document.activeElement) ? document.activeElement.className : null;
  if (st.refocus === a.id) {  // its button was pressed (and lost the focus when disabled)
    focused = "silence";
    st.refocus = null;
  }
  tr.replaceChildren(...cells);
  if (focused !== null) {
    const same = focused ? tr.querySelector(`button.${CSS.escape(focused.split(" ")[0])}`) : null;
    (same || tr.querySelector("button, input, a"))?.focus();
  }
}

// New alerts are inserted in order unless the pointer is on the list, the keyboard's focus
// is in it, or alerts are ticked: then the rows stay where they are and a button says how
// many are waiting.
function renderAlerts(force) {
  const wanted = [...st.alerts.values()].filter(alertShown).sort(alertOrder);
  const hold = !force && (st.pointerInAlerts || st.focusInAlerts || st.selected.size > 0) &&
    st.alertOrder.length;
  const body = document.querySelector("#alerts tbody");
  if (hold) {
    const shown = new Set(st.alertOrder);
    st.alertsPending = wanted.filter((a) => !shown.has(a.id)).length;
    for (const id of st.alertOrder) {  // in place: the rows do not move
      const a = st.alerts.get(id), tr = st.alertRows.get(id);
      if (a && tr && tr.dataset.v !== a.updated_at + a.state + a.silenced_until) {
        fillAlert(tr, a);
        tr.dataset.v = a.updated_at + a.state + a.silenced_until;
      }
    }
  } else {
    st.alertsPending = 0;
    const rows = wanted.map((a) => {
      let tr = st.alertRows.get(a.id);
      if (!tr) {
        tr = el("tr", {"data-alert-id": a.id});
        st.alertRows.set(a.id, tr);
      }
      if (tr.dataset.v !== a.updated_at + a.state + a.silenced_until) {
        fillAlert(tr, a);
        tr.dataset.v = a.updated_at + a.state + a.silenced_until;
      }
      return tr;
    });
    const keep = new Set(wanted.map((a) => a.id));
    for (const id of st.alertRows.keys()) if (!keep.has(id)) st.alertRows.delete(id);
    for (const id of st.selected) if (!keep.has(id)) st.selected.delete(id);
    st.alertOrder = wanted.map((a) => a.id);
    placeRows(body, rows);
  }
  const more = document.getElementById("alerts-new");
  more.hidden = !st.alertsPending;
  more.textContent = `${st.alertsPending} new alert${st.alertsPending === 1 ? "" : "s"}: show`;
  document.getElementById("alert-count").textContent = `(${st.alertOrder.length} shown)`;
  syncOptions("alert-rule", Object.keys(st.rules || {}), ruleTitle);
  syncOptions("alert-severity", [...SEVERITIES].reverse());
  bulkButtons();
}

function bulkButtons() {
  const n = st.selected.size;
  for (const id of ["alerts-ack", "alerts-silence"]) document.getElementById(id).disabled = !n;
  document.getElementById("alerts-ack").textContent = `Acknowledge selected (${n})`;
  document.getElementById("alerts-silence").textContent = `Silence selected 1 h (${n})`;
  const all = document.getElementById("alerts-all");
  all.checked = n > 0 && n === st.alertOrder.filter((id) => (st.alerts.get(id) || {}).state !== "resolved").length;
}

async function bulk(action) {
  const ids = [...st.selected];
  const body = action === "silence" ? {minutes: SILENCE_MINUTES} : {};
  const result = document.getElementById("bulk-result");
  result.textContent = `${action === "ack" ? "acknowledging" : "silencing"} ${ids.length}…`;
  let ok = 0, failed = 0;
  for (let i = 0; i < ids.length; i += 8) {  // a few at a time, not hundreds at once
    const answers = await Promise.all(ids.slice(i, i + 8).map(async (id) => {
      const a = st.alerts.get(id);
      if (action === "ack" && a && a.state !== "open") return true;  // nothing to do
      const r = await post(`/alerts/${encodeURIComponent(id)}/${action}`, body);
      if (r.ok) onAlerts([await r.json()]);
      return r.ok || r.status === 409;
    }));
    for (const good of answers) if (good) ok += 1; else failed += 1;
  }
  st.selected.clear();
  result.textContent = `${ok} ${action === "ack" ? "acknowledged" : "silenced"}` +
    (failed ? `, ${failed} failed` : "");
  announce(result.textContent);
  st.alertsDirty = true;
  renderAlerts(true);
}

async function alertAction(id, action, body, button) {
  if (document.activeElement === button) st.refocus = id;
  button.disabled = true;
  const r = await post(`/alerts/${encodeURIComponent(id)}/${action}`, body);
  if (r.ok) onAlerts([await r.json()]);
  else { button.disabled = false; button.title = `failed (${r.status})`; }
}

// -- events ----------------------------------------------------------------------------
function renderEvents() {  // keyed: a new event adds one row, the rest stay
  const list = [...st.events.values()].filter(eventPasses).sort(eventOrder);
  const rows = list.map((e) => {
    const key = eventKey(e);
    let tr = st.eventRows.get(key);
    if (!tr) { tr = eventRow(e, true); st.eventRows.set(key, tr); }
    return tr;
  });
  const keep = new Set(list.map(eventKey));
  for (const key of [...st.eventRows.keys()]) if (!keep.has(key)) st.eventRows.delete(key);
  placeRows(document.querySelector("#events tbody"), rows);
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
  const select = el("select", {class: "cmd-name", "aria-label": `command for gateway ${g.gateway_id}`});
  for (const c of GATEWAY_COMMANDS) select.append(el("option", {value: c}, c));
  const button = el("button", {type: "button", class: "cmd", "data-gateway": g.gateway_id,
    "aria-label": `Send the command to gateway ${g.gateway_id}`}, "Send");
  const out = el("div", {class: "cmd-out", role: "status"});
  button.addEventListener("click", () => sendCommand(
    `/devices/${encodeURIComponent(g.gateway_id)}/commands`,
    {command: select.value, args: {}, timeout: COMMAND_TIMEOUT_S, org_id: g.org_id}, out, button));
  td.append(select, button, out);
  st.gatewayCmd.set(key, td);
  if (st.me && st.me.operator) loadGatewayCommands(g, select);
  return td;
}

// Ask the gateway which commands it has (get_status's "commands") and offer them; robot
// commands (pudu.*) belong to the robot page. A gateway that does not answer keeps the two.
async function loadGatewayCommands(g, select) {
  try {
    const r = await post(`/devices/${encodeURIComponent(g.gateway_id)}/commands`,
      {command: "get_status", args: {}, timeout: COMMAND_TIMEOUT_S, org_id: g.org_id});
    if (!r.ok) return;
    const answer = await r.json();
    const names = ((answer.result ?? answer).commands || []).filter((c) => !c.startsWith("pudu."));
    const have = new Set([...select.options].map((o) => o.value));
    for (const c of names) if (!have.has(c)) select.append(el("option", {value: c}, c));
  } catch (err) {
    // offline or refused: the two every gateway answers stay offered
  }
}

// A clock offset in words: "in step with …", "1.0 h behind …", "12 s ahead of …".
function fmtOffset(s, whom) {
  if (Math.abs(s) < 1) return `in step with ${whom}`;
  return `${fmtAge(Math.abs(s))} ${s > 0 ? "ahead of" : "behind"} ${whom}`;
}

// The gateway's clock, compared twice: with this server's (its heartbeat's timestamp against
// when it arrived, clock_offset_s) and with its robots' (the edge's own verdict,
// gateway_clock_offset_s). Off when either is beyond the gateway_clock rule's bound.
function clockOf(g) {
  const limit = st.rules?.gateway_clock?.max_offset_seconds ?? Infinity;
  const here = g.clock_offset_s, robots = g.gateway_clock_offset_s;
  const parts = [];
  if (typeof here === "number") parts.push(fmtOffset(here, "this server"));
  if (typeof robots === "number" && Math.abs(robots) >= 1) parts.push(fmtOffset(robots, "its robots"));
  const off = [here, robots].some((v) => typeof v === "number" && Math.abs(v) > limit);
  return {off, text: parts.length ? (off ? "clock off: " : "") + parts.join("; ") : "not reported",
    title: Number.isFinite(limit) ? `off beyond ${limit} s either way (gateway_clock rule)` : ""};
}

// One gateway's row, refilled in place: the row and its command cell (a pending answer, the
// chosen command, the focus) stay; only cells whose text changed are written.
function fillGateway(tr, key, g) {
  const beat = typeof g.heartbeat_at === "number" ? (Date.now() / 1000 - g.heartbeat_at) : Infinity;
  const clock = clockOf(g);
  tr.className = `presence-${g.state}` + (backlogged(g) ? " backlogged" : "") + (clock.off ? " clock-off" : "");
  const presence = (g.state || "unknown") + (g.state === "offline" && g.since ? ` since ${fmtEpoch(g.since)}` : "");
  const cells = [
    ["gateway", g.gateway_id], ["org", g.org_id], [`presence s-${g.state}`, presence],
    ["heartbeat", Number.isFinite(beat) ? `${fmtAge(beat)} ago` : "none yet"],
    ["clock" + (clock.off ? " off" : ""), clock.text, clock.title],
    ["backlog", g.outbox_depth ?? ""],
    ["oldest", typeof g.outbox_oldest_age_s === "number" ? fmtAge(g.outbox_oldest_age_s) : ""],
    ["last-run", runText(g.last_run || st.runs.get(key))],
  ];
  if (tr.cells.length === 0) {
    for (const [cls] of cells) tr.append(el("td", {class: cls}));
    if (st.me && st.me.operator) tr.append(gatewayCommandCell(key, g));
  }
  cells.forEach(([cls, text, title], i) => {
    const td = tr.cells[i];
    if (td.className !== cls) td.className = cls;
    if (td.textContent !== String(text)) td.textContent = text;
    if (title !== undefined && td.title !== title) td.title = title;
  });
}

function renderGateways() {
  const body = document.querySelector("#gateways tbody");
  const rows = [];
  for (const [key, g] of [...st.gateways].sort()) {
    if (!gatewayPasses(g)) continue;
    let tr = st.gatewayRows.get(key);
    if (!tr) {
      tr = el("tr", {"data-gateway": key});
      st.gatewayRows.set(key, tr);
    }
    fillGateway(tr, key, g);
    rows.push(tr);
  }
  placeRows(body, rows);
  document.getElementById("gateway-count").textContent = `(${rows.length})`;
}

async function loadRuns() {
  const r = await fetch("/ingestion-runs?limit=100", {credentials: "same-origin"});
  if (!r.ok) return;
  for (const run of (await r.json()).items.reverse()) st.runs.set(`${run.org_id}/${run.gateway_id}`, run);
  st.gatewaysDirty = true;
  schedule();
}

// -- floor view: per site and map, robots at (x, y) with heading, coloured by what matters --
function niceStep(span) {
  const raw = span / 8, p = Math.pow(10, Math.floor(Math.log10(raw)));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw) || raw;
}

function markerClass(r) {
  const f = flagsOf(r);
  const state = f.unknown ? "unknown" : f.fault ? "fault" : f.stuck ? "stuck" : f.low ? "low"
    : r.status || NO_STATUS;
  return `marker ${statusClass(state)}`;
}

// The frame of one floor: a centre and a scale kept while the positions stay inside it, so
// a move redraws one marker, not the map. Refit when a point leaves the padded frame, or
// when the points fill less than a quarter of its span.
function floorFrame(old, pts, W, H, PAD) {
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  const span = Math.max(x1 - x0, y1 - y0, 2);
  if (old) {
    const hw = (W / 2 - PAD / 2) / old.k, hh = (H / 2 - PAD / 2) / old.k;
    const inside = x0 >= old.cx - hw && x1 <= old.cx + hw && y0 >= old.cy - hh && y1 <= old.cy + hh;
    if (inside && span * old.k * 4 >= Math.min(W - 2 * PAD, H - 2 * PAD)) return old;
  }
  const fit = span * 1.25;  // room to move before the next refit
  const k = Math.min(W - 2 * PAD, H - 2 * PAD) / fit;
  return {cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, k, span: fit};
}

// One floor's figure: its svg, its grid (redrawn only when the frame changes) and a layer of
// tracks under a layer of markers, each robot's kept by sn and changed in place.
function floorFigure(name) {
  const W = 480, H = 320;
  const fig = el("figure", {class: "map", "data-map": name});
  const caption = el("figcaption");
  const s = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H});
  const grid = svg("g", {class: "grid-layer"}), tracks = svg("g"), marks = svg("g"), tags = svg("g");
  s.append(grid, tracks, marks, tags);
  fig.append(caption, s);
  return {fig, caption, grid, tracks, marks, tags, frame: null, robots: new Map(), W, H};
}

function drawGrid(f, PAD) {
  const {W, H} = f, {cx, cy, k, span} = f.frame;
  const sx = (x) => W / 2 + (x - cx) * k, sy = (y) => H / 2 - (y - cy) * k;
  const step = niceStep(span * (W / Math.min(W - 2 * PAD, H - 2 * PAD)));
  const gx0 = Math.floor((cx - W / 2 / k) / step) * step;
  const gy0 = Math.floor((cy - H / 2 / k) / step) * step;
  const lines = [];
  for (let gx = gx0; sx(gx) <= W; gx += step) lines.push(svg("line", {class: "grid", x1: sx(gx), x2: sx(gx), y1: 0, y2: H}));
  for (let gy = gy0; sy(gy) >= 0; gy += step) lines.push(svg("line", {class: "grid", y1: sy(gy), y2: sy(gy), x1: 0, x2: W}));
  const label = svg("text", {class: "scale", x: 6, y: H - 6});
  label.textContent = `grid ${step} m`;
  f.grid.replaceChildren(...lines, label);
}

// One robot on its floor: the marker (and its track, and its name tag on a small floor)
// created once, then only the attributes that changed are written.
function placeRobot(f, r, sx, sy, tagged) {
  let m = f.robots.get(robotKey(r));
  if (!m) {
    const g = svg("g", {"data-sn": r.robot_sn, "data-org": r.org_id});
    const title = svg("title"), dot = svg("circle", {r: 7}), heading = svg("line", {class: "heading"});
    g.append(dot, heading, title);
    m = {g, dot, heading, title, track: null, tag: null, at: "", cls: "", tip: "", points: ""};
    f.marks.append(g);
    f.robots.set(robotKey(r), m);
  }
  const yaw = typeof r.yaw === "number" ? r.yaw : 0;
  const cls = markerClass(r);
  // placed by coordinates, not a transform: a transform per marker made each its own paint
  // chunk, and the browser's compositing of 1,000 of them its costliest step
  const x = sx(r.x), y = sy(r.y), rad = yaw * Math.PI / 180;
  const at = `${x.toFixed(1)} ${y.toFixed(1)} ${yaw}`;
  if (m.at !== at) {
    m.at = at;
    m.dot.setAttribute("cx", x.toFixed(1));
    m.dot.setAttribute("cy", y.toFixed(1));
    m.heading.setAttribute("x1", x.toFixed(1));
    m.heading.setAttribute("y1", y.toFixed(1));
    m.heading.setAttribute("x2", (x + 14 * Math.cos(rad)).toFixed(1));
    m.heading.setAttribute("y2", (y - 14 * Math.sin(rad)).toFixed(1));
    m.g.setAttribute("data-x", r.x);
    m.g.setAttribute("data-y", r.y);
    m.g.setAttribute("data-yaw", yaw);
  }
  if (m.cls !== cls) { m.cls = cls; m.g.setAttribute("class", cls); }
  const tip = `${r.robot_sn} (${r.x}, ${r.y}) yaw ${yaw} · ${cls.slice(9)}`;
  if (m.tip !== tip) { m.tip = tip; m.title.textContent = tip; }
  const t = st.tracks.get(robotKey(r)) || [];
  const points = t.length > 1 ? t.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") : "";
  if (m.points !== points) {
    m.points = points;
    if (!points) { m.track?.remove(); m.track = null; }
    else {
      if (!m.track) {
        m.track = svg("polyline", {class: "track", "data-sn": r.robot_sn, "data-org": r.org_id});
        f.tracks.append(m.track);
      }
      m.track.setAttribute("points", points);
    }
  }
  if (tagged) {  // past TAGS_UP_TO, names only on hover (title)
    if (!m.tag) {
      m.tag = svg("text", {class: "tag"});
      m.tag.textContent = r.robot_sn;
      f.tags.append(m.tag);
    }
    m.tag.setAttribute("x", (sx(r.x) + 9).toFixed(1));
    m.tag.setAttribute("y", (sy(r.y) - 9).toFixed(1));
  } else if (m.tag) { m.tag.remove(); m.tag = null; }
}

function dropRobot(f, key) {
  const m = f.robots.get(key);
  m.g.remove();
  m.track?.remove();
  m.tag?.remove();
  f.robots.delete(key);
}

// The floor view as [name, step] pairs, each run in its own task (renderRest): per floor its
// frame, then its markers MARKS_PER_STEP at a time, then a last step putting the floors in
// place. Three sites of ~330 robots drawn at once took up to 59 ms, and one floor's refit
// (every marker moved) 56 ms: long tasks.
function floorSteps() {
  const byMap = new Map();
  let positioned = 0;
  const kind = ROBOT_KINDS[st.filter.attention];
  for (const r of st.robots.values()) {
    if (typeof r.x !== "number" || typeof r.y !== "number" || !robotPasses(r)) continue;
    if (kind && !kind[1](flagsOf(r))) continue;
    positioned += 1;
    // a map name is per site (org and gateway): five sites' "1F" are five floors, not one,
    // and two orgs' gateways of the same name are two sites
    const m = `${siteOf(r.org_id, r.gateway_id)} · ${r.map_name || "(no map)"}`;
    if (!byMap.has(m)) byMap.set(m, {robots: [], label: [r.gateway_id || "(no gateway)",
      r.org_id, r.map_name || "(no map)"].join(" · ")});
    byMap.get(m).robots.push(r);
  }
  const host = document.getElementById("floor");
  const note = document.getElementById("floor-note");
  if (positioned > FLOOR_UP_TO) {
    note.textContent = `${positioned} robots with a position: choose a site or search to draw them`;
    host.replaceChildren();
    st.floors.clear();
    return [];
  }
  note.textContent = "";
  const figures = [];
  const steps = [...byMap].sort((a, b) => (a[0] < b[0] ? -1 : 1))
    .flatMap(([name, {robots, label}]) => floorDrawing(name, label, robots, figures));
  steps.push(["floor", () => {
    for (const name of [...st.floors.keys()]) if (!byMap.has(name)) st.floors.delete(name);
    placeRows(host, figures);
  }]);
  return steps;
}

// One floor's steps: its figure and frame (the grid redrawn when the frame changes, which
// moves every marker), its markers placed in slices (made once per robot, then changed in
// place), and the robots no longer on it dropped.
function floorDrawing(name, label, robots, figures) {
  const PAD = 24;
  let f, sx, sy;
  const steps = [["floor-frame", () => {
    f = st.floors.get(name);
    if (!f) { f = floorFigure(name); st.floors.set(name, f); }
    const pts = robots.flatMap((r) => st.tracks.get(robotKey(r)) || [[r.x, r.y]]);
    const frame = floorFrame(f.frame, pts, f.W, f.H, PAD);
    if (frame !== f.frame) {
      f.frame = frame;
      drawGrid(f, PAD);
    }
    const {cx, cy, k} = frame, {W, H} = f;
    sx = (x) => W / 2 + (x - cx) * k;
    sy = (y) => H / 2 - (y - cy) * k;  // y up
    const caption = `${label} — ${robots.length} robot(s)`;
    if (f.caption.textContent !== caption) f.caption.textContent = caption;
    figures.push(f.fig);
  }]];
  const tagged = robots.length <= TAGS_UP_TO;
  for (let i = 0; i < robots.length; i += MARKS_PER_STEP) {
    const slice = robots.slice(i, i + MARKS_PER_STEP);
    steps.push(["floor-markers", () => { for (const r of slice) placeRobot(f, r, sx, sy, tagged); }]);
  }
  steps.push(["floor-markers", () => {
    const here = new Set(robots.map(robotKey));
    for (const key of [...f.robots.keys()]) if (!here.has(key)) dropRobot(f, key);
  }]);
  return steps;
}

// -- the robot page's flags (robot.js draws the rest) --------------------------------------
function renderRobotFlags() {
  const m = location.hash.match(/^#robot\/(.+)$/);
  const host = document.getElementById("robot-flags");
  // the page is by sn (its API's address): the first robot of that sn among the key's orgs
  const sn = m && decodeURIComponent(m[1]);
  let r = null;
  if (sn) for (const each of st.robots.values()) if (each.robot_sn === sn) { r = each; break; }
  if (!r) { host.replaceChildren(); return; }
  const f = flagsOf(r), parts = [];
  if (f.unknown) parts.push(el("span", {class: "tag unknown"}, `unknown since ${fmtEpoch(f.unknown)} (gateway ${r.gateway_id} offline)`));
  if (f.fault) parts.push(el("span", {class: `tag fault sev-${f.fault.severity}`}, `fault (${f.fault.severity}): ${detailText(f.fault)}`));
  if (f.stuck) parts.push(el("span", {class: "tag stuck"}, "stuck"));
  if (f.offline) parts.push(el("span", {class: "tag offline"}, "offline"));
  if (f.stale) parts.push(el("span", {class: "tag stale"}, `stale: last seen ${fmtAge(ageSeconds(r.last_updated))} ago`));
  if (f.low) parts.push(el("span", {class: "tag low"}, `low battery: ${r.battery_level} %`));
  const text = parts.map((p) => p.textContent).join("|");
  if (host.dataset.text !== text) {
    host.dataset.text = text;
    host.replaceChildren(...parts);
  }
}

// One render is split into tasks, the browser free to paint and take input between them,
// so no one of them blocks the page for long: the fleet table at once (a sort click is
// answered in its own task), then the lists, then the counts, then the floor.
const nextTask = () => new Promise((resolve) => {
  const ch = new MessageChannel();
  ch.port1.onmessage = () => resolve();
  ch.port2.postMessage(null);
});

function render() {
  if (st.rules === null) return;  // the hello brings the rules the page judges by
  const t0 = performance.now();
  renderFleet();
  stats.renders += 1;
  stats.renderMs += performance.now() - t0;
  slowest("fleet", performance.now() - t0);
  renderRest();
}

function slowest(name, ms) {
  if (!(stats.slowest[name] >= ms)) stats.slowest[name] = Math.round(ms);
}

function timed(name, step) {
  const t0 = performance.now();
  step();
  const spent = performance.now() - t0;
  stats.renderMs += spent;
  slowest(name, spent);
  return spent;
}

async function renderRest() {
  if (st.resting) { st.restAgain = true; return; }
  st.resting = true;
  try {
    do {
      st.restAgain = false;
      await nextTask();
      timed("lists", () => {
        if (st.alertsDirty) renderAlerts(false);  // rebuilt only when changed: buttons stay put
        st.alertsDirty = false;
        if (st.eventsDirty) renderEvents();
        st.eventsDirty = false;
        if (st.gatewaysDirty || stats.renders % 7 === 0) renderGateways();  // heartbeat ages
        st.gatewaysDirty = false;
      });
      await nextTask();
      timed("counts", () => {
        // every robot's flags, counted: past COUNT_ALWAYS_UP_TO robots the strip is recounted
        // at most once a second (a render comes every RENDER_MS while updates arrive), and a
        // recount put off is rendered when due, updates or not
        const t0 = performance.now();
        if (st.robots.size <= COUNT_ALWAYS_UP_TO || t0 - st.attentionAt >= COUNT_MS) {
          renderAttention();
          st.attentionAt = t0;
        } else if (st.countTimer === null) {
          st.countTimer = setTimeout(() => { st.countTimer = null; schedule(); },
            COUNT_MS - (t0 - st.attentionAt));
        }
        renderRobotFlags();
      });
      // a view without the floor (#view/alerts...) leaves it dirty: drawn when it is shown again
      const view = document.querySelector("main").dataset.view;
      const floorShown = !view || view === "floors";
      const now = performance.now();
      if (st.floorDirty && floorShown && now - st.floorAt >= FLOOR_MS) {  // not every pose
        await nextTask();
        st.floorDirty = false;  // before the steps: what arrives meanwhile marks it again
        st.floorAt = now;
        let steps = [];
        stats.floorMs += timed("floor", () => { steps = floorSteps(); });
        for (const [name, step] of steps) {
          await nextTask();
          stats.floorMs += timed(name, step);
        }
      } else if (st.floorDirty && floorShown) {
        schedule();
      }
    } while (st.restAgain);
  } finally {
    st.resting = false;
  }
}

function frame(handler) {
  return (e) => {
    const t0 = performance.now();
    const items = JSON.parse(e.data);
    stats.frames += 1;
    stats.objects += items.length;
    handler(items);
    slowest("frame", performance.now() - t0);
  };
}

// -- the attention links: #show/<kind>[/<org>/<gateway>] ------------------------------------
function route() {
  const m = location.hash.match(/^#show\/([a-z-]+)(?:\/(.+))?$/);
  if (!m) return;
  const [, kind, site] = m;
  st.filter.site = site ? decodeURIComponent(site) : "";
  document.getElementById("filter-site").value = st.filter.site;
  let target = "fleet";
  if (kind.startsWith("alerts-")) {
    const sev = kind.slice(7);
    document.getElementById("alert-severity").value = SEVERITIES.includes(sev) ? sev : "";
    document.getElementById("alert-state").value = "open";
    st.filter.attention = kind;  // shown as the active filter; the fleet is not narrowed
    target = "alerts-section";
  } else if (GATEWAY_KINDS[kind]) {
    st.filter.attention = kind;
    target = "gateways-section";
  } else {
    st.filter.attention = ROBOT_KINDS[kind] ? kind : "";
  }
  filterChanged();
  render();
  renderAlerts(true);
  document.getElementById(target).scrollIntoView();
}

// -- start -----------------------------------------------------------------------------
function link(text, cls) {
  const e = document.getElementById("link");
  e.textContent = text;
  e.className = `link ${cls}`;
}

function wire() {
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/console/logout", {method: "POST", credentials: "same-origin"});
    location.replace("/");
  });
  // each header is a column header holding a button: read as "Battery, button" in a column
  // "sorted ascending" (aria-sort belongs on the header); the button takes Tab, Enter and
  // Space itself, and its click bubbles to the header (a click anywhere on it sorts too)
  for (const th of document.querySelectorAll("#robots th[data-key]")) {
    const sort = () => {
      const key = th.dataset.key;
      st.sort = {key, dir: st.sort.key === key ? -st.sort.dir : 1};
      for (const h of document.querySelectorAll("#robots th")) h.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", st.sort.dir > 0 ? "ascending" : "descending");
      st.listDirty = true;
      st.listAt = 0;
      render();
    };
    th.addEventListener("click", sort);
  }
  const filters = {search: "q", "filter-org": "org", "filter-site": "site", "filter-status": "status"};
  for (const [id, key] of Object.entries(filters)) {
    const apply = (e) => {
      const value = key === "q" ? e.target.value.trim().toLowerCase() : e.target.value;
      if (st.filter[key] === value) return;
      st.filter[key] = value;
      filterChanged();
    };
    for (const type of ["input", "change"]) document.getElementById(id).addEventListener(type, apply);
  }
  document.getElementById("clear-filter").addEventListener("click", () => {
    st.filter.attention = "";
    st.filter.site = "";
    document.getElementById("filter-site").value = "";
    document.getElementById("alert-severity").value = "";
    document.getElementById("alert-state").value = "";
    if (location.hash.startsWith("#show/")) history.replaceState(null, "", location.pathname);
    filterChanged();
  });
  for (const id of ["alert-rule", "alert-severity", "alert-state"]) {
    document.getElementById(id).addEventListener("change", () => renderAlerts(true));
  }
  const list = document.getElementById("alerts");
  const release = () => {
    if (st.alertsPending && !st.selected.size && !st.pointerInAlerts && !st.focusInAlerts) {
      renderAlerts(false);
    }
  };
  list.addEventListener("pointerenter", () => { st.pointerInAlerts = true; });
  list.addEventListener("pointerleave", () => { st.pointerInAlerts = false; release(); });
  list.addEventListener("focusin", () => { st.focusInAlerts = true; });
  list.addEventListener("focusout", (e) => {
    if (list.contains(e.relatedTarget)) return;  // from one of its controls to another
    // a refilled row takes the focus back in the same task (fillAlert): look after it
    setTimeout(() => {
      st.focusInAlerts = list.contains(document.activeElement);
      release();
    }, 0);
  });
  document.getElementById("alerts-new").addEventListener("click", () => renderAlerts(true));
  document.getElementById("alerts-ack").addEventListener("click", () => bulk("ack"));
  document.getElementById("alerts-silence").addEventListener("click", () => bulk("silence"));
  document.getElementById("alerts-all").addEventListener("change", (e) => {
    for (const id of st.alertOrder) {
      const a = st.alerts.get(id);
      if (e.target.checked && a && a.state !== "resolved") st.selected.add(id);
    }
    if (!e.target.checked) st.selected.clear();
    for (const [id, tr] of st.alertRows) {
      const box = tr.querySelector("input.pick");
      if (box) box.checked = st.selected.has(id);
    }
    bulkButtons();
  });
  const box = document.getElementById("fleet-scroll");
  let pending = false;
  new ResizeObserver(() => { st.fleetBox.height = box.clientHeight; }).observe(box);
  box.addEventListener("scroll", () => {
    st.fleetBox.top = box.scrollTop;
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; renderFleet(); });
  });
  window.addEventListener("hashchange", route);
  window.addEventListener("hashchange", schedule);  // a view shown again draws what it missed
}

async function start() {
  const r = await fetch("/console/me", {credentials: "same-origin"});
  if (r.status === 401) { location.replace("/"); return; }
  st.me = await r.json();
  document.getElementById("who").textContent =
    `${st.me.name} · ${st.me.role} · ${st.me.orgs.join(", ")}`;
  // every time on the page is this browser's local time: say which zone that is
  document.getElementById("tz").textContent =
    `times in ${Intl.DateTimeFormat().resolvedOptions().timeZone || "local time"}`;
  document.body.classList.toggle("operator", st.me.operator);
  wire();
  const es = new EventSource("/console/stream");
  es.addEventListener("open", () => link("live", "up"));
  es.addEventListener("hello", (e) => {
    stats.hellos += 1;
    stats.ready = false;
    const hello = JSON.parse(e.data);
    st.rules = hello.rules;
    st.chargingStates = hello.charging_states;
    for (const m of [st.robots, st.alerts, st.events, st.gateways, st.rowEls, st.byRobot,
      st.alertRows, st.gatewayRows, st.eventRows]) m.clear();
    st.alertOrder = [];
    st.listDirty = true;
    document.getElementById("loading").textContent = "loading…";
  });
  es.addEventListener("robots", frame(onRobots));
  es.addEventListener("tracks", (e) => onTracks(JSON.parse(e.data)));
  es.addEventListener("events", frame(onEvents));
  es.addEventListener("alerts", frame(onAlerts));
  es.addEventListener("gateways", frame(onGateways));
  es.addEventListener("ready", () => {
    stats.ready = true;
    document.getElementById("loading").textContent = "";
    st.listAt = 0;
    schedule();
    route();
  });
  es.addEventListener("error", async () => {
    link("reconnecting…", "down");
    if (es.readyState === EventSource.CLOSED) {
      const me = await fetch("/console/me", {credentials: "same-origin"});
      if (me.status === 401) location.replace("/");
    }
  });
  setInterval(schedule, 1000);  // the "stale" column ages even when nothing arrives
  setInterval(refreshAges, AGES_MS);
  loadRuns();
  robotPage.start(st.me);
}

start();
