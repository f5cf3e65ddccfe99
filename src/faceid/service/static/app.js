// The faceid web app: a static page over the /v1 API (the same one other clients use). All user and server text
// goes into the page through textContent, never innerHTML.
//
// With API keys (GET /health says "authenticated"), the page asks for a key, keeps it in sessionStorage (this tab
// only) and sends it as "Authorization: Bearer KEY" on every request. Neither <img src> nor EventSource can send
// that header, so images and crops are fetched and shown as blob URLs, and the progress events are read from a
// fetch() stream (with polling of the generation as the fallback when the stream breaks off).
"use strict";

const $ = (id) => document.getElementById(id);
const FINISHED = ["done", "failed", "cancelled"];
const PAGE = 12;  // generations per gallery page
const state = {
  identity: null, models: [], authenticated: false, cursor: null, modes: [], controlnets: {},
  people: [], maxPeople: 1, styleAdapters: {},  // several people in one picture (in order), style adapters by name
  fast: {},  // the server's few-step presets by name
  identities: new Map(),  // the library's people by id (their reference crops, names)
  speech: null,  // the server's speech model (GET /v1/models "speech"), or null: no microphone
  methods: [],  // the identity methods the chosen model set runs (GET /v1/models catalog[].methods)
};

// ------------------------------------------------------------------ API key and requests
const keyInput = $("api-key");
localStorage.removeItem("faceid-api-key");  // earlier versions kept it past the session
keyInput.value = sessionStorage.getItem("faceid-api-key") || "";
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("faceid-api-key", keyInput.value.trim());
  loadAll();
});

function authHeaders(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

// The Error for a failed response: the server's message; for 401, what to do about the key (also shown by it).
async function apiError(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON */ }
  if (response.status === 401) {
    message = keyInput.value.trim()
      ? "the server refused this API key (401 unauthorized): check it, enter it again and press Use key"
      : "this server needs an API key: enter it at the top and press Use key";
    $("key-form").hidden = false;
    setStatus("key-status", message, "error");
  }
  return new Error(message);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!response.ok) throw await apiError(response);
  return response.status === 204 ? null : response.json();
}

// Images need the bearer key too, which an <img src> cannot send: fetch them and show a blob URL.
const blobs = new Map();
async function imageURL(path) {
  if (!blobs.has(path)) {
    const response = await fetch(path, { headers: authHeaders() });
    if (!response.ok) throw await apiError(response);
    blobs.set(path, URL.createObjectURL(await response.blob()));
  }
  return blobs.get(path);
}

