// minterp_tl explorer: the page. Plain JavaScript and SVG, served from the package (no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let state = { tokens: [], nLayers: 0, graph: null };

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function api(action, params = {}, post = false) {
  $("error").textContent = "";
  $("status").textContent = "working…";
  document.body.dataset.busy = "1";
  try {
    const query = new URLSearchParams(params).toString();
    const response = post
      ? await fetch(`/api/${action}`, { method: "POST", body: JSON.stringify(params) })
      : await fetch(`/api/${action}?${query}`);
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  } catch (err) {
    $("error").textContent = err.message;
    throw err;
  } finally {
    $("status").textContent = "";
    delete document.body.dataset.busy;
  }
}

function tokenList(title, items) {
  const rows = items.map((t) => `<li><code>${esc(JSON.stringify(t.token))}</code> ${t.value.toFixed(3)}</li>`);
  return `<div><b>${esc(title)}</b><ul class="${title.replace(/\W/g, "")}">${rows.join("")}</ul></div>`;
}

function pushes(data) {
  return `<div class="tokens">${tokenList("promoted", data.promoted)}${tokenList("suppressed", data.suppressed)}</div>`;
}

// ---- the graph ------------------------------------------------------------------------------------
const W = 70, H = 12, PAD = 30;

function xy(node) {
  const x = PAD + node.token * W;
  const row = node.kind === "X" ? 0 : node.kind === "A" ? 2 * node.layer + 1 : node.kind === "M" ? 2 * node.layer + 1.5 : 2 * node.layer + 2;
  return [node.kind === "M" ? x + W * 0.3 : x, PAD + (2 * state.nLayers + 1 - row) * H];
}

function nodeInfo(id) {
  const m = /^([XAMI])(-?\d+)_(\d+)$/.exec(id);
  return { kind: m[1], layer: m[1] === "X" ? -1 : Number(m[2]), token: Number(m[3]) };
}

function drawGraph(graph) {
  state.graph = graph;
  const svg = $("graph");
  svg.innerHTML = "";
  svg.setAttribute("width", PAD * 2 + W * state.tokens.length);
  svg.setAttribute("height", PAD * 2 + H * (2 * state.nLayers + 2));
  state.tokens.forEach((tok, t) => {
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", PAD + t * W - 10);
    label.setAttribute("y", PAD + (2 * state.nLayers + 2) * H + 10);
    label.textContent = tok;
    svg.appendChild(label);
  });
  for (const e of graph.edges) {
    const s = nodeInfo(e.source), t = nodeInfo(e.target);
    const [x1, y1] = xy(s), [x2, y2] = xy(t);
    const line = document.createElementNS(SVG, "line");
    const kind = t.kind === "A" ? "attn" : (t.kind === "M" || s.kind === "M") ? "ffn" : "resid";
    Object.entries({ x1, y1, x2, y2, "stroke-width": 0.5 + 5 * e.weight }).forEach(([k, v]) => line.setAttribute(k, v));
    line.setAttribute("class", `edge ${kind}`);
    line.dataset.source = e.source;
    line.dataset.target = e.target;
    if (kind === "attn") line.addEventListener("click", () => selectEdge(line, t.layer, t.token, s.token));
    svg.appendChild(line);
  }
  for (const n of graph.nodes) {
    const [cx, cy] = xy(n);
    const circle = document.createElementNS(SVG, "circle");
    Object.entries({ cx, cy, r: n.kind === "M" ? 4 : 3 }).forEach(([k, v]) => circle.setAttribute(k, v));
    circle.setAttribute("class", n.kind === "M" ? "node ffn" : "node");
    circle.dataset.id = n.id;
    circle.addEventListener("click", () => selectNode(circle, n));
    svg.appendChild(circle);
  }
  $("edge-count").textContent = graph.edges.length;
  $("paths").innerHTML = graph.paths.map((p) => `<li>${esc(p.text)}</li>`).join("");
}

function mark(el) {
  document.querySelectorAll("svg .selected").forEach((x) => x.classList.remove("selected"));
  if (el) el.classList.add("selected");
}

async function selectEdge(line, layer, target, source) {
  mark(line);
  const data = await api("edge", { layer, target, source, distance_norm: $("norm").value });
  const heads = data.heads.slice(0, 5).map((h) => `<li>head ${h.head}: ${(100 * h.share).toFixed(1)}%</li>`);
  $("panel").innerHTML = `<p id="edge-panel">Attention edge, layer ${layer}: token ${source} → ${target}.
    Strongest head: <b id="edge-head">L${layer}H${data.heads[0].head}</b></p><ol>${heads.join("")}</ol>
    <p>What that head wrote at token ${target}:</p>${pushes(data.top_head)}`;
}

async function selectNode(circle, node) {
  mark(circle);
  if (node.kind === "M") return showFfn(node.layer, node.token);
  const layer = node.kind === "X" ? -1 : node.layer;
  return showRepresentation(node.kind === "A" ? layer - 1 : layer, node.token);
}

