/* A light site's neuron page (mkdocs_gluscope.light): the page holds its title, links and one line of
   facts; this module draws the rest from the neuron's row of its Parquet data file, read with hyparquet
   by HTTP range requests (the file's tail, where Parquet keeps its footer, then the neuron's row group),
   and the documents its examples come from (corpus files, one row group per document).

   What it draws is what a full page holds, in the same HTML (rules.js and figures.js mirror the Python
   that writes full pages, and are tested against it): the summary table, the distributions, the
   example lists of every case and hook, the random and band samples. The example windows are 7-bit
   codes (light/data.py: encode_windows), so values shown for the tokens around an example are within
   6%; each example's own value, the summary and the distributions are exact. */
import { parquetMetadataAsync, parquetReadObjects } from "./vendor/hyparquet/index.js";
import { decompress } from "./vendor/fzstd.js";
import { CASES, HOOKS, HOOK_LABELS, LEVELS, caseBlock, colorLevels, colorScale, countOf, escapeHtml, exampleRow,
  extremeText, fmt, fmtInt, formatG, halfBits, mdText, signed, summaryTable, windowValue } from "./rules.js";
import { binRange, densityHtml, histogramsHtml } from "./figures.js";
import { fetchJSON, fetchOk, initExamples, neuronUrl, once } from "./gluscope.js";

const compressors = { ZSTD: (input, n) => decompress(input, new Uint8Array(n)) };

// -- reading Parquet over HTTP -----------------------------------------------------------------------
// A file for hyparquet whose first request, for its last `tail` bytes (the footer), also tells its length
// (Content-Range): no HEAD request. A server that ignores Range sends the whole file, which serves too.
function parquetFile(url, tail) {
  return once("parquet " + url, async () => {
    const res = await fetchOk(url, { headers: { Range: "bytes=-" + tail } });
    const end = await res.arrayBuffer();
    let length = end.byteLength;
    if (res.status === 206) {
      const range = res.headers.get("Content-Range");  // a cross-origin host must expose it
      length = range ? +range.split("/")[1] : +(await fetchOk(url, { method: "HEAD" })).headers.get("Content-Length");
    }
    const start = length - end.byteLength;
    const file = {
      byteLength: length,
      slice(a, b = length) {
        if (a >= start) return end.slice(a - start, b - start);
        return fetchOk(url, { headers: { Range: "bytes=" + a + "-" + (b - 1) } })
          .then(r => r.arrayBuffer().then(buf => r.status === 206 ? buf : buf.slice(a, b)));
      },
    };
    const metadata = await parquetMetadataAsync(file, { initialFetchSize: Math.min(tail, length) });
    return { file, metadata };
  });
}
async function readRow(url, row, tail) {
  const { file, metadata } = await parquetFile(url, tail);
  // utf8: false: a binary column (the window codes) stays bytes; string columns are strings by their type.
  const rows = await parquetReadObjects({ file, metadata, rowStart: row, rowEnd: row + 1, compressors, utf8: false });
  if (!rows.length) throw new Error("no row " + row + " in " + url);
  return rows[0];
}

// -- the site -----------------------------------------------------------------------------------------
function siteOf(el) {
  const base = new URL(el.dataset.root, location.href).href;
  const site = (window.GLUSCOPE_SITES || []).find(s => s.base === base);
  if (!site) throw new Error("this page's site.js did not load (" + base + "site.js)");
  return site;
}
const INFINITE = { inf: Infinity, "-inf": -Infinity };
function facts(site) {
  return once("facts " + site.base, () => fetchJSON(new URL("gluscope/site.json", site.base).href).then(f => {
    for (const name of ["histEdges", "densityEdges", "bandEdges"]) if (f[name]) f[name] = f[name].map(x => x in INFINITE ? INFINITE[x] : x);
    return f;
  }));
}
function dataUrl(site, path) { return new URL(site.data + path, site.base).href; }

