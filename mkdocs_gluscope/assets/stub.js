/* A light neuron page is a stub of a few hundred bytes: its title, links, a line of facts and where its data
   is. This script, in the stub's head, turns it into the site's own page: it fetches the theme's page that
   the build rendered once for every neuron page at this depth (mkdocs_gluscope.light.theme, data-shell),
   puts the stub's title and content where that page's markers are, and writes it in place of the stub
   (its scripts run as on any page: the theme's search box and navigation, then gluscope.js, which draws
   the neuron from its data). Without JavaScript the stub is shown as it is. */
(function () {
  "use strict";
  var script = document.currentScript, root = document.documentElement;
  var shell = fetch(new URL(script.getAttribute("data-shell"), location.href).href).then(function (r) {
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r.text();
  });
  root.style.visibility = "hidden";  // the bare stub, for the moment until the theme's page replaces it
  document.addEventListener("DOMContentLoaded", function () {
    shell.then(function (text) {
      var h1 = document.querySelector("h1"), title = (h1 ? h1.textContent : document.title).replace(/[&<>"]/g, function (c) {
        return { "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;" }[c];
      });
      var parts = text.split("GLUSCOPE:TITLE").join(title).split("GLUSCOPE:CONTENT");
      var page = parts[0] + document.body.innerHTML + parts.slice(1).join("");
      document.open();
      document.write(page);
      document.close();
    }).catch(function () { root.style.visibility = ""; });
  });
})();
