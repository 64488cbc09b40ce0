"""The page ``gpt2-effnet serve`` shows at ``/``: pick, drop or photograph an image, read its
caption, hover a word to see where the model looked for it. Plain HTML and JavaScript,
no build step and nothing fetched from elsewhere."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gpt2-effnet captioner</title>
<style>
  [hidden] { display: none !important; }
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; text-align: center; }
  #drop.over { border-color: #06c; background: #eef5ff; }
  #stage { position: relative; display: inline-block; margin-top: 1rem; }
  #stage img, #stage canvas { display: block; width: 320px; height: 320px; object-fit: fill; }
  #heat { position: absolute; left: 0; top: 0; pointer-events: none; opacity: 0.6; }
  #caption { font-size: 1.3rem; margin: 1rem 0 0.3rem; min-height: 1.6rem; }
  #caption span { padding: 0 2px; border-radius: 3px; cursor: default; }
  #caption span:hover, #caption span.on { background: #ffe08a; }
  #error { color: #b00; }
  video { width: 320px; display: none; margin-top: 1rem; }
  .row { display: flex; gap: 0.6rem; align-items: center; flex-wrap: wrap; justify-content: center; }
</style>
</head>
<body>
<h1>gpt2-effnet</h1>
<div id="drop">
  <p>Drop an image here, or</p>
  <div class="row">
    <input id="file" type="file" accept="image/*">
    <button id="camera" type="button" hidden>Use the webcam</button>
    <button id="snap" type="button" hidden>Take the picture</button>
    <label>beams <input id="beams" type="number" min="1" max="8" value="3" style="width:3rem"></label>
  </div>
</div>
<video id="video" autoplay playsinline></video>
<p id="caption" aria-live="polite"></p>
<p id="status"></p>
<p id="error" role="alert"></p>
<div id="stage" hidden><img id="picture" alt="the uploaded image"><canvas id="heat" width="320" height="320"></canvas></div>
<script>
const $ = (id) => document.getElementById(id);
let last = null;

function showHeat(index) {
  const heat = $("heat"), ctx = heat.getContext("2d");
  ctx.clearRect(0, 0, heat.width, heat.height);
  document.querySelectorAll("#caption span").forEach((s, i) => s.classList.toggle("on", i === index));
  if (index < 0 || !last || !last.attention) { heat.dataset.word = ""; return; }
  const [h, w] = last.attention.grid, map = last.attention.maps[index];
  const peak = Math.max(...map) || 1;
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const pixels = small.getContext("2d").createImageData(w, h);
  map.forEach((v, i) => {
    const t = v / peak;
    pixels.data.set([255, Math.round(200 * (1 - t)), 0, Math.round(230 * t)], 4 * i);
  });
  small.getContext("2d").putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, heat.width, heat.height);
  heat.dataset.word = last.attention.words[index];
}

function showCaption(result) {
  last = result;
  const box = $("caption");
  box.textContent = "";
  const words = result.attention ? result.attention.words : result.caption.split(" ");
  words.forEach((word, i) => {
    const span = document.createElement("span");
    span.textContent = word;
    span.addEventListener("mouseenter", () => showHeat(i));
    span.addEventListener("mouseleave", () => showHeat(-1));
    box.appendChild(span);
    box.appendChild(document.createTextNode(" "));
  });
  $("status").textContent = "score " + result.score.toFixed(3);
}

async function send(blob) {
  $("error").textContent = "";
  $("caption").textContent = "";
  $("status").textContent = "captioning...";
  $("picture").src = URL.createObjectURL(blob);
  $("stage").hidden = false;
  showHeat(-1);
  const form = new FormData();
  form.append("image", blob, "upload");
  try {
    const response = await fetch("/caption?attention=1&beams=" + encodeURIComponent($("beams").value), { method: "POST", body: form });
    const text = await response.text();
    let body;
    try { body = JSON.parse(text); } catch (err) { body = { error: text.slice(0, 200) || response.statusText }; }
    if (!response.ok) { throw new Error(body.error || ("the service answered " + response.status)); }
    showCaption(body);
  } catch (err) {
    $("status").textContent = "";
    $("error").textContent = "could not caption this image: " + err.message;
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) send(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]);
});

if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
  $("camera").hidden = false;
  $("camera").addEventListener("click", async () => {
    try {
      $("video").srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
      $("video").style.display = "block";
      $("snap").hidden = false;
    } catch (err) { $("error").textContent = "webcam: " + err.message; }
  });
  $("snap").addEventListener("click", () => {
    const video = $("video"), canvas = document.createElement("canvas");
    canvas.width = video.videoWidth; canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => send(blob), "image/jpeg", 0.92);
  });
}
</script>
</body>
</html>
"""
