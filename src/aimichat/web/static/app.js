// AimiChat account pages: small enhancements only. Every action also works without this file.
"use strict";

(function () {
  // Copy buttons: hidden in the HTML (useless without script), shown here.
  function copyText(target, button) {
    var text = target.textContent;
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 2000);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectAndCopy(target) && done(); });
    } else if (selectAndCopy(target)) {
      done();
    }
  }

  function selectAndCopy(target) {
    var range = document.createRange();
    range.selectNodeContents(target);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try { return document.execCommand("copy"); } catch (e) { return false; } // text stays selected for Ctrl+C
  }

  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var target = document.querySelector(button.getAttribute("data-copy"));
    if (!target) return;
    button.hidden = false;
    button.setAttribute("aria-label", button.textContent + " " + (target.id === "new-key" ? "key" : "code"));
    button.addEventListener("click", function () { copyText(target, button); });
  });

  // Revoke / Regenerate: ask here; without script the server shows a confirmation page instead.
  // A regenerate form with a grace period chosen says how long the old key keeps working.
  function confirmText(form) {
    var grace = form.querySelector("select[name=grace]");
    var option = grace && grace.value ? grace.options[grace.selectedIndex] : null;
    if (option && form.hasAttribute("data-confirm-grace")) {
      return form.getAttribute("data-confirm-grace").replace("{grace}", option.getAttribute("data-phrase") || option.textContent);
    }
    return form.getAttribute("data-confirm");
  }

  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(confirmText(form))) {
        event.preventDefault();
        return;
      }
      var field = form.querySelector("input[name=confirm]");
      if (field) field.value = "yes";
    });
  });

  // Phones: the Menu button shows or hides the site's links (the stylesheet hides them while it says
  // aria-expanded="false"). Escape, or focus leaving the header, folds them again.
  var toggle = document.querySelector(".menu-toggle");
  var header = toggle && toggle.closest("header");
  if (toggle && header) {
    var setOpen = function (open) { toggle.setAttribute("aria-expanded", open ? "true" : "false"); };
    var isOpen = function () { return toggle.getAttribute("aria-expanded") === "true"; };
    toggle.addEventListener("click", function () { setOpen(!isOpen()); });
    header.addEventListener("keydown", function (event) {
      if (event.key === "Escape" && isOpen()) {
        setOpen(false);
        toggle.focus();
      }
    });
    header.addEventListener("focusout", function (event) {
      if (isOpen() && event.relatedTarget && !header.contains(event.relatedTarget)) setOpen(false);
    });
  }

  // Times are rendered in UTC; add the reader's local time next to the ones marked data-local.
  var format = new Intl.DateTimeFormat(undefined, { weekday: "short", day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });
  document.querySelectorAll("time[data-local]").forEach(function (time) {
    var moment = new Date(time.getAttribute("datetime"));
    if (isNaN(moment)) return;
    var span = document.createElement("span");
    span.className = "local-time";
    span.textContent = " (" + format.format(moment) + " your time)";
    time.after(span);
  });

  // Usage page (recent requests): a relative time ("3 h 12 min ago") carries its UTC time as a title;
  // put the reader's local time first in that title, so hovering shows it.
  document.querySelectorAll("time[data-local-title]").forEach(function (time) {
    var moment = new Date(time.getAttribute("datetime"));
    if (isNaN(moment)) return;
    time.title = format.format(moment) + " your time (" + time.title + ")";
  });

  // Playground (issue 17): its conversations live in localStorage ("aimichat.playground.<account>", see
  // playground.js); logging out forgets them, so the next person at a shared computer finds none.
  document.querySelectorAll("form.logout").forEach(function (logout) {
    logout.addEventListener("submit", function () {
      try {
        Object.keys(localStorage).forEach(function (key) {
          if (key.indexOf("aimichat.playground.") === 0) localStorage.removeItem(key);
        });
      } catch (e) { /* storage switched off: nothing was kept */ }
    });
  });
})();