// act(x) for every float16 x: light.data.act_table's deltas of bit patterns, summed back.
function actTable(site) {
  return once("act " + site.base, async () => {
    const res = await fetchOk(new URL("gluscope/act.bin", site.base).href);
    let buf = await res.arrayBuffer();
    const head = new Uint8Array(buf, 0, 2);
    if (head[0] === 0x1f && head[1] === 0x8b) {  // a server that sent it as Content-Encoding: gzip inflated it already
      buf = await new Response(new Blob([buf]).stream().pipeThrough(new DecompressionStream("gzip"))).arrayBuffer();
    }
    const deltas = new Uint16Array(buf), table = new Float64Array(65536);
    let bits = 0;
    for (let i = 0; i < 65536; i++) { bits = (bits + deltas[i]) & 0xffff; table[i] = float16(bits); }
    return table;
  });
}
function float16(bits) {
  const sign = bits & 0x8000 ? -1 : 1, exp = (bits >> 10) & 0x1f, frac = bits & 0x3ff;
  if (exp === 0) return sign * Math.pow(2, -14) * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * Math.pow(2, exp - 15) * (1 + frac / 1024);
}
function toHalf(x) { return Number.isNaN(x) ? NaN : float16(halfBits(x)); }

// A document's title and tokens (display strings), from its corpus file.
function documentOf(site, f, doc) {
  return once("doc " + site.base + doc, () => readRow(dataUrl(site, "corpus/" + Math.floor(doc / f.docsPerFile) + ".parquet"),
    doc % f.docsPerFile, site.tails.corpus).then(r => ({ title: r.title, tokens: r.tokens })));
}

// -- a neuron's row, decoded --------------------------------------------------------------------------
function decodeNeuron(row, f) {
  const num = a => Array.from(a, Number), C = CASES.length, H = HOOKS.length;
  const s = num(row.summary), parts = {};
  let o = 0;
  for (const [name, n] of f.summary) { parts[name] = s.slice(o, o + n); o += n; }
  const grid = a => CASES.map((_, c) => a.slice(c * H, (c + 1) * H));
  const [k, S, S2] = f.shown, R = f.bandEdges ? f.bandEdges.length - 1 : 0, W = f.contextBefore + 1 + f.contextAfter;
  const lists = num(row.lists), all = num(row.values), place = num(row.place);
  const values = all.slice(0, all.length - 2 * C), largest = all.slice(all.length - 2 * C);
  const U = place.length / 2, docs = place.slice(0, U), pos = place.slice(U);
  const codes = new Int8Array(row.window.buffer, row.window.byteOffset, row.window.byteLength), caseOf = new Array(U).fill(0);
  const slot = (offset, c, n) => { for (let j = 0; j < n; j++) if (lists[offset + j] >= 0) caseOf[lists[offset + j]] = c; };
  for (let c = 0; c < C; c++) {
    for (let h = 0; h < H; h++) slot((c * H + h) * k, c, k);
    slot(C * H * k + c * S, c, S);
    for (let r = 0; r < R; r++) slot(C * H * k + C * S + (c * R + r) * S2, c, S2);
  }
  const windows = w => Array.from({ length: U }, (_, u) => Array.from({ length: W }, (_, t) =>
    windowValue(codes[(w * U + u) * W + t], largest[caseOf[u] * 2 + w], f.codeSteps, f.codeOctaves, f.nanCode)));
  const dist = Array.from(row.dist, code => countOf(code, f.countSteps)), B = f.histEdges ? f.histEdges.length - 1 : 0, G = f.densityEdges ? f.densityEdges.length - 1 : 0;
  return {
    id: null, count: parts.count, sum: grid(parts.sum), min: grid(parts.min), max: grid(parts.max), nonfinite: parts.nonfinite,
    cos: parts.cos, flipped: parts.flipped[0] > 0, telling: parts.telling[0], routed: parts.routed[0] >= 0 ? parts.routed[0] : null,
    hist: dist.length ? CASES.map((_, c) => HOOKS.map((_, h) => dist.slice((c * H + h) * B, (c * H + h + 1) * B))) : null,
    density: dist.length ? Array.from({ length: G }, (_, g) => dist.slice(C * H * B + g * G, C * H * B + (g + 1) * G)) : null,
    k, S, S2, R, W, lists, values, docs, pos, gate: windows(0), in_: windows(1), ...effectsOf(row, U),
    top: (c, h) => ({ offset: (c * H + h) * k, n: k }),
    sample: c => ({ offset: C * H * k + c * S, n: S }),
    band: (c, r) => ({ offset: C * H * k + C * S + (c * R + r) * S2, n: S2 }),
  };
}

