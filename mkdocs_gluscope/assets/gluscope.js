/* GLUScope pages: recoloring by hook, token tooltips, whole documents, sortable tables, the neuron
   search in the theme's search box, a light site's layer tables and neuron pages (light.js).

   Everything an example row shows comes from the page (mkdocs_gluscope.render writes full pages;
   light.js writes the same HTML from a neuron's data file): each example's gate, in and act(gate)
   windows (data-g, data-i, data-s: float16, base64), each list's color scale per hook (data-scale),
   the number of color levels and the first counted position. This file computes no activation
   function and chooses no scale: it applies render.color_levels' rule to those values. The rules it
   shares with Python (words, shard keys, number formats, labels) are in rules.js, tested against
   them. Untrusted text is set with textContent, or escaped by rules.mdText as in Python. */
import { CASES, HOOKS, compare, fmt, queryTerms, shardOf, tokenLabel, visible, wordKey } from "./rules.js";

// -- fetching, cached per URL ------------------------------------------------------------------------
const cache = new Map();
export function once(key, make) { if (!cache.has(key)) cache.set(key, make()); return cache.get(key); }
export function fetchOk(url, init) {
  return fetch(url, init).then(r => { if (!r.ok) throw new Error("HTTP " + r.status + " for " + url); return r; });
}
export function fetchJSON(url) { return once("json " + url, () => fetchOk(url).then(r => r.json())); }

// -- example rows: values, colors, tooltips, documents -------------------------------------------------
function float16(bits) {
  const sign = bits & 0x8000 ? -1 : 1, exp = (bits >> 10) & 0x1f, frac = bits & 0x3ff;
  if (exp === 0) return sign * Math.pow(2, -14) * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * Math.pow(2, exp - 15) * (1 + frac / 1024);
}
function decode(b64) {
  const raw = atob(b64), out = [];
  for (let i = 0; i + 1 < raw.length; i += 2) out.push(float16(raw.charCodeAt(i) | (raw.charCodeAt(i + 1) << 8)));
  return out;
}
function values(ex) {
  if (!ex._gs) {
    const g = decode(ex.dataset.g), i = decode(ex.dataset.i), s = decode(ex.dataset.s);
    ex._gs = { hook_pre: g, hook_pre_linear: i, swish: s, hook_post: s.map((x, j) => x * i[j]) };
  }
  return ex._gs;
}
function counted(container, ex, w) {  // the statistics count this window position (not the BOS)
  return +ex.dataset.pos + (w - +container.dataset.centre) >= +container.dataset.countedFrom;
}
function tipNumber(x) {
  if (!isFinite(x)) return "–";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toPrecision(3);
}

export function recolor(container, hook) {
  const centre = +container.dataset.centre, levels = +container.dataset.levels;
  container.querySelectorAll(".gs-list").forEach(list => {
    if (!list.dataset.scale) return;
    const scale = JSON.parse(list.dataset.scale)[HOOKS.indexOf(hook)];
    list.querySelectorAll(".gs-ex").forEach(ex => {
      const v = values(ex)[hook], first = +ex.dataset.first;
      ex.querySelectorAll(".gs-toks > span").forEach((span, n) => {
        const w = first + n;
        if (!counted(container, ex, w)) { span.className = "c0 gs-nc"; return; }
        const level = isFinite(v[w]) ? Math.max(-levels, Math.min(levels, Math.round(v[w] / scale * levels))) : 0;
        span.className = "c" + level + (w === centre ? " gs-x" : "");
      });
    });
  });
}

