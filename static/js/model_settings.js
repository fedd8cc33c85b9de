// A model's Settings page: the form is filled from the settings as saved, sent with PUT, and each
// refused setting's sentence is shown under its field.
(function () {
  "use strict";

  const form = document.getElementById("settings-form");
  const formError = document.getElementById("form-error");
  const saved = document.getElementById("saved");
  const saveButton = document.getElementById("save-button");
  const model = form.dataset.model;
  const url = "/api/admin/models/" + encodeURIComponent(model) + "/settings";
  const fields = Array.from(form.querySelectorAll(".field")).map((el) => el.dataset.field);
  const loadFields = Array.from(form.querySelectorAll('.field[data-group="load"]')).map((el) => el.dataset.field);

  function input(name) { return document.getElementById("setting-" + name); }

  function shown(value) {
    if (value === null || value === undefined) return "";
    if (Array.isArray(value)) return value.join(", ");
    return String(value);
  }

  function fill(settings) {
    fields.forEach((name) => { input(name).value = shown(settings[name]); });
  }

  // What the field says, in the JSON type the setting takes; the server checks it (and says what is wrong).
  function read(name) {
    const text = input(name).value.trim();
    if (text === "") return null;
    if (name === "system_prompt") return input(name).value;
    if (input(name).tagName === "SELECT") return text === "true" || text === "false" ? text === "true" : text;
    if (name === "gpu_split") return text.split(/[\s,]+/).filter(Boolean).map((part) => (isNaN(Number(part)) ? part : Number(part)));
    if (["cache_mode", "draft_model", "prompt_template"].includes(name)) return text;
    if (name === "rope_alpha" && text.toLowerCase() === "auto") return "auto";
    return isNaN(Number(text)) ? text : Number(text);
  }

  function showErrors(errors) {
    fields.forEach((name) => {
      const box = document.getElementById("error-" + name);
      const text = errors[name] || "";
      box.textContent = text;
      box.hidden = !text;
      input(name).setAttribute("aria-invalid", text ? "true" : "false");
      box.closest(".field").classList.toggle("invalid", Boolean(text));
    });
    const others = Object.keys(errors).filter((name) => !fields.includes(name)).map((name) => errors[name]);
    formError.textContent = others.join(" ");
    formError.hidden = others.length === 0;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    fields.forEach((name) => { body[name] = read(name); });
    saveButton.disabled = true;
    saved.hidden = true;
    try {
      const answer = await window.gantry.api("PUT", url, body, { "X-Gantry-Source": "dashboard" });
      showErrors({});
      fill(answer.settings);
      const loadChanged = answer.changed.some((name) => loadFields.includes(name));
      saved.textContent = answer.changed.length
        ? "Saved: " + answer.changed.join(", ") + "." +
          (answer.loaded && loadChanged ? " Load parameters apply from the next load of " + model + "." : "")
        : "Nothing changed.";
      saved.hidden = false;
    } catch (error) {
      const data = error.data || {};
      showErrors(data.errors || { "": error.message });
      const first = form.querySelector(".field.invalid input, .field.invalid select, .field.invalid textarea");
      if (first) first.focus();
    } finally {
      saveButton.disabled = false;
    }
  });

  fill(JSON.parse(document.getElementById("model-settings").textContent).settings);
})();
