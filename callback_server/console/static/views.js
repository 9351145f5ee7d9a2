// Which part of the console is on screen, read from the address: #view/<name> shows one view
// (a bookmark or a link from a colleague opens it), no view name shows every part at once.
const VIEWS = {
  attention: "attention", alerts: "alerts-section", fleet: "fleet",
  events: "events-section", gateways: "gateways-section", floors: "floor-section",
};

export function currentView() {
  const m = location.hash.match(/^#view\/([a-z]+)$/);
  return m && VIEWS[m[1]] ? m[1] : "";
}

function show() {
  const name = currentView();
  const main = document.querySelector("main");
  if (name) main.dataset.view = name; else delete main.dataset.view;
  for (const [view, id] of Object.entries(VIEWS)) {
    document.getElementById(id).toggleAttribute("data-view-on", view === name);
  }
  for (const a of document.querySelectorAll("#views a")) {
    if (a.dataset.view === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

window.addEventListener("hashchange", show);
show();
