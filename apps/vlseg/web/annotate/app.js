// The annotation page: work list -> image -> prompt -> mask + uncertainty -> corrections -> submit -> train.
// It talks only to the server's REST API (api.js). Edits live in `state.mask` and in drafts (draft.js) until the
// label is submitted, so a failed request never loses them.

import {api, ApiError} from "./api.js";
import {base64ToBytes, decodeImage, encodePngGray8, isGzip, readNifti, readNpy, writeNiftiU8} from "./formats.js";
import {fromNifti, fromNumpy, toNifti, windowToU8} from "./volume.js";
import {View, drawColourBar} from "./view.js";
import {Undo, floodFill, paintDisc, paintLine} from "./tools.js";
import {Drafts, recentPrompts, rememberPrompt} from "./draft.js";
import {orderImages, renderWorklist, scoreKey} from "./worklist.js";
import {scoringButton, trainingPanel} from "./tasks.js";
import {installShortcuts} from "./keys.js";

const $ = (id) => document.getElementById(id);
const view = new View($("stage"));
const drafts = new Drafts(api.base);
const undo = new Undo();
const state = {
  info: null, objects: {}, image: null, mask: null, unc: null, slice: 0, paintValue: 1,
  tool: "brush", brush: 4, busy: false, visible: {mask: true, heat: true},
};
window.vlsegAnnotate = state;  // for debugging and the browser test: read-only use

// ------------------------------------------------------------------------------------------------ messages
function say(text, kind = "info") {
  const m = $("message");
  m.textContent = text;
  m.className = kind;
  if (kind === "error") console.warn("[vlseg]", text);
}
function serverUp(ok) {
  const s = $("server-status");
  s.textContent = ok ? `server ${api.base}` : "server unreachable";
  s.className = `status ${ok ? "ok" : "down"}`;
}
function failed(e) {
  if (e instanceof ApiError && e.status === 0) serverUp(false);
  say(e instanceof ApiError ? e.message : `Unexpected error: ${e.message || e}`, "error");
}
async function busy(label, fn) {
  if (state.busy) { say("Still working on the last request; wait for it to finish.", "info"); return; }
  state.busy = true;
  document.body.dataset.busy = "1";
  say(`${label}…`, "info");
  try { return await fn(); } catch (e) { failed(e); } finally {
    state.busy = false;
    document.body.dataset.busy = "0";
  }
}

// ------------------------------------------------------------------------------------------------ drawing
const sliceSize = () => state.image.width * state.image.height;
const sliceOf = (a) => a.subarray(state.slice * sliceSize(), (state.slice + 1) * sliceSize());

function redraw() {
  const im = state.image;
  if (!im) return;
  if (im.kind === "2d") view.drawBitmap(im.bitmap); else view.drawGrey(sliceOf(im.grey));
  view.drawMask(sliceOf(state.mask));
  view.drawHeat(state.unc ? sliceOf(state.unc) : null);
  $("slice-value").textContent = im.depth > 1 ? `${state.slice + 1} / ${im.depth}` : "";
  $("stage").dataset.imageId = im.id;
  $("stage").dataset.slice = String(state.slice);
}

function keepDraft() {
  if (!state.image) return;
  const ok = drafts.save(state.image.id, {mask: state.mask, shape: state.image.shape, prompt: $("prompt").value});
  if (!ok) say("This browser refused to store the draft (storage full): it is kept in this page only.", "info");
  const li = document.querySelector(`#worklist li[data-id="${CSS.escape(state.image.id)}"]`);
  if (li && !li.classList.contains("labelled")) li.classList.add("draft");
}

// ------------------------------------------------------------------------------------------------ images
async function loadImage(id) {
  const bytes = await api.image(id);
  const nifti = isGzip(bytes) || (bytes.length > 348 && new DataView(bytes.buffer).getInt32(0, true) === 348);
  if (!nifti) {
    const img = await decodeImage(new Blob([bytes]));
    return {id, kind: "2d", width: img.width, height: img.height, depth: 1, shape: [img.height, img.width, 1],
            bitmap: img.bitmap};
  }
  const v = await readNifti(bytes);
  const [nx, ny, nz] = v.dims;
  return {id, kind: "volume", width: ny, height: nx, depth: nz, shape: [nx, ny, nz], dims: v.dims,
          header: v.header, littleEndian: v.littleEndian, grey: windowToU8(fromNifti(v.dims, v.data))};
}

