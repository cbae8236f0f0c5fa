// The demo page: it calls the API as any client does and shows what the API answers, errors in its words.
"use strict";

const $ = (id) => document.getElementById(id);
let served = null; // {name, version, explain, untrained}

function show(id, on) { $(id).hidden = !on; }

function showError(message) {
  $("error").textContent = message;
  show("error", true);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return `${response.status}: ${body.error}`;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}`;
}

async function findModel() {
  const line = $("model-line");
  try {
    const response = await fetch("/models");
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    const mine = body.models.filter((m) => m.name === body.default_model && m.state === "ready");
    const latest = mine.sort((a, b) => b.version - a.version)[0];
    if (!latest) {
      line.textContent = "No model is ready yet; reload in a moment.";
      line.dataset.state = "none";
      return;
    }
    const meta = latest.metadata;
    served = {
      name: latest.name,
      version: latest.version,
      explain: Boolean(meta.outputs && meta.outputs.attention),
      untrained: Boolean(meta.untrained),
    };
    line.textContent = `Model ${served.name}, version ${served.version} (${meta.arch}, ${meta.num_classes} classes, `
      + (latest.engine
        ? `${latest.engine.precision} on ${latest.engine.name}, chosen by ${latest.engine.chosen_by})`
        : `${meta.precision} on ${latest.provider})`)
      + (served.explain ? "" : ". It has no attention output, so only its answers are shown "
        + "(export it with deepvit export --explain to see where it looks).");
    line.dataset.state = "ready";
    show("untrained", served.untrained);
  } catch (err) {
    line.textContent = "The server's model list could not be read.";
    showError(`Could not read /models: ${err.message}`);
  }
}

function renderPredictions(predictions) {
  const list = $("predictions");
  list.replaceChildren();
  for (const p of predictions) {
    const item = document.createElement("li");
    item.dataset.classId = String(p.class_id);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(100 * p.score).toFixed(1)}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(0.5, 100 * p.score)}%`;
    bar.setAttribute("role", "presentation");
    item.append(label, score, bar);
    list.append(item);
  }
}

async function classify(file) {
  show("error", false);
  if (!served) await findModel();
  if (!served) { showError("No model is ready to answer yet; retry in a moment."); return; }
  $("preview").src = URL.createObjectURL(file);
  const route = served.explain ? "/explain" : "/classify";
  const query = new URLSearchParams({ top_k: "5", model: served.name, version: String(served.version) });
  show("busy", true);
  try {
    const response = await fetch(`${route}?${query}`, {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream", Accept: "application/json" },
      body: file,
    });
    if (!response.ok) { show("result", false); showError(await errorText(response)); return; }
    const body = await response.json();
    renderPredictions(body.predictions);
    show("overlay-figure", Boolean(body.overlay_png));
    if (body.overlay_png) $("overlay").src = `data:image/png;base64,${body.overlay_png}`;
    $("answered-by").textContent = `Answered by ${body.model.name} version ${body.model.version}`
      + (served.untrained ? " (untrained: random weights)" : "");
    show("result", true);
  } catch (err) {
    showError(`The request failed: ${err.message}`);
  } finally {
    show("busy", false);
  }
}

function init() {
  findModel();
  $("file").addEventListener("change", (e) => { if (e.target.files.length) classify(e.target.files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", init);
