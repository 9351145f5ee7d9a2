// What the console and the robot page share, as an ES module (no globals): elements built
// with text only (never HTML), times in words, a command sent and its answer shown, and an
// event's row.

export function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

export function fmtAge(s) {
  if (!Number.isFinite(s)) return "never";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function fmtEpoch(s) {
  return typeof s === "number" ? new Date(s * 1000).toLocaleString() : "";
}

// A state-changing request with the session cookie (the browser adds this Origin).
export function post(url, body) {
  return fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

// Send a command and show its answer, or why there is none (timeout, refusal), in ``out``.
// A command's answer in plain words: one row per value (nested keys joined by "."), yes/no
// for flags, and the raw JSON behind a toggle for whoever needs it.
function flatten(value, prefix, rows) {
  if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, rows);
  } else {
    const when = typeof value === "number" && /(^|_)(time|ts|at|timestamp)$/.test(prefix) && value > 1e9 && value < 1e10;
    const shown = when ? fmtEpoch(value) : value === true ? "yes" : value === false ? "no" : value === null ? "—"
      : Array.isArray(value) ? value.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", ")
      : typeof value === "object" ? "—" : String(value);
    rows.push([prefix.replaceAll("_", " "), shown]);
  }
  return rows;
}

function showAnswer(out, command, value) {
  const failed = value && typeof value === "object" && value.status === "error";
  const table = el("table", {class: "kv"});
  const caption = el("caption", {}, `${command}: ${failed ? "the gateway answered with an error" : "answered"}`);
  const body = el("tbody");
  for (const [k, v] of flatten(value, "", [])) {
    const tr = el("tr");
    tr.append(el("th", {scope: "row"}, k || "answer"), el("td", {}, v));
    body.append(tr);
  }
  table.append(caption, body);
  const raw = el("details", {class: "raw"});
  raw.append(el("summary", {}, "raw answer"), el("pre", {}, JSON.stringify(value, null, 1)));
  out.replaceChildren(table, raw);
}

export async function sendCommand(url, body, out, button) {
  button.disabled = true;
  out.className = "cmd-out pending";
  out.textContent = `${body.command}: waiting up to ${body.timeout} s…`;
  try {
    const r = await post(url, body);
    const answer = await r.json().catch(() => ({message: `HTTP ${r.status}`}));
    out.className = `cmd-out ${r.ok && answer.status !== "error" ? "ok" : r.status === 504 ? "timeout" : "failed"}`;
    if (r.ok) showAnswer(out, body.command, answer.result ?? answer);
    else out.textContent =
      `${body.command}: ${r.status === 504 ? "timed out" : "refused"} (${r.status}): ${answer.message || ""}`;
  } catch (err) {
    out.className = "cmd-out failed";
    out.textContent = `${body.command}: ${err}`;
  } finally {
    button.disabled = false;
  }
}

export function eventRow(e, withRobot) {
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
