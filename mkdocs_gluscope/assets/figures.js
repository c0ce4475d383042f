// The distributions' SVG figures, line for line mkdocs_gluscope.figures (tests/test_rules_js.py checks
// that both give the same text for the same arrays): a light page draws with these what a full page holds.
import { CASES, HOOKS, formatG, formatF, fmtInt, escapeHtml } from "./rules.js";

// figures.GATE_SIGN, IN_SIGN and store.HOOK_SIGNS ([case][hook])
const HOOK_SIGNS = [[1, 1, 1, 1], [-1, -1, 1, 1], [-1, 1, -1, -1], [1, -1, -1, -1]];
const GATE_SIGN = HOOK_SIGNS.map(s => s[2]), IN_SIGN = HOOK_SIGNS.map(s => s[1]);
export const HOOK_SHORT = { hook_post: "post", hook_pre_linear: "in", hook_pre: "gate", swish: "act(gate)" };
const SUPERSCRIPT = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };

function hookSign(c, hook) { return HOOK_SIGNS[c][HOOKS.indexOf(hook)]; }

// figures.pow2
export function pow2(edge) {
  if (edge === 0) return "0";
  if (!Number.isFinite(edge)) return edge < 0 ? "−∞" : "∞";
  const e = Math.round(Math.log2(Math.abs(edge)));
  return (edge < 0 ? "−" : "") + (e === 0 ? "1" : "2" + Array.from(String(e), ch => SUPERSCRIPT[ch]).join(""));
}
function tokens(n) { return fmtInt(n) + " token" + (n === 1 ? "" : "s"); }
function decimal(x) { return formatG(Math.abs(x), 3); }

