"use strict";
// The experts page: each data expert's share of the data, live routing of typed class names, the report.

const $ = (id) => document.getElementById(id);

function expertCard(expert) {
  const card = el("article", { class: "card", "data-expert": expert.id });
  card.append(el("h3", {}, expert.id));
  const samples = expert.samples === null || expert.samples === undefined ? "?" : expert.samples.toLocaleString();
  card.append(el("p", { class: "muted" }, `${samples} training pairs in ${expert.fine_clusters} fine clusters`));
  const terms = el("p", { class: "terms" });
  for (const term of expert.terms) terms.append(el("span", {}, term));
  card.append(terms);
  const grid = el("div", { class: "thumbs" });
  for (const example of expert.examples) {
    const figure = el("figure", { title: example.caption });
    figure.append(el("img", { src: example.thumbnail, alt: example.caption }));
    figure.append(el("figcaption", {}, example.caption));
    grid.append(figure);
  }
  card.append(grid);
  const tasks = Object.entries(expert.accuracy);
  if (tasks.length) {
    const text = tasks.map(([task, value]) => `${task} ${(100 * value).toFixed(1)}`).join(" · ");
    card.append(el("p", { class: "muted accuracy" }, `accuracy: ${text}`));
  }
  return card;
}

function reportTable(report) {
  const table = $("report-table");
  const head = el("tr");
  for (const name of ["model", ...report.tasks, "compute (samples)", "learning (s)"]) head.append(el("th", {}, name));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const row of report.rows) {
    const tr = el("tr", { "data-model": row.model });
    tr.append(el("td", {}, row.model));
    for (const task of report.tasks) {
      const value = row.accuracy[task];
      tr.append(el("td", {}, value === undefined ? "–" : (100 * value).toFixed(1)));
    }
    tr.append(el("td", {}, row.compute_samples === null ? "–" : row.compute_samples.toLocaleString()));
    tr.append(el("td", {}, row.train_seconds === null ? "–" : row.train_seconds.toFixed(0)));
    body.append(tr);
  }
  table.hidden = report.rows.length === 0;
}

function reportFiles(files) {
  const links = $("report-links");
  for (const name of files) {
    if (links.childNodes.length) links.append(" · ");
    links.append(el("a", { href: `/v1/report/${name}` }, name));
  }
  for (const name of files.filter((f) => f.endsWith(".png"))) {
    $("report-images").append(el("img", { src: `/v1/report/${name}`, alt: name }));
  }
}

async function loadExplorer() {
  const data = await requestJSON("/v1/explorer");
  $("experts").replaceChildren(...data.experts.map(expertCard));
  $("experts-status").textContent = `${data.experts.length} data experts`;
  reportTable(data.report);
  reportFiles(data.report.files);
  $("report-status").textContent = data.report.rows.length ? "" : "No evaluation report in this run yet (mode-ray eval).";
}

let pending = null;
async function route() {
  const labels = splitLabels($("route-labels").value);
  showError($("route-error"), "");
  if (labels.length < 2) {
    $("route-weights").replaceChildren();
    $("route-labels-table").hidden = true;
    return;
  }
  try {
    const answer = await requestJSON("/v1/route", { candidate_labels: labels, routing: $("route-method").value });
    renderBars($("route-weights"), Object.entries(answer.expert_weights), "expert");
    const body = $("route-labels-table").tBodies[0];
    body.replaceChildren();
    for (const label of answer.labels) {
      const tr = el("tr", { "data-label": label.label });
      tr.append(el("td", {}, label.label), el("td", {}, String(label.nearest_fine)));
      tr.append(el("td", {}, label.expert), el("td", {}, label.distance.toFixed(3)));
      body.append(tr);
    }
    $("route-labels-table").hidden = false;
  } catch (err) {
    showError($("route-error"), err.message);
  }
  document.body.dataset.routed = String(Number(document.body.dataset.routed || 0) + 1);
}

function scheduleRoute() {
  clearTimeout(pending);
  pending = setTimeout(route, 250);
}

$("route-labels").addEventListener("input", scheduleRoute);
$("route-method").addEventListener("change", scheduleRoute);
requestJSON("/v1/experts")
  .then((info) => fillRouting($("route-method"), info))
  .then(loadExplorer)
  .then(() => { document.body.dataset.ready = "1"; })
  .catch((err) => { $("experts-status").textContent = ""; showError($("route-error"), err.message); });
