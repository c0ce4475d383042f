// GLUScope's rules that the browser applies, each the mirror of one Python function (named on it).
// Pure functions of plain data that return strings: tests/test_rules_js.py runs them under node
// against the Python functions on the same inputs. No DOM here, no fetching.
import { TRIM, UNSPACED, WORD_LIMIT } from "./words-data.js";

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

// words.index_terms
export function indexTerms(tokens, centre) {
  const [before, peak, after] = wordAround(tokens, centre);
  const key = wordKey(before + peak + after);
  if (!key) return [];
  if (!Array.from(key).some(unspaced)) return [key];
  const left = centre > 0 && !before ? tokens[centre - 1] : null;
  const right = centre + 1 < tokens.length && !after ? tokens[centre + 1] : null;
  const context = (left && unspaced(lastChar(left)) ? lastChar(left) : "") + before + peak + after +
    (right && unspaced(firstChar(right)) ? firstChar(right) : "");
  const out = new Set();
  runTerms(wordKey(context), out);
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

const WHITESPACE = { "\n": "↵", "\t": "⇥", "\r": "␍" };
// render.token_label: whitespace as symbols, control characters escaped, a token of spaces as dots.
export function tokenLabel(token) {
  let out = "";
  for (const ch of token) {
    const c = ch.codePointAt(0);
    if (WHITESPACE[ch]) out += WHITESPACE[ch];
    else if (c < 32 || (c >= 0x7f && c < 0xa0)) out += "\\x" + c.toString(16).padStart(2, "0");
    else out += ch;
  }
  return out && !out.replace(/ /g, "") ? out.replace(/ /g, "·") : out;
}

// render.fmt for floats: Python's "{:.4g}", rounding half to even as Python does (an en dash for no value).
export function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0" : "0";
  // 26 significant digits are exact enough to see a tie: a double next to a 5-digit decimal differs
  // from it within its first 17 digits.
  const [m, e] = Math.abs(x).toExponential(25).split("e"), digits = m.replace(".", "");
  let exp = +e, head = +digits.slice(0, 4);
  const rest = digits.slice(4);
  if (rest[0] > "5" || (rest[0] === "5" && (/[1-9]/.test(rest.slice(1)) || head % 2 === 1))) {
    head += 1;
    if (head === 10000) { head = 1000; exp += 1; }
  }
  const str = String(head);
  let s;
  if (exp < -4 || exp >= 4) {
    s = (str[0] + "." + str.slice(1)).replace(/\.?0+$/, "") + "e" + (exp < 0 ? "-" : "+") + String(Math.abs(exp)).padStart(2, "0");
  } else {
    s = (exp >= 0 ? str.slice(0, exp + 1) + "." + str.slice(exp + 1) : "0." + "0".repeat(-exp - 1) + str)
      .replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }
  return (x < 0 ? "-" : "") + s;
}

// render.fmt for whole numbers: thousands separated by commas.
export function fmtInt(n) {
  const s = String(Math.abs(Math.trunc(n))).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return n < 0 ? "-" + s : s;
}
