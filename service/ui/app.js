// vae-serve's web page: plain JavaScript over the JSON API (GET /v1/models, POST /score, /score/upload,
// /reconstruct, /reconstruct/upload, /sample). No libraries, no network but this service.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], current: null, noMaps: new Set(), cards: [], grid: null, cursor: [0, 0] };

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    const message = typeof e === "string" ? e : e.message || `HTTP ${status}`;
    super(message);
    this.status = status;
    this.code = e.code || "";
    this.where = e.where || "";
  }
}

// --- the API ---------------------------------------------------------------------------------------

async function api(path, body) {
  const headers = {};
  const key = $("apikey").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  const init = { method: body === undefined ? "GET" : "POST", headers };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  try { data = await res.json(); } catch (_) { data = null; }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

function explain(err) {
  if (!(err instanceof ApiError)) return String(err.message || err);
  if (err.status === 401) return "This service needs an API key: enter it above. (" + err.message + ")";
  if (err.status === 403) return "The API key was refused: " + err.message;
  if (err.status === 503) return "The service is busy or not ready: " + err.message;
  return err.message + (err.where ? ` (${err.where})` : "");
}

function showError(text) {
  const el = $("error");
  el.textContent = text || "";
  el.hidden = !text;
}

function showNotice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

async function busy(button, work) {
  button.disabled = true;
  document.body.setAttribute("aria-busy", "true");
  try { await work(); } finally {
    button.disabled = false;
    document.body.removeAttribute("aria-busy");
  }
}

// --- models ----------------------------------------------------------------------------------------

async function loadModels() {
  showError("");
  const select = $("model");
  let data;
  try { data = await api("/v1/models"); } catch (err) {
    select.replaceChildren();
    $("model-info").textContent = "";
    showError(explain(err));
    return;
  }
  const previous = select.value;
  state.models = [];
  select.replaceChildren();
  for (const m of data.models) {
    for (const v of [...m.versions].sort((a, b) => b - a)) {
      const d = m.details[String(v)];
      const value = `${m.name}/${v}`;
      state.models.push({ name: m.name, version: v, details: d, value });
      const opt = new Option(`${m.name} v${v}${v === m.newest ? " (newest)" : ""}`, value);
      select.add(opt);
      if (value === previous || (!previous && m.default && v === m.newest)) opt.selected = true;
    }
  }
  if (!state.models.length) showError("No model version is served: see /readyz for the reasons.");
  selectModel();
}

function selectModel() {
  state.current = state.models.find((m) => m.value === $("model").value) || null;
  const m = state.current;
  if (!m) return;
  const img = m.details.image;
  const ch = img.channels || 1;
  const nll = (m.details.metrics || {}).nll;
  $("model-info").textContent =
    `${m.name} v${m.version}: ${img.height} x ${img.width}` + (ch > 1 ? ` x ${ch}` : "") + ` images, ` +
    `${img.levels} levels, ${m.details.likelihood} likelihood, latent ${m.details.latent_dim}; scored on ` +
    `${m.details.scoring ? `${m.details.scoring.engine} ${m.details.scoring.precision || ""}`.trim() : "?"}` +
    (nll ? `; test NLL ${nll.bits_per_dim.toFixed(3)} bits/dim (K=${nll.K})` : "") + ".";
  const names = $("scorename");
  const chosen = names.value;
  names.replaceChildren(new Option(`model default (${m.details.default_score || "none"})`, ""));
  for (const s of m.details.calibrated_scores || []) names.add(new Option(s, s, false, s === chosen));
  const small = ch === 1 && img.height <= 32 && img.width <= 32;
  $("draw-box").hidden = !small;
  if (small) resetDrawing();
}

function modelFields() {
  const m = state.current;
  return m ? { model: m.name, version: m.version } : {};
}

// --- pixels on canvases ----------------------------------------------------------------------------

function scaleFor(h, w, target) {
  return Math.max(1, Math.floor(target / Math.max(h, w)));
}

// An image of integer levels, (H, W) or (H, W, C), drawn at an integer scale.
function drawLevels(canvas, image, levels, scale) {
  const h = image.length, w = image[0].length;
  canvas.width = w * scale;
  canvas.height = h * scale;
  const ctx = canvas.getContext("2d");
  const data = ctx.createImageData(w, h);
  const k = 255 / Math.max(1, levels - 1);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const p = image[y][x];
      const rgb = Array.isArray(p) ? (p.length >= 3 ? p : [p[0], p[0], p[0]]) : [p, p, p];
      const i = 4 * (y * w + x);
      data.data[i] = rgb[0] * k;
      data.data[i + 1] = rgb[1] * k;
      data.data[i + 2] = rgb[2] * k;
      data.data[i + 3] = 255;
    }
  }
  const tmp = document.createElement("canvas");
  tmp.width = w;
  tmp.height = h;
  tmp.getContext("2d").putImageData(data, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, w * scale, h * scale);
}

