// SkinBridge review console: progressive enhancement only; every form works without this file.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("decision-form");
  if (!form) return;

  // Show the condition picker only when amending, and hide urgency/recommendation when asking for info.
  const sync = () => {
    const choice = form.querySelector("input[name=decision]:checked");
    form.classList.toggle("accepting", !!choice && choice.value === "accept");
    form.classList.toggle("requesting", !!choice && choice.value === "request_info");
  };
  form.querySelectorAll("input[name=decision]").forEach((el) => el.addEventListener("change", sync));
  sync();

  // The recommendation list follows the urgency (the server refuses a pair that contradicts itself).
  const urgency = document.getElementById("urgency");
  const recommendation = document.getElementById("recommendation");
  const days = document.getElementById("days");
  const follow = () => {
    if (!urgency || !recommendation) return;
    for (const option of recommendation.options) {
      if (!option.value) continue;
      const fits = option.dataset.urgencies.split(" ").includes(urgency.value);
      option.hidden = !fits;
      option.disabled = !fits;
      if (!fits && option.selected) recommendation.value = "";
    }
    if (days && days.dataset.ranges) {
      const range = JSON.parse(days.dataset.ranges)[urgency.value];
      if (range) {
        days.min = range[0];
        days.max = range[1];
        const n = Number(days.value);
        if (!(n >= range[0] && n <= range[1])) days.value = range[0] === range[1] ? range[0] : Math.max(range[0], Math.min(14, range[1]));
      }
    }
  };
  if (urgency) urgency.addEventListener("change", follow);
  follow();

  // Condition search against the vocabulary (server-side, same origin, session cookie).
  const search = document.getElementById("condition-search");
  const select = document.getElementById("condition-select");
  if (!search || !select) return;
  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const response = await fetch(`${search.dataset.url}?q=${encodeURIComponent(search.value)}`,
                                   { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const found = await response.json();
      select.replaceChildren(...found.map((c) => new Option(c.name, c.code)));  // textContent: no HTML parsing
      select.dispatchEvent(new Event("change"));
    }, 200);
  });
});

// Explanation pictures: a worker draws them; fill each slot in as its picture arrives (no reload, so the
// dermatologist's choices in the form stay as they are).
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("drawing");
  if (!status || status.classList.contains("done")) return;
  const problem = document.getElementById("drawing-problem");
  const text = document.getElementById("drawing-text");
  const poll = async () => {
    let progress = null;
    try {
      const response = await fetch(status.dataset.progressUrl,
                                   { credentials: "same-origin", headers: { Accept: "application/json" } });
      progress = await response.json();
    } catch (err) {
      setTimeout(poll, 5000);  // the web app restarting: try again
      return;
    }
    if (progress.problem) { problem.textContent = progress.problem; problem.hidden = false; }
    else { problem.hidden = true; }
    if (!progress.counts) return;  // the generator changed: the message says to reload
    document.querySelectorAll("td.samples span.slot").forEach((slot) => {
      if ((progress.counts[slot.dataset.code] || 0) <= Number(slot.dataset.index)) return;
      const img = new Image(128, 128);
      img.alt = slot.dataset.alt;
      img.src = slot.dataset.src;
      slot.replaceWith(img);
    });
    if (progress.done) {
      status.classList.replace("pending", "done");
      text.textContent = `All ${progress.total} sample pictures are drawn.`;
      return;
    }
    const count = document.getElementById("drawn-count");
    if (count) count.textContent = String(progress.drawn);
    setTimeout(poll, 1500);
  };
  setTimeout(poll, 1000);
});
