// The faceid web app: a static page over the /v1 API (the same one other clients use). All user and server text
// goes into the page through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { identity: null, models: [] };

// ------------------------------------------------------------------ API key and requests
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("faceid-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("faceid-api-key", keyInput.value.trim());
  loadModels();
  loadLibrary();
});

function authHeaders(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response.status === 204 ? null : response.json();
}

// Images need the bearer key too, which an <img src> cannot send: fetch them and show a blob URL.
const blobs = new Map();
async function imageURL(path) {
  if (!blobs.has(path)) {
    const response = await fetch(path, { headers: authHeaders() });
    if (!response.ok) throw new Error("could not load " + path + ": " + response.status);
    blobs.set(path, URL.createObjectURL(await response.blob()));
  }
  return blobs.get(path);
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "className") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(id, text, kind = "") {
  const node = $(id);
  node.textContent = text;
  node.className = "status" + (kind ? " " + kind : "");
}

function showImage(img, path) {
  imageURL(path).then((url) => { img.src = url; }).catch((e) => { img.alt = e.message; });
}

// ------------------------------------------------------------------ models
async function loadModels() {
  const select = $("model");
  try {
    const info = await api("/v1/models");
    const names = [...new Set(info.workers.filter((w) => w.loaded).map((w) => w.base_model))];
    state.models = names;
    select.replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
    if (!names.length) select.append(el("option", { value: "", text: "no model loaded (yet)" }));
    const d = info.defaults || {};
    if (d.num_inference_steps) $("steps").value = d.num_inference_steps;
    if (d.width) $("width").placeholder = "default " + d.width;
    if (d.height) $("height").placeholder = "default " + d.height;
  } catch (e) {
    select.replaceChildren(el("option", { value: "", text: "models unavailable: " + e.message }));
  }
}

// ------------------------------------------------------------------ identities
function selectIdentity(identity) {
  state.identity = identity;
  $("selected").textContent = (identity.name || "unnamed") + " (" + identity.faces.length + " photo" +
    (identity.faces.length === 1 ? "" : "s") + ")";
  for (const node of document.querySelectorAll(".library .person")) {
    node.classList.toggle("selected", node.dataset.id === identity.id);
  }
}

function showCrops(identity) {
  $("crops").replaceChildren(...identity.faces.map((face) => {
    const img = el("img", { className: "crop", alt: "aligned face " + face.k });
    showImage(img, face.crop_url);
    return el("figure", {}, img, el("figcaption", { text: "photo " + face.k + ", score " + face.score.toFixed(2) }));
  }));
}

async function loadLibrary() {
  const library = $("library");
  try {
    const people = await api("/v1/identities");
    if (!people.length) {
      library.replaceChildren(el("p", { className: "muted", text: "no one enrolled yet" }));
      return;
    }
    library.replaceChildren(...people.map((person) => {
      const img = el("img", { alt: person.name || "unnamed" });
      if (person.faces.length) showImage(img, person.faces[0].crop_url);
      const node = el("div", { className: "person", title: "use this person", onclick: () => selectIdentity(person) },
        img, el("div", { text: person.name || "unnamed" }));
      node.dataset.id = person.id;
      node.classList.toggle("selected", !!state.identity && state.identity.id === person.id);
      return node;
    }));
  } catch (e) {
    library.replaceChildren(el("p", { className: "muted", text: "library unavailable: " + e.message }));
  }
}

$("enroll-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = $("photos").files;
  if (!files.length) return setStatus("enroll-status", "choose one or more photos first", "error");
  const form = new FormData();
  for (const file of files) form.append("photos", file);
  const name = $("name").value.trim();
  if (name) form.append("name", name);
  $("enroll").disabled = true;
  setStatus("enroll-status", "analysing " + files.length + " photo" + (files.length === 1 ? "" : "s") + "…");
  $("crops").replaceChildren();
  try {
    const identity = await api("/v1/identities", { method: "POST", body: form });
    if (identity.warnings.length) setStatus("enroll-status", "enrolled, with warnings: " + identity.warnings.join("; "), "warn");
    else setStatus("enroll-status", "enrolled " + (identity.name || "this person") + ": the aligned faces are below");
    showCrops(identity);
    selectIdentity(identity);
    $("photos").value = "";  // the next upload is a new person
    await loadLibrary();
  } catch (e) {
    setStatus("enroll-status", e.message, "error");
  } finally {
    $("enroll").disabled = false;
  }
});

// ------------------------------------------------------------------ generation
function intOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : parseInt(value, 10);
}