let tip;
function showTip(span) {
  const ex = span.closest(".gs-ex"), container = span.closest(".gs-examples");
  if (!ex || !container) return;
  const n = Array.prototype.indexOf.call(span.parentNode.children, span);
  const w = +ex.dataset.first + n, v = values(ex);
  const g = v.hook_pre[w], i = v.hook_pre_linear[w];
  const kase = g > 0 ? (i > 0 ? 0 : i < 0 ? 1 : -1) : g < 0 ? (i > 0 ? 2 : i < 0 ? 3 : -1) : -1;
  const pos = +ex.dataset.pos + (w - +container.dataset.centre);
  if (!tip) { tip = document.createElement("div"); tip.className = "gs-tip"; document.body.appendChild(tip); }
  tip.textContent = "";
  const approx = container.dataset.approx ? "≈ " : "";
  const f = x => isFinite(x) && approx ? approx + x.toPrecision(2) : tipNumber(x);
  const lines = [["token", JSON.stringify(span.textContent)], ["position", String(pos)], ["gate", f(g)], ["in", f(i)],
    ["act(gate)", f(v.swish[w])], ["post", f(v.hook_post[w])], ["case", kase < 0 ? "none (a zero)" : CASES[kase]]];
  if (approx) lines.push(["values", container.dataset.approx]);
  if (!counted(container, ex, w)) lines.push(["counted", "no: left out of all statistics and color scales"]);
  for (const [name, text] of lines) {
    const row = document.createElement("div"), key = document.createElement("b");
    key.textContent = name + " "; row.appendChild(key); row.appendChild(document.createTextNode(text));
    tip.appendChild(row);
  }
  tip.style.display = "block";
  const r = span.getBoundingClientRect();
  tip.style.left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - 220) + "px";
  tip.style.top = (window.scrollY + r.bottom + 6) + "px";
}
function hideTip() { if (tip) tip.style.display = "none"; }

// A whole document: {title, tokens} of a full site's document shards (light.js gives its container
// a reader of the corpus files instead).
function shardDocument(container, doc) {
  const per = 64;  // pages.DOCS_PER_SHARD
  const url = new URL(container.dataset.root + "gluscope/docs/" + Math.floor(doc / per) + ".json", location.href).href;
  return fetchJSON(url).then(shard => shard[String(doc)]);
}
function toggleDocument(button) {
  const ex = button.closest(".gs-ex"), container = button.closest(".gs-examples");
  const open = ex.nextElementSibling && ex.nextElementSibling.classList.contains("gs-doc") ? ex.nextElementSibling : null;
  if (open) { open.remove(); return; }
  const doc = +ex.dataset.doc, pos = +ex.dataset.pos, box = document.createElement("div");
  box.className = "gs-doc"; box.textContent = "loading document " + doc + "…";
  ex.after(box);
  const load = container.gsDocument || (d => shardDocument(container, d));
  load(doc).then(entry => {
    box.textContent = "";
    const head = document.createElement("div");
    head.className = "gs-doc-head";
    head.textContent = "document " + doc + (entry.title ? " · " + entry.title : "") + " · " + entry.tokens.length + " tokens";
    box.appendChild(head);
    entry.tokens.forEach((t, p) => {
      const s = document.createElement("span");
      s.textContent = t.split("\n").map(visible).join("↵\n");  // the document keeps its line breaks
      if (p === pos) s.className = "gs-x";
      box.appendChild(s);
    });
    const mark = box.querySelector(".gs-x");
    if (mark) mark.scrollIntoView({ block: "nearest" });
  }).catch(e => { box.textContent = "could not load document " + doc + " (" + e.message + ")"; });
}

function sortable(table) {
  table.querySelectorAll("th").forEach((th, col) => {
    th.addEventListener("click", () => {
      const body = table.tBodies[0], rows = Array.from(body.rows);
      const dir = th.dataset.dir === "desc" ? 1 : -1;
      table.querySelectorAll("th").forEach(x => { delete x.dataset.dir; });
      th.dataset.dir = dir === 1 ? "asc" : "desc";
      const key = row => {
        const cell = row.cells[col], raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent;
        const num = parseFloat(raw);
        return isNaN(num) || cell.dataset.sort === undefined && !/^[-\d.]/.test(raw) ? raw : num;
      };
      rows.sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * dir; });
      rows.forEach(r => body.appendChild(r));
    });
  });
}

// One control colors the whole page (top-k lists, samples, bands) and shows that hook's histograms.
export function initExamples(container) {
  if (container.dataset.ready) return;
  container.dataset.ready = "1";
  const select = container.querySelector(".gs-hook-select");
  if (select) select.addEventListener("change", () => {
    document.querySelectorAll(".gs-examples").forEach(c => recolor(c, select.value));
    const tab = document.getElementById("gs-hist-" + HOOKS.indexOf(select.value));
    if (tab) tab.checked = true;
  });
  container.addEventListener("mouseover", e => {
    const span = e.target.closest(".gs-toks > span");
    if (span) showTip(span); else hideTip();
  });
  container.addEventListener("mouseleave", hideTip);
  container.addEventListener("click", e => {
    const button = e.target.closest(".gs-doc-btn");
    if (button) toggleDocument(button);
  });
}

