// mae-serve playground. Plain ES module, no build step, no third-party code; it talks only to the public API:
// GET /v1/models, POST /v1/reconstruct?format=json, POST /v1/embed?format=npz.

const VIEWS = ["original", "masked", "reconstruction", "paste", "error"];
const KEY_STORE = "mae-serve.api-key";
const DEBOUNCE_MS = 250;
const TITLES = {
  0: "Cannot reach the server",
  400: "Bad image",
  401: "API key needed",
  404: "Not found",
  413: "Too large",
  415: "Unsupported file",
  422: "Rejected",
  503: "Server busy",
  504: "Timed out",
};

const $ = (sel) => document.querySelector(sel);
const el = {
  file: $("#file"),
  drop: $("#drop"),
  fileName: $("#file-name"),
  ratio: $("#ratio"),
  ratioOut: $("#ratio-out"),
  seed: $("#seed"),
  newMask: $("#new-mask"),
  modelRow: $("#model-row"),
  model: $("#model"),
  resize: $("#resize"),
  error: $("#error"),
  errorTitle: $("#error-title"),
  errorMessage: $("#error-message"),
  errorCode: $("#error-code"),
  maskInfo: $("#mask-info"),
  psnr: $("#psnr"),
  mode: $("#mode"),
  resetMask: $("#reset-mask"),
  embed: $("#download-embed"),
  panels: $("#panels"),
  modelInfo: $("#model-info"),
  keyBox: $("#key-box"),
  keyForm: $("#key-form"),
  key: $("#api-key"),
  forgetKey: $("#forget-key"),
};

const state = {
  image: null, // Blob: the picked image, sent as is
  name: "image", // base of download file names
  result: null, // the last successful format=json answer
  explicit: null, // Set of masked patch indices once the user edits the mask; null = ratio + seed
  wanted: null, // the explicit mask of the request in flight (clicks build on it)
  models: [],
  inflight: null, // AbortController of the reconstruct call in flight
  debounce: 0,
};