// A colour scale from dark (typical) through red to light yellow (most anomalous).
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((c, j) => Math.round(c + f * (STOPS[i + 1][j] - c)));
}

// One scale for every image of a version: 0 (typical) up to twice the pixel threshold, where the colour
// saturates; so maps compare across images. Without a threshold, the image's own largest value.
function mapRange(map, threshold) {
  if (Number.isFinite(threshold) && threshold > 0) return 2 * threshold;
  let hi = 0;
  for (const row of map) for (const v of row) if (Number.isFinite(v) && v > hi) hi = v;
  return hi > 0 ? hi : 1;
}

// The heat map over the picture already on the canvas: colour by value, more opaque where higher;
// pixels over the threshold (the mask) outlined.
function drawOverlay(canvas, map, mask, hi, opacity) {
  const ctx = canvas.getContext("2d");
  const h = map.length, w = map[0].length;
  const sx = canvas.width / w, sy = canvas.height / h;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const t = Math.max(0, map[y][x]) / hi;
      const [r, g, b] = colour(t);
      ctx.fillStyle = `rgba(${r},${g},${b},${(opacity * Math.min(1, t)).toFixed(3)})`;
      ctx.fillRect(x * sx, y * sy, sx, sy);
    }
  }
  if (mask) {
    ctx.strokeStyle = "rgba(255,255,255,0.9)";
    ctx.lineWidth = Math.max(1, Math.min(sx, sy) / 8);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
      if (mask[y][x]) ctx.strokeRect(x * sx + 1, y * sy + 1, sx - 2, sy - 2);
    }
  }
}

function legend(hi, threshold) {
  const box = document.createElement("div");
  box.className = "legend";
  const bar = document.createElement("canvas");
  bar.width = 120;
  bar.height = 10;
  bar.setAttribute("aria-hidden", "true");
  const ctx = bar.getContext("2d");
  for (let x = 0; x < bar.width; x++) {
    const [r, g, b] = colour(x / (bar.width - 1));
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, bar.height);
  }
  const lo = document.createElement("span");
  lo.textContent = "0";
  const top = document.createElement("span");
  top.textContent = `${hi.toFixed(1)} nats` + (Number.isFinite(threshold) ? `; threshold ${threshold.toFixed(1)}` : "");
  box.title = "each pixel's surprise against normal pixels (nats); the colour saturates at twice the pixel threshold";
  box.append("pixel surprise", lo, bar, top);
  return box;
}

// --- result cards ----------------------------------------------------------------------------------

function fmt(v, digits) {
  return v === null || v === undefined ? "n/a" : Number(v).toFixed(digits);
}

function newCard(title) {
  const li = document.createElement("li");
  li.className = "card";
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = title;
  li.append(name);
  $("results").append(li);
  return li;
}

function cardError(li, text) {
  const p = document.createElement("p");
  p.className = "error";
  p.textContent = text;
  li.append(p);
  li.dataset.state = "error";
}