// The effect column (light/data.py): each distinct example's final-norm scale s, then the out score of the
// token after it; empty in a file without effects.
function effectsOf(row, U) {
  const e = row.effect ? Array.from(row.effect, Number) : [];
  return e.length === 2 * U ? { finalScale: e.slice(0, U), nextScore: e.slice(U) } : { finalScale: null, nextScore: null };
}

// -- drawing ------------------------------------------------------------------------------------------
const NO_TOKEN = '<p class="gs-empty">No token of the corpus fell in this case.</p>';
function heading(id, text) { return '<h2 id="' + id + '">' + escapeHtml(text) + "</h2>"; }

// Related neurons (the row's context column: context.light_context), as a full page lists them
// (render.related_section): what the neuron feeds per sign of post, alike and opposite writers, and the
// cases whose strongest examples are the same tokens; each neuron a link to its page.
function relatedHtml(related, site, k) {
  const link = id => '<a href="' + escapeHtml(neuronUrl(site, id)) + '">' + escapeHtml(id) + "</a>";
  const out = [heading("related-neurons", "Related neurons")];
  if (related.feeds && !related.feeds.some(row => Object.values(row.sides).some(list => list.length))) {
    out.push("<p><strong>Feeds</strong> (by weights): no later layer in this file reads what this neuron writes.</p>");
  } else if (related.feeds) {
    out.push("<p><strong>Feeds</strong> (by weights, the direct path): the later neurons whose gate or in reads most strongly " +
      "what this neuron writes, w · (g ⊙ w_out) with g the later layer's pre-MLP norm scale. In a case where post &gt; 0 the " +
      "neuron pushes them towards the side named; where post &lt; 0, the other way.</p>",
      '<div class="md-typeset__scrollwrap"><table class="gs-table gs-related"><thead><tr><th>this neuron\'s cases</th>' +
      "<th>gate+ of</th><th>gate− of</th><th>in+ of</th><th>in− of</th></tr></thead><tbody>" +
      related.feeds.map(row => "<tr><td>" + row.cases.map(c => escapeHtml(c)).join(", ") + " (post " + (row.post > 0 ? "&gt;" : "&lt;") +
        " 0)</td>" + ["gate+", "gate-", "in+", "in-"].map(side => "<td>" + (row.sides[side].slice(0, 5).map(e => link(e.id) +
        "&nbsp;<small>" + fmt(e.score) + "</small>").join(" · ") || "–") + "</td>").join("") + "</tr>").join("") + "</tbody></table></div>");
  }
  if (related.alike) {
    out.push("<ul>" + [["alike", "Writes alike"], ["opposite", "Writes opposite"]].map(([name, label]) => "<li><strong>" + label +
      "</strong> (same layer, cos of w_out): " + ((related[name] || []).slice(0, 8).map(e => link(e.id) + "&nbsp;<small>" +
      fmt(e.cos) + "</small>").join(" · ") || "none") + "</li>").join("") + "</ul>");
  }
  if (related.shared) {
    const plural = (x, noun) => x + " " + noun + (x === 1 ? "" : "s");
    out.push("<p><strong>Fires with</strong> (by activation): the cases whose " + k + " strongest hook_post examples include the " +
      "same tokens as this case's (shared tokens, then shared documents, of " + k + "; tokens at the start of a document left out).</p>" +
      "<ul>" + Object.entries(related.shared).map(([kase, entries]) => "<li><strong>" + escapeHtml(kase) + "</strong>: " +
        (entries.slice(0, 6).map(e => link(e.id) + " " + escapeHtml(e.case) + " <small>" + plural(e.positions, "token") + ", " +
          plural(e.docs, "doc") + "</small>").join(" · ") || "no other case shares a strong token") + "</li>").join("") + "</ul>");
  }
  return out.join("");
}

// One top example's effect on the output (render.effect_cell): post · s · score, the change of the next
// token's logit, and in its tooltip the tokens the example raises and lowers most (effects.raised_and_lowered:
// every token's logit changes by post · s times its out score).
function effectCell(context, post, s, score, next) {
  const factor = post * s, effect = factor * score;
  if (!isFinite(effect)) return '<span class="gs-eff" title="no next token in the document">–</span>';
  let tip = "direct effect on the logit of the next token" + (next === null ? "" : " " + JSON.stringify(next)) + ": " + signed(effect);
  if (context && factor !== 0) {
    const [up, down] = factor > 0 ? [context.raises, context.lowers] : [context.lowers, context.raises];
    for (const [label, list] of [["raises most", up], ["lowers most", down]]) {
      if (list && list.length) tip += "\n" + label + ": " + list.map(([t, x]) => JSON.stringify(t) + " " + signed(factor * x)).join(", ");
    }
  }
  return '<span class="gs-eff" title="' + mdText(tip) + '">' + signed(effect) + "</span>";
}

