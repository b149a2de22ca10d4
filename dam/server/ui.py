"""The demo page (`dam serve --ui`, `dam demo-ui`): one static HTML file, no build step.

Upload an image, mark the region (paint it with the mouse, which always works; or drag a box /
click points, which the server turns into a mask with SAM when it was started with
--sam-checkpoint), and the caption streams in from /v1/chat/completions (fetch + SSE). The page
sends the image and the mask as two image parts (the mask rule of `dam.server.messages`): a
browser canvas cannot export a cut-out whose hidden pixels keep their colours.

`/?example=1` loads a drawn example scene and paints its red circle with synthetic pointer
events; `&describe=1` also asks for the caption (used by the headless-browser test).
"""

DEMO_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Describe Anything demo</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 20px; color: #222; max-width: 980px; }
  h1 { font-size: 20px; margin: 0 0 8px; }
  .row { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
  #stage { position: relative; display: inline-block; border: 1px solid #bbb; background: #f4f4f4;
           min-width: 320px; min-height: 120px; }
  #stage canvas { display: block; max-width: 640px; }
  #overlay { position: absolute; left: 0; top: 0; width: 100%; height: 100%; cursor: crosshair; touch-action: none; }
  #caption { white-space: pre-wrap; border: 1px solid #bbb; border-radius: 4px; padding: 10px; min-height: 48px;
             font-size: 16px; background: #fff; }
  #status { color: #666; font-size: 13px; }
  .error { color: #b00020 !important; }
  label.disabled { color: #999; }
  input[type=text] { width: 420px; }
</style>
</head>
<body>
<h1>Describe Anything</h1>
<div id="status">loading...</div>
<div class="row">
  <input type="file" id="file" accept="image/*">
  <button id="example">Try an example</button>
</div>
<div class="row" id="tools">
  <label><input type="radio" name="tool" value="paint" checked> paint</label>
  <label><input type="radio" name="tool" value="erase"> erase</label>
  <label id="box-label"><input type="radio" name="tool" value="box"> box (SAM)</label>
  <label id="points-label"><input type="radio" name="tool" value="points"> points (SAM; shift-click: background)</label>
  <label>brush <input type="range" id="brush" min="2" max="80" value="24"></label>
  <button id="clear">Clear mask</button>
</div>
<div id="stage"><canvas id="image" width="320" height="120"></canvas><canvas id="overlay" width="320" height="120"></canvas></div>
<div class="row">
  <input type="text" id="query" value="Describe the masked region in detail.">
  <label>max tokens <input type="number" id="max-tokens" value="256" min="1" style="width:70px"></label>
  <label>temperature <input type="number" id="temperature" value="0" min="0" max="2" step="0.1" style="width:60px"></label>
  <button id="describe">Describe</button>
</div>
<div id="caption"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const imageCanvas = $("image"), overlay = $("overlay");
const mask = document.createElement("canvas");  // magenta where the region is, transparent elsewhere
const MASK_COLOR = "rgb(255, 0, 200)";
let hasImage = false, painting = false, last = null, boxStart = null, points = [], sam = false;

function status(text, isError) { $("status").textContent = text; $("status").classList.toggle("error", !!isError); }
function tool() { return document.querySelector("input[name=tool]:checked").value; }

function setSize(w, h) {
  for (const c of [imageCanvas, overlay, mask]) { c.width = w; c.height = h; }
  points = [];
}

function showImage(source) {  // source: an Image or a canvas
  setSize(source.width, source.height);
  const ctx = imageCanvas.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, source.width, source.height);  // opaque: no alpha sent
  ctx.drawImage(source, 0, 0);
  hasImage = true;
  redraw();
}

function redraw(box) {
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  ctx.globalAlpha = 0.45; ctx.drawImage(mask, 0, 0); ctx.globalAlpha = 1;
  if (box) { ctx.strokeStyle = "#0a0"; ctx.lineWidth = 2; ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]); }
  for (const [x, y, label] of points) {
    ctx.fillStyle = label ? "#0a0" : "#a00"; ctx.beginPath(); ctx.arc(x, y, 5, 0, 2 * Math.PI); ctx.fill();
  }
}