function forgetImage(path) {
  if (blobs.has(path)) URL.revokeObjectURL(blobs.get(path));
  blobs.delete(path);
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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ start: ask for a key when the server needs one
async function start() {
  try {
    state.authenticated = !!(await (await fetch("/health")).json()).authenticated;
  } catch (e) { /* the API calls below say what is wrong */ }
  $("key-form").hidden = !state.authenticated;
  if (state.authenticated && !keyInput.value.trim()) {
    setStatus("key-status", "this server needs an API key: enter it and press Use key (kept for this tab only)", "warn");
    for (const id of ["library", "gallery"]) $(id).replaceChildren(el("p", { className: "muted", text: "enter the API key first" }));
    keyInput.focus();
    return;
  }
  await loadAll();
}

// Everything the key sees (another key sees other identities and generations): loaded again when it changes.
async function loadAll() {
  for (const path of [...blobs.keys()]) forgetImage(path);
  state.identity = null;
  state.people = [];
  showPeople();
  $("selected").textContent = "none chosen: upload photos or pick one from the library";
  $("crops").replaceChildren();
  if (state.authenticated) setStatus("key-status", "checking the key…");
  if (!(await loadModels())) return;  // a refused key says so at the top
  if (state.authenticated) setStatus("key-status", "key accepted");
  await loadLibrary();  // first: the gallery shows each result beside its person's reference crop
  await loadGallery();
}

// ------------------------------------------------------------------ models
// A short label for a model source: its last path part (a repo's or folder's name, a file's name); two sources
// with the same last part keep one more part each. The option's title holds the whole source.
function shortNames(sources) {
  const parts = sources.map((s) => String(s).replace(/[\\/]+$/, "").split(/[\\/]/));
  const last = parts.map((p) => p[p.length - 1]);
  return parts.map((p, i) => (last.filter((name) => name === last[i]).length > 1 ? p.slice(-2).join("/") : last[i]));
}

// The model sets this server may run (GET /v1/models "catalog": loaded ones and those a worker loads on first use),
// each with its family and its defaults. A request names the chosen set's models (base model and adapter).
async function loadModels() {
  const select = $("model");
  try {
    const info = await api("/v1/models");
    const entries = info.catalog || [];
    state.models = entries;
    const labels = shortNames(entries.map((e) => e.base_model));
    const adapters = shortNames(entries.map((e) => e.adapter || ""));
    select.replaceChildren(...entries.map((entry, i) => {
      // several sets: which family, and whether choosing it waits for a load
      const twin = entries.some((other) => other !== entry && other.base_model === entry.base_model);
      const more = entries.length > 1
        ? " (" + entry.family + ((entry.loaded_on || []).length ? "" : ", loads on first use") + ")" : "";
      const label = labels[i] + (twin ? " + " + adapters[i] : "") + more;
      return el("option", { value: String(entry.index), title: entry.base_model, text: label });
    }));
    if (!entries.length) select.append(el("option", { value: "", text: "no model loaded (yet)" }));
    showModes(info.modes || ["text-to-image"], info.controlnets || {});
    showGroupOptions(info.max_people || 1, info.style_adapters || {});
    showFast(info.fast || {});
    showDecoders(info.decoders || ["full"]);
    showLimits(info.limits || {});
    state.speech = info.speech || null;
    $("mic").hidden = !state.speech;  // a microphone only where the server transcribes
    if (state.speech) $("mic").title = "speak the prompt (transcribed by " + shortNames([state.speech])[0] + "): click to record, click again to stop";
    modelChanged();
    return true;
  } catch (e) {
    select.replaceChildren(el("option", { value: "", text: "models unavailable: " + e.message }));
    return false;
  }
}

function selectedModel() {
  return state.models.find((entry) => String(entry.index) === $("model").value) || state.models[0] || null;
}

// The few-step presets this server loaded (GET /v1/models "fast", by name: title, families, steps...): only those
// are offered, and no menu at all when it has none (faceid serve --fast PRESET).
function showFast(presets) {
  state.fast = presets;
  const chosen = $("fast").value;
  $("fast").replaceChildren(el("option", { value: "", text: "off" }), ...Object.entries(presets).map(([name, p]) =>
    el("option", { value: name, text: (p.title || name) + " (" + p.num_inference_steps + " steps)" })));
  $("fast").value = presets[chosen] ? chosen : "";
  $("fast-field").hidden = !Object.keys(presets).length;
}

// The decoders this server has (GET /v1/models "decoders": "full", and "tiny" with a tiny VAE); a choice only when
// there is one to make.
function showDecoders(decoders) {
  const names = { full: "VAE", tiny: "tiny VAE" };  // the field's title says the difference
  $("decoder").replaceChildren(...decoders.map((d) => el("option", { value: d, text: names[d] || d })));
  $("decoder-field").hidden = decoders.length < 2;
}

// The chosen model set's defaults as placeholders, and the fast presets its family has (SDXL-Lightning: SDXL only).
function modelChanged() {
  const entry = selectedModel();
  showMethods();
  // a FLUX.1 set: no negative prompt (its guidance is embedded; but see negativeChanged), no swap (FaceID's); the
  // ControlNet kinds are the chosen set's own (catalog[].controlnets: the server's ControlNets of its family). The
  // server refuses the rest too (422).
  negativeChanged();
  const kinds = controlKinds(entry);
  const chosenKind = $("control-kind").value;
  $("control-kind").replaceChildren(...Object.entries(kinds).map(([kind, source]) => el("option", { value: kind, title: source, text: kind })));
  if (kinds[chosenKind] !== undefined) $("control-kind").value = chosenKind;
  for (const option of $("mode").options) {
    if (option.hidden) continue;  // not served at all (showModes)
    const flux = !!entry && entry.faceid_adapter === false && option.value === "swap";
    const noNet = option.value === "controlnet" && !Object.keys(kinds).length;
    option.disabled = flux || noNet;
    option.title = flux ? "not for " + entry.family + " models" : noNet ? "no ControlNet of this model's family" : "";
  }
  if ($("mode").selectedOptions[0]?.disabled) $("mode").value = "text-to-image";
  modeChanged();  // the size placeholders: the model's defaults, or the input image's
  for (const option of $("fast").options) {
    const families = option.value && (state.fast[option.value] || {}).families;
    option.disabled = !!entry && !!families && !families.includes(entry.family);
    option.title = option.disabled ? "not for " + entry.family + " models" : "";
  }
  if ($("fast").selectedOptions[0]?.disabled) $("fast").value = "";
  fastChanged();
}

// ------------------------------------------------------------------ methods: the identity method and its own fields
// Each identity method's own settings (GenerationSettings fields the server refuses with any other method), one entry
// per setting: a number field and its slider, shown only while the method is chosen, sent only when set and only with
// that method (a comparison's other method runs at its own defaults), named in the gallery's captions (`short`) and
// kept by "same seed again". The placeholder is the method's default (GET /v1/models methods[].defaults) or, where
// those do not name the setting, `unset` (what an empty field means). `negativeAbove`: above this value the setting
// runs a pass with the negative prompt, so the negative prompt applies even on a model set whose guidance is
// embedded (FLUX.1; the server accepts it there only then).
const METHOD_FIELDS = {
  instantid: [{
    setting: "identitynet_scale", label: "IdentityNet scale", short: "IdentityNet", min: 0, max: 2, step: 0.05,
    title: "how strongly InstantID's IdentityNet follows the face's keypoints (empty: the method's default)",
  }],
  pulid: [{
    setting: "pulid_num_zero", label: "Zero tokens", short: "zero tokens", min: 0, max: 80, step: 1,
    title: "PuLID's zero tokens beside the identity tokens: more take attention away from the identity, for more " +
      "style and less likeness (the authors' app: 0 to 80; empty: the method's default)",
  }, {
    setting: "pulid_ortho", label: "Ortho", short: "ortho", choices: ["off", "v1", "v2"],
    title: "how PuLID's identity attention is added: off (plain sum), v1 (only its part orthogonal to the text's), " +
      "v2 (the orthogonal part and a weighed parallel part); empty: the method's default",
  }],
  "pulid-flux": [{
    setting: "true_cfg", label: "True CFG", short: "true CFG", min: 1, max: 10, step: 0.5, unset: "1 (off)",
    negativeAbove: 1,
    title: "PuLID-FLUX's true classifier-free guidance scale: above 1 every step also runs a pass with the negative " +
      "prompt and no identity, at twice the time (empty: 1, off)",
  }, {
    setting: "true_cfg_start", label: "True CFG from step", short: "true CFG from step", min: 0, max: 50, step: 1,
    title: "the first step that runs true CFG's negative pass (the steps before run without it; empty: the method's " +
      "default)",
  }],
};
const ALL_METHOD_SETTINGS = Object.values(METHOD_FIELDS).flat().map((f) => f.setting);

const methodFields = (name) => METHOD_FIELDS[name] || [];
const fieldId = (f) => f.setting.replaceAll("_", "-");  // the number field; its slider "-range", its label "-field"

// The fields of every method in the table, hidden until their method is chosen (before the sliders are wired below).
for (const [method, fields] of Object.entries(METHOD_FIELDS)) {
  for (const f of fields) {
    const id = fieldId(f);
    let label;
    if (f.choices) {  // a menu; its first entry, empty, leaves the choice to the method's default
      const options = [el("option", { value: "", text: "default" }), ...f.choices.map((c) => el("option", { value: c, text: c }))];
      label = el("label", { id: id + "-field", title: f.title, hidden: "" }, f.label, el("select", { id }, ...options));
    } else {
      const limits = { min: String(f.min), max: String(f.max), step: String(f.step) };
      label = el("label", { id: id + "-field", className: "slider", title: f.title, hidden: "" }, f.label,
        el("input", { id, type: "number", placeholder: "default", ...limits }),
        el("input", { id: id + "-range", type: "range", value: String(f.min), "data-for": id, ...limits }));
    }
    label.dataset.method = method;
    label.addEventListener("input", negativeChanged);  // after the slider has set its field (the target's listener)
    $("compare-field").before(label);
  }
}

// The chosen method's settings that are set: setting -> number (a menu's: its choice).
function methodValues(method) {
  const values = {};
  for (const f of methodFields(method)) {
    const raw = $(fieldId(f)).value;
    const value = f.choices ? raw : parseFloat(raw);
    if (f.choices ? value !== "" : !Number.isNaN(value)) values[f.setting] = value;
  }
  return values;
}

function chosenMethod() {
  return $("method-box").hidden ? "faceid" : $("method").value || "faceid";
}

// The negative prompt: where the model set has an unconditional pass, or where the chosen method's setting runs a
// negative pass (PuLID-FLUX's true CFG above 1 on FLUX.1).
function negativeChanged() {
  const entry = selectedModel();
  const values = methodValues(chosenMethod());
  const negativePass = methodFields(chosenMethod()).some((f) => f.negativeAbove !== undefined && values[f.setting] > f.negativeAbove);
  $("negative-field").hidden = !!entry && entry.negative_prompt === false && !negativePass;
}

// The identity methods the chosen model set runs (GET /v1/models catalog[].methods: name, title, licence, defaults):
// a menu only where there is a choice (none when faceid is the only one), the licence where the method is chosen,
// and the second method of a comparison.
function showMethods() {
  const entry = selectedModel();
  const methods = (entry && entry.methods) || [];
  state.methods = methods;
  const chosen = $("method").value;
  $("method").replaceChildren(...methods.map((m) => el("option", { value: m.name, text: m.title })));
  if (methods.some((m) => m.name === chosen)) $("method").value = chosen;
  // shown where there is a choice, or where the one method is not FaceID (a FLUX.1 set: InfiniteYou, its licence)
  $("method-box").hidden = methods.length < 2 && !methods.some((m) => m.name !== "faceid");
  if (methods.length < 2) $("compare").checked = false;
  methodChanged();
}

function methodOf(name) {
  return state.methods.find((m) => m.name === name) || { name: name || "faceid", title: name || "faceid", defaults: {} };
}

// The chosen method's own fields (METHOD_FIELDS), its defaults, its licence; the other methods to compare it with.
function methodChanged() {
  const method = methodOf($("method").value);
  const d = method.defaults || {};
  for (const [name, fields] of Object.entries(METHOD_FIELDS)) {
    for (const f of fields) {
      const id = fieldId(f);
      $(id + "-field").hidden = name !== method.name;
      if (name !== method.name) continue;
      const known = d[f.setting] !== undefined ? d[f.setting] : f.unset;
      const said = known !== undefined ? "default " + known : "default";
      if (f.choices) {
        $(id).options[0].textContent = said;
        continue;
      }
      $(id).placeholder = said;
      // an empty field's slider rests at the default it stands for
      if ($(id).value === "") $(id + "-range").value = d[f.setting] !== undefined ? d[f.setting] : f.min;
    }
  }
  negativeChanged();
  // the identity strength starts at the method's own default (InstantID's IP-Adapter scale 0.8; FaceID's 1)
  const strength = d.scale !== undefined ? d.scale : 1;
  $("scale").value = strength;
  $("scale-range").value = strength;
  $("method-licence").textContent = !$("method-box").hidden && method.licence
    ? "licence: " + method.licence + (method.commercial ? "" : " — not for commercial use") : "";
  const other = $("compare-method").value;
  const others = state.methods.filter((m) => m.name !== method.name);
  $("compare-method").replaceChildren(...others.map((m) => el("option", { value: m.name, text: m.title })));
  if (others.some((m) => m.name === other)) $("compare-method").value = other;
  $("compare-field").hidden = !others.length;
}

$("method").addEventListener("change", methodChanged);

// An empty Steps field leaves the steps to the server: the model's default, or a fast preset's.
function fastChanged() {
  const entry = selectedModel();
  const d = (entry && entry.defaults) || {};
  const steps = d.num_inference_steps;
  const preset = state.fast[$("fast").value];
  $("steps").placeholder = preset ? preset.num_inference_steps + " (the preset's)" : steps ? "default " + steps : "default";
  $("guidance").placeholder = d.guidance_scale !== undefined ? "default " + d.guidance_scale : "default";
  // an empty field's slider rests at the default it stands for
  const rest = { steps: preset ? preset.num_inference_steps : steps, guidance: d.guidance_scale, width: d.width, height: d.height };
  for (const [id, value] of Object.entries(rest)) if ($(id).value === "" && value !== undefined) $(id + "-range").value = value;
}

// ------------------------------------------------------------------ sliders: a range beside each number field
// Each slider (data-for: its number field) and its field show the same value; the field may stay empty (the
// server's default). Their ranges are the server's limits (GET /v1/models "limits").
for (const range of document.querySelectorAll("input[type=range][data-for]")) {
  const field = $(range.dataset.for);
  range.addEventListener("input", () => { field.value = range.value; });
  field.addEventListener("input", () => { if (field.value !== "") range.value = field.value; });
}

function showLimits(limits) {
  if (limits.max_steps) for (const id of ["steps", "steps-range"]) $(id).max = limits.max_steps;
  if (limits.max_side) for (const id of ["width", "height", "width-range", "height-range"]) $(id).max = limits.max_side;
  if (limits.max_images) $("count").max = limits.max_images;
}

// ------------------------------------------------------------------ example prompts
for (const button of document.querySelectorAll("#examples button.example")) {
  button.addEventListener("click", () => { $("prompt").value = button.textContent; });
}

$("model").addEventListener("change", modelChanged);

// ------------------------------------------------------------------ modes: the input images a generation starts from
// Each upload slot (the image to redraw, the mask, the control photo, the swap target) is uploaded as soon as it is
// chosen (POST /v1/uploads: a bad image is refused at once), and its thumbnail is the server's copy, upright as the
// generation reads it. A generation names the uploads by id.
const uploads = {};  // slot -> Promise of the upload's view

// The modes this server runs (GET /v1/models "modes": text-to-image only on Ray) and its ControlNets by kind: only
// those are offered (ControlNet only with a ControlNet).
function showModes(modes, controlnets) {
  state.modes = modes;
  state.controlnets = controlnets;
  const kinds = Object.keys(controlnets);
  for (const option of $("mode").options) {
    option.disabled = option.hidden = !modes.includes(option.value) || (option.value === "controlnet" && !kinds.length);
  }
  if ($("mode").selectedOptions[0]?.disabled) $("mode").value = "text-to-image";
  $("control-kind").replaceChildren(...kinds.map((kind) => el("option", { value: kind, title: controlnets[kind], text: kind })));
  modeChanged();
}

// The ControlNet kinds a model set runs: its catalog entry's (kind -> source), else the server's.
function controlKinds(entry) {
  return entry && entry.controlnets ? entry.controlnets : state.controlnets;
}

// Only the fields of the chosen mode show; swap makes an image of its target's size (no width and height).
function modeChanged() {
  const mode = $("mode").value;
  for (const node of document.querySelectorAll(".mode-field")) node.hidden = !node.dataset.modes.split(" ").includes(mode);
  const slot = maskBaseSlot();
  if (slot && slot !== mask.base) maskImageChanged(slot, uploads[slot] || null);
  $("mask-hint").textContent = mode === "swap"
    ? "Draw where the person goes on the photo with the mouse (or a finger): only what you paint is replaced."
    : "Draw the mask on the image with the mouse (or a finger): what you paint is redrawn.";
  const d = (selectedModel() && selectedModel().defaults) || {};
  $("strength").placeholder = mode === "img2img" ? "default 0.8" : "default 1";
  for (const key of ["width", "height"]) {
    $(key).placeholder = mode === "img2img" || mode === "inpaint" ? "the image's" : d[key] ? "default " + d[key] : "default";
  }
}

$("mode").addEventListener("change", modeChanged);

function slotField(slot) {
  return document.querySelector('.upload[data-slot="' + slot + '"]');
}

// Uploads the file chosen in `input` at once; its figure shows the server's copy (or why it was refused). The
// Promise of the upload's view, or null when the choice was cleared.
function uploadChosen(input, figure) {
  const thumb = figure.querySelector("img"), caption = figure.querySelector("figcaption");
  thumb.removeAttribute("src");
  figure.hidden = !input.files.length;
  if (!input.files.length) return null;
  const form = new FormData();
  form.append("image", input.files[0]);
  caption.textContent = "uploading…";
  caption.className = "";
  const upload = api("/v1/uploads", { method: "POST", body: form });
  upload.then((view) => {
    showImage(thumb, view.url);
    caption.textContent = view.width + "×" + view.height;
  }).catch((e) => {
    caption.textContent = e.message;
    caption.className = "status error";
  });
  return upload;
}

for (const slot of ["init", "mask", "control", "target", "regions"]) {
  const input = $(slot + "-file");
  input.addEventListener("change", () => {
    delete uploads[slot];
    const upload = uploadChosen(input, slotField(slot).querySelector("figure"));
    if (upload) uploads[slot] = upload;
    if (slot === maskBaseSlot()) maskImageChanged(slot, upload);
  });
}

// ------------------------------------------------------------------ the mask, drawn on the image it applies to
// A canvas over the server's copy of the image, at the image's size: what is painted is redrawn (inpainting: the
// image to redraw; swap: the target photo, where only the painted area takes the person). At generation the
// painting is uploaded as the mask (white where painted, black elsewhere); a mask file is used when nothing is
// painted.
const mask = { canvas: $("mask-canvas"), drawing: false, last: null, upload: null, base: null };

// The upload slot whose image the mask is drawn on in the chosen mode (null: the mode takes no mask).
function maskBaseSlot() {
  return { inpaint: "init", swap: "target" }[$("mode").value] || null;
}

function maskImageChanged(slot, upload) {
  const canvas = mask.canvas;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  mask.upload = null;
  mask.base = slot;
  $("mask-editor").classList.remove("ready");
  $("mask-base").removeAttribute("src");
  if (!upload) return;
  upload.then(async (view) => {
    canvas.width = view.width;
    canvas.height = view.height;
    $("mask-base").src = await imageURL(view.url);
    $("mask-editor").classList.add("ready");
  }).catch(() => {});
}

function canvasPoint(event) {
  const rect = mask.canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * mask.canvas.width / rect.width,
    (event.clientY - rect.top) * mask.canvas.height / rect.height];
}

