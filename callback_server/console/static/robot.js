// The robot page (#robot/<sn>): battery and status over the last 24 h as a hand-drawn SVG
// chart (GET /robots/{sn}/history), recent events, tasks (GET /robots/{sn}/tasks, with
// the chart every REFRESH_MS), and for operators the robot commands
// (POST /robots/{sn}/commands) with their answer or timeout. console.js owns the stream
// and hands this page the events it receives (robotPage.onEvents); an ES module.

import {eventRow, sendCommand} from "./page.js";

export const robotPage = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const DAY_S = 86400;
  const EVENTS = 20;
  const REFRESH_MS = 30000;  // the chart gains a point a minute at most: no need for more
  const W = 720, H = 190, LEFT = 36, RIGHT = 24, TOP = 10, BAND = 14, AXIS = 18;
  const STATUS_COLOURS = {online: "#66bb6a", idle: "#66bb6a", working: "#42a5f5",
    charging: "#ffca28", offline: "#9e9e9e", error: "#e53935", fault: "#e53935"};

  const page = {me: null, sn: null, timer: null, events: new Map()};

  function el(tag, attrs = {}, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function svg(tag, attrs = {}, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  async function getJson(url) {
    const r = await fetch(url, {credentials: "same-origin"});
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  async function history(sn, since) {
    const base = `/robots/${encodeURIComponent(sn)}/history?since=${since}&limit=1000`;
    let items = [], cursor = null;
    do {  // a day is about 1,440 points plus the changes: two or three pages
      const body = await getJson(cursor ? `${base}&cursor=${cursor}` : base);
      items = items.concat(body.items);
      cursor = body.next_cursor;
    } while (cursor);
    return items;
  }

  // -- the chart ------------------------------------------------------------------------
  // The last 24 h, or less when the history is shorter (a robot seen for ten minutes
  // gets ten minutes across the chart, not a sliver at its right edge).
  function chart(points, now) {
    const first = points.length ? points[0].ts : now - DAY_S;
    const x0 = Math.max(now - DAY_S, first - Math.max(60, (now - first) * 0.05));
    const span = now - x0, plotH = H - TOP - BAND - AXIS - 4;
    const sx = (t) => LEFT + (Math.max(t, x0) - x0) / span * (W - LEFT - RIGHT);
    const sy = (b) => TOP + (1 - b / 100) * plotH;
    const s = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "history",
      "data-points": points.length});
    for (const b of [0, 25, 50, 75, 100]) {
      s.append(svg("line", {class: "grid", x1: LEFT, x2: W - RIGHT, y1: sy(b), y2: sy(b)}),
        svg("text", {class: "axis", x: LEFT - 4, y: sy(b) + 4, "text-anchor": "end"}, `${b}%`));
    }
    const step = [60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600].find((s) => span / s <= 8) || DAY_S;
    for (let t = Math.ceil(x0 / step) * step; t <= now; t += step) {
      const x = sx(t);
      s.append(svg("line", {class: "grid", x1: x, x2: x, y1: TOP, y2: H - AXIS}),
        svg("text", {class: "axis", x, y: H - 4, "text-anchor": "middle"},
          new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"})));
    }
    // status as a band of segments, each lasting until the next point
    const bandY = H - AXIS - BAND;
    points.forEach((p, i) => {
      const end = i + 1 < points.length ? points[i + 1].ts : now;
      if (end < x0) return;
      const status = String(p.status || "unknown").toLowerCase();
      const r = svg("rect", {class: `band s-${status}`, x: sx(p.ts), y: bandY,
        width: Math.max(1, sx(end) - sx(p.ts)), height: BAND,
        fill: STATUS_COLOURS[status] || "#bdbdbd"});
      r.append(svg("title", {}, `${status} from ${new Date(p.ts * 1000).toLocaleString()}`));
      s.append(r);
    });
    const battery = points.filter((p) => typeof p.battery_level === "number" && p.ts >= x0);
    if (battery.length) {
      // steps, not slopes: a reading holds until the next one
      const pts = battery.flatMap((p, i) => {
        const x = sx(p.ts).toFixed(1), y = sy(p.battery_level).toFixed(1);
        return i ? [`${x},${sy(battery[i - 1].battery_level).toFixed(1)}`, `${x},${y}`] : [`${x},${y}`];
      });
      pts.push(`${sx(now).toFixed(1)},${sy(battery[battery.length - 1].battery_level).toFixed(1)}`);
      s.append(svg("polyline", {class: "battery-line", points: pts.join(" ")}));
    } else {
      s.append(svg("text", {class: "axis", x: W / 2, y: H / 2, "text-anchor": "middle"},
        "no battery reading in the last 24 h"));
    }
    return s;
  }

  function legend(points) {
    const ul = el("ul", {class: "legend"});
    ul.append(el("li", {class: "battery"}, "battery %"));
    for (const status of new Set(points.map((p) => String(p.status || "unknown").toLowerCase()))) {
      const li = el("li", {}, status);
      const swatch = el("span", {class: "swatch"});
      swatch.style.background = STATUS_COLOURS[status] || "#bdbdbd";
      li.prepend(swatch);
      ul.append(li);
    }
    return ul;
  }

  // -- events and commands ------------------------------------------------------------------
  function renderEvents() {
    const list = [...page.events.values()].sort((a, b) =>
      ((a.task_time || "") < (b.task_time || "") ? 1 : -1)).slice(0, EVENTS);
    document.querySelector("#robot-events tbody").replaceChildren(
      ...list.map((e) => eventRow(e, false)));
  }

  function when(epoch) {
    return typeof epoch === "number" ? new Date(epoch * 1000).toLocaleString() : "";
  }

  function renderTasks(tasks) {
    document.querySelector("#robot-tasks tbody").replaceChildren(...tasks.map((t) => {
      const tr = el("tr", {"data-task": t.task_id || t.task_name || ""});
      tr.append(el("td", {class: "task"}, t.task_name || t.task_id || ""),
        el("td", {class: `task-status t-${String(t.task_status || "").toLowerCase()}`}, t.task_status || ""),
        el("td", {}, when(t.task_time)), el("td", {}, when(t.ts)),
        el("td", {class: "detail"}, t.remark || ""));
      return tr;
    }));
  }

  function commands(sn) {
    const host = document.getElementById("robot-commands");
    host.querySelectorAll("form").forEach((f) => f.remove());
    if (!page.me || !page.me.operator) return;  // a viewer gets no buttons at all
    // The Pudu commands a robot takes and their arguments: /console/me's robot_commands
    // (bridge/pudu/command_catalogue.py, the catalogue the gateway runs).
    for (const c of page.me.robot_commands || []) {
      const form = el("form", {class: "command", "data-command": c.name});
      const inputs = c.args.map((a) => {
        const i = el("input", {name: a.key, type: a.type, placeholder: a.label, "aria-label": a.label});
        if (a.value) i.value = a.value;
        return i;
      });
      const labelled = inputs.map((i) => {
        const label = el("label", {}, `${i.getAttribute("aria-label")} `);
        label.append(i);
        return label;
      });
      const button = el("button", {type: "submit", class: "cmd", "data-command": c.name}, c.label);
      const out = el("div", {class: "cmd-out", role: "status"});
      form.append(...labelled, button, out);
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const args = {};
        for (const i of inputs) args[i.name] = i.type === "number" ? Number(i.value) : i.value;
        sendCommand(`/robots/${encodeURIComponent(sn)}/commands`,
          {command: c.name, args, timeout: 10}, out, button);
      });
      host.append(form);
    }
  }

  async function refresh() {
    const sn = page.sn;
    if (!sn) return;
    const now = Date.now() / 1000;
    try {
      const [robot, points, tasks] = await Promise.all([
        getJson(`/robots/${encodeURIComponent(sn)}`), history(sn, Math.floor(now - DAY_S)),
        getJson(`/robots/${encodeURIComponent(sn)}/tasks?limit=10`)]);
      if (sn !== page.sn) return;
      renderTasks(tasks.items);
      document.getElementById("robot-summary").textContent =
        `${robot.org_id || ""} · ${robot.status || "unknown"} · battery ${robot.battery_level ?? "–"} %` +
        ` · ${robot.charge_state || ""} · map ${robot.map_name || "–"}`;
      const fig = document.getElementById("robot-chart");
      fig.querySelector("svg")?.remove();
      fig.querySelector(".legend")?.remove();
      fig.append(chart(points, now), legend(points));
      const since = points.length && points[0].ts > now - DAY_S
        ? ` (history since ${new Date(points[0].ts * 1000).toLocaleString()})` : "";
      fig.querySelector("figcaption").textContent = `Battery and status, last 24 h${since}`;
    } catch (err) {
      document.getElementById("robot-summary").textContent = String(err);
    }
  }

  async function open(sn) {
    page.sn = sn;
    page.events.clear();
    const section = document.getElementById("robot-page");
    section.hidden = false;
    document.getElementById("robot-sn").textContent = sn;
    document.querySelector("#robot-events tbody").replaceChildren();
    document.querySelector("#robot-tasks tbody").replaceChildren();
    commands(sn);
    clearInterval(page.timer);
    page.timer = setInterval(refresh, REFRESH_MS);
    await refresh();
    try {
      const body = await getJson(`/robots/${encodeURIComponent(sn)}/events?limit=${EVENTS}`);
      if (sn === page.sn) robotPage.onEvents(body.items);
    } catch (err) { /* the summary line shows what failed */ }
    section.scrollIntoView();
  }

  function close() {
    page.sn = null;
    clearInterval(page.timer);
    document.getElementById("robot-page").hidden = true;
  }

  function route() {
    const m = location.hash.match(/^#robot\/(.+)$/);
    if (m) open(decodeURIComponent(m[1]));
    else close();
  }

  const robotPage = {
    start(me) {
      page.me = me;
      window.addEventListener("hashchange", route);
      document.getElementById("robot-close").addEventListener("click", (e) => {
        e.preventDefault();
        location.hash = "";
      });
      route();
    },
    onEvents(items) {
      let mine = false;
      for (const e of items) {
        if (e.robot_sn === page.sn) {
          page.events.set(e.event_id, e);
          mine = true;
        }
      }
      if (mine) renderEvents();
    },
  };

  return robotPage;
})();
