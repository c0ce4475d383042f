// GLUScope's rules that the browser applies, each the mirror of one Python function (named on it).
// Pure functions of plain data that return strings: tests/test_rules_js.py runs them under node
// against the Python functions on the same inputs. No DOM here, no fetching.
import { CONTEXT, TRIM, UNSPACED, VISIBLE, WORD_LIMIT } from "./words-data.js";

export const CASES = ["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"];
export const HOOKS = ["hook_post", "hook_pre_linear", "hook_pre", "swish"];

// -- words (mkdocs_gluscope.words) -----------------------------------------------------------------
const TRIM_SET = new Set(Array.from(TRIM));

// words.unspaced
export function unspaced(ch) {
  const c = ch.codePointAt(0);
  for (const [lo, hi] of UNSPACED) if (c >= lo && c <= hi) return true;
  return false;
}

// words.word_key
export function wordKey(text) {
  const cps = Array.from(text.normalize("NFC").toLowerCase().normalize("NFC"));
  let start = 0, stop = cps.length;
  while (start < stop && TRIM_SET.has(cps[start])) start++;
  while (stop > start && TRIM_SET.has(cps[stop - 1])) stop--;
  return cps.slice(start, stop).join("");
}

const ALNUM = /^[\p{L}\p{N}]$/u;
function lastChar(s) { const a = Array.from(s); return a[a.length - 1]; }
function firstChar(s) { return String.fromCodePoint(s.codePointAt(0)); }
function joins(left, right) {
  if (!left || !right) return false;
  const a = lastChar(left), b = firstChar(right);
  return ALNUM.test(a) && ALNUM.test(b) && !(unspaced(a) && unspaced(b));
}

// words.word_around
export function wordAround(tokens, centre, limit = WORD_LIMIT) {
  let start = centre, stop = centre;
  while (start > 0 && centre - start < limit && joins(tokens[start - 1], tokens[start])) start--;
  while (stop + 1 < tokens.length && stop - centre < limit && joins(tokens[stop], tokens[stop + 1])) stop++;
  return [tokens.slice(start, centre).join(""), tokens[centre] || "", tokens.slice(centre + 1, stop + 1).join("")];
}

function runs(key) {
  const out = [];
  for (const ch of key) {
    const kind = unspaced(ch);
    if (out.length && out[out.length - 1][0] === kind) out[out.length - 1][1] += ch;
    else out.push([kind, ch]);
  }
  return out;
}
function bigrams(run) {
  const cps = Array.from(run);
  if (cps.length < 2) return [run];
  const out = [];
  for (let i = 0; i + 1 < cps.length; i++) out.push(cps[i] + cps[i + 1]);
  return out;
}
function runTerms(key, into) {
  for (const [isUnspaced, raw] of runs(key)) {
    const run = wordKey(raw);
    for (const term of isUnspaced ? bigrams(run) : run ? [run] : []) into.add(term);
  }
}

// words.query_terms
export function queryTerms(text) {
  const out = new Set();
  for (const word of wordKey(text).split(/[\t\n\x0b\x0c\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/)) {
    const key = wordKey(word);
    if (!Array.from(key).some(unspaced)) { if (key) out.add(key); continue; }
    runTerms(key, out);
  }
  return Array.from(out);
}

// words._beside: up to CONTEXT unspaced characters next to the peak token, across tokens, nearest first.
function beside(tokens, centre, step) {
  let found = "";
  for (let i = centre + step; i >= 0 && i < tokens.length && tokens[i] && Array.from(found).length < CONTEXT; i += step) {
    const chars = Array.from(tokens[i]);
    for (const ch of step < 0 ? chars.reverse() : chars) {
      if (!unspaced(ch) || Array.from(found).length === CONTEXT) return found;
      found += ch;
    }
  }
  return found;
}

// words.index_terms
export function indexTerms(tokens, centre) {
  const [before, peak, after] = wordAround(tokens, centre);
  const key = wordKey(before + peak + after);
  if (!key) return [];
  if (!Array.from(key).some(unspaced)) { const read = wordKey(before + peak); return read ? [read] : []; }
  const left = before ? "" : Array.from(beside(tokens, centre, -1)).reverse().join("");
  const right = after ? "" : beside(tokens, centre, 1);
  const out = new Set();
  runTerms(wordKey(left + before + peak + after + right), out);
  for (const ch of wordKey(peak)) if (unspaced(ch)) out.add(ch);
  return Array.from(out);
}

// Strings in code-point order (Python's), not UTF-16 order: surrogates sort after U+E000..U+FFFF.
function unit(c) { return c >= 0xd800 && c <= 0xdfff ? c + 0x2000 : c >= 0xe000 ? c - 0x800 : c; }
export function compare(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const d = unit(a.charCodeAt(i)) - unit(b.charCodeAt(i));
    if (d) return d;
  }
  return a.length - b.length;
}