function position(event) {
  const r = overlay.getBoundingClientRect();
  return [(event.clientX - r.left) * overlay.width / r.width, (event.clientY - r.top) * overlay.height / r.height];
}

function stroke(from, to) {
  const ctx = mask.getContext("2d");
  ctx.globalCompositeOperation = tool() === "erase" ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = MASK_COLOR;
  ctx.lineWidth = Number($("brush").value) * overlay.width / overlay.getBoundingClientRect().width;
  ctx.lineCap = "round";
  ctx.beginPath(); ctx.moveTo(from[0], from[1]); ctx.lineTo(to[0], to[1]); ctx.stroke();
  ctx.globalCompositeOperation = "source-over";
  redraw();
}

overlay.addEventListener("pointerdown", (event) => {
  if (!hasImage) return;
  try { overlay.setPointerCapture(event.pointerId); } catch (e) { /* synthetic events have no capture */ }
  const p = position(event), t = tool();
  if (t === "paint" || t === "erase") { painting = true; last = p; stroke(p, p); }
  else if (t === "box") { boxStart = p; }
  else if (t === "points") { points.push([p[0], p[1], event.shiftKey ? 0 : 1]); segment({ points: points.map((q) => [q[0], q[1]]), labels: points.map((q) => q[2]) }); }
});
overlay.addEventListener("pointermove", (event) => {
  const p = position(event);
  if (painting) { stroke(last, p); last = p; }
  else if (boxStart) { redraw([boxStart[0], boxStart[1], p[0], p[1]]); }
});
overlay.addEventListener("pointerup", (event) => {
  const p = position(event);
  if (boxStart) {
    const b = [Math.min(boxStart[0], p[0]), Math.min(boxStart[1], p[1]), Math.max(boxStart[0], p[0]), Math.max(boxStart[1], p[1])];
    boxStart = null;
    if (b[2] - b[0] > 2 && b[3] - b[1] > 2) segment({ box: b.map(Math.round) });
  }
  painting = false;
});

async function segment(prompt) {
  status("segmenting with SAM...");
  const body = Object.assign({ image: imageCanvas.toDataURL("image/png") }, prompt);
  const response = await fetch("/v1/segment", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const result = await response.json();
  if (!response.ok) { status(result.error.message, true); return; }
  const img = new Image();
  img.onload = () => {
    const tmp = document.createElement("canvas"); tmp.width = mask.width; tmp.height = mask.height;
    tmp.getContext("2d").drawImage(img, 0, 0);
    const data = tmp.getContext("2d").getImageData(0, 0, tmp.width, tmp.height);
    for (let i = 0; i < data.data.length; i += 4) {
      const on = data.data[i] >= 128;
      data.data[i] = 255; data.data[i + 1] = 0; data.data[i + 2] = 200; data.data[i + 3] = on ? 255 : 0;
    }
    mask.getContext("2d").putImageData(data, 0, 0);
    redraw();
    status("mask from SAM: " + result.area + " pixels");
  };
  img.src = result.mask;
}

function maskDataUrl() {  // white region on black, opaque
  const out = document.createElement("canvas"); out.width = mask.width; out.height = mask.height;
  const ctx = out.getContext("2d");
  const data = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  let count = 0;
  for (let i = 0; i < data.data.length; i += 4) {
    const v = data.data[i + 3] >= 128 ? 255 : 0; count += v ? 1 : 0;
    data.data[i] = data.data[i + 1] = data.data[i + 2] = v; data.data[i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  return count ? out.toDataURL("image/png") : null;
}

async function describe() {
  const caption = $("caption");
  caption.textContent = ""; caption.classList.remove("error");
  document.body.dataset.state = "running";
  const maskUrl = hasImage ? maskDataUrl() : null;
  if (!maskUrl) { status("load an image and mark the region first", true); document.body.dataset.state = "error"; return; }
  const content = [
    { type: "image_url", image_url: { url: imageCanvas.toDataURL("image/png") } },
    { type: "image_url", image_url: { url: maskUrl } },
    { type: "text", text: $("query").value },
  ];
  const body = { model: "dam", stream: true, messages: [{ role: "user", content }],
                 max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) };
  status("describing...");
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) { const e = await response.json(); throw new Error(e.error ? e.error.message : response.statusText); }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const choice = event.choices[0];
        if (choice && choice.delta.content) caption.textContent += choice.delta.content;
        if (choice && choice.finish_reason) finish = choice.finish_reason;
      }
    }
    status("done (finish_reason: " + finish + ")");
    document.body.dataset.state = "done";
  } catch (error) {
    caption.classList.add("error"); caption.textContent = String(error.message || error);
    status("request failed", true); document.body.dataset.state = "error";
  }
}