/** A label file (PNG of a 2D image, NIfTI of a volume) -> mask stack of `im`, or null when it does not fit. */
async function decodeLabel(im, bytes) {
  if (im.kind === "2d") {
    const d = await decodeImage(new Blob([bytes]));
    if (d.width !== im.width || d.height !== im.height) return null;
    const out = new Uint8Array(d.width * d.height);
    for (let i = 0; i < out.length; i++) out[i] = Math.max(d.rgba[4 * i], d.rgba[4 * i + 1], d.rgba[4 * i + 2]);
    return out;
  }
  const v = await readNifti(bytes);
  if (v.dims.join() !== im.dims.join()) return null;
  return fromNifti(v.dims, v.data, Uint8Array);
}

async function decodeStoredUncertainty(im, bytes) {
  if (im.kind === "2d") {  // 16-bit PNG (u * 65535); the browser decodes it to 8 bits, enough for the colours
    const d = await decodeImage(new Blob([bytes]));
    if (d.width !== im.width || d.height !== im.height) return null;
    return Float32Array.from({length: d.width * d.height}, (_, i) => d.rgba[4 * i] / 255);
  }
  const v = await readNifti(bytes);
  return v.dims.join() === im.dims.join() ? fromNifti(v.dims, v.data) : null;
}

async function openImage(id) {
  if (!id) return;
  await busy(`Opening ${id}`, async () => {
    const im = await loadImage(id);
    const labels = state.objects[id]?.labels || {};
    let mask = null, note = "";
    const draft = drafts.load(id);
    if (draft && draft.shape.join() === im.shape.join()) {
      mask = draft.mask.slice();
      $("prompt").value = draft.prompt || "";
      note = `Unsubmitted edit restored (from ${new Date(draft.ts).toLocaleTimeString()}).`;
    } else if (labels.final) {
      const bytes = await api.label(id, "final");
      mask = bytes && await decodeLabel(im, bytes).catch(() => null);  // e.g. a 2D label saved as NIfTI by Slicer
      const info = labels.final.info || {};
      $("prompt").value = info.text || info.prompt || "";
      note = mask ? "Showing the submitted label." : "The submitted label could not be shown here (other format).";
    }
    let unc = null;
    const tag = state.info?.vlseg?.uncertainty_tag || "uncertainty";
    if (labels[tag]) {
      const bytes = await api.label(id, tag);
      unc = bytes && await decodeStoredUncertainty(im, bytes).catch(() => null);
      const i = labels[tag].info || {};
      if (unc) $("result").textContent = `stored map: ${i.model || "?"}, prompt "${i.prompt || "?"}"`;
    } else $("result").textContent = "";
    state.image = im;
    state.mask = mask || new Uint8Array(im.width * im.height * im.depth);
    state.unc = unc;
    state.result = null;
    state.paintValue = Math.max(1, state.mask.reduce((a, b) => (b > a ? b : a), 0));  // a saved label's value
    state.slice = Math.floor(im.depth / 2);
    undo.clear();
    view.setSize(im.width, im.height);
    $("placeholder").hidden = true;
    $("slice-bar").hidden = im.depth <= 1;
    Object.assign($("slice"), {max: String(im.depth - 1), value: String(state.slice)});
    $("image-title").textContent = `${id} — ${im.kind === "2d" ? "2D image" : "volume"} ${im.shape.slice(0, im.kind === "2d" ? 2 : 3).join(" × ")}`;
    $("label-status").textContent = labels.final ? "labelled" : "not labelled yet";
    redraw();
    refreshWorklist(false);
    say(note || `Opened ${id}. Type a prompt and press Enter.`, note.startsWith("Unsubmitted") ? "ok" : "info");
  });
}

