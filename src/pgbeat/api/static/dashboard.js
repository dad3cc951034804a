// pgbeat dashboard: refresh the parts of a page marked data-refresh without a reload,
// and ask before every action (forms marked data-confirm). No framework, no inline script.
"use strict";

function refreshEvery(part) {
  const url = part.dataset.refresh;
  const seconds = Number(part.dataset.every || 5);
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const answer = await fetch(url, { headers: { "X-Pgbeat-Fragment": "1" }, credentials: "same-origin" });
      if (answer.status === 401) {
        window.location.reload(); // signed out: the page shows the sign-in form
        return;
      }
      if (answer.ok) {
        part.innerHTML = await answer.text();
        part.removeAttribute("data-stale");
      } else {
        part.setAttribute("data-stale", String(answer.status));
      }
    } catch (error) {
      part.setAttribute("data-stale", "offline");
    } finally {
      busy = false;
    }
  }
  window.setInterval(refresh, seconds * 1000);
  document.addEventListener("visibilitychange", refresh);
}

document.querySelectorAll("[data-refresh]").forEach(refreshEvery);

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
