// The Admin Dashboard's Backends tab: the fleet's model servers, their state, model and running answers,
// the actions on each (drain/resume, switch, unload, remove) and the Add form. Rows follow the admins'
// socket (ws/models/: `backend.state`), and the list is read again after every action.
(function () {
  "use strict";

  const page = document.getElementById("backends-page");
  const rowsBody = document.getElementById("backend-rows");
  const errorBox = document.getElementById("error");
  const live = document.getElementById("live");
  const form = document.getElementById("add-form");
  const addButton = document.getElementById("add-button");
  let backends = JSON.parse(document.getElementById("backends-data").textContent);

  function api(method, url, body) {
    return window.gantry.api(method, url, body, { "X-Gantry-Source": "dashboard" });
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  const STATES = {
    ready: "Ready", switching: "Switching...", unloading: "Unloading...", unloaded: "No model",
    failed: "Failed", draining: "Draining (out of rotation)", down: "Down",
  };

  function cell(text, className) {
    const td = document.createElement("td");
    td.className = className;
    td.textContent = text;
    return td;
  }

  function button(label, className, action) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = label;
    b.addEventListener("click", action);
    return b;
  }

  function actions(backend) {
    const td = document.createElement("td");
    td.className = "actions-cell";
    const busy = backend.state === "switching" || backend.state === "unloading";
    const url = "/api/admin/backends/" + encodeURIComponent(backend.name) + "/";
    const inRotation = backend.in_rotation;
    td.append(button(inRotation ? "Drain" : "Resume", inRotation ? "drain" : "resume",
      () => run("POST", url + (inRotation ? "drain" : "resume"))));
    const picker = document.createElement("select");
    picker.className = "switch-model";
    picker.setAttribute("aria-label", "Model for " + backend.name);
    (backend.models || []).filter((m) => m !== backend.active_model).forEach((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m;
      picker.append(option);
    });
    const switchButton = button("Switch", "switch", () => {
      if (picker.value) run("POST", url + "switch", { model_id: picker.value });
    });
    picker.disabled = switchButton.disabled = busy || picker.options.length === 0;
    td.append(picker, switchButton);
    const unload = button("Unload", "unload danger", () => run("POST", url + "unload"));
    unload.disabled = busy || !backend.active_model;
    td.append(unload);
    if (!backend.default) { // the default is the server of TABBY_HOST: drained, never removed
      td.append(button("Remove", "remove danger", () => {
        if (window.confirm("Remove the backend " + backend.name + "?")) run("DELETE", url);
      }));
    }
    return td;
  }

  function row(backend) {
    const tr = document.createElement("tr");
    tr.className = "backend-row";
    tr.dataset.backend = backend.name;
    tr.dataset.state = backend.state;
    tr.append(
      cell(backend.name + (backend.default ? " (TABBY_HOST)" : ""), "name-cell"),
      cell(backend.url, "url-cell"),
      cell(STATES[backend.state] || backend.state, "state-cell"),
      cell(backend.active_model || (backend.target_model ? "→ " + backend.target_model : "—"), "model-cell"),
      cell(String(backend.running), "running-cell"),
      cell(backend.healthy ? "✓ answering" : "✗ " + (backend.trouble_text || "not answering"), "health-cell"),
      actions(backend),
    );
    return tr;
  }

  function draw() {
    rowsBody.replaceChildren(...backends.map(row));
  }

  async function reload() {
    try {
      backends = (await api("GET", "/api/admin/backends")).backends;
      draw();
    } catch (error) {
      showError(error.message);
    }
  }

  async function run(method, url, body) {
    showError("");
    try {
      await api(method, url, body);
    } catch (error) {
      const data = error.data || {};
      showError(data.reason ? error.message + " " + data.reason : error.message);
    }
    await reload();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = new FormData(form);
    const body = {};
    ["name", "url", "api_key", "admin_key"].forEach((k) => { body[k] = String(fields.get(k) || "").trim(); });
    addButton.disabled = true;
    showError("");
    try {
      await api("POST", "/api/admin/backends", body);
      form.reset();
    } catch (error) {
      showError(error.message);
    } finally {
      // The keys never stay on the page, whatever happened.
      form.elements.api_key.value = "";
      form.elements.admin_key.value = "";
      addButton.disabled = false;
    }
    await reload();
  });

  function onEvent(event) {
    if (event.type !== "backend.state") return;
    const index = backends.findIndex((b) => b.name === event.backend.name);
    if (index < 0) { reload(); return; }
    backends[index] = event.backend;
    draw();
  }

  function setLive(on) {
    page.dataset.live = String(on);
    live.textContent = on ? "Live" : "Reconnecting...";
    live.classList.toggle("on", on);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + window.location.host + "/ws/models/");
    socket.addEventListener("open", () => { setLive(true); reload(); });
    socket.addEventListener("message", (event) => onEvent(JSON.parse(event.data)));
    socket.addEventListener("close", (event) => {
      setLive(false);
      if (!window.gantry.sessionEnded(event)) setTimeout(connect, 1500);
    });
  }

  draw();
  connect();
  // Running answers change without a state change: the counts are read again every few seconds.
  setInterval(() => { if (page.dataset.live === "true" && !document.hidden) reload(); }, 5000);
})();
