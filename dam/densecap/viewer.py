"""A static results viewer for `dam densecap`: index.html + results.js beside the results.

No build step and no network: index.html holds its CSS and JavaScript inline and reads the
results from results.js (`window.DENSECAP_RESULTS = {...}`, loaded by a plain <script> tag, so
the page works when opened from file://, where fetch() of a JSON file is blocked). The page
lists the images; hovering over a box or a caption highlights both, clicking selects the region
(its mask is painted when the result has masks: SAM's). `index.html?image=I&region=R` opens image I
(an index or the image's relative path) with region R (0-based) selected; the arrow keys step
through the images.

Each image is shown from its original file (a path relative to the viewer) and falls back to
the drawn copy when the original cannot be loaded (e.g. the results folder was moved).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dam.densecap.drawing import PALETTE
from dam.densecap.files import write_text_atomic

VIEWER_FILE = "index.html"
DATA_FILE = "results.js"


def _url(target: Path, base: Path) -> str:
    """A URL for `target` that works from a page in `base`: relative when possible."""
    try:
        relative = Path(os.path.relpath(target.resolve(), base.resolve()))
    except ValueError:  # another drive (Windows): no relative path exists
        return target.resolve().as_uri()
    return "/".join(quote(part) for part in relative.parts)


def viewer_entry(result: Mapping[str, Any], source: Path, drawn: Path, output: Path) -> dict[str, Any]:
    """What the viewer needs of one image's result (a per-image JSON of `dam densecap`)."""
    return {
        "name": result["image"],
        "src": _url(source, output),
        "drawn": _url(drawn, output),
        "width": result["width"],
        "height": result["height"],
        "proposer": result.get("proposer"),
        "captioner": result.get("captioner"),
        "regions": [
            {key: region[key] for key in ("box", "score", "caption", "mask") if key in region}
            for region in result["regions"]
        ],
    }


def write_viewer(output: str | os.PathLike, entries: Sequence[Mapping[str, Any]], title: str = "Dense captions") -> Path:
    """Write index.html and results.js (the `entries` of `viewer_entry`) into `output`; returns
    the page's path."""
    output = Path(output)
    data = {"title": title, "palette": [list(color) for color in PALETTE], "images": list(entries)}
    # "</" is escaped so that no caption can close the <script> element early.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    write_text_atomic(output / DATA_FILE, f"window.DENSECAP_RESULTS = {payload};\n")
    write_text_atomic(output / VIEWER_FILE, VIEWER_HTML)
    return output / VIEWER_FILE


VIEWER_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Dense captions</title>
<style>
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #222; display: flex; height: 100vh; }
  #list { width: 230px; overflow-y: auto; border-right: 1px solid #ddd; background: #fafafa; flex: none; }
  #list h2 { font-size: 13px; margin: 10px; color: #666; }
  #list button { display: block; width: 100%; text-align: left; border: 0; background: none; padding: 5px 10px;
                 cursor: pointer; font: inherit; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  #list button:hover { background: #eee; }
  #list button.current { background: #dde8f7; font-weight: 600; }
  main { flex: 1; overflow-y: auto; padding: 12px 16px; }
  h1 { font-size: 16px; margin: 0 0 4px; word-break: break-all; }
  #meta { color: #666; font-size: 12px; margin-bottom: 8px; }
  #stage { position: relative; max-width: 100%; background: #eee; }
  #stage img, #stage canvas { position: absolute; inset: 0; width: 100%; height: 100%; }
  #stage canvas { pointer-events: none; }
  .box { position: absolute; border: 2px solid; cursor: pointer; }
  .box.dim { opacity: 0.25; }
  .box.active { border-width: 3px; opacity: 1; box-shadow: 0 0 0 2px #fff; z-index: 2; }
  #selected-caption { font-size: 16px; min-height: 1.4em; margin: 10px 0; padding: 6px 10px; border-left: 5px solid #ccc; }
  #captions { padding-left: 0; list-style: none; margin: 0; }
  #captions li { padding: 3px 8px; cursor: pointer; border-left: 5px solid; margin-bottom: 2px; }
  #captions li.active { background: #dde8f7; }
  #captions .score { color: #888; font-size: 12px; margin-left: 6px; }
  #error { color: #b00; }
</style>
</head>
<body data-state="loading">
<nav id="list"><h2>Images</h2></nav>
<main>
  <h1 id="title">Dense captions</h1>
  <div id="meta"></div>
  <p id="error"></p>
  <div id="stage"><img id="picture" alt=""><canvas id="mask"></canvas><div id="boxes"></div></div>
  <p id="selected-caption"></p>
  <ol id="captions"></ol>
</main>
<script src="results.js"></script>
<script>
"use strict";
const DATA = window.DENSECAP_RESULTS;
const $ = (id) => document.getElementById(id);
let current = -1, selected = -1;

function color(i) { const c = DATA.palette[i % DATA.palette.length]; return `rgb(${c[0]},${c[1]},${c[2]})`; }

// COCO compressed RLE (pycocotools' rleFrString) -> run lengths, column-major, starting with background.
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function paintMask(region, index) {
  const canvas = $("mask"), image = DATA.images[current];
  canvas.width = image.width; canvas.height = image.height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!region || !region.mask) return;
  const [h, w] = region.mask.size, counts = rleCounts(region.mask.counts);
  const pixels = ctx.createImageData(w, h), c = DATA.palette[index % DATA.palette.length];
  let at = 0;
  counts.forEach((run, i) => {
    if (i % 2 === 1) {
      for (let j = at; j < at + run; j++) {
        const x = Math.floor(j / h), y = j % h, o = 4 * (y * w + x);
        pixels.data[o] = c[0]; pixels.data[o + 1] = c[1]; pixels.data[o + 2] = c[2]; pixels.data[o + 3] = 110;
      }
    }
    at += run;
  });
  ctx.putImageData(pixels, 0, 0);
}