// -- a light site's plugin instances (each url_prefix's site.js registers one) ---------------------------
function sites() { return window.GLUSCOPE_SITES || []; }
export function neuronUrl(site, id) {
  const m = /^(\d+)\.(?:(e\d+|s)\.)?(\d+)$/.exec(id);
  const folder = "L" + m[1] + (m[2] ? "/" + (m[2] === "s" ? "S" : "E" + m[2].slice(1)) : "");
  return new URL(folder + "/N" + m[3] + site.suffix, site.base).href;
}
function tableOf(site, layer, label) {
  const name = "L" + layer + (label ? "-" + (label === "s" ? "S" : "E" + label.slice(1)) : "");
  return site.tables[name] ? name : null;
}
function tableRows(site, name) { return fetchJSON(new URL("gluscope/layers/" + name + ".json", site.base).href).then(t => t.rows); }

// Neurons 0..size-1 whose id begins with `prefix`: the exact one first, then by length and value (at most 12).
function idsBeginning(prefix, size) {
  const out = [];
  if (prefix === "") { for (let n = 0; n < Math.min(12, size); n++) out.push(n); return out; }
  if (prefix.length > 1 && prefix[0] === "0") return out;
  const n = +prefix;
  if (n < size) out.push(n);
  for (let scale = 10; n > 0 && out.length < 12 && n * scale < size; scale *= 10) {
    for (let m = n * scale; m < Math.min((n + 1) * scale, size) && out.length < 12; m++) out.push(m);
  }
  return out;
}

// "28.473", "28.47" (and the ids it begins), "3.e12.407", "5.s.20".
async function searchIds(query) {
  const m = /^(\d+)\.(?:(e\d+|s)\.)?(\d*)$/.exec(query.trim().toLowerCase());
  if (!m) return null;
  const items = [];
  for (const site of sites()) {
    const name = tableOf(site, +m[1], m[2]);
    if (!name) continue;
    const [layer, , listed, size] = site.tables[name];
    const neurons = listed === size ? idsBeginning(m[3], size) :  // every neuron of the table: no lookup
      (await tableRows(site, name)).map(r => r[0]).filter(n => m[3] === "" || String(n).startsWith(m[3]))
        .sort((a, b) => (String(a) !== m[3]) - (String(b) !== m[3]) || a - b).slice(0, 12);
    const label = layer + "." + (m[2] ? m[2] + "." : "");
    for (const n of neurons) items.push([neuronUrl(site, label + n), "Neuron " + label + n, sites().length > 1 ? site.prefix : ""]);
  }
  return { heading: "Neurons", items };
}

// The shards a term's postings are in: its own, and the next ones while they begin with the term.
async function shardsFor(site, term, prefix) {
  const firsts = await fetchJSON(new URL("gluscope/search/firsts.json", site.base).href);
  const first = shardOf(term, firsts), wanted = [first];
  for (let i = first + 1; prefix && i < firsts.length && i <= first + 2 && firsts[i].startsWith(term); i++) wanted.push(i);
  const shards = await Promise.all(wanted.map(i => fetchJSON(new URL("gluscope/search/" + i + ".json", site.base).href)));
  return Object.assign({}, ...shards);
}

