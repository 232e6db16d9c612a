// The cxr page: sends dropped X-rays to /v1/predict and shows each answer; the model card from /v1/model.
"use strict";

const state = { card: null, key: sessionStorage.getItem("cxr-api-key") || "" };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function headers() {
  return state.key ? { Authorization: "Bearer " + state.key } : {};
}

async function call(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({ error: "bad_response", detail: response.statusText }));
  if (response.status === 401) document.getElementById("key-form").hidden = false;
  if (!response.ok) throw new Error(body.detail || body.error || response.statusText);
  return body;
}

const pct = (x) => (100 * x).toFixed(1) + "%";
const num = (x) => (x === null || x === undefined ? "n/a" : x.toFixed(3));

function renderCard(card) {
  const box = document.getElementById("card");
  const point = card.operating_point;
  box.replaceChildren(el("h2", {}, "Model"));
  const facts = el("dl");
  const fact = (name, value) => facts.append(el("dt", {}, name), el("dd", {}, value));
  const multiLabel = card.outputs.activation === "sigmoid";
  fact(multiLabel ? "Findings" : "Classes", card.class_names.join(", "));
  fact("Backbone", `${card.backbone} at ${card.img_size} px`);
  fact("Decision", multiLabel ? "each finding is called when its calibrated probability reaches its threshold"
                              : card.decision_rule);
  fact("Fitted on", point.fitted_on_description);
  fact("Model hash", card.model_sha256.slice(0, 16) + "...");
  box.append(facts);
  const training = card.training;
  if (training) {
    box.append(el("h3", {}, "Test metrics (95% CI)"), el("p", { class: "muted" }, "On " + training.evaluated_on + "."));
    const table = el("table");
    for (const name of ["sensitivity", "specificity", "auc_roc", "balanced_accuracy", "ppv", "npv", "mean_auc",
                        "mean_auc_pr", "mean sensitivity", "mean specificity"]) {
      if (!(name in training.metrics)) continue;
      const ci = training.confidence_intervals[name];
      table.append(el("tr", {}, el("th", {}, name.replaceAll("_", " ")), el("td", {}, num(training.metrics[name])),
                      el("td", {}, ci && ci[0] != null ? `${num(ci[0])} to ${num(ci[1])}` : "")));
    }
    box.append(table);
    // numbers that rest on few positives or negatives say so where they are shown
    for (const caution of (training.cautions || []).slice(0, 5)) {
      box.append(el("p", { class: "caution" }, "Caution: " + caution));
    }
    box.append(el("h3", {}, "Training data"));
    const counts = el("table");
    for (const [split, perClass] of Object.entries(training.counts || {})) {
      counts.append(el("tr", {}, el("th", {}, split),
                       el("td", {}, Object.entries(perClass).map(([c, n]) => `${c} ${n}`).join(", "))));
    }
    box.append(counts);
  } else {
    box.append(el("p", {}, "No test metrics: no summary.json of this model was found beside it."));
  }
  box.append(el("h3", {}, "Limits of use"));
  const limits = el("ul");
  for (const limit of card.limits) limits.append(el("li", {}, limit));
  box.append(limits, el("p", {}, card.intended_use));
}

function thresholdBar(p, threshold, title) {
  const bar = el("div", { class: "bar", title }, el("div", { class: "fill", style: `width: ${pct(p)}` }));
  if (threshold !== null) {
    bar.append(el("div", { class: "threshold", style: `left: calc(${pct(threshold)} - 1px)` }),
               el("span", { class: "threshold-label", style: `left: ${pct(threshold)}` }, "threshold"));
  }
  return bar;
}

// A multi-label answer: every finding, most probable first, with its bar and threshold; those called first.
function renderFindings(prediction) {
  const list = el("ul", { class: "findings" });
  for (const finding of prediction.findings) {
    list.append(el("li", { class: finding.positive ? "positive" : "negative", "data-finding": finding.name,
                           "data-probability": String(finding.probability) },
      el("span", { class: "finding-name" }, finding.name),
      el("span", { class: "finding-prob" },
         `${finding.probability.toFixed(3)} (threshold ${finding.threshold.toFixed(3)})`),
      thresholdBar(finding.probability, finding.threshold, `P(${finding.name}) against its threshold`)));
  }
  const called = prediction.positive_findings;
  return el("div", {},
    el("p", { class: "label " + (called.length ? "positive" : "negative"), "data-label": prediction.label },
       called.length ? called.join(", ") : "No finding called"),
    list);
}