function paint(from, to) {
  const canvas = mask.canvas, g = canvas.getContext("2d");
  const scale = canvas.width / canvas.getBoundingClientRect().width;  // the brush size is in screen pixels
  g.globalCompositeOperation = $("mask-erase").checked ? "destination-out" : "source-over";
  g.strokeStyle = "#ef4444";
  g.lineCap = g.lineJoin = "round";
  g.lineWidth = parseFloat($("brush-size").value) * scale;
  g.beginPath();
  g.moveTo(...from);
  g.lineTo(...to);
  g.stroke();
  mask.upload = null;  // changed: uploaded again at the next generation
}

mask.canvas.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  mask.canvas.setPointerCapture?.(event.pointerId);
  mask.drawing = true;
  mask.last = canvasPoint(event);
  paint(mask.last, mask.last);
});
mask.canvas.addEventListener("pointermove", (event) => {
  if (!mask.drawing) return;
  const point = canvasPoint(event);
  paint(mask.last, point);
  mask.last = point;
});
for (const kind of ["pointerup", "pointercancel", "pointerleave"]) {
  mask.canvas.addEventListener(kind, () => { mask.drawing = false; });
}
$("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
$("mask-clear").addEventListener("click", () => {
  mask.canvas.getContext("2d").clearRect(0, 0, mask.canvas.width, mask.canvas.height);
  mask.upload = null;
});

// Whether anything is painted on the mask canvas.
function maskPainted() {
  const { width, height } = mask.canvas;
  if (!$("mask-editor").classList.contains("ready") || !width || !height) return false;
  const pixels = mask.canvas.getContext("2d").getImageData(0, 0, width, height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) return true;
  return false;
}

// The painted mask as an upload (white where painted, black elsewhere): the Promise of its view.
function uploadDrawnMask() {
  if (!mask.upload) {
    const { width, height } = mask.canvas;
    const out = el("canvas", { width: String(width), height: String(height) });
    const g = out.getContext("2d");
    g.drawImage(mask.canvas, 0, 0);
    g.globalCompositeOperation = "source-in";  // the painted pixels, white
    g.fillStyle = "#fff";
    g.fillRect(0, 0, width, height);
    g.globalCompositeOperation = "destination-over";  // on black
    g.fillStyle = "#000";
    g.fillRect(0, 0, width, height);
    mask.upload = new Promise((resolve) => out.toBlob(resolve, "image/png")).then((blob) => {
      const form = new FormData();
      form.append("image", blob, "mask.png");
      return api("/v1/uploads", { method: "POST", body: form });
    });
    mask.upload.catch(() => { mask.upload = null; });
  }
  return mask.upload;
}

// The id of a slot's upload; an Error that says what to choose when there is none.
async function uploadId(slot, what) {
  if (!uploads[slot]) throw new Error("choose " + what + " first");
  return (await uploads[slot]).id;
}

// The request fields of the chosen mode (JobInputs): uploads by id, the control kind and scale, the strength.
async function modeFields() {
  const mode = $("mode").value, fields = {};
  if (mode === "img2img" || mode === "inpaint") fields.init_image = await uploadId("init", "the image to redraw");
  if (mode === "inpaint") {
    fields.mask_image = maskPainted() ? (await uploadDrawnMask()).id
      : await uploadId("mask", "the mask: paint it on the image, or choose a mask file,");
  }
  if (mode === "controlnet") {
    fields.controls = [{ kind: $("control-kind").value, image: await uploadId("control", "the reference photo"),
      scale: parseFloat($("control-scale").value) }];
  }
  if (mode === "swap") {
    fields.swap = { target: await uploadId("target", "the photo to put the person into"), face_index: intOrNull("target-face") || 0 };
    if (maskPainted()) fields.swap.mask = (await uploadDrawnMask()).id;  // optional: without one, the whole face
    else if (uploads.mask) fields.swap.mask = await uploadId("mask", "the mask");
  }
  const strength = parseFloat($("strength").value);
  if (["img2img", "inpaint", "swap"].includes(mode) && !Number.isNaN(strength)) fields.strength = strength;
  return fields;
}
$("fast").addEventListener("change", fastChanged);

// ------------------------------------------------------------------ several people, style references
// Several people in one picture (GET /v1/models "max_people": 1 on Ray) and the server's style adapters by name
// ("style_adapters": none configured, none offered).
function showGroupOptions(maxPeople, styleAdapters) {
  state.maxPeople = maxPeople;
  state.styleAdapters = styleAdapters;
  const group = $("group");
  group.disabled = maxPeople < 2;
  $("group-box").hidden = group.disabled;  // offered only where the server places several people
  if (group.disabled) group.checked = false;
  groupChanged();
  const names = Object.keys(styleAdapters);
  $("add-style").disabled = !names.length;
  $("styles-box").hidden = !names.length;  // offered only with the server's style adapters
  if (!names.length) $("styles").replaceChildren();
  for (const select of document.querySelectorAll("#styles select.style-adapter")) fillAdapters(select);
}

function groupChanged() {
  document.querySelector(".group-field").hidden = !$("group").checked;
  $("regions").dispatchEvent(new Event("change"));
  markLibrary();
}

$("group").addEventListener("change", groupChanged);
$("regions").addEventListener("change", () => {
  slotField("regions").hidden = $("regions").value !== "photo";
});

// The people of the picture, in order (person k goes to column k), each with a button that takes them out.
function showPeople() {
  $("people").replaceChildren(...state.people.map((person) => el("li", {},
    person.name || "unnamed", " ",
    el("button", { className: "small remove-person", type: "button", text: "×", title: "take this person out",
      onclick: () => togglePerson(person) }))));
  markLibrary();
}

function togglePerson(identity) {
  const at = state.people.findIndex((person) => person.id === identity.id);
  if (at >= 0) state.people.splice(at, 1);
  else if (state.people.length >= state.maxPeople) {
    return setStatus("generate-status", "this server places at most " + state.maxPeople + " people in a picture", "error");
  } else state.people.push(identity);
  showPeople();
}

// The library shows who is chosen: the person, or in a group each one's place.
function markLibrary() {
  const group = $("group").checked;
  for (const node of document.querySelectorAll(".library .person")) {
    const place = state.people.findIndex((person) => person.id === node.dataset.id);
    node.classList.toggle("selected", group ? place >= 0 : !!state.identity && state.identity.id === node.dataset.id);
    node.querySelector(".order").textContent = group && place >= 0 ? String(place + 1) : "";
  }
}

function fillAdapters(select) {
  const names = Object.keys(state.styleAdapters);
  select.replaceChildren(...names.map((name) => el("option", { value: name, title: state.styleAdapters[name], text: name })));
}

// A style reference: an image (uploaded at once), the style adapter that reads it, and how strongly it acts.
function addStyle() {
  const input = el("input", { type: "file", accept: "image/*", className: "style-file" });
  const figure = el("figure", { hidden: "" }, el("img", { className: "thumb", alt: "style image" }), el("figcaption"));
  const adapter = el("select", { className: "style-adapter" });
  fillAdapters(adapter);
  const scale = el("input", { type: "range", min: "0", max: "2", step: "0.05", value: "0.5", className: "style-scale" });
  const shown = el("output", { text: "0.5" });
  scale.addEventListener("input", () => { shown.textContent = scale.value; });
  const row = el("div", { className: "style-row upload" },
    el("label", {}, "Style image", input), figure,
    el("div", { className: "row" },
      el("label", { title: "the style adapter that reads the image (this server's, GET /v1/models)" }, "Adapter", adapter),
      el("label", { title: "how strongly the reference acts (0 adds nothing)" }, "Style strength ", shown, scale)),
    el("button", { className: "small danger remove-style", type: "button", text: "Remove", onclick: () => row.remove() }));
  input.addEventListener("change", () => { row.upload = uploadChosen(input, figure); });
  $("styles").append(row);
}

$("add-style").addEventListener("click", addStyle);

// The request fields of several people (people, regions) and of the style references (style).
async function groupFields() {
  const fields = {};
  if ($("group").checked) {
    fields.people = state.people.map((person) => person.id);
    fields.regions = $("regions").value === "photo" ? { photo: await uploadId("regions", "the group photo") } : "auto";
  }
  const rows = [...document.querySelectorAll("#styles .style-row")];
  if (rows.length) {
    fields.style = [];
    for (const [k, row] of rows.entries()) {
      if (!row.upload) throw new Error("choose the image of style reference " + (k + 1) + " first");
      fields.style.push({ image: (await row.upload).id, adapter: row.querySelector(".style-adapter").value,
        scale: parseFloat(row.querySelector(".style-scale").value) });
    }
  }
  return fields;
}

// ------------------------------------------------------------------ identities
function selectIdentity(identity) {
  if ($("group").checked) return togglePerson(identity);
  state.identity = identity;
  $("selected").textContent = (identity.name || "unnamed") + " (" + identity.faces.length + " photo" +
    (identity.faces.length === 1 ? "" : "s") + ")";
  markLibrary();
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
    state.identities = new Map(people.map((person) => [person.id, person]));
    if (!people.length) {
      library.replaceChildren(el("p", { className: "muted", text: "no one enrolled yet" }));
      return;
    }
    library.replaceChildren(...people.map((person) => {
      const img = el("img", { alt: person.name || "unnamed" });
      if (person.faces.length) showImage(img, person.faces[0].crop_url);
      const node = el("div", { className: "person", title: "use this person", onclick: () => selectIdentity(person) },
        img, el("div", {}, el("span", { className: "order" }), " ", person.name || "unnamed"));
      node.dataset.id = person.id;
      return node;
    }));
    markLibrary();
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

async function requestBody() {
  const body = {
    identity_id: state.identity ? state.identity.id : null,  // none with several people (body.people)
    prompt: $("prompt").value,
    num_images_per_prompt: intOrNull("count") || 1,
    num_inference_steps: intOrNull("steps"),
    scale: parseFloat($("scale").value),
    seed: intOrNull("seed"),
    width: intOrNull("width"),
    height: intOrNull("height"),
  };
  const negative = $("negative").value.trim();
  if (negative && !$("negative-field").hidden) body.negative_prompt = negative;
  const entry = selectedModel();
  if (state.models.length > 1 && entry) {
    body.base_model = entry.base_model;
    if (entry.adapter) body.adapter = entry.adapter;
  }
  const method = chosenMethod();
  if (method !== "faceid") body.method = method;
  Object.assign(body, methodValues(method));  // the chosen method's own settings, those set
  if ($("fast").value) body.fast = $("fast").value;
  if ($("decoder").value === "tiny") body.decoder = "tiny";
  const cfg = parseFloat($("guidance").value);
  if (!Number.isNaN(cfg)) body.guidance_scale = cfg;
  const guidance = parseFloat($("identity-guidance").value);
  if (guidance) body.identity_guidance = guidance;  // 0 or empty: off (the default); a bad value: the server says
  Object.assign(body, await modeFields(), await groupFields());
  if (body.people) delete body.identity_id;
  if (body.swap) {
    delete body.width;
    delete body.height;
  }
  for (const k of Object.keys(body)) if (body[k] === null || Number.isNaN(body[k])) delete body[k];
  return body;
}

function showProgress(step, total, text) {
  $("progress-box").hidden = false;
  $("progress").max = total || 1;
  $("progress").value = step;
  $("progress-text").textContent = text;
}

// The newest preview of each image (a "preview" event: JPEG data URLs and which images they are), replaced by the
// final images when the generation is done. Previews come when the server has them on (faceid serve
// --preview-every, or --tiny-vae).
function previewImage(i) {
  const box = $("previews");
  while (box.children.length <= i) box.append(el("img", { className: "preview", alt: "preview" }));
  return box.children[i];
}

function showPreview(data) {
  data.images.forEach((url, k) => {
    const i = (data.image_index || [])[k] ?? k;
    const img = previewImage(i);
    img.src = url;
    img.className = "preview";
    img.alt = img.title = "image " + (i + 1) + " at step " + data.step + " of " + data.total;
  });
}

function showFinalImages(urls) {
  $("previews").replaceChildren(...urls.map((url, i) => {
    const img = el("img", { className: "final", alt: "image " + (i + 1) });
    showImage(img, url);
    return img;
  }));
}

// Server-sent events through fetch (EventSource cannot send the Authorization header). Calls onEvent(kind, data)
// for each event; resolves when the stream ends.
async function followEvents(url, onEvent) {
  const response = await fetch(url, { headers: authHeaders({ Accept: "text/event-stream" }) });
  if (!response.ok) throw await apiError(response);
  if (!response.body) throw new Error("this browser cannot read a response as a stream");
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

function progressText(kind, data) {
  if (kind === "queued") {
    const ahead = data.queue_position;
    return "queued" + (typeof ahead === "number" ? ": position " + (ahead + 1) + " in the queue" +
      (ahead ? " (" + ahead + " ahead)" : ", next") : "");
  }
  if (kind === "progress" || kind === "preview") return "running, step " + data.step + " of " + (data.total || "?");
  return kind;
}

// Follows a generation to its end (once, however often asked), keeping its gallery entry up to date and calling
// onEvent(kind, data) with its progress; resolves to the generation's last view. With stream, through its events
// (one connection each: the browser allows 6 per server, so only the page's own generation streams), else and
// after the stream by polling.
const following = new Map();
function follow(id, onEvent = () => {}, stream = true) {
  if (!following.has(id)) following.set(id, watch().finally(() => following.delete(id)));
  return following.get(id);

  async function watch() {
    const url = "/v1/generations/" + id;
    if (stream) {
      try {
        await followEvents(url + "/events", (kind, data) => {
          setEntryStatus(id, progressText(kind, data));
          onEvent(kind, data);
        });
      } catch (e) { /* the stream broke off: polling below says how it ends */ }
    }
    let view = await api(url);
    for (let i = 0; i < 1200 && !FINISHED.includes(view.status); i++) {
      showGeneration(view);
      onEvent(view.status === "running" ? "progress" : "queued", { step: view.progress.step, total: view.progress.total });
      await sleep(500);
      view = await api(url);
    }
    showGeneration(view);
    return view;
  }
}

async function runGeneration(body) {
  $("generate").disabled = true;
  setStatus("generate-status", "queued…");
  showProgress(0, 1, "queued");
  $("previews").replaceChildren();
  try {
    const job = await api("/v1/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    showGeneration(await api(job.url));
    const view = await follow(job.id, (kind, data) => {
      if (kind === "queued" || kind === "progress") showProgress(data.step || 0, data.total || 1, progressText(kind, data));
      if (kind === "progress") setStatus("generate-status", "running…");
      else if (kind === "preview") showPreview(data);
    });
    if (view.status === "done") {
      showProgress(1, 1, "done");
      showFinalImages(view.images);
      setStatus("generate-status", "done: " + view.images.length + " image" + (view.images.length === 1 ? "" : "s"));
    } else {
      showProgress(0, 1, view.status);
      $("previews").replaceChildren();
      setStatus("generate-status", "generation " + view.status + (view.error ? ": " + view.error : ""),
        view.status === "cancelled" ? "warn" : "error");
    }
  } catch (e) {
    setStatus("generate-status", e.message, "error");
  } finally {
    $("generate").disabled = false;
  }
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if ($("group").checked && !state.people.length) {
    return setStatus("generate-status", "choose the people first: click them in the library, left to right", "error");
  }
  if (!$("group").checked && !state.identity) return setStatus("generate-status", "choose a person first: upload photos or pick one from the library", "error");
  let body;
  try {
    body = await requestBody();
  } catch (e) {
    return setStatus("generate-status", e.message, "error");
  }
  if ($("compare").checked && !$("method-box").hidden && $("compare-method").value) {
    return runComparison(body, $("compare-method").value);
  }
  runGeneration(body);
});

// ------------------------------------------------------------------ compare: one request through two methods
// The same request (same seed: one is drawn here when the field is empty) through the chosen method and another, as
// two generations; the second runs at its own default strength. Their first images are shown side by side, each
// with its method and its identity similarity.
function comparisonBodies(body, other) {
  const first = { ...body };
  if (first.seed === undefined) first.seed = Math.floor(Math.random() * 2 ** 31);
  first.num_images_per_prompt = 1;
  const second = { ...first, method: other };
  delete second.scale;
  for (const setting of ALL_METHOD_SETTINGS) delete second[setting];  // the first method's own: never the second's
  // a negative prompt only the first method's setting allows (true CFG on FLUX.1) is not the second's either
  const entry = selectedModel();
  if (entry && entry.negative_prompt === false) delete second.negative_prompt;
  if (other === "faceid") delete second.method;
  return [first, second];
}

function comparedFigure(body, view) {
  const method = methodOf(body.method || "faceid");
  const figure = el("figure", { className: "compared" });
  figure.dataset.method = method.name;
  if (!view) {
    figure.append(el("p", { className: "muted", text: method.title + ": queued…" }));
    return figure;
  }
  if (view.status !== "done" || !view.images.length) {
    figure.append(el("p", { className: "status error", text: method.title + ": " + view.status + (view.error ? ": " + view.error : "") }));
    return figure;
  }
  const img = el("img", { className: "generated", alt: method.title + " image" });
  showImage(img, view.images[0]);
  const score = (view.scores || [])[0];
  if (score) figure.dataset.similarity = String(score.similarity);
  const text = method.title + " (" + method.name + ") · similarity " + (score ? formatSimilarity(score.similarity) : "not scored") +
    " · seed " + (Array.isArray(view.settings.seed) ? view.settings.seed[0] : view.settings.seed);
  figure.append(img, el("figcaption", { text }));
  return figure;
}

async function runComparison(body, other) {
  const bodies = comparisonBodies(body, other);
  const box = $("comparison");
  box.hidden = false;
  box.replaceChildren(...bodies.map((b) => comparedFigure(b, null)));
  $("generate").disabled = true;
  setStatus("generate-status", "comparing " + bodies.map((b) => methodOf(b.method || "faceid").title).join(" and ") + "…");
  try {
    const jobs = [];
    for (const b of bodies) {
      jobs.push(await api("/v1/generations", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(b),
      }));
    }
    for (const job of jobs) showGeneration(await api(job.url));
    const views = await Promise.all(jobs.map((job) => follow(job.id)));
    box.replaceChildren(...views.map((view, i) => comparedFigure(bodies[i], view)));
    const done = views.every((v) => v.status === "done");
    setStatus("generate-status", done ? "done: compared side by side" : "comparison incomplete", done ? "" : "error");
  } catch (e) {
    setStatus("generate-status", e.message, "error");
  } finally {
    $("generate").disabled = false;
  }
}

// ------------------------------------------------------------------ gallery: one entry per generation, newest first
async function loadGallery(more = false) {
  const gallery = $("gallery");
  try {
    const cursor = more && state.cursor ? "&cursor=" + encodeURIComponent(state.cursor) : "";
    const page = await api("/v1/generations?limit=" + PAGE + cursor);
    if (!more) gallery.replaceChildren();
    for (const view of page.generations) {
      showGeneration(view, "append");
      if (!FINISHED.includes(view.status)) follow(view.id, undefined, false).catch(() => {});
    }
    state.cursor = page.next_cursor;
    $("more").hidden = !page.next_cursor;
    showEmptyGallery();
  } catch (e) {
    gallery.replaceChildren(el("p", { className: "muted", text: "gallery unavailable: " + e.message }));
  }
}

$("more").addEventListener("click", () => loadGallery(true));

function showEmptyGallery() {
  const gallery = $("gallery");
  const empty = gallery.querySelector(".empty");
  if (gallery.querySelector(".generation")) empty?.remove();
  else if (!empty) gallery.append(el("p", { className: "muted empty", text: "generated images appear here" }));
}

function entryOf(id) {
  return [...document.querySelectorAll("#gallery .generation")].find((node) => node.dataset.id === id);
}

function setEntryStatus(id, text) {
  const entry = entryOf(id);
  if (entry) entry.querySelector(".gen-status").textContent = text;
}

// Shows a generation's view in the gallery: replaces its entry, or adds one (first, or with "append" last).
// An entry whose status and images are unchanged only gets its status text (polling a queued generation every
// 500 ms would otherwise rebuild it, and its buttons, under the user's pointer).
function showGeneration(view, where = "prepend") {
  const old = entryOf(view.id);
  if (old && old.dataset.key === entryKey(view)) {
    old.querySelector(".gen-status").textContent = statusText(view);
    return;
  }
  const node = generationEntry(view);
  if (old) old.replaceWith(node);
  else $("gallery")[where](node);
  showEmptyGallery();
  arrangeGallery();
}

function statusText(view) {
  const when = new Date(view.created * 1000).toLocaleString();
  if (view.status === "queued") return progressText("queued", view) + " · " + when;
  if (view.status === "running") return progressText("progress", view.progress) + " · " + when;
  if (view.status === "failed") return "failed: " + view.error + " · " + when;
  if (view.status === "done") return "done: " + view.images.length + " image" + (view.images.length === 1 ? "" : "s") + " · " + when;
  return view.status + " · " + when;
}

function generationEntry(view) {
  const finished = FINISHED.includes(view.status);
  const action = finished
    ? el("button", { className: "small danger delete-generation", type: "button", text: "Delete",
      title: "delete this generation and its images", onclick: (e) => deleteGeneration(view, e.target) })
    : el("button", { className: "small cancel", type: "button", text: "Cancel",
      title: "cancel this generation", onclick: (e) => cancelGeneration(view.id, e.target) });
  const head = el("div", { className: "gen-head" }, el("span", { className: "gen-status", text: statusText(view) }), action);
  const images = el("div", { className: "gen-images" }, ...view.images.map((url, i) => imageFigure(view, url, i)),
    ...(view.control_images || []).map((url, k) => controlFigure(url, k)));
  const node = el("article", { className: "generation" }, head, images);
  node.dataset.id = view.id;
  node.dataset.status = view.status;
  node.dataset.key = entryKey(view);
  return node;
}

function entryKey(view) {
  return view.status + " " + view.images.join(" ");
}

// What a ControlNet of the generation saw (made from its upload at the output's size).
function controlFigure(url, k) {
  const img = el("img", { className: "control", alt: "control image " + k });
  showImage(img, url);
  return el("figure", { className: "control" }, img, el("figcaption", { text: "control image " + k }));
}

function describe(settings, prompt, negative, seed, mode, people) {
  const parts = [];
  if (mode && mode !== "text-to-image") parts.push(mode + (settings.strength ? " " + settings.strength : ""));
  if (people > 1) parts.push(people + " people" + (settings.regions === "auto" ? " side by side" : ""));
  for (const style of settings.style || []) parts.push("style " + style.adapter + " " + style.scale);
  if (prompt) parts.push("prompt: " + prompt);
  if (negative) parts.push("negative: " + negative);
  parts.push("seed " + seed, "steps " + settings.num_inference_steps, "strength " + settings.scale,
    "guidance " + settings.guidance_scale, settings.width + "×" + settings.height);
  if (settings.method && settings.method !== "faceid") {
    const own = methodFields(settings.method).filter((f) => settings[f.setting] !== undefined && settings[f.setting] !== null);
    parts.push("method " + settings.method + (own.length ? " (" + own.map((f) => f.short + " " + settings[f.setting]).join(", ") + ")" : ""));
  }
  if (settings.fast) parts.push("fast " + settings.fast);
  if (settings.identity_guidance) parts.push("identity guidance " + settings.identity_guidance);
  if (settings.base_model) parts.push("model " + shortNames([settings.base_model])[0]);  // a name, not a path
  return parts.join(" · ");
}

function imageFigure(view, url, i) {
  const settings = view.settings || {};
  const index = (view.image_index || [])[i] ?? i;  // its place in the generation: its seed and prompt
  const per = settings.num_images_per_prompt || 1;
  const pick = (value) => (Array.isArray(value) ? value[Math.floor(index / per)] ?? value[0] : value);
  const seed = Array.isArray(settings.seed) ? settings.seed[index] : (settings.seed ?? 0) + index;
  const prompt = pick(settings.prompt), negative = pick(settings.negative_prompt);
  const img = el("img", { className: "generated", alt: "generated image " + (index + 1) });
  showImage(img, url);
  const download = el("a", { href: "#", download: url.split("/").pop(), text: "download" });
  imageURL(url).then((u) => { download.href = u; }).catch(() => {});
  const again = el("button", {
    className: "small again", type: "button", text: "same seed again",
    onclick: () => {
      const body = { identity_id: view.identity_ids[Math.floor(index / per)], seed, num_images_per_prompt: 1, prompt };
      if (negative) body.negative_prompt = negative;
      for (const k of ["num_inference_steps", "guidance_scale", "width", "height", "scale", "fast", "identity_guidance",
        "scheduler", "eta", "strength", "base_model", "adapter", "decoder", "method", ...ALL_METHOD_SETTINGS]) {
        if (settings[k] !== undefined && settings[k] !== null) body[k] = settings[k];
      }
      Object.assign(body, view.inputs || {});  // the same uploads (a swap's size is its target's: no width, height)
      if (body.people) delete body.identity_id;  // the same people in the picture
      if (body.swap) {
        delete body.width;
        delete body.height;
      }
      runGeneration(body);
    },
  });
  const people = (view.inputs && view.inputs.people || []).length;
  const caption = describe(settings, prompt, negative, seed, view.mode, people);
  const score = (view.scores || [])[i];
  const likeness = likenessBox(score, view.identity_ids[Math.floor(index / per)]);
  const figure = el("figure", { className: "result" }, el("div", { className: "pair" }, img, likeness),
    el("figcaption", { text: caption }), download, again);
  if (score) figure.dataset.similarity = String(score.similarity);
  img.title = "click for a large view";
  img.addEventListener("click", () => openLightbox(img, caption, score));
  const remove = el("button", { className: "small danger delete-image", type: "button", text: "Delete",
    title: "delete this image", onclick: () => deleteImage(url, figure, remove) });
  figure.append(remove);
  return figure;
}

// The likeness of a result: each person's reference face (their first aligned crop) with the image's identity
// similarity to them (GET /v1/generations "scores": the server's recognizer, cosine similarity); with several people
// the weakest is the image's.
function formatSimilarity(value) {
  return value.toFixed(2);
}

function likenessBox(score, identityId) {
  const box = el("div", { className: "likeness" });
  if (score === undefined) return box;  // a server that does not score
  const people = score ? score.people : [{ identity_id: identityId, similarity: null }];
  for (const person of people) {
    const identity = state.identities.get(person.identity_id);
    const crop = identity && identity.faces.length ? identity.faces[0].crop_url : "/v1/identities/" + person.identity_id + "/crops/0.png";
    const name = (identity && identity.name) || "reference";
    const ref = el("img", { className: "reference", alt: "reference face of " + name, title: name });
    showImage(ref, crop);
    const reference = el("div", { className: "reference" }, ref);
    // each person's own similarity with several people (the image's is the weakest); a face not found, said
    if (person.no_face) reference.append(el("span", { className: "person-similarity", text: "no face found" }));
    else if (people.length > 1) reference.append(el("span", { className: "person-similarity", text: formatSimilarity(person.similarity) }));
    box.append(reference);
  }
  const overall = el("div", { className: "similarity", title: score ? "identity similarity by " + score.recognizer +
    " (cosine; the weakest person's with several)" : "this image could not be scored" },
  score ? formatSimilarity(score.similarity) : "not scored");
  if (score) overall.dataset.similarity = String(score.similarity);
  box.append(el("span", { className: "muted" }, "similarity"), overall);
  return box;
}

// The gallery's order (newest first, or most alike first) and its filter (a minimum similarity), by CSS order and
// hidden: entries keep their place in the page, so they can be redrawn as they change.
function arrangeGallery() {
  const alike = $("gallery-order").value === "alike";
  const min = parseFloat($("min-similarity").value) || 0;
  $("min-similarity-value").textContent = min ? "≥ " + min.toFixed(2) : "off";
  const rank = (s) => String(Number.isNaN(s) ? 30000 : Math.round((1 - s) * 10000));  // similarity in [-1, 1]
  for (const entry of document.querySelectorAll("#gallery .generation")) {
    const figures = [...entry.querySelectorAll("figure.result")];
    let best = NaN;
    for (const figure of figures) {
      const s = figure.dataset.similarity === undefined ? NaN : parseFloat(figure.dataset.similarity);
      figure.hidden = min > 0 && !(s >= min);
      figure.style.order = alike ? rank(s) : "";
      if (!figure.hidden && !(s <= best)) best = s;
    }
    entry.style.order = alike ? rank(best) : "";
    entry.hidden = min > 0 && figures.length > 0 && figures.every((figure) => figure.hidden);
  }
}

$("gallery-order").addEventListener("change", arrangeGallery);
$("min-similarity").addEventListener("input", arrangeGallery);

// ------------------------------------------------------------------ the large view of an image
function openLightbox(img, caption, score) {
  $("lightbox-image").src = img.src;
  $("lightbox-image").alt = img.alt + ", large";
  $("lightbox-caption").textContent = caption;
  $("lightbox-similarity").textContent = score ? "identity similarity " + formatSimilarity(score.similarity) +
    (score.people.length > 1 ? " (the weakest of " + score.people.length + " people)" : "") : score === null ? "not scored" : "";
  $("lightbox").showModal();
}

$("lightbox").addEventListener("click", (event) => {
  if (event.target === $("lightbox")) $("lightbox").close();  // a click beside the image
});

// ------------------------------------------------------------------ the microphone: speak the prompt
// Shown when the server has a speech model (GET /v1/models "speech"). Records in the browser (getUserMedia,
// MediaRecorder: webm/opus in Chromium and Firefox), sends the recording to POST /openai/v1/audio/transcriptions
// and puts its text into the prompt field.
const mic = { recorder: null, chunks: [] };

async function toggleMicrophone() {
  const button = $("mic");
  if (mic.recorder && mic.recorder.state === "recording") {
    mic.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    return setStatus("mic-status", "this page cannot record here: browsers allow the microphone on https or localhost", "error");
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    return setStatus("mic-status", "no microphone: " + e.message, "error");
  }
  mic.chunks = [];
  const recorder = new MediaRecorder(stream);
  mic.recorder = recorder;
  recorder.addEventListener("dataavailable", (event) => {
    if (event.data.size) mic.chunks.push(event.data);
    button.dataset.recorded = String(mic.chunks.length);
  });
  recorder.addEventListener("stop", async () => {
    for (const track of stream.getTracks()) track.stop();
    button.classList.remove("recording");
    button.textContent = "● Speak";
    const recording = new Blob(mic.chunks, { type: recorder.mimeType || "audio/webm" });
    if (!recording.size) return setStatus("mic-status", "nothing was recorded", "error");
    button.disabled = true;
    setStatus("mic-status", "transcribing…");
    try {
      const form = new FormData();
      const ext = (recording.type.split("/")[1] || "webm").split(";")[0];
      form.append("file", recording, "speech." + ext);
      form.append("model", state.speech);
      const answer = await api("/openai/v1/audio/transcriptions", { method: "POST", body: form });
      $("prompt").value = answer.text;
      setStatus("mic-status", "transcribed: edit the prompt if need be");
    } catch (e) {
      setStatus("mic-status", e.message, "error");
    } finally {
      button.disabled = false;
    }
  });
  button.dataset.recorded = "0";
  recorder.start(250);  // a chunk every 250 ms
  button.classList.add("recording");
  button.textContent = "■ Stop";
  setStatus("mic-status", "recording: speak, then click Stop");
}

$("mic").addEventListener("click", toggleMicrophone);

async function deleteImage(url, figure, button) {
  button.disabled = true;
  try {
    await api(url, { method: "DELETE" });
    forgetImage(url);
    figure.remove();
    setStatus("gallery-status", "image deleted");
  } catch (e) {
    button.disabled = false;
    setStatus("gallery-status", e.message, "error");
  }
}

async function deleteGeneration(view, button) {
  button.disabled = true;
  try {
    await api("/v1/generations/" + view.id + "?purge=true", { method: "DELETE" });
    for (const url of view.images) forgetImage(url);
    entryOf(view.id)?.remove();
    showEmptyGallery();
    setStatus("gallery-status", "generation deleted");
  } catch (e) {
    button.disabled = false;
    setStatus("gallery-status", e.message, "error");
  }
}

async function cancelGeneration(id, button) {
  button.disabled = true;
  try {
    const view = await api("/v1/generations/" + id, { method: "DELETE" });
    showGeneration(view);
    setStatus("gallery-status", view.status === "cancelled" ? "generation cancelled" : "cancelling: it stops at its next step");
  } catch (e) {
    button.disabled = false;
    setStatus("gallery-status", e.message, "error");
  }
}

start();