function requestBody() {
  const body = {
    identity_id: state.identity.id,
    prompt: $("prompt").value,
    num_images_per_prompt: intOrNull("count") || 1,
    num_inference_steps: intOrNull("steps"),
    scale: parseFloat($("scale").value),
    seed: intOrNull("seed"),
    width: intOrNull("width"),
    height: intOrNull("height"),
  };
  const negative = $("negative").value.trim();
  if (negative) body.negative_prompt = negative;
  if (state.models.length > 1 && $("model").value) body.base_model = $("model").value;
  for (const k of Object.keys(body)) if (body[k] === null || Number.isNaN(body[k])) delete body[k];
  return body;
}

function showProgress(step, total, text) {
  $("progress-box").hidden = false;
  $("progress").max = total || 1;
  $("progress").value = step;
  $("progress-text").textContent = text;
}

// Server-sent events through fetch (EventSource cannot send the Authorization header). Calls onEvent(kind, data)
// for each event; resolves when the stream ends.
async function followEvents(url, onEvent) {
  const response = await fetch(url, { headers: authHeaders({ Accept: "text/event-stream" }) });
  if (!response.ok || !response.body) throw new Error("no progress stream: " + response.status);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(kind, JSON.parse(data));
    }
  }
}

async function runGeneration(body) {
  if (!state.identity) return setStatus("generate-status", "choose a person first: upload photos or pick one from the library", "error");
  $("generate").disabled = true;
  setStatus("generate-status", "queued…");
  showProgress(0, 1, "queued");
  try {
    const job = await api("/v1/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    try {
      await followEvents(job.events_url, (kind, data) => {
        if (kind === "queued") showProgress(0, 1, "queued" + (data.queue_position ? ", " + data.queue_position + " ahead" : ""));
        else if (kind === "progress") showProgress(data.step, data.total, "step " + data.step + " of " + (data.total || "?"));
      });
    } catch (e) { /* the stream broke off: the job view below says how it ended */ }
    let view = await api(job.url);
    for (let i = 0; i < 1200 && !["done", "failed", "cancelled"].includes(view.status); i++) {
      await new Promise((r) => setTimeout(r, 500));
      view = await api(job.url);
      showProgress(view.progress.step, view.progress.total, view.status);
    }
    if (view.status === "done") {
      showProgress(1, 1, "done");
      setStatus("generate-status", "done: " + view.images.length + " image" + (view.images.length === 1 ? "" : "s"));
      addToGallery(view);
    } else {
      setStatus("generate-status", "generation " + view.status + (view.error ? ": " + view.error : ""), "error");
    }
  } catch (e) {
    setStatus("generate-status", e.message, "error");
  } finally {
    $("generate").disabled = false;
  }
}

$("generate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (!state.identity) return setStatus("generate-status", "choose a person first: upload photos or pick one from the library", "error");
  runGeneration(requestBody());
});

function describe(settings, seed) {
  const parts = [];
  if (settings.prompt) parts.push("prompt: " + settings.prompt);
  if (settings.negative_prompt) parts.push("negative: " + settings.negative_prompt);
  parts.push("seed " + seed, "steps " + settings.num_inference_steps, "strength " + settings.scale,
    "guidance " + settings.guidance_scale, settings.width + "×" + settings.height);
  if (settings.base_model) parts.push("model " + settings.base_model);
  return parts.join(" · ");
}

function addToGallery(view) {
  const gallery = $("gallery");
  if (gallery.querySelector(".muted")) gallery.replaceChildren();
  const settings = view.settings || {};
  const seeds = Array.isArray(settings.seed) ? settings.seed : view.images.map((_, i) => (settings.seed ?? 0) + i);
  const figures = view.images.map((url, i) => {
    const img = el("img", { className: "generated", alt: "generated image " + (i + 1) });
    showImage(img, url);
    const download = el("a", { href: "#", download: url.split("/").pop(), text: "download" });
    imageURL(url).then((u) => { download.href = u; }).catch(() => {});
    const again = el("button", {
      className: "small", type: "button", text: "same seed again",
      onclick: () => {
        const body = { identity_id: view.identity_ids[0], seed: seeds[i], num_images_per_prompt: 1 };
        for (const k of ["prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "scale"]) {
          if (settings[k] !== undefined && settings[k] !== null) body[k] = Array.isArray(settings[k]) ? settings[k][0] : settings[k];
        }
        runGeneration(body);
      },
    });
    return el("figure", {}, img, el("figcaption", { text: describe(settings, seeds[i]) }), download, again);
  });
  gallery.prepend(...figures);
}

loadModels();
loadLibrary();