// figures.compact
export function compact(n) {
  for (const [size, suffix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) if (n >= size) return formatG(n / size, 3) + suffix;
  return String(n);
}

// figures.bin_range
export function binRange(edges, b, name) {
  const lo = edges[b], hi = edges[b + 1];
  if (lo === 0) return "|" + name + "| < " + pow2(hi) + " (" + decimal(hi) + "), zeros included";
  if (!Number.isFinite(hi)) return "|" + name + "| ≥ " + pow2(lo) + " (" + decimal(lo) + ")";
  return pow2(lo) + " ≤ |" + name + "| < " + pow2(hi) + " (" + decimal(lo) + "–" + decimal(hi) + ")";
}

const [HW, HH, HL, HR, HT, HB, LABEL] = [300, 150, 42, 10, 10, 34, 34];
const div = (a, b) => Math.floor(a / b);

function histogramSvg(hist, edges, lo, hi, c, hook) {
  const name = HOOK_SHORT[hook], total = hist.reduce((a, b) => a + b, 0), top = total ? Math.max(...hist) : 1;
  const n = hi - lo + 1, pw = HW - HL - HR, ph = HH - HT - HB, base = HT + ph, sign = hookSign(c, hook);
  const out = ['<svg class="gs-hist" viewBox="0 0 ' + HW + " " + HH + '" width="' + HW + '" height="' + HH + '" role="img" ' +
    'aria-label="histogram of |' + name + "| in " + CASES[c] + '">',
    "<title>" + escapeHtml(CASES[c]) + ": |" + name + "| of its " + fmtInt(total) + " tokens, octave bins " +
    "(values are " + (sign > 0 ? "positive" : "negative") + ")</title>",
    '<line class="gs-axis" x1="' + HL + '" y1="' + base + '" x2="' + (HW - HR) + '" y2="' + base + '"/>',
    '<line class="gs-axis" x1="' + HL + '" y1="' + HT + '" x2="' + HL + '" y2="' + base + '"/>',
    '<line class="gs-grid" x1="' + HL + '" y1="' + HT + '" x2="' + (HW - HR) + '" y2="' + HT + '"/>',
    '<text x="' + (HL - 4) + '" y="' + (HT + 4) + '" text-anchor="end">' + (total ? compact(top) : 0) + "</text>",
    '<text x="' + (HL - 4) + '" y="' + (base + 4) + '" text-anchor="end">0</text>'];
  for (let b = lo; b <= hi; b++) {
    const count = hist[b];
    if (!count) continue;
    const x0 = HL + div((b - lo) * pw, n), x1 = HL + div((b - lo + 1) * pw, n);
    const h = Math.max(1, div(2 * ph * count + top, 2 * top));
    out.push('<rect class="gs-bar-' + c + '" x="' + (x0 + 1) + '" y="' + (base - h) + '" width="' + Math.max(x1 - x0 - 1, 1) +
      '" height="' + h + '"><title>' + escapeHtml(binRange(edges, b, name)) + ": " + tokens(count) + " (" +
      formatG(100 * count / total, 3) + "% of " + escapeHtml(CASES[c]) + ")</title></rect>");
  }
  const every = Math.max(1, -div(-LABEL * n, pw));
  for (let e = lo; e <= hi + 1; e++) {
    const x = HL + div((e - lo) * pw, n), labelled = (e - lo) % every === 0;
    out.push('<line class="gs-tick" x1="' + x + '" y1="' + base + '" x2="' + x + '" y2="' + (base + (labelled ? 4 : 2)) + '"/>');
    if (labelled) out.push('<text x="' + x + '" y="' + (base + 16) + '" text-anchor="middle">' + pow2(edges[e]) + "</text>");
  }
  out.push('<text class="gs-axname" x="' + (HW - HR) + '" y="' + (HH - 3) + '" text-anchor="end">|' + name + "|</text>");
  if (!total) out.push('<text x="' + (HL + div(pw, 2)) + '" y="' + (HT + div(ph, 2)) + '" text-anchor="middle" class="gs-none">no tokens</text>');
  out.push("</svg>");
  return out.join("");
}

// figures.histograms_html: hist [C][H][B] counts, edges [B + 1] (Infinity last), count [C]
export function histogramsHtml(hist, edges, count, colorHook = "hook_post") {
  const selected = HOOKS.includes(colorHook) ? HOOKS.indexOf(colorHook) : 0;
  const parts = ['<div class="gs-dist" data-search-exclude>'];
  HOOKS.forEach((hook, h) => {
    parts.push('<input type="radio" class="gs-tab-in" name="gs-hist-hook" id="gs-hist-' + h + '" value="' + hook + '"' +
      (h === selected ? " checked" : "") + '><label class="gs-tab" for="gs-hist-' + h + '">' + HOOK_SHORT[hook] + "</label>");
  });
  HOOKS.forEach((hook, h) => {
    const filled = [];
    for (let b = 0; b < edges.length - 1; b++) if (CASES.some((_, c) => hist[c][h][b])) filled.push(b);
    const [lo, hi] = filled.length ? [filled[0], filled[filled.length - 1]] : [0, edges.length - 2];
    const cells = CASES.map((kase, c) => {
      const share = fmtInt(count[c]) + " tokens · " + HOOK_SHORT[hook] + " " + (hookSign(c, hook) > 0 ? ">" : "<") + " 0";
      return '<figure class="gs-hist-fig gs-case' + c + '"><figcaption><span class="gs-chip gs-case' + c + '"></span>' +
        "<b>" + escapeHtml(kase) + "</b> · " + share + "</figcaption>" + histogramSvg(hist[c][h], edges, lo, hi, c, hook) + "</figure>";
    });
    parts.push('<div class="gs-tab-panel" data-hook="' + hook + '">' + cells.join("") + "</div>");
  });
  parts.push("</div>");
  return parts.join("");
}

const [DC, DL, DB, DT, DR] = [16, 52, 52, 20, 12];

function signedRange(edges, j) {
  const lo = edges[j], hi = edges[j + 1];
  if (hi <= 0) return Number.isFinite(lo) ? pow2(lo) + " < v ≤ " + pow2(hi) : "v ≤ " + pow2(hi);
  return Number.isFinite(hi) ? pow2(lo) + " ≤ v < " + pow2(hi) : "v ≥ " + pow2(lo);
}
// figures.bits
export function bits(n) { let b = 0; while (n >= 1) { n = Math.floor(n / 2); b++; } return b; }

// figures.density_html: density [G][G] (gate cell, in cell), edges [G + 1] (signed, ±Infinity at the ends)
export function densityHtml(density, edges) {
  const G = density.length, half = G / 2, total = density.reduce((a, row) => a + row.reduce((x, y) => x + y, 0), 0);
  const rowsUsed = [], colsUsed = [];
  for (let g = 0; g < G; g++) if (density[g].some(x => x)) rowsUsed.push(g);
  for (let i = 0; i < G; i++) if (density.some(row => row[i])) colsUsed.push(i);
  const gLo = rowsUsed.length ? Math.min(rowsUsed[0], half - 1) : half - 1;
  const gHi = rowsUsed.length ? Math.max(rowsUsed[rowsUsed.length - 1], half) : half;
  const iLo = colsUsed.length ? Math.min(colsUsed[0], half - 1) : half - 1;
  const iHi = colsUsed.length ? Math.max(colsUsed[colsUsed.length - 1], half) : half;
  const nx = iHi - iLo + 1, ny = gHi - gLo + 1, width = DL + nx * DC + DR, height = DT + ny * DC + DB;
  const top = bits(Math.max(...density.map(row => Math.max(...row)))) || 1;
  const ranges = Array.from({ length: G }, (_, j) => escapeHtml(signedRange(edges, j)));
  const x = j => DL + (j - iLo) * DC, y = j => DT + (gHi - j) * DC;
  const out = ['<svg class="gs-density" viewBox="0 0 ' + width + " " + height + '" width="' + width + '" height="' + height +
    '" role="img" aria-label="joint histogram of gate and in">',
    "<title>gate × in: " + fmtInt(total) + " tokens; each quadrant is a case, darker cells hold more tokens " +
    "(each step twice as many)</title>"];
  CASES.forEach((kase, c) => {
    const gx = IN_SIGN[c] > 0 ? [x(half), x(iHi + 1)] : [x(iLo), x(half)];
    const gy = GATE_SIGN[c] > 0 ? [y(gHi), y(half - 1)] : [y(half - 1), y(gLo - 1)];
    out.push('<rect class="gs-quad" style="fill:var(--gs-case' + c + ')" x="' + gx[0] + '" y="' + gy[0] + '" width="' + (gx[1] - gx[0]) +
      '" height="' + (gy[1] - gy[0]) + '"><title>' + escapeHtml(kase) + "</title></rect>");
  });
  for (let g = gLo; g <= gHi; g++) {
    for (let i = iLo; i <= iHi; i++) {
      const n = density[g][i];
      if (!n) continue;
      const c = (g >= half ? 0 : 2) + (i >= half ? 0 : 1), alpha = 0.15 + 0.85 * bits(n) / top;
      out.push('<rect style="fill:var(--gs-case' + c + ')" fill-opacity="' + formatF(alpha, 2) + '" x="' + x(i) + '" y="' + y(g) +
        '" width="' + DC + '" height="' + DC + '"><title>gate ' + ranges[g] + ", in " + ranges[i] + ": " + tokens(n) + " (" +
        formatG(100 * n / total, 3) + "%) · " + CASES[c] + "</title></rect>");
    }
  }
  out.push('<line class="gs-zero" x1="' + x(half) + '" y1="' + DT + '" x2="' + x(half) + '" y2="' + (DT + ny * DC) + '"/>' +
    '<line class="gs-zero" x1="' + DL + '" y1="' + y(half - 1) + '" x2="' + (DL + nx * DC) + '" y2="' + y(half - 1) + '"/>');
  for (let j = iLo; j <= iHi + 1; j++) {
    if ((j - half) % 2 || !Number.isFinite(edges[j])) continue;
    out.push('<text class="gs-xlab" transform="translate(' + x(j) + "," + (DT + ny * DC + 6) + ') rotate(-60)" text-anchor="end">' +
      pow2(edges[j]) + "</text>");
  }
  for (let j = gLo; j <= gHi + 1; j++) {
    if ((j - half) % 2 || !Number.isFinite(edges[j])) continue;
    out.push('<text x="' + (DL - 5) + '" y="' + (y(j - 1) + 4) + '" text-anchor="end">' + pow2(edges[j]) + "</text>");
  }
  out.push('<text class="gs-axname" x="' + (DL + nx * DC) + '" y="' + (height - 3) + '" text-anchor="end">in →</text>' +
    '<text class="gs-axname" x="3" y="13">gate ↑</text></svg>');
  return out.join("");
}