function pageHtml(n, f, nid, site) {
  const total = n.routed === null ? f.nTokens : n.routed;
  const prov = f.provenance.map(([k, v]) => "<b>" + mdText(k) + "</b> " + mdText(v)).join(" · ");
  const out = ['<p class="gs-provenance">' + prov + "</p>"];
  if (n.routed !== null) {
    out.push('<p class="gs-routing">This expert neuron\'s statistics are over the ' + fmtInt(n.routed) + " tokens routed to its " +
      "expert (" + formatG(100 * n.routed / Math.max(f.nTokens, 1), 3) + "% of " + fmtInt(f.nTokens) + "); each case's " +
      "frequency is a share of them, and tokens not routed to it have no value in the examples.</p>");
  }
  out.push(heading("summary", "Summary"), summaryTable(n.count, total, n.sum, n.min, n.max));
  const bad = n.nonfinite.reduce((a, b) => a + b, 0);
  if (bad) {
    out.push('<div class="admonition warning gs-nonfinite"><p class="admonition-title">Non-finite values</p><p>' + fmtInt(bad) +
      " positions of this neuron had a NaN or infinite value; they are excluded from every statistic on this page.</p></div>");
  }
  if (n.hist) {
    out.push(heading("distributions", "Distributions"),
      "<p>How each case's tokens spread over |value| (octave bins; hover a bar for its range and count) and over the " +
      "(gate, in) plane. Counts in these figures are to three significant digits (within 5%); the summary's are exact.</p>", '<div class="gs-dists">' + histogramsHtml(n.hist, f.histEdges, n.count, "hook_post") +
      '<figure class="gs-density-fig" data-search-exclude><figcaption>gate × in, all cases (darker: more tokens)</figcaption>' +
      densityHtml(n.density, f.densityEdges) + "</figure></div>");
  }
  out.push(heading("weights", "Weights"), "<ul><li>cos(w_gate, w_in) = " + n.cos[0].toFixed(3) + " · cos(w_gate, w_out) = " +
    n.cos[1].toFixed(3) + " · cos(w_in, w_out) = " + n.cos[2].toFixed(3) + "</li><li>refactor_glu: " + (n.flipped ?
      "<strong>flipped</strong> (w_gate · w_in was negative, so w_in and w_out were negated; in and post carry the opposite " +
      "sign of the original model's)" : "not flipped") + "</li></ul>");
  if (n.context && n.context.related) out.push(relatedHtml(n.context.related, site, n.k));
  out.push(heading("examples", "Examples"), examplesHtml(n, f, total));
  if (n.S) {
    out.push(heading("random-samples", "Random samples"), "<p>Tokens drawn uniformly at random from each case: what the case " +
      "looks like on an ordinary token, not at its extremes (value: post).</p>", samplesHtml(n, f));
  }
  if (n.R && n.S2) {
    out.push(heading("samples-by-strength", "Samples by strength"), "<p>Random tokens of each case from each band of |post|, " +
      "weak to strong: where along that range the neuron starts to mean something.</p>", bandsHtml(n, f));
  }
  return out.join("");
}

function containerOpen(f, kind) {
  return '<div class="gs-examples gs-' + kind + '" data-centre="' + f.contextBefore + '" data-levels="' + LEVELS +
    '" data-counted-from="' + f.countedFrom + '" data-approx="within 6% (7-bit codes); exact in the activations file">';
}