// ------------------------------------------------------------------------------------------------ segment
async function segment() {
  const im = state.image;
  if (!im) { say("Open an image first (work list, or N for the next sample).", "error"); return; }
  const text = $("prompt").value.trim();
  if (!text) { say("The prompt is empty: type what to segment (or click a label word), then press Enter.", "error"); return; }
  const model = $("model").value;
  if (!model) { say("No model is loaded on the server (see /info/ → vlseg.skipped).", "error"); return; }
  const samples = Number($("samples").value);
  await busy(`Segmenting "${text.slice(0, 60)}" with ${model}`, async () => {
    const {result, file} = await api.infer(model, im.id, {text, num_samples: samples, uncertainty_inline: true});
    if (!file) throw new Error("the server answered without a label file");
    const mask = await decodeLabel(im, file);
    if (!mask) throw new Error("the server's label does not fit the image");
    const npy = readNpy(base64ToBytes(result.uncertainty.npy_base64));
    undo.push(state.mask);
    state.mask = mask;
    state.unc = fromNumpy(npy.shape, npy.data);
    state.paintValue = Math.max(1, ...Object.values(result.label_names || {}));
    state.result = result;
    redraw();
    keepDraft();
    showRecent(rememberPrompt(text));
    $("stage").dataset.resultTs = String(Date.now());
    $("result").textContent = `${result.model}: "${result.prompt}", ${result.num_samples} sample(s) — ` +
      `${result.foreground_pixels} px, uncertainty mean ${result.uncertainty_mean.toFixed(3)}, ` +
      `top 5 % ${result.uncertainty_top5.toFixed(3)} (${result.latency_s.toFixed(1)} s)`;
    serverUp(true);
    say(`Segmented "${result.prompt}". Correct the mask with brush / eraser / fill, then submit (Ctrl+S).`, "ok");
  });
}

// ------------------------------------------------------------------------------------------------ submit
async function submit() {
  const im = state.image;
  if (!im) { say("Open an image first.", "error"); return; }
  const text = $("prompt").value.trim();
  if (!text) { say("The prompt is empty: type the prompt this label answers before submitting.", "error"); return; }
  await busy(`Submitting the label of ${im.id}`, async () => {
    const bytes = im.kind === "2d" ? await encodePngGray8(state.mask, im.width, im.height)
      : await writeNiftiU8(im.header, im.littleEndian, im.dims, toNifti(im.dims, state.mask));
    await api.saveLabel(im.id, bytes, im.kind === "2d" ? "label.png" : "label.nii.gz", {text});
    drafts.clear(im.id);
    serverUp(true);
    $("label-status").textContent = `labelled with "${text}"`;
    await refreshWorklist(true);
    say(`Label of ${im.id} saved with the prompt "${text}". Press N for the next sample.`, "ok");
  });
}

// ------------------------------------------------------------------------------------------------ painting
let stroke = null;
function paintAt(p, first) {
  const im = state.image;
  const sl = sliceOf(state.mask);
  const value = state.tool === "eraser" ? 0 : state.paintValue;
  if (state.tool === "fill") { if (first) floodFill(sl, im.width, im.height, p.r, p.c, value); }
  else if (first || !stroke.last) paintDisc(sl, im.width, im.height, p.r, p.c, state.brush / 2, value);
  else paintLine(sl, im.width, im.height, stroke.last.r, stroke.last.c, p.r, p.c, state.brush / 2, value);
  stroke.last = p;
  view.drawMask(sl);
}
const layer = $("mask-layer");
layer.addEventListener("pointerdown", (e) => {
  if (!state.image || e.button !== 0) return;
  const p = view.pixelAt(e);
  if (!p) return;
  layer.setPointerCapture(e.pointerId);
  undo.push(state.mask);
  stroke = {last: null};
  paintAt(p, true);
});
layer.addEventListener("pointermove", (e) => {
  if (!stroke || state.tool === "fill") return;
  const p = view.pixelAt(e);
  if (p) paintAt(p, false);
});
const endStroke = () => { if (stroke) { stroke = null; keepDraft(); } };
layer.addEventListener("pointerup", endStroke);
layer.addEventListener("pointercancel", endStroke);

function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll(".tool").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
}
function setBrush(size) {
  state.brush = Math.max(1, Math.min(40, size));
  $("brush-size").value = String(state.brush);
  $("brush-size-value").textContent = String(state.brush);
}

// ------------------------------------------------------------------------------------------------ panels
async function refreshWorklist(reload = true) {
  try {
    if (reload) state.objects = (await api.datastore()).objects || {};
    const key = scoreKey(state.info);
    renderWorklist($("worklist"), orderImages(state.objects, key), {key, current: state.image?.id, open: openImage,
                                                                   hasDraft: (id) => drafts.has(id)});
    serverUp(true);
  } catch (e) { failed(e); }
}

async function nextSample() {
  try {
    const strategies = Object.keys(state.info?.strategies || {});
    const strategy = strategies.includes("uncertainty") ? "uncertainty" : strategies[0];
    const s = await api.nextSample(strategy);
    if (!s || !s.id) { say("No unlabelled image is left.", "info"); return; }
    await refreshWorklist(true);
    await openImage(s.id);
  } catch (e) { failed(e); }
}