// paint(canvas) draws the input as the model sees it; the overlay is redrawn when the controls change.
function fillCard(li, body, paint, recon) {
  const r = body.results[0];
  const m = state.current;
  li.dataset.state = "scored";
  li.dataset.ood = String(r.is_ood);
  if (r.is_ood) li.classList.add("ood");
  const pics = document.createElement("div");
  pics.className = "pics";
  const input = document.createElement("canvas");
  input.setAttribute("role", "img");
  const inFig = figure(input, "input" + (r.anomaly_map ? " + anomaly map" : ""));
  pics.append(inFig);
  if (recon) {
    const rc = document.createElement("canvas");
    rc.className = "recon";
    rc.setAttribute("role", "img");
    rc.setAttribute("aria-label", "reconstruction");
    const img = m.details.image;
    drawLevels(rc, recon, img.levels, scaleFor(img.height, img.width, 128));
    pics.append(figure(rc, "reconstruction"));
  }
  li.append(pics);
  const hasMap = Array.isArray(r.anomaly_map);
  li.dataset.map = hasMap ? "yes" : "no";
  const entry = { input, paint, map: r.anomaly_map, mask: r.anomaly_mask, threshold: r.pixel_threshold };
  if (hasMap) {
    entry.hi = mapRange(r.anomaly_map, r.pixel_threshold);
    li.append(legend(entry.hi, r.pixel_threshold));
    input.classList.add("overlay");
  }
  state.cards.push(entry);
  render(entry);
  input.setAttribute("aria-label", `input image, ${r.is_ood ? "flagged out of distribution" : "not flagged"}`);
  const dl = document.createElement("dl");
  const flag = r.is_ood === null ? "not calibrated" : r.is_ood ? "OOD: flagged" : "in distribution";
  const rows = [
    ["model", `${body.model} v${body.version}`],
    ["flag", flag],
    [`score (${body.score_name})`, `${fmt(r.score, 4)} ${body.score_units}`],
    [`threshold (fpr ${body.fpr})`, fmt(r.threshold, 4)],
    ["p-value", fmt(r.p_value, 4)],
    ["NLL", `${fmt(r.nll_bits_per_dim, 4)} bits/dim (${fmt(r.nll_nats, 2)} nats, K=${body.num_samples})`],
    ["engine", body.engine],
  ];
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    if (k === "flag") dd.className = "flag " + (r.is_ood ? "ood" : "in");
    if (k.startsWith("score")) dd.className = "score";
    dl.append(dt, dd);
  }
  li.append(dl);
}

function figure(canvas, caption) {
  const fig = document.createElement("figure");
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(canvas, cap);
  return fig;
}

function render(entry) {
  entry.paint(entry.input);
  if (entry.map && $("showmap").checked) {
    drawOverlay(entry.input, entry.map, entry.mask, entry.hi, Number($("opacity").value) / 100);
  }
}

// --- scoring ---------------------------------------------------------------------------------------

function scoreOptions() {
  const o = { num_samples: Number($("k").value) || 1000, seed: 0 };
  const fpr = Number($("fpr").value);
  if (fpr > 0 && fpr < 1) o.fpr = fpr;
  if ($("scorename").value) o.score = $("scorename").value;
  return o;
}

function mapsWanted() {
  return state.current && !state.noMaps.has(state.current.value);
}

function refusesMaps(err) {
  return err instanceof ApiError && err.status === 422 && /anomaly/i.test(`${err.message} ${err.where}`);
}

// send(withMap) makes one request; a 422 about the map is retried without it, once per model version.
async function scoreWithFallback(send) {
  const wanted = mapsWanted();
  let body;
  try { body = await send(wanted); } catch (err) {
    if (!(wanted && refusesMaps(err))) throw err;
    state.noMaps.add(state.current.value);
    body = await send(false);
  }
  if (wanted && body.results.length && !Array.isArray(body.results[0].anomaly_map)) {
    state.noMaps.add(state.current.value);
  }
  if (state.current && state.noMaps.has(state.current.value)) {
    showNotice(`Anomaly maps not available for this model version (${state.current.name} v${state.current.version}).`);
  }
  return body;
}

