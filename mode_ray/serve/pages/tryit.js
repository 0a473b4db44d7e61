"use strict";
// The try-it page: an image and class names → POST / (the Hugging Face API shape, the same limits), the
// labels' scores, the expert weights the class names produced, and the request as curl and InferenceClient.

const $ = (id) => document.getElementById(id);
let image = null; // a data: URL; the API accepts it as it is

function setImage(dataUrl) {
  image = dataUrl;
  $("preview").src = dataUrl;
  $("preview").hidden = false;
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.readAsDataURL(file);
}

async function loadModels() {
  const info = await requestJSON("/v1/experts");
  for (const expert of info.experts) $("model").append(el("option", { value: expert.id }, expert.id));
  fillRouting($("routing"), info);
}

async function loadExamples() {
  const examples = await requestJSON("/v1/examples");
  $("examples-title").hidden = examples.length === 0;
  for (const example of examples) {
    const button = el("button", { type: "button", title: `${example.task}: ${example.answer}` });
    button.append(el("img", { src: example.image, alt: `${example.task} example` }));
    button.addEventListener("click", () => {
      setImage(example.image);
      $("labels").value = example.labels.join("\n");
    });
    $("examples").append(button);
  }
}

function requestBody(labels) {
  const model = $("model").value;
  const parameters = { candidate_labels: labels, model, return_expert_weights: true };
  if (model === "ensemble") parameters.routing = $("routing").value;
  return { inputs: image, parameters };
}

function snippets(body) {
  const url = new URL("/", window.location.href).href;
  const params = JSON.stringify(body.parameters);
  const shellSafe = params.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\$/g, "\\$").replace(/`/g, "\\`");
  $("curl").textContent = `curl -s ${url} -H 'Content-Type: application/json' \\\n`
    + `  -d "{\\"inputs\\": \\"$(base64 -w0 IMAGE.jpg)\\", \\"parameters\\": ${shellSafe}}"`;
  $("client").textContent = "from huggingface_hub import InferenceClient\n\n"
    + `client = InferenceClient(model=${JSON.stringify(url)})\n`
    + `client.zero_shot_image_classification("IMAGE.jpg", candidate_labels=${JSON.stringify(body.parameters.candidate_labels)})`;
  $("snippets").hidden = false;
}

function showRouting(answer) {
  const box = $("routing-box");
  if (!answer.expert_weights) { box.hidden = true; return; }
  const entries = Object.entries(answer.expert_weights).sort((a, b) => b[1] - a[1]);
  renderBars($("weights"), entries, "expert");
  const weights = entries.map(([, w]) => w);
  const entropy = -weights.filter((w) => w > 0).reduce((s, w) => s + w * Math.log(w), 0);
  const sure = weights.length > 1 ? 1 - entropy / Math.log(weights.length) : 1;
  $("router-summary").textContent = `${answer.routing} routing sent the task mostly to ${entries[0][0]} `
    + `(weight ${entries[0][1].toFixed(3)}); certainty ${sure.toFixed(2)} (1 − entropy / log experts).`;
  box.hidden = false;
}

async function classify() {
  showError($("error"), "");
  const labels = splitLabels($("labels").value);
  if (!image) { showError($("error"), "pick or drop an image first"); return; }
  const body = requestBody(labels);
  snippets(body);
  $("status").textContent = "Classifying…";
  const started = performance.now();
  try {
    const answer = await requestJSON("/", body);
    renderBars($("scores"), answer.predictions.map((p) => [p.label, p.score]), "label", 4);
    showRouting(answer);
    const elapsed = performance.now() - started;
    $("status").textContent = `${answer.model}: ${answer.predictions.length} labels in ${Math.round(elapsed)} ms`;
    document.body.dataset.resultMs = String(elapsed); // time to result: request, answer, bars drawn
    document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
  } catch (err) {
    $("scores").replaceChildren();
    $("routing-box").hidden = true;
    $("status").textContent = "No answer.";
    showError($("error"), err.message);
    document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
  }
}

function wireDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) readFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => { if (e.target.files.length) readFile(e.target.files[0]); });
}

wireDrop();
$("classify").addEventListener("click", classify);
Promise.all([loadModels(), loadExamples()])
  .then(() => {
    document.body.dataset.readyMs = String(performance.now()); // since navigation began
    document.body.dataset.ready = "1";
  })
  .catch((err) => showError($("error"), err.message));
