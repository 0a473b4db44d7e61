"use strict";
// Shared by the pages. Every text that comes from a request or from the run (labels, captions, errors) is set
// with textContent, never parsed as HTML: a label or caption with markup shows as text.

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function splitLabels(text) {
  return text.split(/[\n,]/).map((s) => s.trim()).filter((s) => s.length > 0);
}

// POST or GET JSON; a 4xx/5xx answer's own {"error": ...} message becomes the thrown error's message.
async function requestJSON(url, body = null) {
  const init = body === null ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(url, init);
  let payload = null;
  try { payload = await response.json(); } catch (e) { payload = null; }
  if (!response.ok) {
    const message = payload && payload.error ? payload.error : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return payload;
}

// One row per [name, value]: the name, a bar of value / max, the value; data-* attributes keep the exact
// numbers (for whoever reads the page, tests included).
function renderBars(container, entries, kind, digits = 3) {
  container.replaceChildren();
  const max = Math.max(1e-12, ...entries.map(([, v]) => v));
  for (const [name, value] of entries) {
    const row = el("div", { class: "bar-row", [`data-${kind}`]: name, "data-value": String(value) });
    row.append(el("span", { class: "name", title: name }, name));
    const bar = el("div", { class: "bar" });
    bar.style.width = `${(100 * value) / max}%`;
    row.append(bar, el("span", { class: "value" }, value.toFixed(digits)));
    container.append(row);
  }
}

// Opens on the routing whose ensemble the run's report found best, else the served default.
function fillRouting(select, info) {
  for (const method of ["reference", "calibrated"]) select.append(el("option", { value: method }, method));
  select.value = info.best_routing || info.routing.method;
}

function showError(node, message) {
  node.textContent = message;
  node.hidden = !message;
}
