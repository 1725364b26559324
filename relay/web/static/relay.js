// The relay's pages: copy buttons, and a gentle refresh of the clone list while clones run.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button.copy[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var target = document.getElementById(button.getAttribute("data-copy"));
      if (!target) return;
      var text = target.textContent;
      var done = function () {
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = "Copy"; }, 1500);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { select(target); });
      } else {
        select(target);
      }
    });
  });
  // A form that starts something (a clone) is sent once: a second click while the page loads does nothing.
  document.querySelectorAll("form[data-once]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (form.getAttribute("data-sent")) {
        event.preventDefault();
        return;
      }
      form.setAttribute("data-sent", "yes");
      form.querySelectorAll("button[type=submit]").forEach(function (button) {
        button.disabled = true;
        button.textContent = "Sending…";
      });
    });
  });
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (seconds > 0) {
    setInterval(function () {
      // Never pull the page away from someone using it: typing in a filter, moving through it by
      // keyboard (focus on a link or button), or selecting text to copy.
      var active = document.activeElement;
      if (active && active !== document.body && active !== document.documentElement) return;
      var selection = window.getSelection();
      if (selection && selection.toString()) return;
      window.location.reload();
    }, seconds * 1000);
  }
});
function select(element) {
  var range = document.createRange();
  range.selectNodeContents(element);
  var selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}