function examplesHtml(n, f, total) {
  const options = HOOKS.map(h => '<option value="' + h + '"' + (h === "hook_post" ? " selected" : "") + ">" +
    escapeHtml(HOOK_LABELS[h]) + "</option>").join("");
  const out = [containerOpen(f, "top"), '<div class="gs-controls"><label>Color tokens by <select class="gs-hook-select">' + options +
    '</select></label> <span class="gs-legend"><span class="gs-legend-bar"></span><span>− most negative</span><span>0</span>' +
    '<span>most positive +</span></span><span class="gs-hint">scaled per list (its ' + f.colorPercentile + "th percentile of " +
    "|value|; stronger values get the strongest color) · hover a token for its values" + (n.finalScale === null ? "" :
      " · effect: the neuron's direct effect on the next token's logit (hover it for the tokens the example raises and lowers " +
      "most)") + "</span></div>"];
  CASES.forEach((_, c) => {
    let filled = 0;
    const t0 = n.top(c, 0);
    for (let j = 0; j < t0.n; j++) if (n.lists[t0.offset + j] >= 0) filled++;
    const lists = HOOKS.map((hook, h) => {
      const { offset, n: k } = n.top(c, h), docs = [], pos = [], vals = [];
      for (let j = 0; j < k; j++) {
        const u = n.lists[offset + j];
        docs.push(u >= 0 ? n.docs[u] : -1); pos.push(u >= 0 ? n.pos[u] : -1); vals.push(n.values[offset + j]);
      }
      const open = c === n.telling && h === 0 ? " open" : "";
      return '<details class="gs-list" data-case="' + c + '" data-hook="' + h + '"' + open + "><summary>" + escapeHtml(HOOK_LABELS[hook]) +
        ": most extreme " + extremeText(vals, docs, pos, f.early) + '</summary><div class="gs-rows">' + (docs[0] >= 0 ? "" : NO_TOKEN) +
        "</div></details>";
    }).join("");
    out.push(caseBlock(c, c === n.telling, formatG(100 * n.count[c] / Math.max(total, 1), 3) + "% of tokens · " + filled + " documents", lists));
  });
  out.push("</div>");
  return out.join("");
}

function samplesHtml(n, f) {
  const out = [containerOpen(f, "samples")];
  CASES.forEach((_, c) => {
    const { offset, n: S } = n.sample(c);
    let filled = 0;
    for (let j = 0; j < S; j++) if (n.lists[offset + j] >= 0) filled++;
    const body = '<div class="gs-list" data-kind="sample" data-case="' + c + '"><div class="gs-rows">' + (filled ? "" : NO_TOKEN) + "</div></div>";
    out.push(caseBlock(c, true, filled + " random tokens of " + fmtInt(n.count[c]), body));
  });
  out.push("</div>");
  return out.join("");
}

function bandsHtml(n, f) {
  const out = [containerOpen(f, "bands")];
  CASES.forEach((_, c) => {
    const lists = [];
    for (let r = 0; r < n.R; r++) {
      const { offset } = n.band(c, r);
      if (n.lists[offset] < 0) continue;
      lists.push('<div class="gs-list gs-band" data-kind="band" data-case="' + c + '" data-band="' + r + '"><p class="gs-band-label">' +
        escapeHtml(binRange(f.bandEdges, r, "post"), false) + '</p><div class="gs-rows"></div></div>');
    }
    out.push(caseBlock(c, c === n.telling, lists.length + " bands with tokens", lists.join("") + (lists.length ? "" : NO_TOKEN)));
  });
  out.push("</div>");
  return out.join("");
}

