/* GLUScope neuron pages: recoloring by hook, token tooltips, whole documents, sortable tables.
   Everything comes from the page, written by mkdocs_gluscope.render: each example's gate, in and
   act(gate) windows (data-g, data-i, data-s: float16, base64), each list's color scale per hook
   (data-scale), the number of color levels and the first counted position. This file computes no
   activation function and chooses no scale: it applies render.color_levels' rule to those values. */
(function () {
  "use strict";
  var CASES = ["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"];
  var DOCS_PER_SHARD = 64;

  function float16(bits) {
    var sign = bits & 0x8000 ? -1 : 1, exp = (bits >> 10) & 0x1f, frac = bits & 0x3ff;
    if (exp === 0) return sign * Math.pow(2, -14) * (frac / 1024);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * Math.pow(2, exp - 15) * (1 + frac / 1024);
  }
  function decode(b64) {
    var raw = atob(b64), out = [];
    for (var i = 0; i + 1 < raw.length; i += 2) out.push(float16(raw.charCodeAt(i) | (raw.charCodeAt(i + 1) << 8)));
    return out;
  }
  function values(ex) {
    if (!ex._gs) {
      var g = decode(ex.dataset.g), i = decode(ex.dataset.i), s = decode(ex.dataset.s);
      ex._gs = { hook_pre: g, hook_pre_linear: i, swish: s, hook_post: s.map(function (x, j) { return x * i[j]; }) };
    }
    return ex._gs;
  }
  function counted(container, ex, w) {  // the statistics count this window position (not the BOS)
    return +ex.dataset.pos + (w - +container.dataset.centre) >= +container.dataset.countedFrom;
  }
  function fmt(x) {
    if (!isFinite(x)) return "–";
    var a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toPrecision(3);
  }

  function recolor(container, hook) {
    var centre = +container.dataset.centre, levels = +container.dataset.levels;
    container.querySelectorAll(".gs-list").forEach(function (list) {
      var scale = JSON.parse(list.dataset.scale)[hook];
      list.querySelectorAll(".gs-ex").forEach(function (ex) {
        var v = values(ex)[hook], first = +ex.dataset.first;
        ex.querySelectorAll(".gs-toks > span").forEach(function (span, n) {
          var w = first + n;
          if (!counted(container, ex, w)) { span.className = "c0 gs-nc"; return; }
          var level = isFinite(v[w]) ? Math.max(-levels, Math.min(levels, Math.round(v[w] / scale * levels))) : 0;
          span.className = "c" + level + (w === centre ? " gs-x" : "");
        });
      });
    });
  }

  var tip;
  function showTip(span, event) {
    var ex = span.closest(".gs-ex"), container = span.closest(".gs-examples");
    if (!ex || !container) return;
    var n = Array.prototype.indexOf.call(span.parentNode.children, span);
    var w = +ex.dataset.first + n, v = values(ex);
    var g = v.hook_pre[w], i = v.hook_pre_linear[w];
    var kase = g > 0 ? (i > 0 ? 0 : i < 0 ? 1 : -1) : g < 0 ? (i > 0 ? 2 : i < 0 ? 3 : -1) : -1;
    var pos = +ex.dataset.pos + (w - +container.dataset.centre);
    if (!tip) { tip = document.createElement("div"); tip.className = "gs-tip"; document.body.appendChild(tip); }
    tip.textContent = "";
    var lines = [["token", JSON.stringify(span.textContent)], ["position", String(pos)], ["gate", fmt(g)], ["in", fmt(i)],
      ["act(gate)", fmt(v.swish[w])], ["post", fmt(v.hook_post[w])], ["case", kase < 0 ? "none (a zero)" : CASES[kase]]];
    if (!counted(container, ex, w)) lines.push(["counted", "no: left out of all statistics and color scales"]);
    lines.forEach(function (pair) {
      var row = document.createElement("div"), key = document.createElement("b");
      key.textContent = pair[0] + " "; row.appendChild(key); row.appendChild(document.createTextNode(pair[1]));
      tip.appendChild(row);
    });
    tip.style.display = "block";
    var r = span.getBoundingClientRect();
    tip.style.left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - 220) + "px";
    tip.style.top = (window.scrollY + r.bottom + 6) + "px";
  }
  function hideTip() { if (tip) tip.style.display = "none"; }

  function toggleDocument(button) {
    var ex = button.closest(".gs-ex"), container = button.closest(".gs-examples");
    var open = ex.nextElementSibling && ex.nextElementSibling.classList.contains("gs-doc") ? ex.nextElementSibling : null;
    if (open) { open.remove(); return; }
    var doc = +ex.dataset.doc, pos = +ex.dataset.pos, box = document.createElement("div");
    box.className = "gs-doc"; box.textContent = "loading document " + doc + "…";
    ex.after(box);
    fetch(container.dataset.root + "gluscope/docs/" + Math.floor(doc / DOCS_PER_SHARD) + ".json")
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (shard) {
        var entry = shard[String(doc)];
        box.textContent = "";
        var head = document.createElement("div");
        head.className = "gs-doc-head";
        head.textContent = "document " + doc + (entry.title ? " · " + entry.title : "") + " · " + entry.tokens.length + " tokens";
        box.appendChild(head);
        entry.tokens.forEach(function (t, p) {
          var s = document.createElement("span");
          s.textContent = t.replace(/\n/g, "↵\n").replace(/\t/g, "⇥");
          if (p === pos) { s.className = "gs-x"; }
          box.appendChild(s);
        });
        var mark = box.querySelector(".gs-x");
        if (mark) mark.scrollIntoView({ block: "nearest" });
      })
      .catch(function (e) { box.textContent = "could not load document " + doc + " (" + e.message + ")"; });
  }

  function sortable(table) {
    table.querySelectorAll("th").forEach(function (th, col) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var dir = th.dataset.dir === "desc" ? 1 : -1;
        table.querySelectorAll("th").forEach(function (x) { delete x.dataset.dir; });
        th.dataset.dir = dir === 1 ? "asc" : "desc";
        function key(row) {
          var cell = row.cells[col], raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent;
          var num = parseFloat(raw);
          return isNaN(num) || cell.dataset.sort === undefined && !/^[-\d.]/.test(raw) ? raw : num;
        }
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          return (x < y ? -1 : x > y ? 1 : 0) * dir;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  function init() {
    document.querySelectorAll(".gs-examples").forEach(function (container) {
      if (container.dataset.ready) return;
      container.dataset.ready = "1";
      var select = container.querySelector(".gs-hook-select");
      if (select) select.addEventListener("change", function () { recolor(container, select.value); });
      container.addEventListener("mouseover", function (e) {
        var span = e.target.closest(".gs-toks > span");
        if (span) showTip(span, e); else hideTip();
      });
      container.addEventListener("mouseleave", hideTip);
      container.addEventListener("click", function (e) {
        var button = e.target.closest(".gs-doc-btn");
        if (button) toggleDocument(button);
      });
    });
    document.querySelectorAll("table.gs-sortable").forEach(function (t) {
      if (!t.dataset.ready) { t.dataset.ready = "1"; sortable(t); }
    });
  }

  if (typeof window.document$ !== "undefined" && window.document$.subscribe) {
    window.document$.subscribe(init);  // Material's instant navigation swaps pages without reload
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
