// The page: pick or drop one X-ray, POST it to /predict, draw the probabilities and the heatmap.
"use strict";

const $ = (id) => document.getElementById(id);
const NAMES = { covid: "COVID-19", pneumonia: "Pneumonia", normal: "Normal" };
let previewUrl = null;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

// The bars; with a threshold rule, a mark on the thresholded class's bar where the rule puts its line.
function renderBars(probabilities, decision) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const [key, p] of Object.entries(probabilities)) {
    const name = document.createElement("span");
    name.textContent = NAMES[key] || key;
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = `bar-fill ${key}`;
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    if (decision && decision.threshold !== null && key === decision.positive_class) {
      const mark = document.createElement("div");
      mark.className = "bar-threshold";
      mark.dataset.threshold = String(decision.threshold);
      mark.style.left = `${(100 * Math.min(decision.threshold, 1)).toFixed(1)}%`;
      mark.title = `threshold ${(100 * decision.threshold).toFixed(1)}% (${decision.rule})`;
      track.append(mark);
    }
    const value = document.createElement("span");
    value.className = "bar-value";
    value.dataset.class = key;
    value.textContent = `${(100 * p).toFixed(1)}%`;
    bars.append(name, track, value);
  }
}

// "int8 (agreement with fp32 on 300 images: 99.7% (95% CI 98.1-99.9%), 299/300, decided by argmax)", or the
// precision alone. The server words the figure (saturation.agreement_words), as predict prints it.
function describePrecision(m) {
  if (!m.int8) return m.precision;
  const check = !m.int8.agreement ? "not checked against fp32"
    : `agreement with fp32 on ${m.int8.check_images} images: ${m.int8.agreement}` +
      (m.int8.decision_rule ? `, decided by ${m.int8.decision_rule}` : "");
  return `int8 (${check})`;
}

function render(result, file) {
  $("predicted-class").textContent = result.label;
  $("predicted-class").dataset.class = result.class;
  $("decision-rule").textContent = result.decision.text;
  $("decision-rule").dataset.rule = result.decision.rule;
  renderBars(result.probabilities, result.decision);
  if (result.heatmap) {
    $("heatmap").src = `data:image/png;base64,${result.heatmap.png_base64}`;
    $("heatmap-caption").textContent =
      `Grad-CAM for ${NAMES[result.heatmap.class] || result.heatmap.class}, over the image as the network sees it`;
    $("heatmap-figure").hidden = false;
  } else {
    $("heatmap-figure").hidden = true;
  }
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  $("preview-figure").hidden = true;
  if (file.type === "image/png" || file.type === "image/jpeg") {
    previewUrl = URL.createObjectURL(file);
    $("preview").src = previewUrl;
    $("preview-figure").hidden = false;
  }
  const m = result.model;
  $("model-info").textContent = `Model ${m.version} (${m.backend}, ${describePrecision(m)}, ` +
    `${m.image_size}x${m.image_size} input, covid-cxr ${m.covid_cxr_version})`;
  $("result").hidden = false;
}

async function classify(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("status").textContent = `Classifying ${file.name}…`;
  const form = new FormData();
  form.append("file", file);
  form.append("heatmap", $("heatmap-toggle").checked && !$("heatmap-toggle").disabled ? "true" : "false");
  let response;
  try {
    response = await fetch("/predict", { method: "POST", body: form });
  } catch (err) {
    showError(`The server cannot be reached (${err.message}).`);
    return;
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : "";
    showError(`The server refused the image (${response.status}): ${detail}`);
    return;
  }
  $("status").textContent = `Result for ${file.name}`;
  render(body, file);
}

// The server renders the card (raw HTML in it escaped); a server without one answers 404 and the section stays hidden.
function loadModelCard() {
  fetch("/model-card.html").then((r) => (r.ok ? r.text() : null)).then((html) => {
    if (!html) return;
    $("model-card").innerHTML = html;
    $("model-card-section").hidden = false;
  }).catch(() => {});
}

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) classify(file);
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.remove("dragging"); });
  }
  zone.addEventListener("drop", (event) => {
    const file = event.dataTransfer.files[0];
    if (file) classify(file);
  });
  fetch("/health").then((r) => r.json()).then((health) => {
    if (!health.heatmaps) {
      $("heatmap-toggle").checked = false;
      $("heatmap-toggle").disabled = true;
    }
    const m = health.model;
    const served = $("served-model");
    served.textContent = `Serving ${m.version} on ${m.backend}, ${describePrecision(m)}; ${health.decision.text}.`;
    served.classList.toggle("int8", Boolean(m.int8));
    served.dataset.precision = m.precision;
  }).catch(() => showError("The server does not answer /health."));
}

setUp();
loadModelCard();
