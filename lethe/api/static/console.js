// Lethe's console: follows a request's progress live (Server-Sent Events), and shows only the
// hold form's fields that fit the chosen scope. Every page works without it.
"use strict";

function followRequest(main) {
  const source = new EventSource(main.dataset.events);
  const initial = main.dataset.state;
  const stateCell = document.getElementById("state");
  const live = document.getElementById("live");
  if (live) live.textContent = "(following live)";
  source.addEventListener("status", (event) => {
    const status = JSON.parse(event.data);
    for (const step of status.steps || []) {
      const cell = document.querySelector(`td[data-step="${CSS.escape(step.step_id)}"]`);
      if (cell) {
        const held = step.holds && step.holds.length ? ` (held: ${step.holds.join(", ")})` : "";
        cell.textContent = step.status.replaceAll("_", " ") + held;
      }
    }
    if (stateCell) stateCell.textContent = status.state.replaceAll("_", " ");
    // Between running states the page updates in place; any other change of state may bring
    // new actions (the decision, the extension, the certificate): the page is shown anew.
    const running = ["planning", "on_hold", "erasing", "waiting_window", "verifying"];
    const moved = status.state !== initial;
    if (moved && !(running.includes(initial) && running.includes(status.state))) {
      source.close();
      window.location.reload();
    }
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED && live) live.textContent = "(refresh to update)";
  });
}

function fitHoldForm(select) {
  const fit = () => {
    const subject = select.value === "subject";
    for (const part of document.querySelectorAll("[data-scope]")) {
      part.hidden = (part.dataset.scope === "subject") !== subject;
    }
  };
  select.addEventListener("change", fit);
  fit();
}

document.addEventListener("DOMContentLoaded", () => {
  const main = document.querySelector("main[data-events]");
  if (main) followRequest(main);
  const scope = document.querySelector("select#scope");
  if (scope) fitHoldForm(scope);
});
