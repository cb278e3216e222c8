// wanrt playground: no build step. Ranges and defaults come from the server's OpenAPI schema.
"use strict";

const NUMERIC = ["steps", "cfg_high_noise", "cfg_low_noise", "width", "height", "frames", "fps", "seed"];
const $ = (id) => document.getElementById(id);
const state = { job: null, source: null, poll: null, preview: null, previewUrl: null, loras: [] };

function headers(extra = {}) {
  const key = $("api_key").value.trim();
  if (key) localStorage.setItem("wanrt_api_key", key);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function loadSchema() {
  const schema = await (await fetch("/schema/openapi.json")).json();
  const props = schema.components.schemas.GenerateRequest.properties;
  const box = $("numbers");
  for (const name of NUMERIC) {
    const p = props[name] || {};
    const step = name.startsWith("cfg") ? "0.1" : (p.multipleOf || 1);
    const range = name === "seed" ? "any integer" : (p.minimum !== undefined ? `${p.minimum}–${p.maximum}` : "");
    const div = document.createElement("div");
    div.innerHTML = `<label for="${name}">${name} <span class="hint">${range}</span></label>
      <input id="${name}" name="${name}" type="number" step="${step}"
        ${p.minimum !== undefined && name !== "seed" ? `min="${p.minimum}" max="${p.maximum}"` : ""} value="${p.default ?? ""}">`;
    box.appendChild(div);
  }
}

// LoRAs per request: the picker appears when the workers publish a library (GET /loras).
async function loadLoras() {
  const r = await fetch("/loras", { headers: headers() });
  if (!r.ok) return;
  state.loras = (await r.json()).available || [];
  $("loras_box").hidden = state.loras.length === 0;
}

function addLora() {
  const row = document.createElement("div");
  row.className = "lora";
  const names = state.loras.map((n) => `<option>${n.replace(/[<>&"]/g, "")}</option>`).join("");
  row.innerHTML = `<select class="lora_name" aria-label="LoRA">${names}</select>
    <input class="lora_strength" type="number" min="-4" max="4" step="0.05" value="1" aria-label="strength">
    <select class="lora_expert" aria-label="expert"><option>both</option><option>high</option><option>low</option></select>
    <button class="secondary" type="button" data-remove-lora>remove</button>`;
  $("loras").appendChild(row);
  $("add_lora").disabled = $("loras").children.length >= 8;
}

function chosenLoras() {
  return [...document.querySelectorAll("#loras .lora")].map((row) => ({
    name: row.querySelector(".lora_name").value,
    strength: Number(row.querySelector(".lora_strength").value),
    expert: row.querySelector(".lora_expert").value,
  }));
}

function showError(text) { $("error").textContent = text || ""; }

// The live preview: an animated WebP replaced after each denoising step. Fetched (not an <img src>) so that an
// API key can go along; each new step's URL differs (?step=N), so each step is fetched once.
async function showPreview(url, step, steps) {
  if (!url || url === state.previewUrl) return;
  state.previewUrl = url;
  const r = await fetch(url, { headers: headers(), cache: "no-store" });
  if (!r.ok || url !== state.previewUrl) return;
  const blob = await r.blob();
  if (state.preview) URL.revokeObjectURL(state.preview);
  state.preview = URL.createObjectURL(blob);
  $("preview").src = state.preview;
  $("preview").dataset.step = String(step || "");
  $("preview_caption").textContent = `preview after step ${step} of ${steps} (predicted video, latent colours)`;
  $("preview_box").hidden = false;
}

function resetPreview() {
  state.previewUrl = null;
  if (state.preview) URL.revokeObjectURL(state.preview);
  state.preview = null;
  $("preview").removeAttribute("src");
  $("preview").dataset.step = "";
  $("preview_box").hidden = true;
}

function show(status) {
  $("state").textContent = status.status + (status.stage ? ` (${status.stage})` : "") +
    (status.queue_position ? ` – position ${status.queue_position}` : "") +
    (status.waiting ? ` – waiting: ${status.waiting}` : "");
  $("progress").value = status.progress || 0;
  if (status.preview_url) showPreview(status.preview_url, status.preview_step, status.preview_steps).catch(() => {});
  if (status.status === "completed") {
    const url = status.download_url;
    const video = $("video");
    video.src = url;
    video.hidden = false;
    video.play().catch(() => {});
    $("download").href = url;
    $("download").hidden = false;
    stopWatching();
    refreshJobs();
  } else if (status.status === "error" || status.status === "cancelled") {
    showError(status.error || status.status);
    stopWatching();
    refreshJobs();
  }
}

function stopWatching() {
  if (state.source) { state.source.close(); state.source = null; }
  if (state.poll) { clearInterval(state.poll); state.poll = null; }
}

function watch(jobId) {
  stopWatching();
  // Server-sent events when possible (they cannot carry an Authorization header); polling otherwise.
  if (window.EventSource && !$("api_key").value.trim()) {
    $("via").textContent = "live (SSE)";
    const source = new EventSource(`/events/${jobId}`);
    state.source = source;
    source.addEventListener("status", (e) => show(JSON.parse(e.data)));
    source.addEventListener("preview", (e) => {
      const p = JSON.parse(e.data);
      showPreview(p.preview_url, p.step, p.steps).catch(() => {});
    });
    source.onerror = () => { if (state.source === source) { source.close(); state.source = null; poll(jobId); } };
  } else {
    poll(jobId);
  }
}

function poll(jobId) {
  $("via").textContent = "polling";
  state.poll = setInterval(async () => {
    const r = await fetch(`/status/${jobId}`, { headers: headers() });
    if (r.ok) show(await r.json());
  }, 1000);
}

async function submit(ev) {
  ev.preventDefault();
  showError("");
  $("video").hidden = true;
  $("download").hidden = true;
  resetPreview();
  const file = $("image_file").files[0];
  const fields = { prompt: $("prompt").value };
  if ($("negative_prompt").value.trim()) fields.negative_prompt = $("negative_prompt").value;
  for (const name of NUMERIC) if ($(name).value !== "") fields[name] = Number($(name).value);
  const loras = chosenLoras();
  if (loras.length) fields.loras = loras;
  let response;
  $("submit").disabled = true;
  try {
    if (file) {  // multipart upload: the same safe image checks as a URL
      const form = new FormData();
      form.append("image", file);
      for (const [k, v] of Object.entries(fields)) form.append(k, k === "loras" ? JSON.stringify(v) : String(v));
      response = await fetch("/generate", { method: "POST", body: form, headers: headers() });
    } else {
      response = await fetch("/generate", {
        method: "POST", headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify({ image_url: $("image_url").value, ...fields }),
      });
    }
    const body = await response.json();
    if (!response.ok) { showError(`${response.status}: ${body.detail}`); return; }
    state.job = body.job_id;
    $("job_id").textContent = body.job_id;
    show({ status: "queued", progress: 0 });
    watch(body.job_id);
    refreshJobs();
  } finally {
    $("submit").disabled = false;
  }
}

async function refreshJobs() {
  const r = await fetch("/jobs", { headers: headers() });
  if (!r.ok) return;
  const { jobs } = await r.json();
  const rows = Object.entries(jobs).reverse().map(([id, j]) =>
    `<tr><td><code>${id.slice(0, 8)}</code></td><td>${j.status}</td><td>${Math.round(j.progress)}%</td>
     <td><button class="secondary" data-delete="${id}" type="button">delete</button></td></tr>`);
  $("jobs").innerHTML = rows.join("");
}

document.addEventListener("click", async (e) => {
  if (e.target.dataset && "removeLora" in e.target.dataset) {
    e.target.closest(".lora").remove();
    $("add_lora").disabled = false;
    return;
  }
  const id = e.target.dataset && e.target.dataset.delete;
  if (!id) return;
  await fetch(`/jobs/${id}`, { method: "DELETE", headers: headers() });
  if (id === state.job) stopWatching();
  refreshJobs();
});

$("form").addEventListener("submit", submit);
$("refresh").addEventListener("click", refreshJobs);
$("add_lora").addEventListener("click", addLora);
$("api_key").value = localStorage.getItem("wanrt_api_key") || "";
loadSchema().then(refreshJobs).then(loadLoras);
