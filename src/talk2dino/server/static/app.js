// talk2dino web page: plain JavaScript, no build step, talks to the JSON API of the same server.
//
// Everything drawn here was drawn by the server with talk2dino.render (one implementation for the CLI, the
// API and this page): the overlay arrives at opacity 1 and the slider fades it over the photo (CSS opacity is
// the same blend, (1 - a) * image + a * colour); legend colours come from the answer; the label under the
// cursor is read from the palette PNG of the label map, whose colours are the legend's.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, photoUrl: null, answer: null, labelPixels: null, labelWidth: 0, labelHeight: 0,
                colorToLabel: new Map(),
                // Progress estimate: the server's measured seconds per new image (/healthz), and the last
                // answer's time when the same file is sent again (its features are cached: labels-only change).
                secondsPerImage: null, secondsCached: null, lastFile: null };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message) { $("status").textContent = message; }

async function loadEstimate() {
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    if (response.ok && health.queue && health.queue.seconds_per_request) {
      state.secondsPerImage = health.queue.seconds_per_request;
    }
  } catch { /* no estimate: the page shows the elapsed time only */ }
}

function estimateText(sameFile) {
  const estimate = sameFile && state.secondsCached !== null ? state.secondsCached : state.secondsPerImage;
  if (estimate === null) return "";
  return estimate < 1 ? " (usually under 1 s)" : ` (usually about ${estimate.toFixed(0)} s)`;
}

// The spinner with the elapsed seconds and the estimate; returns the function that stops it.
function startProgress(sameFile) {
  const started = performance.now();
  const suffix = estimateText(sameFile);
  const tick = () => setStatus(`segmenting… ${((performance.now() - started) / 1000).toFixed(1)} s${suffix}`);
  tick();
  $("progress").hidden = false;
  const timer = setInterval(tick, 100);
  return () => { clearInterval(timer); $("progress").hidden = true; };
}

async function loadExample(button) {
  showError("");
  try {
    const response = await fetch(button.dataset.src);
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const blob = await response.blob();
    const name = button.dataset.src.split("/").pop();
    chooseFile(new File([blob], name, { type: blob.type }));
    $("labels").value = button.dataset.labels;
    $("form").requestSubmit();
  } catch (err) {
    showError(`cannot load the example (${err.message})`);
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    const loaded = info.loaded;
    $("model-name").textContent = `model ${loaded.name} · ${loaded.device} · ${loaded.dtype}`;
    $("background").checked = Boolean(loaded.defaults.background);
    $("pamr").checked = Boolean(loaded.defaults.pamr);
    $("labels").title = `at most ${info.limits.max_labels} labels`;
  } catch (err) {
    $("model-name").textContent = `model information unavailable (${err.message})`;
  }
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("drop-text").textContent = `${file.name} (${(file.size / 1024).toFixed(1)} KB)`;
  showError("");
}

function setupDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) chooseFile(file);
  });
}

async function segment(event) {
  event.preventDefault();
  showError("");
  if (!state.file) { showError("Choose or drop an image first."); return; }
  const labels = $("labels").value.trim();
  if (!labels) { showError("Type at least one label, e.g. cat, sofa, window."); return; }
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("labels", labels);
  form.append("background", $("background").checked);
  form.append("pamr", $("pamr").checked);
  form.append("label_png", "true");
  form.append("overlay", "true");
  form.append("alpha", "1");  // faded by the opacity slider
  form.append("heatmaps", $("heatmaps").checked);
  form.append("attention", $("attention").checked);
  $("submit").disabled = true;
  const file = state.file;
  const stopProgress = startProgress(file === state.lastFile);
  const started = performance.now();
  try {
    const response = await fetch("/v1/segment", { method: "POST", body: form });
    let answer;
    try { answer = await response.json(); } catch { answer = { error: response.statusText }; }
    if (!response.ok) throw new Error(`${response.status}: ${answer.error || response.statusText}`);
    await render(answer);
    const seconds = (performance.now() - started) / 1000;
    if (answer.timings.cached_features) state.secondsCached = seconds;
    else if (answer.timings.batch_size === 1) state.secondsPerImage = seconds;
    state.lastFile = file;
    stopProgress();
    setStatus(`done in ${seconds.toFixed(1)} s${answer.timings.cached_features ? " (image features reused)" : ""}`);
  } catch (err) {
    stopProgress();
    showError(err.message);
    setStatus("");
  } finally {
    $("submit").disabled = false;
  }
}

function loadImage(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot display image"));
    img.src = src;
  });
}