function exampleScene() {
  const c = document.createElement("canvas"); c.width = 320; c.height = 240;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#9cd3f0"; ctx.fillRect(0, 0, 320, 160); ctx.fillStyle = "#7cb36b"; ctx.fillRect(0, 160, 320, 80);
  ctx.fillStyle = "#e03c3c"; ctx.beginPath(); ctx.arc(90, 120, 40, 0, 2 * Math.PI); ctx.fill();
  ctx.fillStyle = "#f2c230"; ctx.fillRect(170, 60, 70, 70);
  ctx.fillStyle = "#3050d0"; ctx.beginPath(); ctx.moveTo(250, 210); ctx.lineTo(300, 210); ctx.lineTo(275, 160); ctx.fill();
  return c;
}

function paintExample() {  // synthetic pointer events over the red circle, as a user would paint it
  const r = overlay.getBoundingClientRect(), sx = r.width / overlay.width, sy = r.height / overlay.height;
  const send = (type, x, y) => overlay.dispatchEvent(new PointerEvent(type, { clientX: r.left + x * sx, clientY: r.top + y * sy, pointerId: 1, bubbles: true }));
  document.querySelector("input[value=paint]").checked = true;
  send("pointerdown", 64, 96);
  for (let y = 96; y <= 144; y += 6) { send("pointermove", 64, y); send("pointermove", 116, y); }
  send("pointerup", 116, 144);
}

function loadExample() { mask.getContext("2d").clearRect(0, 0, mask.width, mask.height); showImage(exampleScene()); }

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  const img = new Image();
  img.onload = () => { showImage(img); URL.revokeObjectURL(img.src); status("paint the region" + (sam ? ", drag a box or click points" : "")); };
  img.onerror = () => status("could not read " + file.name + " as an image", true);
  img.src = URL.createObjectURL(file);
});
$("example").addEventListener("click", () => { loadExample(); paintExample(); status("example loaded: the red circle is painted; press Describe"); });
$("clear").addEventListener("click", () => { mask.getContext("2d").clearRect(0, 0, mask.width, mask.height); points = []; redraw(); });
$("describe").addEventListener("click", describe);

(async () => {
  try {
    const health = await (await fetch("/health")).json();
    sam = health.sam;
    for (const id of ["box-label", "points-label"]) {
      $(id).classList.toggle("disabled", !sam); $(id).querySelector("input").disabled = !sam;
      if (!sam) $(id).title = "start the server with --sam-checkpoint to use SAM";
    }
    status("model " + health.model + (sam ? " with SAM" : " (no SAM: paint the mask)") + ": load an image or try the example");
  } catch (error) { status("the server does not answer /health: " + error, true); }
  const params = new URLSearchParams(location.search);
  if (params.get("example")) { loadExample(); paintExample(); if (params.get("describe")) await describe(); }
})();
</script>
</body>
</html>
"""