// ------------------------------------------------------------------------------------------ API access
class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORE) || "";
  } catch {
    return ""; // storage disabled
  }
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = storedKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let res;
  try {
    res = await fetch(path, { ...init, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    const big = init.body instanceof FormData && state.image && state.image.size > 8 * 1024 * 1024;
    throw new ApiError(
      0,
      "network_error",
      big
        ? `the upload (${(state.image.size / 1048576).toFixed(1)} MB) was cut off; it may be over the server's size limit`
        : "no answer from the server; is it running?",
    );
  }
  if (res.ok) return res;
  let code = "http_error";
  let message = `HTTP ${res.status} ${res.statusText}`.trim();
  try {
    const body = await res.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch {
    // not the service's JSON error shape (a proxy's page, say): keep the status line
  }
  throw new ApiError(res.status, code, message, res.headers.get("Retry-After"));
}

function imageForm() {
  const form = new FormData();
  form.append("image", state.image, state.name);
  return form;
}

// ------------------------------------------------------------------------------------------ messages
function showError(err) {
  const status = err instanceof ApiError ? err.status : 0;
  const code = err instanceof ApiError ? err.code : "client_error";
  el.errorTitle.textContent = TITLES[status] || (status >= 500 ? "Server error" : "Error");
  let message = err.message || String(err);
  if (status === 503 && err.retryAfter) message += ` (try again in ${err.retryAfter} s)`;
  el.errorMessage.textContent = message;
  el.errorCode.textContent = status ? `${code} · HTTP ${status}` : code;
  el.error.hidden = false;
  if (status === 401) {
    el.keyBox.open = true;
    el.key.focus();
  }
}

function clearError() {
  el.error.hidden = true;
}

function setBusy(busy) {
  el.panels.classList.toggle("busy", busy);
  el.panels.setAttribute("aria-busy", String(busy));
  document.body.classList.toggle("busy", busy);
}

// ------------------------------------------------------------------------------------------ models
async function loadModels() {
  try {
    const res = await api("/v1/models");
    const body = await res.json();
    state.models = body.models;
    el.model.replaceChildren(
      ...body.models.map((m) => {
        const opt = new Option(`${m.name} (${m.image_size}px, patch ${m.patch_size})`, m.name);
        opt.selected = m.name === body.default;
        opt.disabled = !m.has_decoder;
        return opt;
      }),
    );
    el.modelRow.hidden = body.models.length < 2;
    describeModel();
    clearError();
    if (state.image) reconstruct();
  } catch (e) {
    showError(e);
    if (e instanceof ApiError && e.status === 503) {
      setTimeout(loadModels, 1000 * Math.max(1, Number(e.retryAfter) || 1));
    }
  }
}

function currentModel() {
  return state.models.find((m) => m.name === el.model.value) || state.models[0] || null;
}

function describeModel() {
  const m = currentModel();
  if (!m) return;
  const parts = [`Model ${m.name}`, `${m.image_size}px`, `patch ${m.patch_size}`, `grid ${m.grid[0]}×${m.grid[1]}`];
  if (m.random_init) parts.push("random weights: expect noise");
  el.modelInfo.textContent = parts.join(" · ");
}

// ------------------------------------------------------------------------------------------ reconstruct
function newSeed() {
  el.seed.value = String(crypto.getRandomValues(new Uint32Array(1))[0] >>> 1); // < 2**31
}

function queryFor(explicit) {
  const q = new URLSearchParams({ format: "json", resize: el.resize.value });
  if (explicit && explicit.size) {
    q.set("mask", [...explicit].sort((a, b) => a - b).join(","));
  } else if (explicit) {
    q.set("mask_ratio", "0"); // an edited mask with nothing hidden
  } else {
    if (!/^\d+$/.test(el.seed.value.trim())) newSeed();
    q.set("mask_ratio", el.ratio.value);
    q.set("seed", el.seed.value.trim());
  }
  if (state.models.length > 1 && el.model.value) q.set("model", el.model.value);
  return q;
}

async function reconstruct(explicit = state.explicit) {
  if (!state.image) return;
  clearTimeout(state.debounce);
  if (state.inflight) state.inflight.abort();
  const ctl = new AbortController();
  state.inflight = ctl;
  state.wanted = explicit;
  setBusy(true);
  try {
    const res = await api(`/v1/reconstruct?${queryFor(explicit)}`, {
      method: "POST",
      body: imageForm(),
      signal: ctl.signal,
    });
    const body = await res.json();
    if (ctl.signal.aborted) return;
    state.explicit = explicit;
    state.result = body;
    render(body);
    clearError();
  } catch (e) {
    if (e.name === "AbortError") return;
    state.wanted = state.explicit; // the edit did not take: later clicks build on what is shown
    if (!state.result) el.maskInfo.textContent = "no result";
    showError(e);
  } finally {
    if (state.inflight === ctl) {
      state.inflight = null;
      setBusy(false);
    }
  }
}

function render(body) {
  for (const view of VIEWS) {
    const panel = $(`#panel-${view}`);
    const url = `data:image/png;base64,${body.images[view]}`;
    const img = panel.querySelector("img");
    img.onload = () => img.classList.toggle("pixelated", img.naturalWidth < 160);
    img.src = url;
    const link = panel.querySelector("a.dl");
    link.href = url;
    link.download = `${state.name}-${view}.png`;
    link.hidden = false;
  }
  const [rows, cols] = body.grid;
  const total = rows * cols;
  const n = body.mask.length;
  el.maskInfo.textContent = `${n} of ${total} patches masked (${Math.round((100 * n) / total)}%)`;
  el.maskInfo.dataset.masked = String(n);
  el.psnr.textContent =
    body.psnr === null ? "PSNR: nothing masked" : `PSNR ${body.psnr.toFixed(2)} dB on masked patches`;
  el.psnr.title = `MSE ${body.mse.toExponential(3)} (pixels in 0..1)`;
  el.mode.textContent = state.explicit ? "hand-edited mask" : `seed ${body.seed}`;
  el.resetMask.hidden = !state.explicit;
  el.embed.disabled = false;
  for (const frame of document.querySelectorAll(".editable .frame")) {
    frame.style.setProperty("--rows", rows);
    frame.style.setProperty("--cols", cols);
  }
}

function scheduleReconstruct() {
  clearTimeout(state.debounce);
  state.debounce = setTimeout(() => reconstruct(null), DEBOUNCE_MS);
}

// ------------------------------------------------------------------------------------------ patch editing
function patchAt(ev, frame) {
  if (!state.result) return null;
  const [rows, cols] = state.result.grid;
  const box = frame.getBoundingClientRect();
  const x = (ev.clientX - box.left) / box.width;
  const y = (ev.clientY - box.top) / box.height;
  if (x < 0 || y < 0 || x >= 1 || y >= 1) return null;
  const r = Math.min(rows - 1, Math.floor(y * rows));
  const c = Math.min(cols - 1, Math.floor(x * cols));
  return { index: r * cols + c, r, c };
}

for (const frame of document.querySelectorAll(".editable .frame")) {
  const hover = frame.querySelector(".hover");
  frame.addEventListener("click", (ev) => {
    const p = patchAt(ev, frame);
    if (!p) return;
    const next = new Set(state.wanted || state.result.mask);
    if (next.has(p.index)) next.delete(p.index);
    else next.add(p.index);
    reconstruct(next);
  });
  frame.addEventListener("pointermove", (ev) => {
    const p = patchAt(ev, frame);
    hover.hidden = !p;
    if (p) {
      hover.style.setProperty("--r", p.r);
      hover.style.setProperty("--c", p.c);
    }
  });
  frame.addEventListener("pointerleave", () => {
    hover.hidden = true;
  });
}

// ------------------------------------------------------------------------------------------ image input
function baseName(name) {
  const stem = String(name || "image").replace(/\.[^.]*$/, "");
  return stem.replace(/[^\w.-]+/g, "_").slice(0, 60) || "image";
}

function clearResults() {
  state.result = null;
  for (const view of VIEWS) {
    const panel = $(`#panel-${view}`);
    panel.querySelector("img").removeAttribute("src");
    panel.querySelector("a.dl").hidden = true;
  }
  el.maskInfo.textContent = "running…";
  delete el.maskInfo.dataset.masked;
  el.psnr.textContent = "";
  el.mode.textContent = "";
  el.resetMask.hidden = true;
  el.embed.disabled = true;
}

function useImage(blob, name) {
  state.image = blob;
  state.name = baseName(name);
  state.explicit = null;
  state.wanted = null;
  el.fileName.textContent = name || "";
  clearResults(); // never show one picture's results under another's name
  reconstruct(null);
}

el.file.addEventListener("change", () => {
  const f = el.file.files[0];
  if (f) useImage(f, f.name);
  el.file.value = ""; // picking the same file again still fires "change"
});

for (const type of ["dragenter", "dragover"]) {
  el.drop.addEventListener(type, (ev) => {
    ev.preventDefault();
    el.drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  el.drop.addEventListener(type, () => el.drop.classList.remove("over"));
}
el.drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  const f = ev.dataTransfer.files[0];
  if (f) useImage(f, f.name);
});
// A file dropped next to the drop zone should not navigate away from the page.
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("drop", (ev) => ev.preventDefault());

window.addEventListener("paste", (ev) => {
  const item = [...(ev.clipboardData?.items || [])].find((i) => i.kind === "file");
  const f = item && item.getAsFile();
  if (f) useImage(f, f.name || "pasted");
});

for (const btn of document.querySelectorAll("button.sample")) {
  btn.addEventListener("click", async () => {
    const src = btn.dataset.src;
    try {
      const res = await fetch(src);
      if (!res.ok) throw new ApiError(res.status, "sample_missing", `cannot load the sample ${src}`);
      useImage(await res.blob(), src.split("/").pop());
    } catch (e) {
      showError(e);
    }
  });
}

// ------------------------------------------------------------------------------------------ controls
el.ratio.addEventListener("input", () => {
  el.ratioOut.value = Number(el.ratio.value).toFixed(2);
  scheduleReconstruct();
});
el.seed.addEventListener("change", () => reconstruct(null));
el.newMask.addEventListener("click", () => {
  newSeed();
  reconstruct(null);
});
el.resetMask.addEventListener("click", () => reconstruct(null));
el.model.addEventListener("change", () => {
  state.explicit = null; // another model may have another grid
  state.wanted = null;
  describeModel();
  reconstruct(null);
});
el.resize.addEventListener("change", () => reconstruct());

// ------------------------------------------------------------------------------------------ downloads
function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30_000);
}

el.embed.addEventListener("click", async () => {
  if (!state.image) return;
  const q = new URLSearchParams({ format: "npz", resize: el.resize.value });
  if (state.models.length > 1 && el.model.value) q.set("model", el.model.value);
  el.embed.disabled = true;
  try {
    const res = await api(`/v1/embed?${q}`, { method: "POST", body: imageForm() });
    saveBlob(await res.blob(), `${state.name}-embeddings.npz`);
    clearError();
  } catch (e) {
    showError(e);
  } finally {
    el.embed.disabled = false;
  }
});

// ------------------------------------------------------------------------------------------ API key
el.key.value = storedKey();
el.keyForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  try {
    const key = el.key.value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  } catch {
    showError(new ApiError(0, "storage_disabled", "this browser does not allow saving the key"));
    return;
  }
  el.keyBox.open = false;
  loadModels();
});
el.forgetKey.addEventListener("click", () => {
  try {
    localStorage.removeItem(KEY_STORE);
  } catch {
    // nothing stored
  }
  el.key.value = "";
});

// ------------------------------------------------------------------------------------------ start
newSeed();
loadModels();
