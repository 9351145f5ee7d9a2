// Sign-in: trade the key for a session cookie, then load "/" again (now the console).
document.getElementById("signin").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const field = document.getElementById("key");
  const error = document.getElementById("error");
  error.textContent = "";
  try {
    const r = await fetch("/console/session", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({key: field.value}),
    });
    field.value = "";
    if (r.ok) { location.replace("/"); return; }
    const body = await r.json().catch(() => ({}));
    error.textContent = body.message || `sign-in failed (${r.status})`;
  } catch (e) {
    error.textContent = `sign-in failed: ${e}`;
  }
});