// Neurons by word: each posting [id, case, score, share, peak] says the term is `share` of the neuron's
// strongest activations (in that case), `score` that share discounted where the neuron is weak for its
// layer (light/search.py). A neuron's case scores the sum, over the query's terms, of its score for each
// (the last term also matches the terms it begins, at half weight): a word that is all of a neuron's
// strong activations first, and a longer query (several words, a run of Chinese) ranks by how much it covers.
async function searchWords(query) {
  const terms = queryTerms(query);
  if (!terms.length) return null;
  const last = terms.length - 1, found = new Map();
  for (const site of sites()) {
    const maps = await Promise.all(terms.map((t, i) => shardsFor(site, t, i === last)));
    terms.forEach((term, i) => {
      const map = maps[i];
      const matches = i < last ? (map[term] ? [term] : []) : Object.keys(map).filter(t => t === term || t.startsWith(term))
        .sort((x, y) => (x !== term) - (y !== term) || map[y].length - map[x].length || compare(x, y)).slice(0, 6);
      for (const word of matches) {
        const weight = word === term ? 1 : 0.5;
        for (const [id, c, score, share, peak] of map[word]) {
          const key = site.prefix + " " + id + " " + c;
          const entry = found.get(key) || { site, id, c, best: new Array(terms.length).fill(0), peak: 0, word, share: 0 };
          if (weight * score > entry.best[i]) {
            entry.best[i] = weight * score;
            if (i === last) { entry.word = word; entry.share = share; }
          }
          entry.peak = Math.max(entry.peak, Math.abs(peak));
          found.set(key, entry);
        }
      }
    });
  }
  const ranked = Array.from(found.values()).map(e => Object.assign(e, { score: e.best.reduce((a, b) => a + b, 0) }))
    .sort((a, b) => b.score - a.score || b.peak - a.peak);
  const seen = new Set(), items = [];
  let labelled = false;
  for (const f of ranked) {
    if (seen.has(f.site.prefix + f.id) || items.length >= 12) continue;
    seen.add(f.site.prefix + f.id);
    labelled = labelled || f.share < 0;
    // A share of -1 marks a word of the case's explanation label (light/search.py label_postings).
    const what = f.share < 0 ? "its explanation's label says “" + tokenLabel(f.word) + "”" :
      "“" + tokenLabel(f.word) + "” is " + Math.round(100 * f.share) + "% of its strongest activations";
    items.push([neuronUrl(f.site, f.id), "Neuron " + f.id, CASES[f.c] + " · " + what + (terms.length > 1 ? " (" + f.best.filter(x => x).length + " of " + terms.length +
      " terms)" : "") + (f.peak ? " · peak " + fmt(f.peak) : "")]);
  }
  return { heading: "Neurons whose strongest activations" + (labelled ? " or explanation labels" : "") + " are on “" +
    terms.map(tokenLabel).join(" ") + "”", items };
}

export function searchNeurons(query) {
  return searchIds(query).then(found => found || searchWords(query));
}

function resultItem(href, title, detail) {
  const li = document.createElement("li"), a = document.createElement("a"), b = document.createElement("b");
  li.className = "gs-search-item"; a.href = href; b.textContent = title; a.appendChild(b);
  if (detail) { const s = document.createElement("span"); s.textContent = " · " + detail; a.appendChild(s); }
  li.appendChild(a);
  return li;
}

let searchSeq = 0;
function initSearch() {
  const input = document.querySelector(".md-search__input"), result = document.querySelector(".md-search-result");
  if (!sites().length || !input || !result || input.dataset.gs) return;
  input.dataset.gs = "1";
  const box = document.createElement("div");
  box.className = "gs-search";
  result.insertBefore(box, result.firstChild);
  let timer;
  // A light neuron page's search form sends its query here as ?q=: open the search box with it.
  const query = new URLSearchParams(location.search).get("q");
  if (query) {
    const toggle = document.getElementById("__search");
    if (toggle) { toggle.checked = true; toggle.dispatchEvent(new Event("change")); }
    input.value = query;
    input.focus();
    setTimeout(() => {
      input.dispatchEvent(new Event("input", { bubbles: true }));
      input.dispatchEvent(new KeyboardEvent("keyup", { bubbles: true }));
    }, 0);
  }
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      const seq = ++searchSeq;
      searchNeurons(input.value).then(found => {
        if (seq !== searchSeq) return;  // a later query answered first
        box.textContent = "";
        if (!found) return;
        const head = document.createElement("div"), list = document.createElement("ol");
        head.className = "gs-search-head";
        head.dataset.query = input.value;  // what these results answer (tests wait for it)
        head.textContent = found.items.length ? found.heading : found.heading + ": none";
        list.className = "gs-search-list";
        for (const [href, title, detail] of found.items) list.appendChild(resultItem(href, title, detail));
        box.appendChild(head); box.appendChild(list);
      }).catch(e => { if (seq === searchSeq) box.textContent = "neuron search failed (" + e.message + ")"; });
    }, 120);
  });
}