// The rows of one list, colored on the list's own scale (render._example_lists' rule on decoded windows).
async function fillList(list, n, f, site, nid) {
  if (list.dataset.loaded) return;
  list.dataset.loaded = "1";
  const rowsBox = list.querySelector(".gs-rows");
  const c = +list.dataset.case, kind = list.dataset.kind || "top";
  const spot = kind === "top" ? n.top(c, +list.dataset.hook) : kind === "sample" ? n.sample(c) : n.band(c, +list.dataset.band);
  const slots = [];
  for (let j = 0; j < spot.n; j++) if (n.lists[spot.offset + j] >= 0) slots.push(j);
  if (!slots.length) return;
  rowsBox.dataset.loading = "1";
  try {
    const [act, documents] = await Promise.all([actTable(site),
      Promise.all(slots.map(j => documentOf(site, f, n.docs[n.lists[spot.offset + j]])))]);
    const centre = f.contextBefore, hook = (document.querySelector(".gs-hook-select") || { value: "hook_post" }).value;
    const examples = slots.map((j, i) => {
      const u = n.lists[spot.offset + j], doc = n.docs[u], pos = n.pos[u], tokens = documents[i].tokens;
      const gate = n.gate[u].map(toHalf), in_ = n.in_[u].map(toHalf);
      const swish = gate.map(g => Number.isNaN(g) ? NaN : act[halfBits(g)]);
      const hooks = { hook_post: swish.map((s, w) => s * in_[w]), hook_pre_linear: in_, hook_pre: gate, swish };
      const window = Array.from({ length: n.W }, (_, w) => {
        const p = pos - centre + w;
        return p >= 0 && p < tokens.length ? tokens[p] : null;
      });
      const counted = window.map((_, w) => pos - centre + w >= f.countedFrom);
      return { j, u, doc, pos, gate, in_, swish, hooks, window, counted, title: documents[i].title, value: n.values[spot.offset + j] };
    });
    const scales = HOOKS.map(h => colorScale(examples.map(e => e.hooks[h]), examples.map(e => e.counted), examples.length,
      f.colorPercentile));
    list.dataset.scale = JSON.stringify(scales);
    const scale = scales[HOOKS.indexOf(hook)];
    const effects = kind === "top" && n.finalScale !== null, h = +list.dataset.hook;
    rowsBox.innerHTML = examples.map((e, i) => exampleRow({
      doc: e.doc, pos: e.pos, gate: e.gate, in_: e.in_, swish: e.swish, value: e.value, tokens: e.window,
      levels: colorLevels(e.hooks[hook], scale, e.counted), counted: e.counted, centre, early: f.early,
      rank: (kind === "top" ? e.j : i) + 1, title: e.title, earlyTitle: f.earlyTitle, earlyPositions: f.earlyPositions,
      // post: the list's exact value in a hook_post list, else act(gate)·in at the centre (within 6%), as full pages
      effect: effects ? effectCell(n.context, h === 0 ? e.value : e.hooks.hook_post[centre], n.finalScale[e.u],
        n.nextScore[e.u], e.pos + 1 < documents[i].tokens.length ? documents[i].tokens[e.pos + 1] : null) : undefined,
    })).join("");
    delete rowsBox.dataset.loading;
  } catch (e) {
    delete list.dataset.loaded;
    delete rowsBox.dataset.loading;
    rowsBox.dataset.failed = e.message;
  }
}

export async function renderNeuron(el) {
  try {
    const site = siteOf(el), nid = el.dataset.id;
    actTable(site).catch(() => {});  // wanted as soon as the first list fills (a failure shows there)
    const [f, row] = await Promise.all([facts(site), readRow(dataUrl(site, el.dataset.file), +el.dataset.row, site.tails.neurons)]);
    const n = decodeNeuron(row, f);
    n.context = row.context ? JSON.parse(row.context) : null;
    el.innerHTML = pageHtml(n, f, nid, site);
    el.querySelectorAll(".gs-examples").forEach(container => {
      container.gsDocument = doc => documentOf(site, f, doc);
      initExamples(container);
      // Lists fill when they open (toggle does not bubble: listen in the capture phase). The samples' and
      // bands' blocks, open from the start, fill when they come into view (below).
      container.addEventListener("toggle", e => {
        const t = e.target;
        if (t.open && t.classList && t.classList.contains("gs-list")) fillList(t, n, f, site, nid);
        if (t.open && t.classList && t.classList.contains("gs-case-block") && container.dataset.seen) {
          t.querySelectorAll(".gs-list:not(details)").forEach(l => fillList(l, n, f, site, nid));
        }
      }, true);
    });
    // The opened list first; then samples and bands, as they come into view.
    await Promise.all(Array.from(el.querySelectorAll("details.gs-list[open]"), l => fillList(l, n, f, site, nid)));
    const later = new IntersectionObserver(entries => entries.forEach(entry => {
      if (!entry.isIntersecting) return;
      later.unobserve(entry.target);
      entry.target.dataset.seen = "1";
      entry.target.querySelectorAll(".gs-case-block[open] .gs-list:not(details)").forEach(l => fillList(l, n, f, site, nid));
    }), { rootMargin: "200px" });
    el.querySelectorAll(".gs-samples, .gs-bands").forEach(c => later.observe(c));
    el.dataset.ready = "2";
  } catch (e) {
    const note = document.createElement("p");
    note.className = "gs-empty";
    note.textContent = "could not load this neuron's data (" + e.message + ")";
    el.appendChild(note);
    el.dataset.failed = e.message;
  }
}