// words.shard_of
export function shardOf(term, firsts) {
  let lo = 0, hi = firsts.length;  // bisect_right
  while (lo < hi) { const mid = (lo + hi) >> 1; if (compare(term, firsts[mid]) < 0) hi = mid; else lo = mid + 1; }
  return Math.max(0, lo - 1);
}

// -- text and numbers (mkdocs_gluscope.render) -----------------------------------------------------
const MD_SPECIAL = new Set(Array.from("\\`*_{}[]()<>#+-.!|~$&\"'=:^%@"));

// render.md_text: every character HTML, Markdown or a template engine would act on, as a reference.
export function mdText(text) {
  let out = "";
  for (const ch of text) {
    const c = ch.codePointAt(0);
    out += MD_SPECIAL.has(ch) || c < 32 || c === 0x2028 || c === 0x2029 ? "&#" + c + ";" : ch;
  }
  return out;
}

// render.VISIBLE (one table, written into words-data.js by pages.asset_text): how a character a reader
// could not see, or that would reorder the tokens around it (a bidirectional control), shows.
export function visible(text) {
  let out = "";
  for (const ch of text) out += Object.prototype.hasOwnProperty.call(VISIBLE, ch) ? VISIBLE[ch] : ch;
  return out;
}
// render.token_label: visible characters, a token of spaces as dots.
export function tokenLabel(token) {
  const out = visible(token);
  return out && !out.replace(/ /g, "") ? out.replace(/ /g, "·") : out;
}

// -- Python's number formats, exactly (rounding half to even on the binary value, as Python does) -----
// |x| rounded to `keep` significant digits (keep may be 0): [digits, exponent of the first digit].
// 26 significant digits are exact enough to see a tie: a double next to a short decimal differs from
// it within its first 17 digits.
function rounded(x, keep) {
  const [m, e] = Math.abs(x).toExponential(25).split("e");
  const d = "0" + m.replace(".", ""), exp = +e + 1, k = keep + 1;  // d[0]: a zero at 10^exp, for the carry
  if (k <= 0) return ["0", exp - 1];
  const head = Array.from(d.slice(0, k), Number), rest = d.slice(k);
  if (rest[0] > "5" || (rest[0] === "5" && (/[1-9]/.test(rest.slice(1)) || head[k - 1] % 2 === 1))) {
    let i = k - 1;
    while (head[i] === 9) { head[i] = 0; i--; }
    head[i] += 1;
  }
  // no carry into the leading zero: keep digits from 10^(exp-1); a carry: "1" and zeros from 10^exp
  return head[0] === 0 ? [head.slice(1).join("") || "0", exp - 1] : [head.slice(0, Math.max(keep, 1)).join(""), exp];
}
function special(x) {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  return null;
}
// Python's format(x, f".{p}g")
export function formatG(x, p) {
  const s = special(x);
  if (s) return s;
  const sign = x < 0 || Object.is(x, -0) ? "-" : "";
  if (x === 0) return sign + "0";
  const [digits, exp] = rounded(x, p);
  let out;
  if (exp < -4 || exp >= p) {
    const tail = digits.slice(1).replace(/0+$/, "");
    out = digits[0] + (tail ? "." + tail : "") + "e" + (exp < 0 ? "-" : "+") + String(Math.abs(exp)).padStart(2, "0");
  } else if (exp >= 0) {
    out = (digits.slice(0, exp + 1) + "." + digits.slice(exp + 1)).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  } else {
    out = ("0." + "0".repeat(-exp - 1) + digits).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }
  return sign + out;
}
// Python's format(x, f".{p}f")
export function formatF(x, p) {
  const s = special(x);
  if (s) return s;
  const sign = x < 0 || Object.is(x, -0) ? "-" : "";
  let digits = "0", exp = 0;
  if (x !== 0) {
    const first = +Math.abs(x).toExponential(25).split("e")[1];
    [digits, exp] = rounded(x, first + 1 + p);
  }
  // digits start at 10^exp; write them from 10^max(exp, 0) down to 10^-p
  let out = "";
  for (let e = Math.max(exp, 0); e >= -p; e--) {
    const i = exp - e;
    out += (i >= 0 && i < digits.length ? digits[i] : "0") + (e === 0 && p > 0 ? "." : "");
  }
  return sign + out;
}