function highlight(index) {
  const image = DATA.images[current];
  document.querySelectorAll(".box").forEach((el, i) => {
    el.classList.toggle("active", i === index);
    el.classList.toggle("dim", index >= 0 && i !== index);
  });
  document.querySelectorAll("#captions li").forEach((el, i) => el.classList.toggle("active", i === index));
  const region = image.regions[index];
  const shown = $("selected-caption");
  shown.textContent = region ? `${index + 1}. ${region.caption}` : "";
  shown.style.borderLeftColor = region ? color(index) : "#ccc";
  paintMask(region, index);
}

function selectRegion(index) {
  selected = index;
  highlight(index);
  document.body.dataset.region = String(index);
  try { history.replaceState(null, "", `?image=${current}&region=${index}`); } catch (e) { /* file:// may refuse */ }
}

function showImage(index) {
  const image = DATA.images[index];
  if (!image) return;
  current = index; selected = -1;
  document.querySelectorAll("#list button").forEach((el, i) => el.classList.toggle("current", i === index));
  $("title").textContent = image.name;
  $("meta").textContent = `${image.width}\\u00d7${image.height} px \\u00b7 ${image.regions.length} regions \\u00b7 ` +
    `proposer ${image.proposer} \\u00b7 captioner ${image.captioner}`;
  const stage = $("stage");
  stage.style.aspectRatio = `${image.width} / ${image.height}`;
  stage.style.width = `min(100%, ${image.width}px)`;
  const picture = $("picture");
  document.body.dataset.picture = "loading";
  picture.onload = () => { document.body.dataset.picture = "loaded"; };
  picture.onerror = () => {
    if (picture.getAttribute("src") !== image.drawn) picture.src = image.drawn;  // the original moved
    else document.body.dataset.picture = "missing";
  };
  picture.src = image.src;
  const boxes = $("boxes"), captions = $("captions");
  boxes.replaceChildren(); captions.replaceChildren();
  image.regions.forEach((region, i) => {
    const [x0, y0, x1, y1] = region.box;
    const box = document.createElement("div");
    box.className = "box";
    box.title = region.caption;
    Object.assign(box.style, {
      left: `${100 * x0 / image.width}%`, top: `${100 * y0 / image.height}%`,
      width: `${100 * (x1 - x0) / image.width}%`, height: `${100 * (y1 - y0) / image.height}%`,
      borderColor: color(i),
    });
    const item = document.createElement("li");
    item.style.borderLeftColor = color(i);
    item.textContent = `${i + 1}. ${region.caption}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = Number(region.score).toFixed(3);
    item.appendChild(score);
    for (const el of [box, item]) {
      el.addEventListener("mouseenter", () => highlight(i));
      el.addEventListener("mouseleave", () => highlight(selected));
      el.addEventListener("click", () => selectRegion(i));
    }
    boxes.appendChild(box); captions.appendChild(item);
  });
  highlight(-1);
  document.body.dataset.image = String(index);
}

function start() {
  if (!DATA || !Array.isArray(DATA.images)) {
    $("error").textContent = "results.js is missing or broken: rerun dam densecap to write it.";
    document.body.dataset.state = "error";
    return;
  }
  document.title = DATA.title;
  const list = $("list");
  DATA.images.forEach((image, i) => {
    const button = document.createElement("button");
    button.textContent = `${image.name} (${image.regions.length})`;
    button.title = image.name;
    button.addEventListener("click", () => showImage(i));
    list.appendChild(button);
  });
  if (!DATA.images.length) {
    $("error").textContent = "No results yet.";
    document.body.dataset.state = "ready";
    return;
  }
  const params = new URLSearchParams(location.search);
  let index = 0;
  if (params.has("image")) {
    const wanted = params.get("image");
    const byName = DATA.images.findIndex((image) => image.name === wanted);
    index = byName >= 0 ? byName : Math.min(Math.max(parseInt(wanted, 10) || 0, 0), DATA.images.length - 1);
  }
  showImage(index);
  if (params.has("region")) {
    const region = parseInt(params.get("region"), 10);
    if (region >= 0 && region < DATA.images[index].regions.length) selectRegion(region);
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight" || event.key === "ArrowDown") showImage(Math.min(current + 1, DATA.images.length - 1));
    if (event.key === "ArrowLeft" || event.key === "ArrowUp") showImage(Math.max(current - 1, 0));
  });
  document.body.dataset.state = "ready";
}
start();
</script>
</body>
</html>
"""
