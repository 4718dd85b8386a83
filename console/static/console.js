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