// Above the label: the population check's notice when the X-ray is unlike the model's training images.
function populationNotice(prediction) {
  if (prediction.in_distribution === false) {
    return el("div", { class: "population-notice", role: "alert" },
      el("strong", {}, "This result is not reliable for this image."),
      ` It is unlike the X-rays the model was trained on (its population score is higher than ` +
      (prediction.population_percentile >= 100 ? "every validation image's"
        : `${prediction.population_percentile.toFixed(0)}% of the validation images'`) +
      `): it may come from another population (other ages, devices or views) or not be a chest X-ray.`);
  }
  if (prediction.in_distribution === null) {
    return el("p", { class: "population-unavailable" },
      "This model has no population check: it can't say whether this image is like its training images.");
  }
  return null;
}

function renderPrediction(file, prediction) {
  const card = state.card;
  const positive = prediction.positive_class;
  const p = prediction.probabilities[positive];
  const image = el("img", { alt: "uploaded X-ray " + prediction.filename, class: "xray" });
  const original = prediction.image || URL.createObjectURL(file);  // DICOM: the server renders it
  image.src = original;
  const isPositive = prediction.label === positive;
  const result = el("article", { class: "result", "data-filename": prediction.filename });
  const threshold = prediction.threshold;
  const bar = prediction.findings ? null : thresholdBar(p, threshold, `P(${positive}) against the threshold`);
  const details = prediction.findings ? renderFindings(prediction) : el("div", {},
    el("p", { class: "label " + (isPositive ? "positive" : "negative"), "data-label": prediction.label }, prediction.label),
    el("p", { class: "prob", "data-probability": String(p) },
       `P(${positive}) = ${p.toFixed(3)}` + (threshold !== null ? ` against threshold ${threshold.toFixed(3)}` : "")),
    bar,
    el("div", { class: "bar-legend" }, el("span", {}, "0"), el("span", {}, "1")),
    el("p", { class: "probs" }, Object.entries(prediction.probabilities)
       .map(([c, v]) => `${c} ${v.toFixed(3)}`).join(" · ")));
  const notice = populationNotice(prediction);
  if (notice) details.prepend(notice);
  if (prediction.warnings.length) {
    const list = el("ul", { class: "warnings" });
    for (const warning of prediction.warnings) list.append(el("li", {}, warning));
    details.append(list);
  }
  if (prediction.overlay) {
    const toggle = el("input", { type: "checkbox", class: "overlay-toggle" });
    toggle.addEventListener("change", () => {
      image.src = toggle.checked ? prediction.overlay : original;
      image.classList.toggle("overlay", toggle.checked);
    });
    details.append(el("label", { class: "toggle" }, toggle, " Show Grad-CAM: where the model found evidence for " +
                      (prediction.overlay_class || prediction.label)));
  }
  result.append(el("figure", {}, image, el("figcaption", {}, prediction.filename)), details);
  return result;
}

async function classify(files) {
  const status = document.getElementById("status");
  if (!files.length) return;
  status.className = "";
  status.textContent = `Classifying ${files.length} image${files.length > 1 ? "s" : ""}...`;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  try {
    const answer = await call("/v1/predict?explain=true", { method: "POST", body: form });
    const results = document.getElementById("results");
    answer.predictions.forEach((prediction, k) => results.prepend(prediction.detail && !prediction.label
      ? el("article", { class: "result refused", "data-filename": prediction.filename },
           el("p", { class: "warnings" }, `${prediction.filename}: ${prediction.detail}`))
      : renderPrediction(files[k], prediction)));
    status.textContent = `Done: ${files.length} image${files.length > 1 ? "s" : ""}.`;
  } catch (error) {
    status.className = "error";
    status.textContent = error.message;
  }
}

async function loadCard() {
  try {
    state.card = await call("/v1/model");
    renderCard(state.card);
  } catch (error) {
    document.getElementById("card").replaceChildren(el("h2", {}, "Model"), el("p", { class: "error" }, error.message));
  }
}

function setUp() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => { classify([...input.files]); input.value = ""; });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify([...event.dataTransfer.files]);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") input.click(); });
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = document.getElementById("key").value;
    sessionStorage.setItem("cxr-api-key", state.key);
    document.getElementById("key-form").hidden = true;
    loadCard();
  });
  loadCard();
}

setUp();