async function scoreFile(file) {
  const li = newCard(file.name);
  const form = (withMap) => {
    const fd = new FormData();
    fd.append("files", file, file.name);
    for (const [k, v] of Object.entries({ ...modelFields(), ...scoreOptions() })) fd.append(k, String(v));
    if (withMap) fd.append("anomaly_map", "true");
    return fd;
  };
  let body;
  try { body = await scoreWithFallback((withMap) => api("/score/upload", form(withMap))); } catch (err) {
    const text = `${file.name}: ${explain(err)}`;
    cardError(li, text);
    showError(text);
    return;
  }
  let recon = null;
  try {
    const fd = new FormData();
    fd.append("files", file, file.name);
    for (const [k, v] of Object.entries(modelFields())) fd.append(k, String(v));
    recon = (await api("/reconstruct/upload", fd)).images[0];
  } catch (_) { recon = null; }
  const bitmap = await createImageBitmap(file);
  const img = state.current.details.image;
  const grey = (img.channels || 1) === 1;
  const scale = scaleFor(img.height, img.width, 128);
  const paint = (canvas) => {
    canvas.width = img.width * scale;
    canvas.height = img.height * scale;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.filter = grey ? "grayscale(1)" : "none";
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    ctx.filter = "none";
  };
  fillCard(li, body, paint, recon);
}

async function scoreFiles(files) {
  showError("");
  showNotice("");
  if (!state.current) { showError("Choose a model version first."); return; }
  for (const file of files) await scoreFile(file);
}

// --- drawing (small grey models) -------------------------------------------------------------------

function resetDrawing() {
  const img = state.current.details.image;
  state.grid = Array.from({ length: img.height }, () => new Array(img.width).fill(0));
  state.cursor = [Math.floor(img.height / 2), Math.floor(img.width / 2)];
  paintDrawing();
}

function paintDrawing(withCursor) {
  const img = state.current.details.image;
  const canvas = $("draw");
  drawLevels(canvas, state.grid, img.levels, scaleFor(img.height, img.width, 192));
  const ctx = canvas.getContext("2d"), s = canvas.width / img.width;
  ctx.strokeStyle = "rgba(255,255,255,0.15)";  // the pixel grid
  ctx.lineWidth = 1;
  for (let i = 1; i < Math.max(img.width, img.height); i++) {
    ctx.beginPath();
    ctx.moveTo(i * s + 0.5, 0);
    ctx.lineTo(i * s + 0.5, canvas.height);
    ctx.moveTo(0, i * s + 0.5);
    ctx.lineTo(canvas.width, i * s + 0.5);
    ctx.stroke();
  }
  if (withCursor) {
    ctx.strokeStyle = "#f6b73c";
    ctx.lineWidth = 2;
    ctx.strokeRect(state.cursor[1] * s + 1, state.cursor[0] * s + 1, s - 2, s - 2);
  }
}

// A soft brush: the cell at full ink, its four neighbours at least half.
function brush(y, x, erase) {
  const g = state.grid, top = state.current.details.image.levels - 1;
  if (erase) { g[y][x] = 0; return; }
  g[y][x] = top;
  for (const [dy, dx] of [[1, 0], [-1, 0], [0, 1], [0, -1]]) {
    const yy = y + dy, xx = x + dx;
    if (yy >= 0 && yy < g.length && xx >= 0 && xx < g[0].length) g[yy][xx] = Math.max(g[yy][xx], Math.ceil(top / 2));
  }
}

function cellAt(ev) {
  const canvas = $("draw"), rect = canvas.getBoundingClientRect();
  const img = state.current.details.image;
  const x = Math.floor(((ev.clientX - rect.left) / rect.width) * img.width);
  const y = Math.floor(((ev.clientY - rect.top) / rect.height) * img.height);
  return [Math.min(img.height - 1, Math.max(0, y)), Math.min(img.width - 1, Math.max(0, x))];
}