// -- a light site's table pages: sortable, filterable (share of a case, whole words), paged ---------------
function element(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
// Whole words: every term of the filter is a term of one of the row's top words ("arms" does not find
// "Darmstadt"); a term ending in * matches the words it begins.
// A row's explanation labels ([parts, score] per case) count as words too, each cut as a query is.
export function wordFilter(text) {
  const raw = wordKey(text);
  if (!raw) return null;
  const star = raw.endsWith("*"), terms = queryTerms(star ? raw.slice(0, -1) : raw);
  return (words, labels) => {
    const have = new Set();
    for (const w of words) if (w) for (const t of queryTerms(w.join(""))) have.add(t);
    for (const l of labels || []) if (l) for (const t of queryTerms(l[0].join(" "))) have.add(t);
    return terms.every((t, i) => have.has(t) || (star && i === terms.length - 1 && Array.from(have).some(h => h.startsWith(t))));
  };
}

// Each case's label ([parts, score]: quoted tokens at odd indices) and score, as text, like
// light/page.py's label_line.
function labelCell(labels) {
  const td = element("td", "gs-labels");
  labels.forEach((l, c) => {
    if (!l) return;
    if (td.childNodes.length) td.appendChild(document.createTextNode(" · "));
    td.appendChild(element("span", "gs-case" + c, CASES[c]));
    td.appendChild(document.createTextNode(" "));
    const label = element("bdi", "gs-label");
    l[0].forEach((part, i) => label.appendChild(i % 2 ? element("code", "", part) : document.createTextNode(part)));
    td.appendChild(label);
    td.appendChild(document.createTextNode(" "));
    td.appendChild(element("span", "gs-score", l[1] === null ? "not scored" : "score " + l[1].toFixed(2)));
  });
  return td;
}

function initTable(box) {
  const rowsPerPage = 100, suffix = box.dataset.suffix, label = box.dataset.label;
  fetchJSON(new URL(box.dataset.src, location.href).href).then(table => {
    const rows = table.rows, state = { sort: 0, dir: 1, page: 0 };
    const controls = element("div", "gs-layer-controls"), caseSel = element("select", "gs-filter-case");
    CASES.forEach((name, c) => { const o = element("option", "", name); o.value = c; caseSel.appendChild(o); });
    caseSel.value = "3";
    const lo = element("input", "gs-filter-min"), hi = element("input", "gs-filter-max"), word = element("input", "gs-filter-word");
    for (const x of [lo, hi]) { x.type = "number"; x.min = "0"; x.max = "100"; x.step = "any"; x.size = 6; }
    lo.placeholder = "0"; hi.placeholder = "100"; word.type = "search"; word.placeholder = "a whole word, or prefix*";
    const labelled = (text, input, after) => {
      const l = element("label", "", text + " "); l.appendChild(input); if (after) l.appendChild(document.createTextNode(" " + after)); return l;
    };
    const hasLabels = rows.length > 0 && rows[0].length > 9;  // the file has explanations: rows end with each case's label
    [labelled("share of", caseSel), labelled("from", lo, "%"), labelled("to", hi, "%"),
     labelled(hasLabels ? "top word or label word" : "top word", word)].forEach(x => controls.appendChild(x));
    const wrap = element("div", "md-typeset__scrollwrap"), tableEl = element("table", "gs-table gs-index gs-layer-table");
    const head = element("tr"), body = element("tbody"), thead = element("thead");
    ["neuron"].concat(CASES.map(c => c + " %")).concat(["top word of each case (peak token marked)" +
      (hasLabels ? "; below, the label of each case (score)" : "")]).forEach((name, col) => {
      const th = element("th", col >= 1 && col <= 4 ? "gs-case gs-case" + (col - 1) : "", name);
      if (col <= 4) {
        th.classList.add("gs-sort");
        th.addEventListener("click", () => {
          state.dir = state.sort === col ? -state.dir : (col === 0 ? 1 : -1); state.sort = col; state.page = 0; show();
        });
      }
      head.appendChild(th);
    });
    thead.appendChild(head); tableEl.appendChild(thead); tableEl.appendChild(body); wrap.appendChild(tableEl);
    const pager = element("div", "gs-pager"), prev = element("button", "md-button gs-prev", "‹ previous"), next = element("button", "md-button gs-next", "next ›");
    const status = element("span", "gs-page-status");
    prev.type = next.type = "button";
    prev.addEventListener("click", () => { state.page--; show(); });
    next.addEventListener("click", () => { state.page++; show(); });
    [prev, status, next].forEach(x => pager.appendChild(x));
    [caseSel, lo, hi, word].forEach(x => x.addEventListener("input", () => { state.page = 0; show(); }));
    function show() {
      const c = +caseSel.value, min = lo.value === "" ? -Infinity : +lo.value, max = hi.value === "" ? Infinity : +hi.value;
      const matches = wordFilter(word.value);
      const kept = rows.filter(r => r[1 + c] >= min && r[1 + c] <= max && (!matches || matches(r.slice(5, 9), r.slice(9, 13))));
      const col = state.sort, dir = state.dir;
      kept.sort((a, b) => (a[col] - b[col]) * dir || a[0] - b[0]);
      const pages = Math.max(1, Math.ceil(kept.length / rowsPerPage));
      state.page = Math.max(0, Math.min(state.page, pages - 1));
      const start = state.page * rowsPerPage, part = kept.slice(start, start + rowsPerPage);
      body.textContent = "";
      for (const r of part) {
        const tr = element("tr"), td = element("td"), a = element("a", "", label + "." + r[0]);
        a.href = "N" + r[0] + suffix; td.appendChild(a); tr.appendChild(td);
        for (let m = 1; m <= 4; m++) tr.appendChild(element("td", "", String(r[m])));
        const tops = element("td", "gs-tops");
        for (let m = 5; m <= 8; m++) {
          const code = element("code", "gs-top gs-case" + (m - 5)), w = r[m];
          code.title = CASES[m - 5];
          if (w) { code.appendChild(document.createTextNode(w[0])); code.appendChild(element("span", "gs-peak", w[1])); code.appendChild(document.createTextNode(w[2])); }
          else code.textContent = "–";
          tops.appendChild(code);
        }
        tr.appendChild(tops); body.appendChild(tr);
        if (hasLabels && r.slice(9, 13).some(l => l)) {  // the labels on a line of their own, the table's width
          const labels = element("tr", "gs-label-row"), cell = labelCell(r.slice(9, 13));
          cell.colSpan = 6; labels.appendChild(cell); body.appendChild(labels);
        }
      }
      head.querySelectorAll("th").forEach((th, n) => { if (n === col) th.dataset.dir = dir > 0 ? "asc" : "desc"; else delete th.dataset.dir; });
      status.textContent = kept.length ? "neurons " + (start + 1) + "–" + (start + part.length) + " of " + kept.length +
        (kept.length < rows.length ? " (filtered from " + rows.length + ")" : "") + " · page " + (state.page + 1) + " of " + pages : "no neuron matches";
      prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
    }
    box.textContent = "";
    [controls, pager, wrap].forEach(x => box.appendChild(x));
    show();
    box.dataset.ready = "2";
  }).catch(e => {
    box.appendChild(element("p", "gs-empty", "could not load the table (" + e.message + "); the first neurons are listed above"));
  });
}

// A served site's text box (plugin option probe_model): the text goes to the probe server on this
// machine, which answers with the example row the pages use; then it is colored like every list.
function initProbe(box) {
  const text = box.querySelector(".gs-probe-text"), run = box.querySelector(".gs-probe-run");
  const status = box.querySelector(".gs-probe-status"), result = box.querySelector(".gs-probe-result");
  function go() {
    if (!text.value.trim()) return;
    status.textContent = "running the model…"; run.disabled = true;
    // text/plain: a simple request, so the browser sends no preflight to the probe server.
    fetch(box.dataset.url, { method: "POST", headers: { "Content-Type": "text/plain" },
      body: JSON.stringify({ text: text.value, neuron: box.dataset.neuron }) })
      .then(r => r.json())
      .then(answer => {
        if (answer.error) { status.textContent = answer.error; return; }
        result.innerHTML = answer.html;  // the probe server's own rendering (render.example_row)
        status.textContent = answer.tokens + " tokens";
        init();
        const select = document.querySelector(".gs-hook-select");
        if (select && select.value !== "hook_post") result.querySelectorAll(".gs-examples").forEach(c => recolor(c, select.value));
      })
      .catch(e => { status.textContent = "the probe server did not answer (" + e + "); is mkdocs serve still running?"; })
      .then(() => { run.disabled = false; });
  }
  run.addEventListener("click", go);
  text.addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) go(); });
}

function init() {
  document.querySelectorAll(".gs-probe").forEach(box => {
    if (!box.dataset.ready) { box.dataset.ready = "1"; initProbe(box); }
  });
  document.querySelectorAll(".gs-examples").forEach(initExamples);
  document.querySelectorAll(".gs-layer").forEach(box => {
    if (!box.dataset.ready) { box.dataset.ready = "1"; initTable(box); }
  });
  const light = document.querySelectorAll(".gs-light:not([data-ready])");
  if (light.length) {
    import("./light.js").then(m => light.forEach(el => { el.dataset.ready = "1"; m.renderNeuron(el); }));
  }
  initSearch();
  document.querySelectorAll("table.gs-sortable").forEach(t => {
    if (!t.dataset.ready) { t.dataset.ready = "1"; sortable(t); }
  });
}

if (window.document$ && window.document$.subscribe) window.document$.subscribe(init);  // Material's instant navigation
else init();  // a module runs after the page is parsed