async function render(answer) {
  state.answer = answer;
  const overlaySrc = `data:image/png;base64,${answer.overlay_png}`;
  const labelSrc = `data:image/png;base64,${answer.label_png}`;
  // Browsers that cannot show the original format (e.g. TIFF) still get the overlay as the base picture.
  await loadImage($("photo"), state.photoUrl).catch(() => loadImage($("photo"), overlaySrc));
  await loadImage($("overlay"), overlaySrc);
  $("heat").hidden = true;

  // The label map, read back pixel by pixel for the hover readout.
  const labelImg = await loadImage(new Image(), labelSrc);
  const canvas = document.createElement("canvas");
  canvas.width = labelImg.naturalWidth;
  canvas.height = labelImg.naturalHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(labelImg, 0, 0);
  state.labelPixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  state.labelWidth = canvas.width;
  state.labelHeight = canvas.height;
  state.colorToLabel = new Map(answer.labels.map((entry) => [entry.color.join(","), entry]));

  renderLegend(answer);
  renderViews(answer);
  renderAttention(answer);
  const stem = (state.file.name.replace(/\.[^.]+$/, "") || "image");
  $("download").href = labelSrc;
  $("download").download = `${stem}_labels.png`;
  const t = answer.timings;
  $("timings").textContent = `server ${t.total.toFixed(2)} s (queue ${t.queue.toFixed(2)}, image ${t.embed_image.toFixed(2)}, batch of ${t.batch_size})`;
  $("range").textContent = answer.heatmap_range
    ? `heat-map scale ${answer.heatmap_range[0].toFixed(3)} – ${answer.heatmap_range[1].toFixed(3)} (sigmoid score)` : "";
  $("result").hidden = false;
  applyOpacity();
}

function renderLegend(answer) {
  const legend = $("legend");
  legend.replaceChildren();
  for (const entry of answer.labels) {
    const item = document.createElement("li");
    item.dataset.index = entry.index;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${entry.color.join(",")})`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.name;
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = `${(entry.share * 100).toFixed(1)} %`;
    item.append(swatch, name, share);
    item.title = `${entry.pixels} pixels`;
    item.addEventListener("click", () => {
      const option = [...$("view").options].find((o) => o.value === `heat:${entry.index}`);
      $("view").value = option ? option.value : "overlay";
      applyView();
    });
    legend.append(item);
  }
}

function renderViews(answer) {
  const view = $("view");
  view.replaceChildren(new Option("overlay", "overlay"));
  for (const map of answer.heatmaps || []) view.append(new Option(`heat map: ${map.name}`, `heat:${map.index}`));
  view.value = "overlay";
  applyView();
}

function renderAttention(answer) {
  const grid = $("attention-grid");
  grid.replaceChildren();
  for (const head of answer.attention || []) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${head.png}`;
    img.alt = `attention head ${head.head}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `head ${head.head}`;
    figure.append(img, caption);
    grid.append(figure);
  }
  $("attention-section").hidden = !(answer.attention && answer.attention.length);
}

function applyView() {
  const value = $("view").value;
  const heat = $("heat");
  for (const item of $("legend").children) item.classList.toggle("selected", value === `heat:${item.dataset.index}`);
  if (value.startsWith("heat:") && state.answer) {
    const index = Number(value.slice(5));
    const map = (state.answer.heatmaps || []).find((m) => m.index === index);
    heat.src = `data:image/png;base64,${map.png}`;
    heat.hidden = false;
    $("overlay").hidden = true;
  } else {
    heat.hidden = true;
    $("overlay").hidden = false;
  }
  applyOpacity();
}

function applyOpacity() {
  const opacity = $("opacity").value;
  $("overlay").style.opacity = opacity;
  $("heat").style.opacity = opacity;
}

function readout(event) {
  if (!state.labelPixels) return;
  const box = $("stage").getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * state.labelWidth);
  const y = Math.floor(((event.clientY - box.top) / box.height) * state.labelHeight);
  if (x < 0 || y < 0 || x >= state.labelWidth || y >= state.labelHeight) return;
  const offset = (y * state.labelWidth + x) * 4;
  const key = `${state.labelPixels[offset]},${state.labelPixels[offset + 1]},${state.labelPixels[offset + 2]}`;
  const entry = state.colorToLabel.get(key);
  $("readout").textContent = entry ? `${entry.name} (${(entry.share * 100).toFixed(1)} % of the image)` : "";
}

document.addEventListener("DOMContentLoaded", () => {
  setupDrop();
  $("form").addEventListener("submit", segment);
  $("opacity").addEventListener("input", applyOpacity);
  $("view").addEventListener("change", applyView);
  $("stage").addEventListener("mousemove", readout);
  $("stage").addEventListener("mouseleave", () => { $("readout").textContent = "hover the image to read its label"; });
  for (const button of document.querySelectorAll("#examples .example")) {
    button.addEventListener("click", () => loadExample(button));
  }
  loadModel();
  loadEstimate();
});
