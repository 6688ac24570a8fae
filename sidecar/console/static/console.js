// Sidecar console: progressive enhancement only (every page works without it).
// Copy buttons, the revoke dialog, showing the parts of the key form that apply, the MCP
// tools picker (the sidecar's own /console/tools/<upstream>), and forgetting a shown key.
"use strict";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");
  area.value = text; document.body.appendChild(area); area.select();
  try { document.execCommand("copy"); } finally { area.remove(); }
  return Promise.resolve();
}

document.addEventListener("click", (ev) => {
  const copy = ev.target.closest("[data-copy]");
  if (copy) {
    const src = document.getElementById(copy.dataset.copy);
    const status = copy.parentElement.querySelector(".copied") || document.querySelector(".copied");
    copyText(src.textContent).then(
      () => { if (status) status.textContent = "Copied to the clipboard."; },
      () => { if (status) status.textContent = "Could not copy: select the key and copy it by hand."; });
    return;
  }
  const opener = ev.target.closest("[data-dialog]");
  if (opener) {
    const dialog = document.getElementById(opener.dataset.dialog);
    if (dialog && dialog.showModal) { ev.preventDefault(); dialog.showModal(); dialog.querySelector("button").focus(); }
    return;
  }
  const closer = ev.target.closest("[data-close-dialog]");
  if (closer && closer.closest("dialog")) { ev.preventDefault(); closer.closest("dialog").close(); }
});

// Parts of the form shown only when a choice applies (data-when="name=value").
function syncWhen() {
  document.querySelectorAll("[data-when]").forEach((el) => {
    const [name, value] = el.dataset.when.split("=");
    const field = document.querySelector(`[name="${CSS.escape(name)}"]`);
    const chosen = field && field.tagName === "SELECT" ? field : document.querySelector(`input[name="${CSS.escape(name)}"]:checked`);
    el.hidden = !chosen || chosen.value !== value;
  });
}
document.addEventListener("change", syncWhen);
syncWhen();

// The MCP tools picker: the upstream's live tools/list, as the sidecar fetched it.
document.querySelectorAll("[data-tools-for]").forEach(async (list) => {
  const upstream = list.dataset.toolsFor;
  const status = list.parentElement.querySelector("[data-tools-status]");
  const have = new Set([...list.querySelectorAll("input")].map((i) => i.value));
  try {
    const resp = await fetch(`/console/tools/${encodeURIComponent(upstream)}`, { credentials: "same-origin" });
    const body = await resp.json();
    if (!resp.ok || !body.tools) throw new Error(body.error || resp.statusText);
    for (const tool of body.tools) {
      if (have.has(tool.allow)) continue;
      const label = document.createElement("label"); label.className = "inline";
      const box = document.createElement("input"); box.type = "checkbox"; box.name = `tool.${upstream}`; box.value = tool.allow;  // the name as a glob matching only it
      const name = document.createElement("code"); name.textContent = tool.name;
      label.append(box, " ", name);
      if (tool.description) { const d = document.createElement("small"); d.textContent = ` ${tool.description}`; label.append(d); }
      list.append(label);
    }
    status.textContent = `${body.tools.length} tools from ${upstream}'s tools/list. Tick the ones this key may call.`;
  } catch (err) {
    status.textContent = `Could not list the tools of ${upstream} (${err.message}): type their names below.`;
  }
});

// A shown-once key is blanked when the page is left (and not kept by the back/forward cache).
window.addEventListener("pagehide", () => {
  document.querySelectorAll("[data-secret]").forEach((el) => { el.textContent = "(hidden: shown once)"; });
});
