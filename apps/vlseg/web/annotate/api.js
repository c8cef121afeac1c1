// MONAI Label's REST API, as the vlseg app serves it (apps/vlseg/README.md). Every failure becomes an ApiError whose
// message says what happened and what to do; nothing here touches the page.

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;  // 0: the server could not be reached
  }
}

const base = new URL("..", window.location.href).href.replace(/\/$/, "");  // the page lives at <server>/vlseg/

async function request(method, path, {query, form, json, what} = {}) {
  const url = new URL(base + path);
  for (const [k, v] of Object.entries(query || {})) url.searchParams.set(k, v);
  const init = {method, headers: {}};
  if (form) {
    init.body = new FormData();
    for (const [k, v] of Object.entries(form)) {
      if (v && v.blob) init.body.append(k, v.blob, v.name);
      else init.body.append(k, v);
    }
  } else if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  }
  let res;
  try {
    res = await fetch(url, init);
  } catch (e) {
    throw new ApiError(`Cannot reach the server at ${base} (${what || path}): is it still running? ` +
                       "Nothing was lost: your edit stays in this page; try again once the server is back.");
  }
  if (!res.ok) {
    let detail = "";
    try {
      const body = await res.clone().json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
    } catch (_) {
      detail = (await res.text()).slice(0, 300);
    }
    throw new ApiError(`${what || path} failed (HTTP ${res.status}): ${detail || res.statusText}`, res.status);
  }
  return res;
}

export const api = {
  base,
  info: async () => (await request("GET", "/info/", {what: "Reading the server info"})).json(),
  datastore: async () =>
    (await request("GET", "/datastore/", {query: {output: "all"}, what: "Reading the work list"})).json(),
  image: async (id) =>
    new Uint8Array(await (await request("GET", "/datastore/image", {query: {image: id},
                                                                     what: `Loading image ${id}`})).arrayBuffer()),
  /** A stored label's bytes, or null when the image has none with this tag. */
  label: async (id, tag) => {
    try {
      const res = await request("GET", "/datastore/label", {query: {label: id, tag}, what: `Loading label ${id}`});
      return new Uint8Array(await res.arrayBuffer());
    } catch (e) {
      if (e.status === 404) return null;
      throw e;
    }
  },
  /** POST /infer/<model>: the JSON answer and the label file (output=all: a multipart answer). */
  infer: async (model, id, params) => {
    const res = await request("POST", `/infer/${encodeURIComponent(model)}`, {
      query: {image: id, output: "all"}, form: {params: JSON.stringify(params)}, what: `Segmentation with ${model}`});
    const type = res.headers.get("content-type") || "";
    if (!type.startsWith("multipart/")) return {result: await res.json(), file: null};
    const parts = await res.formData();
    const file = parts.get("image");
    return {result: JSON.parse(parts.get("params")),
            file: file ? new Uint8Array(await file.arrayBuffer()) : null};
  },
  saveLabel: async (id, bytes, filename, params) =>
    (await request("PUT", "/datastore/label", {
      query: {image: id, tag: "final"},
      form: {label: {blob: new Blob([bytes]), name: filename}, params: JSON.stringify(params)},
      what: `Submitting the label of ${id}`})).json(),
  nextSample: async (strategy) =>
    (await request("POST", `/activelearning/${encodeURIComponent(strategy)}`, {json: {},
                                                                               what: "Asking for the next sample"})).json(),
  startScoring: async (method) =>
    (await request("POST", `/scoring/${encodeURIComponent(method)}`, {what: "Starting the scoring"})).json(),
  startTraining: async (model, params) =>
    (await request("POST", `/train/${encodeURIComponent(model)}`, {json: params, what: `Training ${model}`})).json(),
  stopTraining: async () => (await request("DELETE", "/train/", {what: "Stopping the training"})).json(),
  /** GET /train/ or /scoring/: the latest task ({status, details: [log lines]}), or null when there was none. */
  taskStatus: async (kind) => {
    try {
      return await (await request("GET", `/${kind}/`, {what: `Reading the ${kind} status`})).json();
    } catch (e) {
      if (e.status === 404) return null;
      throw e;
    }
  },
};
