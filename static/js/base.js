// The profile menu at the top right, on every page.
(function () {
  "use strict";
  const button = document.getElementById("profile-button");
  const menu = document.getElementById("profile-menu");
  if (!button || !menu) return;
  function setOpen(open) {
    menu.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
  }
  button.addEventListener("click", (event) => { event.stopPropagation(); setOpen(menu.hidden); });
  document.addEventListener("click", (event) => { if (!menu.contains(event.target)) setOpen(false); });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") setOpen(false); });
})();