function showRecent(list) {
  $("recent").replaceChildren(...list.map((p) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = p;
    b.title = `recent prompt: ${p}`;
    b.addEventListener("click", () => { $("prompt").value = p; $("prompt").focus(); });
    return b;
  }));
}

function setupModels(info) {
  const models = Object.keys(info.models || {});
  $("model").replaceChildren(...models.map((m) => new Option(m, m)));
  const syncSamples = () => {
    const cfg = info.models[$("model").value]?.config || {};
    if (cfg.num_samples) $("samples").value = String(cfg.num_samples);
  };
  $("model").addEventListener("change", syncSamples);
  syncSamples();
  const words = Array.isArray(info.labels) ? info.labels : Object.keys(info.labels || {});
  $("label-words").replaceChildren(...words.map((w) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = w;
    b.title = `use the label word "${w}" as prompt`;
    b.addEventListener("click", () => { $("prompt").value = w; $("prompt").focus(); });
    return b;
  }));
  if (!models.length) say(`No model is loaded: ${JSON.stringify(info.vlseg?.skipped || {})}`, "error");
}

function toggleLayer(name, on) {
  state.visible[name] = on === undefined ? !state.visible[name] : on;
  $(name === "mask" ? "show-mask" : "show-heat").checked = state.visible[name];
  view.setVisible(name, state.visible[name]);
}

function wireControls() {
  $("prompt-form").addEventListener("submit", (e) => { e.preventDefault(); segment(); });
  $("submit").addEventListener("click", submit);
  $("next").addEventListener("click", nextSample);
  $("refresh").addEventListener("click", () => refreshWorklist(true));
  document.querySelectorAll(".tool").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  $("brush-size").addEventListener("input", (e) => setBrush(Number(e.target.value)));
  $("undo").addEventListener("click", doUndo);
  $("clear").addEventListener("click", () => {
    if (!state.image) return;
    undo.push(state.mask);
    sliceOf(state.mask).fill(0);
    redraw();
    keepDraft();
  });
  $("zoom").addEventListener("change", (e) => { view.zoom = Number(e.target.value); view.fit(); });
  new ResizeObserver(() => view.fit()).observe($("stage"));  // window resize, slice bar shown or hidden
  $("slice").addEventListener("input", (e) => { state.slice = Number(e.target.value); redraw(); });
  $("show-mask").addEventListener("change", (e) => toggleLayer("mask", e.target.checked));
  $("show-heat").addEventListener("change", (e) => toggleLayer("heat", e.target.checked));
  $("mask-opacity").addEventListener("input", (e) => view.setOpacity("mask", e.target.value));
  $("heat-opacity").addEventListener("input", (e) => view.setOpacity("heat", e.target.value));
  view.setOpacity("mask", $("mask-opacity").value);
  view.setOpacity("heat", $("heat-opacity").value);
}

function doUndo() {
  const prev = undo.pop();
  if (!prev || !state.image) { say("Nothing to undo.", "info"); return; }
  state.mask = prev;
  redraw();
  keepDraft();
}

function changeSlice(delta) {
  if (!state.image || state.image.depth <= 1) return;
  state.slice = Math.max(0, Math.min(state.image.depth - 1, state.slice + delta));
  $("slice").value = String(state.slice);
  redraw();
}

// ------------------------------------------------------------------------------------------------ start
async function main() {
  drawColourBar($("colourbar"));
  wireControls();
  setTool("brush");
  setBrush(4);
  showRecent(recentPrompts());
  installShortcuts({segment, submit, undo: doUndo, next: nextSample, tool: setTool, slice: changeSlice,
                    brushSize: (d) => setBrush(state.brush + d), toggle: (n) => toggleLayer(n)});
  const followTraining = trainingPanel({model: () => $("model").value, epochs: () => Number($("epochs").value), say,
                                        onDone: () => api.info().then((i) => { state.info = i; })});
  scoringButton({method: () => Object.keys(state.info?.scoring?.methods || {uncertainty: 1})[0] || "uncertainty",
                 say, onDone: () => refreshWorklist(true)});
  try {
    state.info = await api.info();
    serverUp(true);
    setupModels(state.info);
    await refreshWorklist(true);
    followTraining();
    say("Pick an image from the work list, or press N for the next sample. Press ? for the shortcuts.", "info");
  } catch (e) { failed(e); }
  document.body.dataset.ready = "1";
}

main();