async function showRepresentation(layer, pos) {
  const data = await api("representation", { layer, pos });
  const where = layer < 0 ? "the embeddings" : `block ${layer}`;
  $("panel").innerHTML = `<p id="rep-panel">Representation after ${where}, token ${pos}</p>
    ${tokenList("top tokens", data.top)}${data.promoted ? `<p>What block ${layer} wrote:</p>` + pushes(data) : ""}`;
}

async function showFfn(layer, pos) {
  const data = await api("ffn", { layer, pos });
  const rows = data.neurons.map((n) => `<li><a href="#" class="neuron" data-n="${n.neuron}">neuron ${n.neuron}</a>:
    ${(100 * n.share).toFixed(1)}% (activation ${n.activation.toFixed(2)})</li>`);
  $("panel").innerHTML = `<p id="ffn-panel">FFN of layer ${layer}, token ${pos}</p>${pushes(data)}
    <b>top neurons</b><ol>${rows.join("")}</ol><div id="neuron-panel"></div>`;
  document.querySelectorAll("a.neuron").forEach((a) => a.addEventListener("click", async (ev) => {
    ev.preventDefault();
    const n = await api("neuron", { layer, neuron: a.dataset.n });
    $("neuron-panel").innerHTML = `<p>Neuron ${a.dataset.n} of layer ${layer} writes:</p>${pushes(n)}`;
  }));
}

// ---- tables ---------------------------------------------------------------------------------------
function table(id, rows, cols, cell) {
  const head = `<tr><th></th>${cols.map((c) => `<th>${esc(c)}</th>`).join("")}</tr>`;
  const body = rows.map((r, i) => `<tr><th>${esc(r)}</th>${cols.map((_, j) => cell(i, j)).join("")}</tr>`);
  return `<table class="grid" id="${id}">${head}${body.reverse().join("")}</table>`;
}

async function showLens() {
  const data = await api("lens");
  $("lens").innerHTML = table("lens-table", data.rows, state.tokens, (i, j) => {
    const c = data.cells[i][j];
    return `<td data-layer="${i - 1}" data-pos="${j}" style="background: rgba(31,119,180,${c.prob.toFixed(2)})">${esc(c.token)}</td>`;
  });
  document.querySelectorAll("#lens-table td").forEach((td) =>
    td.addEventListener("click", () => showRepresentation(Number(td.dataset.layer), Number(td.dataset.pos))));
}

async function runPatch() {
  const corrupted = $("corrupted").value;
  const data = await api("patch", { corrupted }, true);
  $("patch-view").innerHTML = `<p>Patching ${esc(JSON.stringify(data.answer))} vs ${esc(JSON.stringify(data.corrupted_answer))}
    (1 = clean, 0 = corrupted)</p>` + table("patch-table", data.rows, state.tokens, (i, j) => {
    const v = data.values[i][j];
    const colour = v >= 0 ? `rgba(214,39,40,${Math.min(1, v).toFixed(2)})` : `rgba(31,119,180,${Math.min(1, -v).toFixed(2)})`;
    return `<td data-layer="${i}" data-pos="${j}" style="background: ${colour}">${v.toFixed(2)}</td>`;
  });
  document.querySelectorAll("#patch-table td").forEach((td) => td.addEventListener("click", async () => {
    const lens = await api("patched_lens", { corrupted, layer: td.dataset.layer, pos: td.dataset.pos });
    const rows = lens.rows.map((r, i) => `<li>${esc(r)}: <code>${esc(JSON.stringify(lens.cells[i].token))}</code> ${lens.cells[i].prob.toFixed(3)}</li>`);
    $("patched-lens").innerHTML = `<p id="patched-title">Patched run (resid_pre of block ${lens.layer}, token ${lens.pos}):
      the last token's lens</p><ol>${rows.join("")}</ol>`;
  }));
}

// ---- controls -------------------------------------------------------------------------------------
async function refreshGraph() {
  const graph = await api("graph", { threshold: $("threshold").value, distance_norm: $("norm").value });
  drawGraph(graph);
}

async function run() {
  const data = await api("run", { prompt: $("prompt").value }, true);
  state.tokens = data.tokens;
  state.nLayers = data.n_layers;
  $("prediction").innerHTML = "prediction: " + data.prediction.slice(0, 3)
    .map((t) => `<code>${esc(JSON.stringify(t.token))}</code> ${t.value.toFixed(2)}`).join(", ");
  $("panel").innerHTML = '<p class="hint">Click a node, an edge or an FFN block.</p>';
  $("patch-view").innerHTML = "";
  $("patched-lens").innerHTML = "";
  await refreshGraph();
  await showLens();
  document.body.dataset.ready = "1";
}

$("run").addEventListener("click", () => run().catch(() => {}));
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter") run().catch(() => {}); });
$("threshold").addEventListener("input", () => { $("threshold-value").textContent = $("threshold").value; });
$("threshold").addEventListener("change", () => refreshGraph().catch(() => {}));
$("norm").addEventListener("change", () => refreshGraph().catch(() => {}));
$("patch").addEventListener("click", () => runPatch().catch(() => {}));
$("load").addEventListener("click", async () => {
  try {
    const info = await api("model", { name: $("model").value }, true);
    $("model-name").textContent = info.model;
  } catch (err) { /* shown in #error */ }
});
api("info").then((info) => { $("model-name").textContent = info.model; }).catch(() => {});
