/* GLUScope neuron pages: recoloring by hook, token tooltips, whole documents, sortable tables.
   Everything comes from the page, written by mkdocs_gluscope.render: each example's gate, in and
   act(gate) windows (data-g, data-i, data-s: float16, base64), each list's color scale per hook
   (data-scale), the number of color levels and the first counted position. This file computes no
   activation function and chooses no scale: it applies render.color_levels' rule to those values.

   Light pages (a whole model, mkdocs_gluscope.light) hold a few examples; the rest come from the
   neuron's data file (data-src: gate and in windows, values, scales), act(gate) from the site's
   act table (act.bin: the activation of every float16 value, computed in Python), the tokens from
   the document shards. Layer pages sort, filter and page their table from gluscope/layers/L{l}.json;
   the search box finds neurons through gluscope/search/{key}.json. Untrusted text is set with
   textContent only. */
(function () {
  "use strict";
  var CASES = ["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"];
  var HOOKS = ["hook_post", "hook_pre_linear", "hook_pre", "swish"];  // store.HOOKS: the order of data-scale
  var DOCS_PER_SHARD = 64;
  // The site's root URL, from this script's own address (assets/gluscope/gluscope.js).
  var ROOT = (function () {
    var src = document.currentScript && document.currentScript.src;
    return src ? src.replace(/assets\/gluscope\/gluscope\.js(\?.*)?$/, "") : "";
  })();

  // -- fetching, cached per URL --------------------------------------------------------------------
  var cache = {};
  function once(key, make) { if (!cache[key]) cache[key] = make(); return cache[key]; }
  function fetchOk(url) {
    return fetch(url).then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r; });
  }
  function fetchJSON(url) { return once("json " + url, function () { return fetchOk(url).then(function (r) { return r.json(); }); }); }
  // Data files are gzip-compressed on disk (the site's size counts on disk); a server that sends them
  // with Content-Encoding: gzip has already inflated them, so look at the bytes before inflating.
  function fetchBytes(url) {
    return once("bin " + url, function () {
      return fetchOk(url).then(function (r) { return r.arrayBuffer(); }).then(function (buf) {
        var head = new Uint8Array(buf, 0, 2);
        if (head[0] !== 0x1f || head[1] !== 0x8b) return buf;
        return new Response(new Blob([buf]).stream().pipeThrough(new DecompressionStream("gzip"))).arrayBuffer();
      });
    });
  }
  function docShard(root, doc) {
    var per = window.GLUSCOPE && window.GLUSCOPE.docsPerShard || DOCS_PER_SHARD;  // a light site's own
    return fetchJSON(new URL(root + "gluscope/docs/" + Math.floor(doc / per) + ".json", location.href).href);
  }

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
      if (!list.dataset.scale) return;  // a light page's list that is not loaded yet
      var scale = JSON.parse(list.dataset.scale)[HOOKS.indexOf(hook)];
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
    var approx = ex._approx ? "≈ " : "", f = function (x) { return isFinite(x) && approx ? approx + x.toPrecision(2) : fmt(x); };
    var lines = [["token", JSON.stringify(span.textContent)], ["position", String(pos)], ["gate", f(g)], ["in", f(i)],
      ["act(gate)", f(v.swish[w])], ["post", f(v.hook_post[w])], ["case", kase < 0 ? "none (a zero)" : CASES[kase]]];
    if (approx) lines.push(["values", "8-bit (within 3%); exact in the activations file"]);
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
    docShard(container.dataset.root, doc)
      .then(function (shard) {
        var entry = shard[String(doc)];
        box.textContent = "";
        var head = document.createElement("div");
        head.className = "gs-doc-head";
        head.textContent = "document " + doc + (entry.title ? " · " + entry.title : "") + " · " + entry.tokens.length + " tokens";
        box.appendChild(head);
        entry.tokens.forEach(function (t, p) {
          var s = document.createElement("span");
          s.textContent = t.split("\n").map(visible).join("↵\n");  // the document keeps its line breaks
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

  // -- light pages: examples loaded on demand -----------------------------------------------------
  // render.VISIBLE, written here by pages.asset_text: how a character a reader could not see (or that
  // would reorder the tokens around it) shows.
  var VISIBLE = /*gluscope:visible*/{};
  function visible(text) {
    var out = "";
    for (var n = 0; n < text.length; n++) out += VISIBLE.hasOwnProperty(text[n]) ? VISIBLE[text[n]] : text[n];
    return out;
  }
  // render.token_label's rule: visible characters, and a token of spaces only as dots.
  function tokenLabel(token) {
    var out = visible(token);
    return out && !out.replace(/ /g, "") ? out.replace(/ /g, "·") : out;
  }
  // render.fmt's rule (Python's "{:.4g}"): four significant digits, exponent outside 1e-4 .. 1e4.
  function fmt4(x) {
    if (!isFinite(x)) return "–";
    if (x === 0) return "0";
    var exp = Math.floor(Math.log10(Math.abs(+x.toPrecision(4))));
    if (exp < -4 || exp >= 4) {
      var m = x.toExponential(3).split("e"), mant = m[0].replace(/\.?0+$/, ""), e = +m[1];
      return mant + "e" + (e < 0 ? "-" : "+") + ("0" + Math.abs(e)).slice(-2);
    }
    return String(+x.toPrecision(4));
  }
  function actTable(root) {
    return fetchBytes(new URL(root + "gluscope/act.bin", location.href).href).then(function (buf) {
      return once("act " + root, function () {
        var bits = new DataView(buf), table = new Float64Array(65536);
        for (var b = 0; b < 65536; b++) table[b] = float16(bits.getUint16(2 * b, true));
        return table;
      });
    });
  }
  // mkdocs_gluscope.light.encode_examples' layout; window values as light.decode_windows gives them: a
  // position the statistics count on the counted positions' scale, the others (the BOS) on their own.
  function parseExamples(buf) {
    var v = new DataView(buf), o = 4, magic = String.fromCharCode.apply(null, new Uint8Array(buf, 0, 4));
    if (magic !== "GSX2") throw new Error("not a gluscope example file of this version");
    function u16() { var x = v.getUint16(o, true); o += 2; return x; }
    function f32() { var x = v.getFloat32(o, true); o += 4; return x; }
    var C = u16(), H = u16(), k = u16(), W = u16(), U = v.getUint32(o, true); o += 4;
    var centre = u16(), countedFrom = u16();
    var gateCounted = f32(), inCounted = f32(), gateOther = f32(), inOther = f32(), range = u16(), wide = u16();
    function many(n, size, get) { var a = []; for (var j = 0; j < n; j++, o += size) a.push(get.call(v, o, true)); return a; }
    var d = { C: C, H: H, k: k, W: W, scales: many(C * H * 4, 4, v.getFloat32), values: many(C * H * k, 4, v.getFloat32),
      example: many(C * H * k, 2, v.getInt16) };
    var place = wide === 2 ? v.getUint16 : v.getUint32;
    d.doc = many(U, wide, place); d.pos = many(U, wide, place);
    function decoded(counted, other) {
      return many(U * W, 1, v.getInt8).map(function (c, n) {
        var largest = d.pos[Math.floor(n / W)] + n % W - centre >= countedFrom ? counted : other;
        return c === -128 ? NaN : c === 0 ? 0 : (c < 0 ? -1 : 1) * largest * Math.pow(2, (Math.abs(c) - 1) * range / 126 - range);
      });
    }
    d.gate = decoded(gateCounted, gateOther); d.in_ = decoded(inCounted, inOther);
    return d;
  }
  // x rounded to the nearest float16, as bits: the index of act(x) in the act table.
  var F32 = new Float32Array(1), U32 = new Uint32Array(F32.buffer);
  function halfBits(x) {
    F32[0] = x;
    var b = U32[0], sign = (b >>> 16) & 0x8000, exp = (b >>> 23) & 0xff, mant = b & 0x7fffff, h, rem, half;
    if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
    var e = exp - 112;  // float16 exponent
    if (e >= 0x1f) return sign | 0x7c00;
    if (e <= 0) {
      if (e < -10) return sign;
      mant |= 0x800000;
      var shift = 14 - e;
      h = mant >>> shift; rem = mant & ((1 << shift) - 1); half = 1 << (shift - 1);
    } else {
      h = (e << 10) | (mant >>> 13); rem = mant & 0x1fff; half = 0x1000;
    }
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  function examplesOf(container) {
    var url = new URL(container.dataset.src, location.href).href;
    return once("ex " + url, function () {
      return Promise.all([fetchBytes(url), actTable(container.dataset.root)]).then(function (r) {
        return { data: parseExamples(r[0]), act: r[1] };
      });
    });
  }
  function exampleRow(container, d, act, shard, c, h, j, hook, scale) {
    var n = (c * d.H + h) * d.k + j, u = d.example[n], W = d.W;
    var doc = d.doc[u], pos = d.pos[u], centre = +container.dataset.centre, levels = +container.dataset.levels;
    var entry = shard[String(doc)], tokens = entry ? entry.tokens : [];
    var g = [], i = [], s = [];
    for (var w = 0; w < W; w++) {
      var gv = d.gate[u * W + w];
      g.push(gv); i.push(d.in_[u * W + w]); s.push(isNaN(gv) ? NaN : act[halfBits(gv)]);
    }
    var row = document.createElement("div");
    row.className = "gs-ex";
    row._approx = true;  // 8-bit window values: the tooltip says so
    row._gs = { hook_pre: g, hook_pre_linear: i, swish: s, hook_post: s.map(function (x, m) { return x * i[m]; }) };
    var first = -1, toks = document.createElement("span");
    toks.className = "gs-toks";
    for (w = 0; w < W; w++) {
      var p = pos + w - centre;
      if (p < 0 || p >= tokens.length) continue;
      if (first < 0) first = w;
      var span = document.createElement("span"), x = row._gs[hook][w];
      span.textContent = tokenLabel(tokens[p]);
      if (p < +container.dataset.countedFrom) span.className = w === centre ? "c0 gs-x" : "c0 gs-nc";
      else {
        var level = isFinite(x) ? Math.max(-levels, Math.min(levels, Math.round(x / scale * levels))) : 0;
        span.className = "c" + level + (w === centre ? " gs-x" : "");
      }
      toks.appendChild(span);
    }
    row.dataset.doc = doc; row.dataset.pos = pos; row.dataset.first = first < 0 ? centre : first;
    var rank = document.createElement("span"), val = document.createElement("span");
    rank.className = "gs-rank"; rank.textContent = String(j + 1);
    val.className = "gs-val"; val.textContent = fmt4(d.values[n]);
    if (pos < +container.dataset.early) {
      var badge = document.createElement("span");
      badge.className = "gs-early"; badge.title = (window.GLUSCOPE ? window.GLUSCOPE.earlyTitle : "").replace("{pos}", pos);
      badge.textContent = "start of document";
      val.appendChild(badge);
    }
    var button = document.createElement("button");
    button.className = "gs-doc-btn"; button.type = "button"; button.title = "show the whole document";
    button.textContent = "doc " + doc + (entry && entry.title ? " · " + entry.title : "") + " · pos " + pos;
    [rank, val, toks, button].forEach(function (e) { row.appendChild(e); });
    return row;
  }
  // render._extreme's text: a list's most extreme value and, when that example is at the start of its
  // document, the first later one.
  function extremeText(container, d, c, h) {
    var base = (c * d.H + h) * d.k, early = +container.dataset.early, text = fmt4(d.values[base]);
    if (d.example[base] >= 0 && d.pos[d.example[base]] < early) {
      for (var j = 0; j < d.k; j++) {
        var u = d.example[base + j];
        if (u >= 0 && d.pos[u] >= early) return text + " (start of document; first later example " + fmt4(d.values[base + j]) + ")";
      }
      text += " (start of document; no later example in the list)";
    }
    return text;
  }
  // A light page's case block, opened: its four lists (the one written into the page among them).
  function buildLists(container, block) {
    var lazy = block.querySelector(".gs-lazy");
    if (!lazy || block.dataset.built) return;
    block.dataset.built = "1";
    lazy.dataset.loading = "1";
    var c = Array.prototype.indexOf.call(container.querySelectorAll(".gs-case-block"), block);
    var labels = {};
    container.querySelectorAll(".gs-hook-select option").forEach(function (o) { labels[o.value] = o.textContent; });
    examplesOf(container).then(function (got) {
      var d = got.data, shown = Math.min(+container.dataset.shown, d.k);
      HOOKS.forEach(function (hook, h) {
        var list = block.querySelector('.gs-list[data-hook="' + h + '"]');
        if (!list) {
          list = element("details", "gs-list");
          list.dataset.hook = h;
          list.appendChild(element("summary", "", labels[hook] + ": most extreme " + extremeText(container, d, c, h)));
          var rows = element("div", "gs-rows");
          if (d.example[(c * d.H + h) * d.k] < 0) rows.appendChild(element("p", "gs-empty", "No token of the corpus fell in this case."));
          list.appendChild(rows);
        }
        block.insertBefore(list, lazy);  // in HOOKS order (moves the list the page holds)
      });
      lazy.remove();
    }).catch(function (e) {
      delete block.dataset.built;
      delete lazy.dataset.loading;
      lazy.dataset.failed = e.message;
    });
  }
  // Append the examples of a light page's list that the page does not hold, from the neuron's data file.
  function loadList(container, list) {
    var rowsBox = list.querySelector(".gs-rows");
    if (list.dataset.loaded || !container.dataset.src || list.dataset.hook === undefined) return;
    list.dataset.loaded = "1";
    var block = list.closest(".gs-case-block"), c = Array.prototype.indexOf.call(container.querySelectorAll(".gs-case-block"), block);
    var h = +list.dataset.hook, select = container.querySelector(".gs-hook-select"), hook = select ? select.value : "hook_post";
    var have = rowsBox.querySelectorAll(".gs-ex").length;
    rowsBox.dataset.loading = "1";
    delete rowsBox.dataset.failed;
    examplesOf(container).then(function (got) {
      var d = got.data, shown = Math.min(+container.dataset.shown, d.k), wanted = [];
      for (var j = have; j < shown; j++) {
        var u = d.example[(c * d.H + h) * d.k + j];
        if (u < 0) break;
        wanted.push(j);
      }
      return Promise.all(wanted.map(function (j) {
        return docShard(container.dataset.root, d.doc[d.example[(c * d.H + h) * d.k + j]]);
      })).then(function (shards) {
        if (!list.dataset.scale) list.dataset.scale = JSON.stringify(d.scales.slice((c * d.H + h) * 4, (c * d.H + h + 1) * 4));
        var scale = JSON.parse(list.dataset.scale)[HOOKS.indexOf(hook)], frag = document.createDocumentFragment();
        shards.forEach(function (shard, n) { frag.appendChild(exampleRow(container, d, got.act, shard, c, h, wanted[n], hook, scale)); });
        rowsBox.appendChild(frag);
        delete rowsBox.dataset.loading;
      });
    }).catch(function (e) {
      delete list.dataset.loaded;
      delete rowsBox.dataset.loading;
      rowsBox.dataset.failed = e.message;
    });
  }

  // -- search: neurons by id and by the words their examples peak on -------------------------------
  // light.shard_key's rule: the first two characters, ASCII letters and digits as themselves, others "_".
  function shardKey(word) {
    var key = "";
    for (var n = 0; n < 2; n++) { var ch = word.charAt(n); key += /[a-z0-9]/.test(ch) ? ch : "_"; }
    return key;
  }
  function neuronUrl(layer, neuron) {
    var site = window.GLUSCOPE;
    return ROOT + site.prefix + "/L" + layer + "/N" + neuron + site.suffix;
  }
  function layerRows(layer) {
    return fetchJSON(ROOT + "gluscope/layers/L" + layer + ".json").then(function (t) { return t.rows; });
  }
  function resultItem(href, title, detail) {
    var li = document.createElement("li"), a = document.createElement("a"), b = document.createElement("b");
    li.className = "gs-search-item"; a.href = href; b.textContent = title; a.appendChild(b);
    if (detail) { var s = document.createElement("span"); s.textContent = " · " + detail; a.appendChild(s); }
    li.appendChild(a);
    return li;
  }
  function searchNeurons(query) {
    var site = window.GLUSCOPE, q = query.trim().toLowerCase(), found = [];
    var id = /^(\d+)\.(\d*)$/.exec(q);
    if (id && site.layers.indexOf(+id[1]) >= 0) {
      var layer = +id[1];
      return layerRows(layer).then(function (rows) {
        rows.forEach(function (r) {
          var n = String(r[0]);
          if (found.length < 12 && (id[2] === "" ? true : n === id[2] || n.indexOf(id[2]) === 0))
            found.push([n === id[2] ? 0 : 1, r[0], layer + "." + r[0]]);
        });
        found.sort(function (x, y) { return x[0] - y[0] || x[1] - y[1]; });
        return { heading: "Neurons", items: found.map(function (f) { return resultItem(neuronUrl(layer, f[1]), "Neuron " + f[2], ""); }) };
      });
    }
    var words = q.split(/\s+/), word = words[words.length - 1];
    if (!word) return Promise.resolve(null);
    return fetchJSON(ROOT + "gluscope/search/" + shardKey(word) + ".json").catch(function () { return {}; }).then(function (shard) {
      var keys = Object.keys(shard).filter(function (w) { return w.indexOf(word) === 0; });
      keys.sort(function (x, y) { return (x !== word) - (y !== word) || shard[y].length - shard[x].length || (x < y ? -1 : 1); });
      var items = [];
      keys.slice(0, 6).forEach(function (w) {
        shard[w].slice(0, w === word ? 12 : 4).forEach(function (p) {
          items.push(resultItem(neuronUrl(p[0], p[1]), "Neuron " + p[0] + "." + p[1],
            CASES[p[2]] + " · peaks on “" + tokenLabel(w) + "” in " + p[3] + " of its top examples · " + fmt4(p[4])));
        });
      });
      return { heading: "Neurons whose examples peak on “" + tokenLabel(word) + "”", items: items };
    });
  }
  var searchSeq = 0;
  function initSearch() {
    var input = document.querySelector(".md-search__input"), result = document.querySelector(".md-search-result");
    if (!window.GLUSCOPE || !input || !result || input.dataset.gs) return;
    input.dataset.gs = "1";
    var box = document.createElement("div");
    box.className = "gs-search";
    result.insertBefore(box, result.firstChild);
    var timer;
    // A neuron page's search form sends its query here as ?q=: open the search box with it.
    var query = new URLSearchParams(location.search).get("q");
    if (query) {
      var toggle = document.getElementById("__search");
      if (toggle) { toggle.checked = true; toggle.dispatchEvent(new Event("change")); }
      input.value = query;
      input.focus();
      setTimeout(function () {
        input.dispatchEvent(new Event("input", { bubbles: true }));
        input.dispatchEvent(new KeyboardEvent("keyup", { bubbles: true }));
      }, 0);
    }
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        var seq = ++searchSeq;
        searchNeurons(input.value).then(function (found) {
          if (seq !== searchSeq) return;  // a later query answered first
          box.textContent = "";
          if (!found) return;
          var head = document.createElement("div"), list = document.createElement("ol");
          head.className = "gs-search-head";
          head.textContent = found.items.length ? found.heading : found.heading + ": none";
          list.className = "gs-search-list";
          found.items.forEach(function (li) { list.appendChild(li); });
          box.appendChild(head); box.appendChild(list);
        }).catch(function (e) { if (seq === searchSeq) box.textContent = "neuron search failed (" + e.message + ")"; });
      }, 120);
    });
  }

  // -- layer pages: sortable, filterable, paged ---------------------------------------------------
  function element(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function initLayer(box) {
    var rowsPerPage = window.GLUSCOPE ? window.GLUSCOPE.pageRows : 100, suffix = box.dataset.suffix;
    fetchJSON(new URL(box.dataset.src, location.href).href).then(function (table) {
      var rows = table.rows, state = { sort: 0, dir: 1, page: 0 };
      var controls = element("div", "gs-layer-controls"), caseSel = element("select", "gs-filter-case");
      CASES.forEach(function (name, c) { var o = element("option", "", name); o.value = c; caseSel.appendChild(o); });
      caseSel.value = "3";
      var lo = element("input", "gs-filter-min"), hi = element("input", "gs-filter-max"), word = element("input", "gs-filter-word");
      [lo, hi].forEach(function (x) { x.type = "number"; x.min = "0"; x.max = "100"; x.step = "any"; x.size = 6; });
      lo.placeholder = "0"; hi.placeholder = "100"; word.type = "search"; word.placeholder = "top word contains";
      var label = function (text, input, after) {
        var l = element("label", "", text + " "); l.appendChild(input); if (after) l.appendChild(document.createTextNode(" " + after)); return l;
      };
      [label("share of", caseSel), label("from", lo, "%"), label("to", hi, "%"), label("word", word)].forEach(function (x) { controls.appendChild(x); });
      var wrap = element("div", "md-typeset__scrollwrap"), tableEl = element("table", "gs-table gs-index gs-layer-table");
      var head = element("tr"), body = element("tbody"), thead = element("thead");
      ["neuron"].concat(CASES.map(function (c) { return c + " %"; })).concat(["top word of each case (peak token marked)"]).forEach(function (name, col) {
        var th = element("th", col >= 1 && col <= 4 ? "gs-case gs-case" + (col - 1) : "", name);
        if (col <= 4) {
          th.classList.add("gs-sort");
          th.addEventListener("click", function () {
            state.dir = state.sort === col ? -state.dir : (col === 0 ? 1 : -1); state.sort = col; state.page = 0; show();
          });
        }
        head.appendChild(th);
      });
      thead.appendChild(head); tableEl.appendChild(thead); tableEl.appendChild(body); wrap.appendChild(tableEl);
      var pager = element("div", "gs-pager"), prev = element("button", "md-button gs-prev", "‹ previous"), next = element("button", "md-button gs-next", "next ›");
      var status = element("span", "gs-page-status");
      prev.type = next.type = "button";
      prev.addEventListener("click", function () { state.page--; show(); });
      next.addEventListener("click", function () { state.page++; show(); });
      [prev, status, next].forEach(function (x) { pager.appendChild(x); });
      [caseSel, lo, hi, word].forEach(function (x) { x.addEventListener("input", function () { state.page = 0; show(); }); });
      function wordText(w) { return w ? (w[0] + w[1] + w[2]).toLowerCase() : ""; }
      function show() {
        var c = +caseSel.value, min = lo.value === "" ? -Infinity : +lo.value, max = hi.value === "" ? Infinity : +hi.value;
        var needle = word.value.trim().toLowerCase();
        var kept = rows.filter(function (r) {
          return r[1 + c] >= min && r[1 + c] <= max && (!needle || [5, 6, 7, 8].some(function (m) { return wordText(r[m]).indexOf(needle) >= 0; }));
        });
        var col = state.sort, dir = state.dir;
        kept.sort(function (a, b) { return (a[col] - b[col]) * dir || a[0] - b[0]; });
        var pages = Math.max(1, Math.ceil(kept.length / rowsPerPage));
        state.page = Math.max(0, Math.min(state.page, pages - 1));
        var start = state.page * rowsPerPage, part = kept.slice(start, start + rowsPerPage);
        body.textContent = "";
        part.forEach(function (r) {
          var tr = element("tr"), td = element("td"), a = element("a", "", table.layer + "." + r[0]);
          a.href = "N" + r[0] + suffix; td.appendChild(a); tr.appendChild(td);
          for (var m = 1; m <= 4; m++) tr.appendChild(element("td", "", String(r[m])));
          var tops = element("td", "gs-tops");
          for (m = 5; m <= 8; m++) {
            var code = element("code", "gs-top gs-case" + (m - 5)), w = r[m];
            code.title = CASES[m - 5];
            if (w) { code.appendChild(document.createTextNode(w[0])); code.appendChild(element("span", "gs-peak", w[1])); code.appendChild(document.createTextNode(w[2])); }
            else code.textContent = "–";
            tops.appendChild(code);
          }
          tr.appendChild(tops); body.appendChild(tr);
        });
        head.querySelectorAll("th").forEach(function (th, n) { if (n === col) th.dataset.dir = dir > 0 ? "asc" : "desc"; else delete th.dataset.dir; });
        status.textContent = kept.length ? "neurons " + (start + 1) + "–" + (start + part.length) + " of " + kept.length +
          (kept.length < rows.length ? " (filtered from " + rows.length + ")" : "") + " · page " + (state.page + 1) + " of " + pages : "no neuron matches";
        prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
      }
      box.textContent = "";
      [controls, pager, wrap].forEach(function (x) { box.appendChild(x); });
      show();
      box.dataset.ready = "2";
    }).catch(function (e) {
      var note = element("p", "gs-empty", "could not load the layer's table (" + e.message + "); the first neurons are listed above");
      box.appendChild(note);
    });
  }

  // A served site's text box (plugin option probe_model): the text goes to the probe server on this
  // machine, which answers with the example row the pages use; then it is colored like every list.
  function initProbe(box) {
    var text = box.querySelector(".gs-probe-text"), run = box.querySelector(".gs-probe-run");
    var status = box.querySelector(".gs-probe-status"), result = box.querySelector(".gs-probe-result");
    function go() {
      if (!text.value.trim()) return;
      status.textContent = "running the model…"; run.disabled = true;
      // text/plain: a simple request, so the browser sends no preflight to the probe server.
      fetch(box.dataset.url, { method: "POST", headers: { "Content-Type": "text/plain" },
        body: JSON.stringify({ text: text.value, neuron: box.dataset.neuron }) })
        .then(function (r) { return r.json(); })
        .then(function (answer) {
          if (answer.error) { status.textContent = answer.error; return; }
          result.innerHTML = answer.html;  // the probe server's own rendering (render.example_row)
          status.textContent = answer.tokens + " tokens";
          init();
          var select = document.querySelector(".gs-hook-select");
          if (select && select.value !== "hook_post") result.querySelectorAll(".gs-examples").forEach(function (c) {
            recolor(c, select.value);
          });
        })
        .catch(function (e) { status.textContent = "the probe server did not answer (" + e + "); is mkdocs serve still running?"; })
        .then(function () { run.disabled = false; });
    }
    run.addEventListener("click", go);
    text.addEventListener("keydown", function (e) { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) go(); });
  }

  function init() {
    document.querySelectorAll(".gs-probe").forEach(function (box) {
      if (!box.dataset.ready) { box.dataset.ready = "1"; initProbe(box); }
    });
    document.querySelectorAll(".gs-examples").forEach(function (container) {
      if (container.dataset.ready) return;
      container.dataset.ready = "1";
      var select = container.querySelector(".gs-hook-select");
      // One control colors the whole page: the top-k lists, the samples and the bands, and shows that
      // hook's histograms.
      if (select) select.addEventListener("change", function () {
        document.querySelectorAll(".gs-examples").forEach(function (c) { recolor(c, select.value); });
        var tab = document.getElementById("gs-hist-" + HOOKS.indexOf(select.value));
        if (tab) tab.checked = true;
      });
      container.addEventListener("mouseover", function (e) {
        var span = e.target.closest(".gs-toks > span");
        if (span) showTip(span, e); else hideTip();
      });
      container.addEventListener("mouseleave", hideTip);
      container.addEventListener("click", function (e) {
        var button = e.target.closest(".gs-doc-btn");
        if (button) toggleDocument(button);
      });
      if (container.dataset.src) {
        // toggle does not bubble: listen in the capture phase for every list of the page.
        container.addEventListener("toggle", function (e) {
          var t = e.target;
          if (!t.classList || !t.open) return;
          if (t.classList.contains("gs-case-block")) buildLists(container, t);
          else if (t.classList.contains("gs-list")) loadList(container, t);
        }, true);
        // Lists the page opens itself (its rarest cases): no toggle event reaches a listener added now.
        container.querySelectorAll(".gs-case-block[open]").forEach(function (b) { buildLists(container, b); });
        container.querySelectorAll(".gs-list[open]").forEach(function (l) { loadList(container, l); });
      }
    });
    document.querySelectorAll(".gs-layer").forEach(function (box) {
      if (!box.dataset.ready) { box.dataset.ready = "1"; initLayer(box); }
    });
    initSearch();
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
