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

function renderBars(probabilities) {
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
    const value = document.createElement("span");
    value.className = "bar-value";
    value.dataset.class = key;
    value.textContent = `${(100 * p).toFixed(1)}%`;
    bars.append(name, track, value);
  }
}

function render(result, file) {
  $("predicted-class").textContent = result.label;
  $("predicted-class").dataset.class = result.class;
  renderBars(result.probabilities);
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
  $("model-info").textContent =
    `Model ${m.version} (${m.backend}, ${m.image_size}x${m.image_size} input, covid-cxr ${m.covid_cxr_version})`;
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
  }).catch(() => showError("The server does not answer /health."));
}

setUp();
loadModelCard();