function setUpDrawing() {
  const canvas = $("draw");
  let down = false, erase = false;
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  canvas.addEventListener("pointerdown", (ev) => {
    down = true;
    erase = ev.button === 2;
    canvas.setPointerCapture(ev.pointerId);
    const [y, x] = cellAt(ev);
    brush(y, x, erase);
    paintDrawing();
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!down) return;
    const [y, x] = cellAt(ev);
    brush(y, x, erase);
    paintDrawing();
  });
  canvas.addEventListener("pointerup", () => { down = false; });
  canvas.addEventListener("focus", () => paintDrawing(true));
  canvas.addEventListener("blur", () => paintDrawing(false));
  canvas.addEventListener("keydown", (ev) => {
    const img = state.current.details.image;
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    const [y, x] = state.cursor;
    if (ev.key in moves) {
      const [dy, dx] = moves[ev.key];
      state.cursor = [Math.min(img.height - 1, Math.max(0, y + dy)), Math.min(img.width - 1, Math.max(0, x + dx))];
    } else if (ev.key === " ") brush(y, x, false);
    else if (ev.key === "Delete" || ev.key === "Backspace") brush(y, x, true);
    else return;
    ev.preventDefault();
    paintDrawing(true);
  });
  $("clear-drawing").addEventListener("click", resetDrawing);
  $("score-drawing").addEventListener("click", (ev) => busy(ev.currentTarget, scoreDrawing));
}

async function scoreDrawing() {
  showError("");
  showNotice("");
  const image = state.grid.map((row) => row.slice());
  const li = newCard("drawing");
  let body;
  try {
    body = await scoreWithFallback((withMap) =>
      api("/score", { images: [image], ...modelFields(), ...scoreOptions(), ...(withMap ? { anomaly_map: true } : {}) }));
  } catch (err) {
    const text = `drawing: ${explain(err)}`;
    cardError(li, text);
    showError(text);
    return;
  }
  let recon = null;
  try { recon = (await api("/reconstruct", { images: [image], ...modelFields() })).images[0]; } catch (_) { recon = null; }
  const img = state.current.details.image;
  const paint = (canvas) => drawLevels(canvas, image, img.levels, scaleFor(img.height, img.width, 128));
  fillCard(li, body, paint, recon);
}

// --- samples ---------------------------------------------------------------------------------------

async function drawSamples() {
  showError("");
  if (!state.current) { showError("Choose a model version first."); return; }
  const n = Number($("n").value) || 16, seed = Number($("seed").value) || 0;
  let body;
  try { body = await api("/sample", { n, seed, ...modelFields() }); } catch (err) {
    showError(`samples: ${explain(err)}`);
    return;
  }
  const img = state.current.details.image;
  const grid = $("samples");
  grid.replaceChildren();
  grid.dataset.seed = String(seed);
  grid.dataset.model = `${body.model}/${body.version}`;
  body.images.forEach((image, i) => {
    const c = document.createElement("canvas");
    c.className = "sample";
    c.setAttribute("role", "img");
    c.setAttribute("aria-label", `sample ${i} of ${body.model} v${body.version}, seed ${seed}`);
    drawLevels(c, image, img.levels, scaleFor(img.height, img.width, 64));
    grid.append(c);
  });
}

// --- wiring ----------------------------------------------------------------------------------------

function setUp() {
  const key = $("apikey");
  key.value = sessionStorage.getItem("vae-api-key") || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem("vae-api-key", key.value.trim());
    loadModels();
  });
  $("refresh").addEventListener("click", (ev) => busy(ev.currentTarget, loadModels));
  $("model").addEventListener("change", () => { showNotice(""); selectModel(); });
  $("files").addEventListener("change", async (ev) => {
    const files = [...ev.target.files];
    await scoreFiles(files);
    ev.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    scoreFiles([...ev.dataTransfer.files]);
  });
  const rerender = () => state.cards.forEach(render);
  $("showmap").addEventListener("change", rerender);
  $("opacity").addEventListener("input", rerender);
  $("sample").addEventListener("click", (ev) => busy(ev.currentTarget, drawSamples));
  setUpDrawing();
  loadModels();
}

document.addEventListener("DOMContentLoaded", setUp);