// render.fmt for floats: "{:.4g}", an en dash where there is no value.
export function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return formatG(x, 4);
}

// render.fmt for whole numbers: thousands separated by commas.
export function fmtInt(n) {
  const s = String(Math.abs(Math.trunc(n))).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return n < 0 ? "-" + s : s;
}

// Python's html.escape
const HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#x27;" };
export function escapeHtml(text, quote = true) { return String(text).replace(quote ? /[&<>"']/g : /[&<>]/g, ch => HTML_ESCAPES[ch]); }

// -- page parts a light page draws from its data file (mkdocs_gluscope.render) -----------------------
export const LEVELS = 10;  // render.LEVELS
export const HOOK_LABELS = {
  hook_post: "hook_post = act(gate)·in", hook_pre_linear: "hook_pre_linear = in", hook_pre: "hook_pre = gate",
  swish: "swish = act(gate)",
};

// render.summary_table: count [C], total (the frequencies' denominator), sum, min, max [C][H]
export function summaryTable(count, total, sum, min, max) {
  const head = CASES.map((name, c) => '<th class="gs-case gs-case' + c + '">' + escapeHtml(name) + "</th>").join("");
  const freq = count.map(n => n / Math.max(total, 1));
  const rows = ["<tr><th>frequency</th>" + freq.map((f, c) =>
    '<td><span class="gs-freq"><span class="gs-bar gs-case' + c + '" style="width:' + formatF(100 * f, 1) + '%"></span></span>' +
    formatG(100 * f, 3) + "%</td>").join("") + "</tr>",
    "<tr><th>count</th>" + count.map(n => "<td>" + fmtInt(n) + "</td>").join("") + "</tr>"];
  HOOKS.forEach((hook, h) => {
    rows.push('<tr class="gs-hook-row"><th colspan="5">' + escapeHtml(HOOK_LABELS[hook]) + "</th></tr>");
    for (const [name, get] of [["max", c => max[c][h]], ["min", c => min[c][h]], ["mean", c => sum[c][h] / count[c]]]) {
      rows.push("<tr><th>" + name + "</th>" + CASES.map((_, c) => "<td>" + fmt(get(c)) + "</td>").join("") + "</tr>");
    }
  });
  return '<div class="gs-summary md-typeset__scrollwrap" data-search-exclude><table class="gs-table">' +
    "<thead><tr><th></th>" + head + "</tr></thead><tbody>" + rows.join("") + "</tbody></table></div>";
}

// render._extreme: a list's most extreme value; when that example is at the start of its document,
// also the first later one. values, docs, pos: the list's [k].
export function extremeText(values, docs, pos, early) {
  let text = fmt(values[0]);
  if (docs[0] >= 0 && pos[0] < early) {
    const later = docs.findIndex((d, j) => d >= 0 && pos[j] >= early);
    text += " (start of document; " + (later >= 0 ? "first later example " + fmt(values[later]) + ")" : "no later example in the list)");
  }
  return text;
}

// render.color_scales for one list: the lower 98th percentile of |value| over its first `shown`
// examples' counted, finite window values (1 where it has none). values, counted: [examples][W].
export function colorScale(values, counted, shown, percentile = 98) {
  const flat = [];
  values.slice(0, shown).forEach((row, j) => row.forEach((v, w) => {
    if (counted[j][w] && Number.isFinite(v)) flat.push(Math.abs(v));
  }));
  if (!flat.length) return 1;
  flat.sort((a, b) => a - b);
  const scale = flat[Math.floor((flat.length - 1) * (percentile / 100))];
  return scale > 0 ? scale : 1;
}

// render.color_levels for one window: -LEVELS..LEVELS, 0 where not counted or not finite.
export function colorLevels(values, scale, counted) {
  return values.map((v, w) => {
    const level = Math.max(-LEVELS, Math.min(LEVELS, Math.floor(v / scale * LEVELS + 0.5)));
    return counted[w] && Number.isFinite(level) ? level : 0;
  });
}

// x rounded to the nearest float16, as its bit pattern (through float32: the values are float16 already
// on full pages, and approximate on light ones)
const F32 = new Float32Array(1), U32 = new Uint32Array(F32.buffer);
export function halfBits(x) {
  F32[0] = x;
  const b = U32[0], sign = (b >>> 16) & 0x8000, exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff, h, rem, half;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 112;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    h = mant >>> shift; rem = mant & ((1 << shift) - 1); half = 1 << (shift - 1);
  } else {
    h = (e << 10) | (mant >>> 13); rem = mant & 0x1fff; half = 0x1000;
  }
  if (rem > half || (rem === half && (h & 1))) h++;
  return sign | h;
}
function b64Float16(values) {
  let raw = "";
  for (const v of values) { const bits = halfBits(v); raw += String.fromCharCode(bits & 0xff, bits >> 8); }
  return btoa(raw);
}

// render.example_row: one colored-token example. tokens: the window's display strings (null outside
// the document); levels, counted: per window position; title: the document's (or null).
export function exampleRow({ doc, pos, gate, in_, swish, value, tokens, levels, counted, centre, early, rank, title,
  earlyTitle, earlyPositions, effect }) {
  let spans = "", first = -1;
  tokens.forEach((t, w) => {
    if (t === null) return;
    if (first < 0) first = w;
    const open = w === centre ? '<span class="c' + levels[w] + ' gs-x">' : counted[w] ? '<span class="c' + levels[w] + '">' :
      '<span class="c0 gs-nc">';
    spans += open + mdText(tokenLabel(t)) + "</span>";
  });
  if (first < 0) first = centre;
  const where = "doc " + doc + (title ? " · " + mdText(title) : "") + " · pos " + pos;
  const badge = pos < early ? '<span class="gs-early" title="' +
    mdText(earlyTitle.replace("{pos}", pos).replace("{n}", earlyPositions)) + '">start of document</span>' : "";
  return '<div class="gs-ex' + (effect === undefined ? "" : " gs-ex-eff") + '" data-doc="' + doc + '" data-pos="' + pos +
    '" data-first="' + first + '" ' +
    'data-g="' + b64Float16(gate) + '" data-i="' + b64Float16(in_) + '" data-s="' + b64Float16(swish) + '">' +
    '<span class="gs-rank">' + rank + '</span><span class="gs-val">' + fmt(value) + badge + "</span>" + (effect || "") +
    '<span class="gs-toks">' + spans + "</span>" +
    '<button class="gs-doc-btn" type="button" title="show the whole document">' + where + "</button></div>";
}

// render.signed: a change with its sign, 3 significant digits ("+0.42", "−1.3"); an en dash for none.
export function signed(x) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return ((x > 0 || (x === 0 && !Object.is(x, -0)) ? "+" : "") + formatG(x, 3)).replace("-", "−");
}

// render._case_block: one case's collapsible block of lists, headed by its color chip and name.
export function caseBlock(c, opened, summary, body) {
  return '<details class="gs-case-block"' + (opened ? " open" : "") + '><summary><span class="gs-chip gs-case' + c + '">' +
    "</span><b>" + escapeHtml(CASES[c]) + "</b> · " + summary + "</summary>" + body + "</details>";
}

// -- a light site's codes (mkdocs_gluscope.light.data) -----------------------------------------------
// data.decode_windows for one code: `largest` the scale of its case, the constants from site.json.
export function windowValue(code, largest, steps, octaves, nanCode) {
  if (code === nanCode) return NaN;
  if (code === 0) return 0;
  return Math.sign(code) * largest * Math.pow(2, (Math.abs(code) - steps) * octaves / steps);
}

// data.decode_counts for one code: its count, to three significant digits.
export function countOf(code, steps) {
  if (!code) return 0;
  const n = Math.pow(2, (code - 1) / steps);
  if (n < 1000) return Math.round(n);
  const unit = Math.pow(10, Math.floor(Math.log10(n)) - 2);
  return Math.round(n / unit) * unit;
}
