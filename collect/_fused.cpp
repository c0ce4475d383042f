// One pass over a layer-batch's hooks on the CPU: every statistic of collect.stats.reduce_batch,
// the histograms and the random examples' candidates, fused; then the batch merged into the top-k
// lists and the random-example lists, with the windows of the entries that enter (collect/fused.py
// calls them).
//
// Built by `pip install` as an optional extension (setup.py): plain CPython, no torch or numpy at
// build time; tensors arrive as raw pointers with their strides. Where it is absent (no C++
// compiler), collect falls back to the torch code, which computes the same values (tests compare
// them value by value).
//
// Layout: hooks [B, T, N] (neurons contiguous) in float32 or bfloat16, in HOOKS order (post, in,
// gate, swish). Lanes are 8 consecutive neurons (GCC vector extensions: AVX2 where the CPU has it,
// chosen at run time by target_clones; SSE2 otherwise); a block of neurons is read position by
// position, so that its accumulators stay in L1 and its histograms in L2.
//
// Definitions (as reduce_batch): a counted position where any hook is NaN or infinite counts in
// `nonfinite` (by case, or "no case") and nowhere else; a position is in case c by the strict signs
// of gate and in; per document and (case, hook): the count, the float32 sum, the largest |value|
// and its earliest position, the smallest |value|.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <algorithm>
#include <new>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Aligned to their size even where the build's default target has no 32-byte vectors (GCC would
// align them to 16 there, and the AVX2 clone's aligned moves would fault).
typedef float vf __attribute__((vector_size(32), aligned(32)));
typedef int32_t vi __attribute__((vector_size(32), aligned(32)));
typedef uint32_t vu __attribute__((vector_size(32), aligned(32)));

static constexpr int C = 4, H = 4, NBINS = 22, DH = 12, R = 5, L = 8;
#ifndef CHUNK
#define CHUNK 32
#endif
static const int64_t EMPTY_PRIORITY = INT64_MAX;
// Histogram bin of |value| from its float32 exponent field (mkdocs_gluscope.distributions): bin 0
// below 2**-10, bin j for 2**(j-11) <= |v| < 2**(j-10), bin 21 from 2**10 up.
static constexpr int HIST_BIAS = 127 - 10 - 1;
// Density cell (per sign) of each histogram bin, and band of |post| of each bin.
static const int8_t DENSITY_OF_BIN[NBINS] = {0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11};
static constexpr int BAND_START[R] = {0, 5, 8, 11, 14};  // the first bin of each band of |post|
// The least |value| + 1 in integers (the extremes' keys) of each band's first bin.
static constexpr int32_t band_key(int r) { return r == 0 ? 0 : ((BAND_START[r] + HIST_BIAS) << 23) + 1; }
static constexpr int32_t BAND_KEY[R] = {band_key(0), band_key(1), band_key(2), band_key(3), band_key(4)};
static const int8_t BAND_OF_BIN[NBINS] = {0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4};

struct Args {
    int64_t B, T, N, n0, n1, block;
    int bf16;
    const char* hook[H];
    int64_t hook_sb[H], hook_st[H];  // element strides of b and t (n is contiguous)
    const uint8_t* valid;
    int64_t valid_sb, valid_st, valid_sn;  // valid_sn 0: one mask for every neuron
    // Packed experts (collect.stats.Packing): neurons per group; valid is then [B, T, G] and prio
    // [B, T, G], one per group and slot (valid_sn the stride of G). 0: not packed.
    int64_t group;
    const int64_t* slot_count;  // packed: [B, G] filled slots of each (document, group), past which nothing is read
    // outputs, [B, N, C] and [B, N, C, H]
    int32_t* doc_count;
    float* doc_sum;
    float* doc_max;
    float* doc_min;
    int64_t* doc_pos;
    int64_t* nonfinite;  // [N, C + 1], added to
    // distributions (NULL without): tables added to, priorities, thresholds and candidates
    int32_t* hist;  // [N, C, H, NBINS]
    int32_t* dens;  // [N, C, DH, DH]
    const int64_t* prio;  // [B, T]
    const int64_t* doc_id;  // [B]
    const int64_t* limit_s;  // [N, C]: each case list's last priority; a position enters only below it
    const int64_t* limit_b;  // [N, C, R]: the same for each (case, band) list
    int64_t* cand_s_key;  // [N, C, S] ascending, EMPTY_PRIORITY in empty slots
    int32_t* cand_s_b;
    int32_t* cand_s_t;
    int64_t* cand_b_key;  // [N, C, R, S2]
    int32_t* cand_b_b;
    int32_t* cand_b_t;
    int64_t S, S2;
};

// The most filled slots of the groups of lanes n .. n + width - 1 in document b (packed experts).
static inline int64_t filled_slots(const Args& a, int64_t b, int64_t n, int64_t width) {
    const int64_t n_groups = a.N / a.group;
    int64_t most = 0;
    for (int64_t j = 0; j < width; ++j) most = std::max(most, a.slot_count[b * n_groups + (n + j) / a.group]);
    return most;
}

static inline float load_scalar(const char* base, int64_t i, int bf16) {
    if (bf16) {
        uint32_t bits = (uint32_t)((const uint16_t*)base)[i] << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    return ((const float*)base)[i];
}

// 8 lanes from base[i..i+8) (all of them inside the tensor).
static inline __attribute__((always_inline)) vf load8(const char* base, int64_t i, int bf16) {
    if (bf16) {
        typedef uint16_t vh __attribute__((vector_size(16)));
        vh h;
        std::memcpy(&h, (const uint16_t*)base + i, 16);
        vi w = __builtin_convertvector(h, vi) << 16;
        return (vf)w;
    }
    vf v;
    std::memcpy(&v, (const float*)base + i, 32);
    return v;
}

// Insert (key, doc, t) into an ascending list of `size` entries (order: key, then document, then
// position), the last one dropped; lowers *thr to the list's last key once it is full.
static void insert(int64_t* keys, int32_t* bs, int32_t* ts, int64_t size, int64_t* thr, int64_t key, int32_t b,
                   int32_t t, const int64_t* doc_id) {
    int64_t j = size - 1;
    auto before = [&](int64_t i) {  // the new entry sorts before entry i
        if (keys[i] == EMPTY_PRIORITY) return true;
        if (key != keys[i]) return key < keys[i];
        if (doc_id[b] != doc_id[bs[i]]) return doc_id[b] < doc_id[bs[i]];
        return t < ts[i];
    };
    if (!before(j)) return;
    while (j > 0 && before(j - 1)) {
        keys[j] = keys[j - 1];
        bs[j] = bs[j - 1];
        ts[j] = ts[j - 1];
        --j;
    }
    keys[j] = key;
    bs[j] = b;
    ts[j] = t;
    if (keys[size - 1] != EMPTY_PRIORITY && keys[size - 1] < *thr) *thr = keys[size - 1];
}

// One document's accumulators for 8 lanes. The extremes in integers, |value| + 1 (its bits order
// like the value; 0 stands for "no position"): max its largest, min the complement of its least
// (unsigned: the least key is the largest complement, and a lane outside the case, a 0, is never
// the largest), so that both are one mask and one maximum per value.
struct Acc {
    vi count[C];
    vf sum[C][H];
    vi max[C][H], pos[C][H];
    vu min[C][H];
};

static inline __attribute__((always_inline)) bool any(vi m) {
    typedef uint64_t vq __attribute__((vector_size(32)));
    const vq q = (vq)m;
    return (q[0] | q[1] | q[2] | q[3]) != 0;
}

// Narrow counters per neuron: the joint (gate bin, in bin) and (post bin, act(gate) bin) tables of
// each case, and a last slot for the lanes in no case. A position adds to two of them; the
// histograms and the density the file stores are their sums (fold).
static const int JOINT = NBINS * NBINS, PER_NEURON = 2 * C * JOINT + 1, NO_CASE = 2 * C * JOINT;

// The joint counts of one neuron added to its stored tables, and cleared: the hist of gate and in
// are the (gate, in) table's row and column sums, the density its cells merged in pairs of octaves
// ((bin + 1) / 2), the hist of post and act(gate) the other table's row and column sums.
//
// Every sum fits 16 bits (a run adds at most 65535 positions, each to one counter of each of a
// neuron's two kinds of table, or to its no-case slot), so the sums are taken in 16-bit lanes, and a
// row whose sum is 0 holds no count. A row of 22 counters is read as two vectors of 16, bins 0-15 and
// 6-21 (the second's lanes of bins 6-15 masked out of sums); about half a call's rows are zero (a
// neuron's values in a case span about 10 of the 22 octaves). Rows are cleared where they were not
// zero: the tables are all zero between calls.
typedef uint16_t vw __attribute__((vector_size(32), aligned(32)));  // 16 narrow counters
// The lanes of a vector of 16 narrow counters in another order.
#if defined(__clang__) || __GNUC__ >= 12
#define PERMUTE16(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define PERMUTE16(v, ...) __builtin_shuffle(v, (vw){__VA_ARGS__})
#endif

// One 22 x 22 table into row sums (rows[i] +=), column sums (cols[j] +=) and, where dens is not
// null, its 12 x 12 coarse cells (dens[(i + 1) / 2][(j + 1) / 2] +=); then cleared.
static inline __attribute__((always_inline)) void fold_table(uint16_t* table, int32_t* rows, int32_t* cols,
                                                             int32_t* dens) {
    static_assert(NBINS == 22 && DH == 12, "fold_table reads rows of 22 bins as 16 + 6");
    const vw lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vw high = (vw)(lane >= 10);  // the second vector's bins 16-21
    const vw zero = lane * 0;
    vw col_lo = zero, col_hi = zero;
    for (int ci = 0; ci < DH; ++ci) {  // coarse row ci: fine rows 0; 1-2; ...; 19-20; 21
        const int i0 = ci == 0 ? 0 : 2 * ci - 1, i1 = ci == DH - 1 ? NBINS : 2 * ci + 1;
        vw pair_lo = zero, pair_hi = zero;  // the coarse row's fine columns
        bool any = false;
        for (int i = i0; i < i1; ++i) {
            uint16_t* row = table + i * NBINS;
            vw lo, hi;
            std::memcpy(&lo, row, 32);
            std::memcpy(&hi, row + 6, 32);
            hi &= high;
            vw s = lo + hi;  // the row's sum, in every lane: 0 only where the row is all zero
            s += PERMUTE16(s, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
            s += PERMUTE16(s, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
            s += PERMUTE16(s, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
            s += PERMUTE16(s, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
            if (s[0] == 0) continue;
            col_lo += lo, col_hi += hi;
            pair_lo += lo, pair_hi += hi;
            any = true;
            rows[i] += s[0];
            std::memcpy(row, &zero, 32);
            std::memcpy(row + 6, &zero, 32);
        }
        if (dens == nullptr || !any) continue;
        uint16_t fine[NBINS + 2 + 8];  // bins -1 .. 22 (the edges' coarse cells hold one bin), room to store 16
        std::memcpy(fine + 7, &pair_hi, 32);  // bins 16-21 (its lanes of bins 6-15 are zero) ...
        std::memcpy(fine + 1, &pair_lo, 32);  // ... then bins 0-15 over them
        fine[0] = 0, fine[NBINS + 1] = 0;
        int32_t* drow = dens + ci * DH;
        for (int cj = 0; cj < DH; ++cj) drow[cj] += fine[2 * cj] + fine[2 * cj + 1];
    }
    for (int j = 0; j < 16; ++j) cols[j] += col_lo[j];
    for (int j = 10; j < 16; ++j) cols[6 + j] += col_hi[j];
}

static inline __attribute__((always_inline)) void fold(uint16_t* joint, int32_t* hist, int32_t* dens) {
    for (int c = 0; c < C; ++c) {
        int32_t* hc = hist + c * H * NBINS;  // hooks post, in, gate, swish
        fold_table(joint + c * JOINT, hc + 2 * NBINS, hc + 1 * NBINS, dens + c * DH * DH);
        fold_table(joint + (C + c) * JOINT, hc, hc + 3 * NBINS, nullptr);
    }
    joint[NO_CASE] = 0;
}

// A growable array aligned for the vector types, zeroed when it grows.
template <class T>
struct Aligned {
    T* data = nullptr;
    size_t size = 0;
    T* need(size_t n) {
        if (n > size) {
            std::free(data);
            const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
            data = (T*)std::aligned_alloc(64, bytes);
            size = data != nullptr ? n : 0;
            if (data != nullptr) std::memset((void*)data, 0, bytes);
        }
        return data;
    }
    ~Aligned() { std::free(data); }
};

// The lines of some neurons' stored histogram and density tables, requested for writing a few at a
// time while other work goes on: a layer's tables are touched once a batch, so they are in no cache,
// and the packed experts' increments would otherwise wait on memory one line at a time (the dense
// fold does not gain from it: measured).
struct TableLines {
    const char* at[2];
    int64_t end[2], requested = 0;  // bytes of hist, then of dens
    TableLines(const Args& a, int64_t n, int64_t width) {
        const int64_t lanes = width > 0 ? width : 0, m = width > 0 ? n : 0;
        at[0] = (const char*)(a.hist + m * C * H * NBINS), at[1] = (const char*)(a.dens + m * C * DH * DH);
        end[0] = lanes * C * H * NBINS * 4, end[1] = lanes * C * DH * DH * 4;
    }
    inline void request(int64_t lines) {
        for (; lines > 0 && requested < end[0] + end[1]; --lines, requested += 64) {
            const int t = requested >= end[0];
            __builtin_prefetch(at[t] + requested - t * end[0], 1);
        }
    }
    void rest() { request((end[0] + end[1] + 63) / 64); }
};

// Working memory of one thread, kept from call to call (large allocations fault in every page).
struct Buffers {
    Aligned<Acc> acc;
    Aligned<int32_t> codes, lanes;  // vi, 8 lanes each
    Aligned<uint16_t> local;  // one group's narrow counters, all zero between groups: a fold clears what it read
    Aligned<int32_t> counted;
    Aligned<int64_t> n_counted, thr_s, thr_b;
};

__attribute__((target_clones("avx2", "default")))
static bool kernel_range(const Args& a, const int64_t n0, const int64_t n1, Buffers& buf) {
    const vf zero = {0, 0, 0, 0, 0, 0, 0, 0};
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const vi none = lane * 0;
    const vi abs_mask = none + 0x7fffffff;
    // Each lane's counters in the thread's narrow tables, in both halves of its histogram code.
    const vi lane_offset = lane * PER_NEURON * 0x10001;
    const int64_t B = a.B, T = a.T, N = a.N, block = (a.block + L - 1) / L * L;
    const int bf16 = a.bf16, width_bytes = bf16 ? 2 : 4;
    const char* hook[H];
    int64_t hook_sb[H], hook_st[H];
    for (int h = 0; h < H; ++h) hook[h] = a.hook[h], hook_sb[h] = a.hook_sb[h], hook_st[h] = a.hook_st[h];
    const uint8_t* valid = a.valid;
    const int64_t valid_sb = a.valid_sb, valid_st = a.valid_st, valid_sn = a.valid_sn;
    const bool dist = a.hist != nullptr;
    const bool examples = a.prio != nullptr;
    const int64_t groups = (n1 - n0 + L - 1) / L;
    Acc* acc = buf.acc.need(groups);
    if (acc == nullptr) return false;
    // Each list's current bar for this range's neurons: its limit, lowered to the priority of the
    // last of the batch's candidates once the list's candidates fill it (ties then go by document
    // and position: insert).
    int64_t* thr_s = nullptr;
    int64_t* thr_b = nullptr;
    if (examples) {
        thr_s = buf.thr_s.need((n1 - n0) * C);
        thr_b = buf.thr_b.need((n1 - n0) * C * R);
        if (thr_s == nullptr || thr_b == nullptr) return false;
        std::memcpy(thr_s, a.limit_s + n0 * C, sizeof(int64_t) * (n1 - n0) * C);
        std::memcpy(thr_b, a.limit_b + n0 * C * R, sizeof(int64_t) * (n1 - n0) * C * R);
    }
    struct Slot {
        vf v[H];
        vi key[H];  // |value| + 1 in integers (see the extremes below)
        vi m[C];
        vi code;  // case * 8 + band of |post|, for the random examples
        vi hit;  // lanes that may enter a random-example list (a superset)
        int32_t t;
    };
    Slot tile[CHUNK];  // one group's values and case masks over a chunk of positions
    // Per group and position of the batch: each lane's two counters (low and high 16 bits).
    vi* codes = nullptr;
    uint16_t* local = nullptr;
    if (dist) {
        codes = (vi*)buf.codes.need(groups * B * T * L);
        local = buf.local.need(L * PER_NEURON);
        if (codes == nullptr || local == nullptr) return false;
    }
    vi* lanes = examples ? (vi*)buf.lanes.need(groups * (R + 1) * L) : nullptr;  // per group: open lists, bounds
    if (examples && lanes == nullptr) return false;
    int32_t* counted = buf.counted.need(B * T);  // each document's counted positions
    int64_t* n_counted_of = buf.n_counted.need(B);
    if (counted == nullptr || n_counted_of == nullptr) return false;
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t g = 0; g < groups; ++g) {
            Acc& x = acc[g];
            for (int c = 0; c < C; ++c) {
                x.count[c] = none;
                for (int h = 0; h < H; ++h) {
                    x.sum[c][h] = zero;
                    x.max[c][h] = none;
                    x.min[c][h] = (vu)none;
                    x.pos[c][h] = none;
                }
            }
        }
        int32_t* counted_b = counted + b * T;
        int64_t n_counted = 0;
        for (int64_t t = 0; t < T; ++t)
            if (valid_sn != 0 || valid[b * valid_sb + t * valid_st]) counted_b[n_counted++] = (int32_t)t;
        n_counted_of[b] = n_counted;
        // Positions a chunk at a time, and within a chunk one block of neurons after another: a
        // position's neurons are a row of N values (a page or more), so a block read position by
        // position would wait for a page walk at every position; the chunk's pages are walked once.
        for (int64_t c0 = 0; c0 < n_counted; c0 += CHUNK) {
            const int64_t c1 = c0 + CHUNK < n_counted ? c0 + CHUNK : n_counted;
            // Each of the chunk's positions' rows of each hook, found once for all its groups.
            const char* row[CHUNK][H];
            for (int64_t i = 0; i < c1 - c0; ++i)
                for (int h = 0; h < H; ++h)
                    row[i][h] = hook[h] + (b * hook_sb[h] + counted_b[c0 + i] * hook_st[h]) * width_bytes;
            // The chunk's least priority (top 32 bits) where every neuron shares a position's
            // priority (not packed): a group whose bound p_pass (below) is under it has no position
            // of the chunk to test, which a run's later batches mostly find (1 comparison instead
            // of one per position; a later 512-token batch's test passed over 86% of positions).
            int32_t chunk_least = INT32_MIN;
            if (examples && a.group == 0) {
                chunk_least = INT32_MAX;
                for (int64_t i = c0; i < c1; ++i) {
                    const int32_t p_top = (int32_t)(a.prio[b * T + counted_b[i]] >> 31);
                    chunk_least = p_top < chunk_least ? p_top : chunk_least;
                }
            }
            for (int64_t s0 = n0; s0 < n1; s0 += block) {
                const int64_t s1 = s0 + block < n1 ? s0 + block : n1;
                for (int64_t n = s0; n < s1; n += L) {
                    const int64_t width = s1 - n < L ? s1 - n : L;
                    const int64_t g = (n - n0) / L;
                    Acc& x = acc[g];
                    // Each lane's column of valid and prio: its neuron, or its group where packed.
                    int64_t col[L];
                    for (int j = 0; j < L; ++j) col[j] = a.group > 0 ? (n + j) / a.group : n + j;
                    const bool one_prio = a.group == 0 || col[0] == col[width - 1];
                    const int64_t n_groups = a.group > 0 ? N / a.group : 1;
                    auto prio_of = [&](int64_t t, int64_t j) {
                        return a.group > 0 ? a.prio[(b * T + t) * n_groups + col[j]] : a.prio[b * T + t];
                    };
                    // Packed experts: a group's slots past its filled ones in this document hold nothing.
                    const int64_t stop = a.slot_count != nullptr ? std::min(c1, filled_slots(a, b, n, width)) : c1;
                    if (stop <= c0) continue;
                    vi count[C] = {none, none, none, none};
                    vi bad_any = none, hits = none;
                    // Per lane: which of its 24 lists are not full yet (bit case * 6 + band, and
                    // case * 6 + 5 for the case's list), and for each band of |post| the largest
                    // limit of the full lists a position of that band may enter (its case's list
                    // or its (case, band) list, in any case), in its top 32 bits: found at each
                    // document's start (limits only fall during the batch: these stay bounds). A
                    // rare band's list keeps a high limit; the other bands' positions skip it.
                    vi& lanes_open = lanes[(R + 1) * g];
                    vi* lanes_limit = lanes + (R + 1) * g + 1;
                    if (examples && c0 == 0) {
                        lanes_open = none;
                        for (int r = 0; r < R; ++r) lanes_limit[r] = none - 1;
                        for (int64_t j = 0; j < width; ++j) {
                            int32_t open = 0;
                            int64_t cases = -1, bands[R] = {-1, -1, -1, -1, -1};
                            for (int c = 0; c < C; ++c) {
                                for (int r = 0; r <= R; ++r) {
                                    const int64_t lim = r < R ? thr_b[((n + j - n0) * C + c) * R + r]
                                                              : thr_s[(n + j - n0) * C + c];
                                    open |= (lim == EMPTY_PRIORITY) << (c * 6 + r);
                                    if (lim == EMPTY_PRIORITY) continue;
                                    if (r < R) bands[r] = lim > bands[r] ? lim : bands[r];
                                    else cases = lim > cases ? lim : cases;
                                }
                            }
                            lanes_open[j] = open;
                            for (int r = 0; r < R; ++r) {
                                const int64_t limit = bands[r] > cases ? bands[r] : cases;
                                lanes_limit[r][j] = limit < 0 ? -1 : (int32_t)(limit >> 31);
                            }
                        }
                    }
                    // The group's bar: the largest bound of its lanes' full lists; a position above it
                    // enters only open lists, and a lane only those of its case from the least
                    // |post| key (|value| + 1 in integers) of the lowest band with an open list
                    // (0 where the case's own list is open, none where the case has no open list).
                    int32_t bar[R] = {-1, -1, -1, -1, -1};
                    vi open_key = none + INT32_MAX;
                    if (examples) {
                        for (int r = 0; r < R; ++r)
                            for (int j = 0; j < L; ++j) bar[r] = lanes_limit[r][j] > bar[r] ? lanes_limit[r][j] : bar[r];
                        int32_t open = 0;
                        for (int j = 0; j < L; ++j) open |= lanes_open[j];
                        for (int c = 0; c < C; ++c) {
                            for (int r = R - 1; r >= 0; --r)
                                if (open & (1 << (c * 6 + r))) open_key[c] = BAND_KEY[r];
                            if (open & (1 << (c * 6 + R))) open_key[c] = 0;  // the case's own list
                        }
                    }
                    // First the chunk's values, their cases, counts and bins ...
                    const int64_t k = stop - c0;
                    vi key_most = none;  // the chunk's largest |post| key of a lane in a case
                    for (int64_t i = 0; i < k; ++i) {
                        const int64_t t = counted_b[c0 + i];
                        Slot& here = tile[i];
                        here.t = (int32_t)t;
                        // The values two groups on (the next cache line of this row), requested now:
                        // rows lie N values apart, too far apart for the hardware to guess.
                        if (n + 2 * L < n1)
                            for (int h = 0; h < H; ++h) __builtin_prefetch(row[i][h] + (n + 2 * L) * width_bytes);
                        vf* v = here.v;
                        vi live = lane < (int32_t)width;
                        for (int h = 0; h < H; ++h) {
                            if (width == L) {
                                v[h] = load8(row[i][h], n, bf16);
                            } else {
                                float tmp[L] = {0, 0, 0, 0, 0, 0, 0, 0};
                                for (int j = 0; j < width; ++j) tmp[j] = load_scalar(row[i][h], n + j, bf16);
                                std::memcpy(&v[h], tmp, 32);
                            }
                        }
                        if (valid_sn != 0) {
                            const uint8_t* valid_row = valid + b * valid_sb + t * valid_st;
                            int32_t tmp[L] = {0, 0, 0, 0, 0, 0, 0, 0};
                            for (int j = 0; j < width; ++j) tmp[j] = valid_row[col[j] * valid_sn] ? -1 : 0;
                            vi m;
                            std::memcpy(&m, tmp, 32);
                            live &= m;
                        }
                        const vf gate = v[2], in = v[1];
                        vi mag[H];  // |value|'s bits
                        for (int h = 0; h < H; ++h) mag[h] = (vi)v[h] & abs_mask, here.key[h] = mag[h] + 1;
                        // A NaN or an infinity has the largest exponent field: such lanes count
                        // nowhere but in nonfinite (counted below, in the rare chunk that has any).
                        const vi most01 = mag[0] > mag[1] ? mag[0] : mag[1], most23 = mag[2] > mag[3] ? mag[2] : mag[3];
                        const vi bad = ((most01 > most23 ? most01 : most23) > 0x7f7fffff) & live;
                        bad_any |= bad;
                        live &= ~bad;
                        const vi gp = gate > 0.0f, gn = gate < 0.0f, ip = in > 0.0f, in_neg = in < 0.0f;
                        vi* m = here.m;
                        m[0] = gp & ip & live;
                        m[1] = gp & in_neg & live;
                        m[2] = gn & ip & live;
                        m[3] = gn & in_neg & live;
                        for (int c = 0; c < C; ++c) count[c] -= m[c];
                        if (examples && one_prio) {  // read only there (p_pass below)
                            const vi key = here.key[0] & (m[0] | m[1] | m[2] | m[3]);
                            key_most = key > key_most ? key : key_most;
                        }
                        if (!dist) continue;
                        // Bins: the exponent field, clamped, still biased (the bias is taken off
                        // the case's table, below).
                        const vi in_any = m[0] | m[1] | m[2] | m[3];
                        vi bin[H];
                        for (int h = 0; h < H; ++h) {
                            const vi e = mag[h] >> 23;
                            bin[h] = e > HIST_BIAS ? e : none + HIST_BIAS;
                            bin[h] = bin[h] < HIST_BIAS + NBINS - 1 ? bin[h] : none + (HIST_BIAS + NBINS - 1);
                        }
                        const vi joint = (gn & 2 * JOINT) + (in_neg & JOINT) - HIST_BIAS * (NBINS + 1);
                        const vi both = (joint + bin[2] * NBINS + bin[1]) |
                                        ((joint + C * JOINT + bin[0] * NBINS + bin[3]) << 16);
                        codes[(g * B + b) * T + t] = (in_any ? both : none + (NO_CASE | NO_CASE << 16)) + lane_offset;
                    }
                    // ... then which lanes may enter a random-example list: below the largest
                    // limit of its full lists, or into one of its lists not yet full (a loop of its
                    // own: the one above keeps its values in registers). A position whose lanes'
                    // |post| lie below every band it could enter at its priority is passed over.
                    // In a run's later batches most lists are full and most positions enter none: the
                    // chunk's largest |post| key bounds every position's, so a position whose priority
                    // is above the bars of every band up to that key's band, where no list the key could
                    // enter is open, is passed over at the cost of one comparison (the test below would
                    // pass it over too; p_pass stays INT32_MAX where the bound says nothing).
                    int32_t p_pass = INT32_MAX;
                    if (examples && one_prio) {
                        int32_t most = 0, open_least = INT32_MAX;
                        for (int j = 0; j < L; ++j) most = key_most[j] > most ? key_most[j] : most;
                        for (int c = 0; c < C; ++c) open_least = open_key[c] < open_least ? open_key[c] : open_least;
                        if (most < open_least) {
                            p_pass = -1;
                            for (int r = 0; r < R; ++r)
                                if (BAND_KEY[r] <= most && bar[r] > p_pass) p_pass = bar[r];
                        }
                    }
                    for (int64_t i = 0; examples && chunk_least <= p_pass && i < k; ++i) {
                        Slot& here = tile[i];
                        here.hit = none;
                        const int32_t t = here.t;
                        const int32_t p_top = (int32_t)(prio_of(t, 0) >> 31);
                        if (p_top > p_pass) continue;
                        const vi* m = here.m;
                        const vi in_any = m[0] | m[1] | m[2] | m[3];
                        if (one_prio) {
                            int32_t full = INT32_MAX;  // the least key of a band whose full lists it may enter
                            for (int r = R - 1; r >= 0; --r) full = p_top <= bar[r] ? BAND_KEY[r] : full;
                            vi least = (m[0] & open_key[0]) | (m[1] & open_key[1]) | (m[2] & open_key[2]) |
                                       (m[3] & open_key[3]);
                            least = least < full ? least : none + full;
                            if (!any(in_any & (here.key[0] >= least))) continue;
                        }
                        const vi cv = ((m[2] | m[3]) & 2) | ((m[1] | m[3]) & 1);
                        vi e = ((here.key[0] - 1) >> 23) - HIST_BIAS;  // the bin of |post|
                        e = e > 0 ? e : none;
                        const vi bin0 = e < NBINS - 1 ? e : none + (NBINS - 1);
                        const vi above[R - 1] = {bin0 >= BAND_START[1], bin0 >= BAND_START[2], bin0 >= BAND_START[3],
                                                 bin0 >= BAND_START[4]};
                        const vi band = -(above[0] + above[1] + above[2] + above[3]);
                        vi limit = lanes_limit[0];
                        for (int r = 1; r < R; ++r) limit = above[r - 1] ? lanes_limit[r] : limit;
                        here.code = cv * 8 + band;
                        vi p_hi = none + p_top;
                        if (!one_prio)
                            for (int j = 1; j < width; ++j) p_hi[j] = (int32_t)(prio_of(t, j) >> 31);
                        const vi open = (vi)((1 << (cv * 6 + 5)) | (1 << (cv * 6 + band)));
                        here.hit = in_any & (((open & lanes_open) != 0) | (p_hi <= limit));
                        hits |= here.hit;
                    }
                    for (int c = 0; c < C; ++c) x.count[c] += count[c];
                    if (examples && any(hits)) {
                        for (int64_t i = 0; i < k; ++i) {
                            if (!any(tile[i].hit)) continue;
                            const int32_t t = tile[i].t;
                            for (int j = 0; j < width; ++j) {
                                if (!tile[i].hit[j]) continue;
                                const int64_t p = prio_of(t, j);
                                const int64_t list = (n + j) * C + tile[i].code[j] / 8;
                                const int64_t bl = list * R + tile[i].code[j] % 8;
                                const int64_t at = list - n0 * C, bat = bl - n0 * C * R;
                                if (p < a.limit_s[list] && p <= thr_s[at])
                                    insert(a.cand_s_key + list * a.S, a.cand_s_b + list * a.S,
                                           a.cand_s_t + list * a.S, a.S, thr_s + at, p, (int32_t)b, t, a.doc_id);
                                if (p < a.limit_b[bl] && p <= thr_b[bat])
                                    insert(a.cand_b_key + bl * a.S2, a.cand_b_b + bl * a.S2, a.cand_b_t + bl * a.S2,
                                           a.S2, thr_b + bat, p, (int32_t)b, t, a.doc_id);
                            }
                        }
                    }
                    if (__builtin_expect(any(bad_any), 0)) {
                        for (int64_t i = 0; i < k; ++i) {
                            const int64_t t = tile[i].t;
                            const uint8_t* valid_row = valid + b * valid_sb + t * valid_st;
                            for (int64_t j = 0; j < width; ++j) {
                                if (!valid_row[valid_sn * col[j]]) continue;
                                float y[H];
                                for (int h = 0; h < H; ++h)
                                    y[h] = load_scalar(hook[h], b * hook_sb[h] + t * hook_st[h] + n + j, bf16);
                                if (std::isfinite(y[0]) && std::isfinite(y[1]) && std::isfinite(y[2]) &&
                                    std::isfinite(y[3]))
                                    continue;
                                int col = 4;  // no case: a NaN or a zero in gate or in
                                if ((y[2] > 0 || y[2] < 0) && (y[1] > 0 || y[1] < 0))
                                    col = (y[2] < 0) * 2 + (y[1] < 0);
                                a.nonfinite[(n + j) * (C + 1) + col] += 1;
                            }
                        }
                    }
                    // ... then each hook over the chunk: sums, and the extremes of each pair of
                    // cases, their accumulators in registers (the extremes as in Acc: a lane outside
                    // the case is a 0 for both).
                    for (int h = 0; h < H; ++h) {
                        vf sm0 = x.sum[0][h], sm1 = x.sum[1][h], sm2 = x.sum[2][h], sm3 = x.sum[3][h];
                        for (int64_t i = 0; i < k; ++i) {
                            const vi val = (vi)tile[i].v[h];
                            sm0 += (vf)(val & tile[i].m[0]);
                            sm1 += (vf)(val & tile[i].m[1]);
                            sm2 += (vf)(val & tile[i].m[2]);
                            sm3 += (vf)(val & tile[i].m[3]);
                        }
                        x.sum[0][h] = sm0, x.sum[1][h] = sm1, x.sum[2][h] = sm2, x.sum[3][h] = sm3;
                        for (int c0 = 0; c0 < C; c0 += 2) {
                            vi mx0 = x.max[c0][h], mx1 = x.max[c0 + 1][h];
                            vu mn0 = x.min[c0][h], mn1 = x.min[c0 + 1][h];
                            vi ps0 = x.pos[c0][h], ps1 = x.pos[c0 + 1][h];
                            for (int64_t i = 0; i < k; ++i) {
                                const vi key = tile[i].key[h];
                                const vi tv = none + tile[i].t;
                                const vi m0 = tile[i].m[c0], m1 = tile[i].m[c0 + 1];
                                const vi k0 = key & m0, k1 = key & m1;
                                const vi hi0 = k0 > mx0, hi1 = k1 > mx1;
                                mx0 = hi0 ? k0 : mx0;
                                mx1 = hi1 ? k1 : mx1;
                                ps0 = hi0 ? tv : ps0;
                                ps1 = hi1 ? tv : ps1;
                                const vu lo0 = (vu)(~key & m0), lo1 = (vu)(~key & m1);
                                mn0 = lo0 > mn0 ? lo0 : mn0;
                                mn1 = lo1 > mn1 ? lo1 : mn1;
                            }
                            x.max[c0][h] = mx0, x.max[c0 + 1][h] = mx1;
                            x.min[c0][h] = mn0, x.min[c0 + 1][h] = mn1;
                            x.pos[c0][h] = ps0, x.pos[c0 + 1][h] = ps1;
                        }
                    }
                }
            }
        }
        // The document's accumulators out, [B, N, C(, H)].
        for (int64_t g = 0; g < groups; ++g) {
            const Acc& x = acc[g];
            const int64_t n = n0 + g * L;
            const int64_t width = n1 - n < L ? n1 - n : L;
            for (int64_t j = 0; j < width; ++j) {
                const int64_t row = (b * N + n + j) * C;
                for (int c = 0; c < C; ++c) {
                    a.doc_count[row + c] = x.count[c][j];
                    for (int h = 0; h < H; ++h) {
                        const int64_t o = (row + c) * H + h;
                        a.doc_sum[o] = x.sum[c][h][j];
                        const int32_t most = x.max[c][h][j] - 1, least = (int32_t)~x.min[c][h][j] - 1;
                        float f;
                        std::memcpy(&f, &most, 4);
                        a.doc_max[o] = most < 0 ? -1.0f : f;  // EMPTY where the case has no position
                        std::memcpy(&f, &least, 4);
                        a.doc_min[o] = most < 0 ? INFINITY : f;
                        a.doc_pos[o] = x.pos[c][h][j];
                    }
                }
            }
        }
    }
    // Packed experts: a neuron sees a few dozen positions a batch, too few to pay for folding its
    // 2 x 4 joint tables of 22 x 22 narrow counters (fold): each position adds to the stored
    // tables directly, 8 neurons' tables (in cache) at a time. Those tables (30 KB a group; 240 MB
    // an OLMoE layer) are not in any cache: the next group's lines are requested for writing a few
    // per position meanwhile, so that the increments do not wait on memory one line at a time.
    const bool direct = a.slot_count != nullptr;
    for (int64_t g = 0; dist && direct && g < groups; ++g) {
        const int64_t n = n0 + g * L, width = n1 - n < L ? n1 - n : L;
        TableLines ahead(a, n + L, n1 - (n + L) < L ? n1 - (n + L) : L);  // the next group's (none after the last)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t end = std::min(n_counted_of[b], filled_slots(a, b, n, width));
            const vi* code = codes + (g * B + b) * T;
            const int32_t* counted_b = counted + b * T;
            for (int64_t i = 0; i < end; ++i) {
                ahead.request(4);
                const uint32_t* both = (const uint32_t*)(code + counted_b[i]);
                for (int64_t j = 0; j < width; ++j) {
                    const uint32_t gi = (both[j] & 0xffff) - (uint32_t)(j * PER_NEURON);
                    if (gi == (uint32_t)NO_CASE) continue;
                    const uint32_t ps = (both[j] >> 16) - (uint32_t)(j * PER_NEURON) - C * JOINT;
                    const uint32_t c = gi / JOINT, gate = gi % JOINT / NBINS, in = gi % NBINS;
                    const uint32_t post = ps % JOINT / NBINS, swish = ps % NBINS;
                    int32_t* hc = a.hist + ((n + j) * C + c) * H * NBINS;  // hooks post, in, gate, swish
                    ++hc[post], ++hc[NBINS + in], ++hc[2 * NBINS + gate], ++hc[3 * NBINS + swish];
                    ++a.dens[(((n + j) * C + c) * DH + ((gate + 1) >> 1)) * DH + ((in + 1) >> 1)];
                }
            }
        }
        ahead.rest();  // where this group saw few positions
    }
    // The batch's counters, a group of neurons at a time: the positions add to one group's narrow
    // counters (62 KB, in cache), which are then folded into the group's stored tables and cleared
    // for the next group (a table per neuron of the superblock, 4 MB, would be read from memory at
    // every first touch: twice the time). In runs of at most 65535 positions between folds, so
    // that no narrow counter overflows (a document of more is cut in two).
    const int64_t most = 65535;
    for (int64_t b0 = 0, i0 = 0; dist && !direct && b0 < B;) {
        int64_t b1 = b0, i1 = i0, positions = 0;  // the run ends before position i1 of document b1
        while (b1 < B && positions < most) {
            const int64_t take = n_counted_of[b1] - i1 < most - positions ? n_counted_of[b1] - i1 : most - positions;
            positions += take;
            i1 += take;
            if (i1 == n_counted_of[b1]) ++b1, i1 = 0;
        }
        for (int64_t g = 0; g < groups; ++g) {
            uint16_t* base = local;
            const int64_t width = n1 - (n0 + g * L) < L ? n1 - (n0 + g * L) : L;
            for (int64_t b = b0, i = i0; b < b1 || (b == b1 && i < i1);) {
                int64_t end = b < b1 ? n_counted_of[b] : i1;
                if (a.slot_count != nullptr) end = std::min(end, filled_slots(a, b, n0 + g * L, width));
                const vi* code = codes + (g * B + b) * T;
                const int32_t* counted_b = counted + b * T;
                if (width == L) {  // unrolled: the lanes' offsets are in their codes
                    for (; i < end; ++i) {
                        const uint32_t* both = (const uint32_t*)(code + counted_b[i]);
#pragma GCC unroll 8
                        for (int j = 0; j < L; ++j) {
                            const uint32_t c = both[j];
                            base[c & 0xffff] += 1;
                            base[c >> 16] += 1;
                        }
                    }
                } else {
                    for (; i < end; ++i) {
                        const uint32_t* both = (const uint32_t*)(code + counted_b[i]);
                        for (int j = 0; j < width; ++j) {
                            const uint32_t c = both[j];
                            base[c & 0xffff] += 1;
                            base[c >> 16] += 1;
                        }
                    }
                }
                ++b, i = 0;
            }
            for (int64_t j = 0; j < width; ++j) {
                const int64_t n = n0 + g * L + j;
                fold(base + j * PER_NEURON, a.hist + n * C * H * NBINS, a.dens + n * C * DH * DH);
            }
        }
        b0 = b1, i0 = i1;
    }
    return true;
}

// Neurons a superblock at a time: the positions' codes of at most this many bytes per thread,
// whatever the model's width (written by the main pass, read back by the counters' pass).
static const int64_t SUPERBLOCK_BYTES = 4 << 20;

static bool kernel(const Args& a) {
    static thread_local Buffers buf;
    const int64_t per_neuron = (a.hist != nullptr ? a.B * a.T * 4 : 0) + 1;
    int64_t step = SUPERBLOCK_BYTES / per_neuron / a.block * a.block;
    if (step < a.block) step = (a.block + L - 1) / L * L;
    for (int64_t s0 = a.n0; s0 < a.n1; s0 += step)
        if (!kernel_range(a, s0, s0 + step < a.n1 ? s0 + step : a.n1, buf)) return false;
    return true;
}

static void* ptr(PyObject* list, Py_ssize_t i) {
    return PyLong_AsVoidPtr(PyList_GET_ITEM(list, i));
}

static int64_t num(PyObject* list, Py_ssize_t i) {
    return PyLong_AsLongLong(PyList_GET_ITEM(list, i));
}

// layer_batch(pointers: list[int], sizes: list[int]): see collect/fused.py for the order.
static PyObject* layer_batch(PyObject*, PyObject* args) {
    PyObject *p, *s;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &p, &PyList_Type, &s)) return nullptr;
    if ((PyList_GET_SIZE(p) != 23 || PyList_GET_SIZE(s) != 20) && (PyList_GET_SIZE(p) != 24 || PyList_GET_SIZE(s) != 21)) {
        PyErr_SetString(PyExc_ValueError, "layer_batch: expected 23 pointers and 20 sizes (packed: 24 and 21)");
        return nullptr;
    }
    Args a;
    for (int h = 0; h < H; ++h) a.hook[h] = (const char*)ptr(p, h);
    a.valid = (const uint8_t*)ptr(p, 4);
    a.doc_count = (int32_t*)ptr(p, 5);
    a.doc_sum = (float*)ptr(p, 6);
    a.doc_max = (float*)ptr(p, 7);
    a.doc_min = (float*)ptr(p, 8);
    a.doc_pos = (int64_t*)ptr(p, 9);
    a.nonfinite = (int64_t*)ptr(p, 10);
    a.hist = (int32_t*)ptr(p, 11);
    a.dens = (int32_t*)ptr(p, 12);
    a.prio = (const int64_t*)ptr(p, 13);
    a.doc_id = (const int64_t*)ptr(p, 14);
    a.limit_s = (const int64_t*)ptr(p, 15);
    a.limit_b = (const int64_t*)ptr(p, 16);
    a.cand_s_key = (int64_t*)ptr(p, 17);
    a.cand_s_b = (int32_t*)ptr(p, 18);
    a.cand_s_t = (int32_t*)ptr(p, 19);
    a.cand_b_key = (int64_t*)ptr(p, 20);
    a.cand_b_b = (int32_t*)ptr(p, 21);
    a.cand_b_t = (int32_t*)ptr(p, 22);
    a.B = num(s, 0);
    a.T = num(s, 1);
    a.N = num(s, 2);
    a.n0 = num(s, 3);
    a.n1 = num(s, 4);
    a.block = num(s, 5);
    a.bf16 = (int)num(s, 6);
    for (int h = 0; h < H; ++h) {
        a.hook_sb[h] = num(s, 7 + 2 * h);
        a.hook_st[h] = num(s, 8 + 2 * h);
    }
    a.valid_sb = num(s, 15);
    a.valid_st = num(s, 16);
    a.valid_sn = num(s, 17);
    a.S = num(s, 18);
    a.S2 = num(s, 19);
    a.group = PyList_GET_SIZE(s) > 20 ? num(s, 20) : 0;
    a.slot_count = PyList_GET_SIZE(p) > 23 ? (const int64_t*)ptr(p, 23) : nullptr;
    if (PyErr_Occurred()) return nullptr;
    if ((a.hist == nullptr) != (a.dens == nullptr) || (a.prio != nullptr && a.hist == nullptr) || a.block < 1 ||
        a.group < 0 || (a.group > 0 && a.N % a.group != 0) ||
        (a.slot_count != nullptr && (a.group < 1 || a.valid_sn == 0))) {
        PyErr_SetString(PyExc_ValueError, "layer_batch: inconsistent arguments");
        return nullptr;
    }
    bool done;
    Py_BEGIN_ALLOW_THREADS
    done = kernel(a);
    Py_END_ALLOW_THREADS
    if (!done) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

// Windows of gate or in around chosen positions: out[i, w] = values[rows[i], pos[i] - before + w,
// neurons[i]] (float32), NaN outside the row's document. The windows are visited in the order of
// their positions, so that neighbours read the same rows from cache.
static void cut_windows(const char* values, int bf16, int64_t sb, int64_t st, int64_t T, const int64_t* rows,
                        const int64_t* pos, const int64_t* neurons, const int64_t* lengths, int64_t count,
                        int64_t before, int64_t after, const int64_t* order, float* out) {
    const int64_t W = before + 1 + after;
    for (int64_t k = 0; k < count; ++k) {
        const int64_t i = order[k];
        const int64_t r = rows[i], p = pos[i], n = neurons[i], len = lengths[r] < T ? lengths[r] : T;
        float* o = out + i * W;
        for (int64_t w = 0; w < W; ++w) {
            const int64_t t = p - before + w;
            o[w] = (t >= 0 && t < len) ? load_scalar(values, r * sb + t * st + n, bf16) : NAN;
        }
    }
}

// windows(pointers: [values, rows, pos, neurons, lengths, order, out], sizes: [bf16, sb, st, T, count,
// before, after]): see cut_windows.
static PyObject* windows(PyObject*, PyObject* args) {
    PyObject *p, *s;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &p, &PyList_Type, &s)) return nullptr;
    if (PyList_GET_SIZE(p) != 7 || PyList_GET_SIZE(s) != 7) {
        PyErr_SetString(PyExc_ValueError, "windows: expected 7 pointers and 7 sizes");
        return nullptr;
    }
    const char* values = (const char*)ptr(p, 0);
    const int64_t *rows = (const int64_t*)ptr(p, 1), *pos = (const int64_t*)ptr(p, 2),
                  *neurons = (const int64_t*)ptr(p, 3), *lengths = (const int64_t*)ptr(p, 4),
                  *order = (const int64_t*)ptr(p, 5);
    float* out = (float*)ptr(p, 6);
    const int bf16 = (int)num(s, 0);
    const int64_t sb = num(s, 1), st = num(s, 2), T = num(s, 3), count = num(s, 4), before = num(s, 5),
                  after = num(s, 6);
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS
    cut_windows(values, bf16, sb, st, T, rows, pos, neurons, lengths, count, before, after, order, out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// float32 to IEEE half, rounding to nearest even (as torch converts), NaN kept a NaN.
static inline uint16_t to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    x &= 0x7fffffff;
    if (x > 0x7f800000) return (uint16_t)(sign | 0x7e00);  // NaN
    if (x >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // rounds to inf
    if (x < 0x38800000) {  // a subnormal half (or zero)
        if (x < 0x33000000) return (uint16_t)sign;  // below half the smallest subnormal: zero
        const uint32_t exp = x >> 23, mant = (x & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - exp;  // 14 .. 24
        uint32_t half = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        half += (rest > mid) | ((rest == mid) & half & 1);
        return (uint16_t)(sign | half);
    }
    // Rounding without a branch: its direction is as random as the values' last bits.
    uint32_t half = ((x >> 13) - (112 << 10));
    const uint32_t rest = x & 0x1fff;
    half += (rest > 0x1000) | ((rest == 0x1000) & half & 1);
    return (uint16_t)(sign | half);
}

// float32 to bfloat16, rounding to nearest even (as torch converts), NaN kept a NaN.
static inline uint16_t to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// float32 values to IEEE halves, as to_half rounds them: 8 at a time by F16C where the CPU has it
// (its conversion rounds to nearest even too; a NaN is then made to_half's sign | 0x7e00: equal on
// every float32 bit pattern), else one at a time. The windows' usual conversion: most of a cut.
#if defined(__x86_64__)
__attribute__((target("avx2,f16c"))) static void to_halves_f16c(const float* in, int64_t count, uint16_t* out) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
        const __m128i nan = _mm_cmpgt_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)), _mm_set1_epi16(0x7c00));
        const __m128i quiet = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16((short)0x8000)), _mm_set1_epi16(0x7e00));
        _mm_storeu_si128((__m128i*)(out + i), _mm_blendv_epi8(h, quiet, nan));
    }
    for (; i < count; ++i) out[i] = to_half(in[i]);
}
#endif

static void to_halves(const float* in, int64_t count, uint16_t* out) {
#if defined(__x86_64__)
    static const bool f16c = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"));
    if (f16c) return to_halves_f16c(in, count, out);
#endif
    for (int64_t i = 0; i < count; ++i) out[i] = to_half(in[i]);
}

static inline void store_window_value(void* out, int64_t i, int kind, float v) {
    if (kind == 0) ((float*)out)[i] = v;
    else if (kind == 1) ((uint16_t*)out)[i] = to_bf16(v);
    else ((uint16_t*)out)[i] = to_half(v);
}

// A window to cut: gate and in at (b, p - before .. p + after, n) into window slot `out` (the
// index of its first value in the window arrays).
struct Cut {
    int64_t b, p, n, out;
};

// The windows of `cuts` (reordered), NaN outside each row's document. By bucket (document, line
// of 16 neurons), each bucket's windows in order of position: each row of the bucket's line that
// a window needs is read once, in order, into a ring of the last rows read, and the windows take
// their values from the ring. Read window by window, a row was read again for every window that
// spans it, from the cache level its column's few sets had left it in (rows lie a row's width
// apart): a dense first batch's windows took 34 ms that now take 23, and their sort 15 ms (by
// comparisons) that three counting passes do in 6 (SmolLM2 shape, 128-token documents, Zen 4).
// A window equal to the one before it (same document, position and neuron: a neuron's largest
// value in several lists) is copied instead.
static void cut_windows_of(std::vector<Cut>& cuts, const char* const hook[2], const int64_t sb[2], const int64_t st[2],
                           int bf16, const int64_t* lengths, int64_t T, int64_t before, int64_t after,
                           char* const win[2], int kind) {
    constexpr int64_t LINE = 16;  // neurons of a bucket: one cache line of float32
    const int64_t W = before + 1 + after, bytes = (kind == 0 ? 4 : 2) * W;
    // By (document, line of 16 neurons), then position, then neuron: three counting passes, the
    // least significant first (each keeps the order of the one before).
    int64_t lines = 1, rows = 1, positions = 1;
    for (const Cut& c : cuts) {
        lines = c.n / LINE + 1 > lines ? c.n / LINE + 1 : lines;
        rows = c.b + 1 > rows ? c.b + 1 : rows;
        positions = c.p + 1 > positions ? c.p + 1 : positions;
    }
    std::vector<Cut> sorted(cuts.size());
    std::vector<int64_t> start;
    auto pass = [&](int64_t range, auto key) {
        start.assign(range + 1, 0);
        for (const Cut& c : cuts) ++start[key(c) + 1];
        for (int64_t i = 1; i <= range; ++i) start[i] += start[i - 1];
        std::vector<int64_t> next(start.begin(), start.end() - 1);
        for (const Cut& c : cuts) sorted[next[key(c)]++] = c;
        cuts.swap(sorted);
    };
    pass(LINE, [](const Cut& c) { return c.n % LINE; });
    pass(positions, [](const Cut& c) { return c.p; });
    pass(rows * lines, [&](const Cut& c) { return c.b * lines + c.n / LINE; });  // start: each bucket's first cut
    // The ring: the last `ring` rows read of the bucket's line, of both hooks, as float32 (a window
    // spans W rows, and the rows it needs were read at most W rows before the last).
    int64_t ring = 1;
    while (ring < W) ring *= 2;
    std::vector<float> lines_read(2 * ring * LINE);
    // One window's values, NaN outside the document, and as halves: whole vectors of 8 (to_halves
    // converts a vector's worth at a time; the rest of a window one value at a time cost about as
    // much as the whole of it: W = 19 is two vectors and 3 values).
    const int64_t W8 = (W + 7) / 8 * 8;
    std::vector<float> values(W8, 0.0f);
    std::vector<uint16_t> halves(W8);
    constexpr int64_t AHEAD = 8;  // rows requested ahead of the one read
    const int64_t count = (int64_t)cuts.size();
    std::vector<std::pair<int64_t, int64_t>> ranges;  // a bucket's rows to read: [first, end) ranges
    for (size_t bucket = 0; bucket + 1 < start.size(); ++bucket) {
        const int64_t i0 = start[bucket], i1 = start[bucket + 1];
        if (i0 == i1) continue;
        const int64_t b = cuts[i0].b, base = cuts[i0].n / LINE * LINE;
        const int64_t len = lengths[b] < T ? lengths[b] : T;
        // Only the neurons some window of the bucket reads: all of them inside the tensor.
        int64_t width = 1;
        for (int64_t i = i0; i < i1; ++i) width = cuts[i].n - base + 1 > width ? cuts[i].n - base + 1 : width;
        auto row_at = [&](int h, int64_t t) { return hook[h] + (b * sb[h] + t * st[h] + base) * (bf16 ? 2 : 4); };
        // A window's rows inside its document, [t0, t1) (empty where none is).
        auto rows_of = [&](const Cut& c) {
            const int64_t t0 = c.p - before > 0 ? c.p - before : 0;
            const int64_t end = c.p + after + 1 < len ? c.p + after + 1 : len;
            return std::make_pair(t0, end > t0 ? end : t0);
        };
        // The rows the bucket's windows read: their ranges merged, in order. The rows are
        // requested AHEAD rows ahead of the one read along these ranges, across the gaps between
        // windows: a window after a gap otherwise waited for its first rows from memory (most of
        // a later batch's cut time, whose few windows per bucket lie far apart: 25% less time).
        ranges.clear();
        for (int64_t i = i0; i < i1; ++i) {
            const auto [t0, t1] = rows_of(cuts[i]);
            if (!ranges.empty() && t0 <= ranges.back().second)
                ranges.back().second = t1 > ranges.back().second ? t1 : ranges.back().second;
            else if (t0 < t1)
                ranges.push_back({t0, t1});
        }
        if (ranges.empty()) ranges.push_back({0, 0});
        size_t ahead_range = 0;  // the next row to request: ahead_row, in ranges[ahead_range]
        int64_t ahead_row = ranges[0].first;
        auto request = [&]() {
            if (ahead_row >= ranges[ahead_range].second) return;  // past the last range
            for (int h = 0; h < 2; ++h) __builtin_prefetch(row_at(h, ahead_row));
            if (++ahead_row == ranges[ahead_range].second && ahead_range + 1 < ranges.size())
                ahead_row = ranges[++ahead_range].first;
        };
        for (int64_t r = 0; r < AHEAD; ++r) request();
        int64_t next_row = ranges[0].first;  // the rows before it that a window may still need are in the ring
        const Cut* last = nullptr;
        for (int64_t i = i0; i < i1; ++i) {
            const Cut& c = cuts[i];
            // The slots of a window a few on, requested for writing now: the slots lie all over
            // the lists' windows, and the stores would wait for each line in turn.
            if (i + 4 < count) {
                const int64_t o = cuts[i + 4].out / W * bytes;
                for (int h = 0; h < 2; ++h) {
                    __builtin_prefetch(win[h] + o, 1);
                    __builtin_prefetch(win[h] + o + bytes - 1, 1);
                }
            }
            if (last != nullptr && last->p == c.p && last->n == c.n) {
                for (int h = 0; h < 2; ++h) std::memcpy(win[h] + c.out / W * bytes, win[h] + last->out / W * bytes, bytes);
                continue;
            }
            last = &c;
            // The window's values inside the document are w in [w0, w1): NaN around them.
            const auto [t0, t1] = rows_of(c);
            const int64_t w0 = t0 - (c.p - before), w1 = t1 - (c.p - before);
            for (int64_t t = next_row > t0 ? next_row : t0; t < t1; ++t) {
                request();
                for (int h = 0; h < 2; ++h) {
                    float* to = lines_read.data() + (h * ring + (t & (ring - 1))) * LINE;
                    const char* from = row_at(h, t);
                    if (width == LINE) {  // the usual bucket: two vectors of 8 lanes
                        const vf lo = load8(from, 0, bf16), hi = load8(from, 8, bf16);
                        std::memcpy(to, &lo, 32);
                        std::memcpy(to + 8, &hi, 32);
                    } else {
                        for (int64_t j = 0; j < width; ++j) to[j] = load_scalar(from, j, bf16);
                    }
                }
            }
            next_row = next_row > t1 ? next_row : t1;
            for (int h = 0; h < 2; ++h) {
                const float* at = lines_read.data() + h * ring * LINE + (c.n - base);
                for (int64_t w = 0; w < w0; ++w) values[w] = NAN;
                for (int64_t w = w0; w < w1; ++w) values[w] = at[((c.p - before + w) & (ring - 1)) * LINE];
                for (int64_t w = w1; w < W; ++w) values[w] = NAN;
                if (kind == 2) {
                    to_halves(values.data(), W8, halves.data());
                    std::memcpy((uint16_t*)win[h] + c.out, halves.data(), 2 * W);
                    continue;
                }
                for (int64_t w = 0; w < W; ++w) store_window_value(win[h], c.out + w, kind, values[w]);
            }
        }
    }
}

// Windows of packed experts (collect.stats.Packing), cut one at a time where an entry enters a
// list: the hooks' rows are slots, `inverse` [B, T, G] the slot of each document position in each
// group of `group` neurons (-1 where the group did not see it: NaN in the window), `positions`
// [B, T', G] the position of each slot, T the documents' length; a cut's p is a document position.
// A group's slots hold its positions in order, so the positions it saw around p are the slots next
// to p's own: a window is a copy of a window of NaN with those few values written in. Nothing to
// sort or share: the lists' windows are written in the order of the lists, and the few slots a
// line of neurons reads stay in cache meanwhile.
struct PackedWindows {
    const char* hook[2];  // gate and in [B, T', N]
    int64_t sb[2], st[2];
    int bf16;
    const int64_t* lengths;  // [B]
    int64_t T, before, after;
    char* win[2];
    int kind;
    const int64_t* inverse;
    const int64_t* positions;
    int64_t group, n_groups, T_packed;
    std::vector<char> nan_window;  // W NaN as store_window_value writes them

    void start() {
        const int64_t W = before + 1 + after;
        nan_window.assign((kind == 0 ? 4 : 2) * W, 0);
        for (int64_t w = 0; w < W; ++w) store_window_value(nan_window.data(), w, kind, NAN);
    }

    void cut(const Cut& c) const {
        const int64_t W = before + 1 + after, bytes = (int64_t)nan_window.size();
        const int64_t len = lengths[c.b] < T ? lengths[c.b] : T, g = c.n / group;
        const int64_t* slot_of = inverse + c.b * T * n_groups + g;
        const int64_t own = c.p >= 0 && c.p < len ? slot_of[c.p * n_groups] : -1;
        if (own < 0) {  // p not seen by the group (not an entry's own position): each position looked up
            for (int h = 0; h < 2; ++h)
                for (int64_t w = 0; w < W; ++w) {
                    const int64_t t = c.p - before + w, at = t >= 0 && t < len ? slot_of[t * n_groups] : -1;
                    store_window_value(win[h], c.out + w, kind,
                                       at >= 0 ? load_scalar(hook[h], c.b * sb[h] + at * st[h] + c.n, bf16) : NAN);
                }
            return;
        }
        const int64_t* position_of = positions + c.b * T_packed * n_groups + g;
        int64_t s0 = own, s1 = own + 1;
        while (s0 > 0 && position_of[(s0 - 1) * n_groups] >= c.p - before) --s0;
        // An empty slot's position is 0, never past p: the walk ends with the filled slots.
        while (s1 < T_packed && position_of[s1 * n_groups] > c.p && position_of[s1 * n_groups] <= c.p + after) ++s1;
        for (int h = 0; h < 2; ++h) {
            std::memcpy(win[h] + c.out / W * bytes, nan_window.data(), bytes);
            for (int64_t s = s0; s < s1; ++s)
                store_window_value(win[h], c.out + position_of[s * n_groups] - c.p + before, kind,
                                   load_scalar(hook[h], c.b * sb[h] + s * st[h] + c.n, bf16));
        }
    }

    // The cuts in order, each one's memory requested ahead: its slot lookup FAR cuts on, then (the
    // slot read from cache by then) the slots' positions, values and window lines NEAR cuts on. A
    // cut reads lines all over the batch's tensors and writes one all over the windows; one after
    // another each would wait for memory in turn.
    void cut_all(const std::vector<Cut>& cuts) const {
        const int64_t count = (int64_t)cuts.size(), W = before + 1 + after, bytes = (int64_t)nan_window.size();
        constexpr int64_t FAR = 16, NEAR = 8;
        auto slot_at = [&](const Cut& c) { return inverse + (c.b * T + c.p) * n_groups + c.n / group; };
        for (int64_t i = 0; i < count; ++i) {
            if (i + FAR < count && cuts[i + FAR].p >= 0 && cuts[i + FAR].p < T) __builtin_prefetch(slot_at(cuts[i + FAR]));
            if (i + NEAR < count) {
                const Cut& c = cuts[i + NEAR];
                for (int h = 0; h < 2; ++h) {
                    __builtin_prefetch(win[h] + c.out / W * bytes, 1);
                    __builtin_prefetch(win[h] + c.out / W * bytes + bytes - 1, 1);
                }
                const int64_t own = c.p >= 0 && c.p < T ? *slot_at(c) : -1;
                if (own >= 0) {
                    const int64_t g = c.n / group;
                    for (int64_t s = own > 0 ? own - 1 : 0; s <= own + 1 && s < T_packed; ++s) {
                        __builtin_prefetch(positions + (c.b * T_packed + s) * n_groups + g);
                        for (int h = 0; h < 2; ++h)
                            __builtin_prefetch(hook[h] + (c.b * sb[h] + s * st[h] + c.n) * (bf16 ? 2 : 4));
                    }
                }
            }
            cut(cuts[i]);
        }
    }
};

struct Merge {
    int64_t* key;  // [lists, k] sort keys, best first, -1 empty
    int32_t* pos;  // [lists, k]
    int16_t* slot;  // [lists, k] where each entry's windows are
    char* win[2];  // [lists * k, W] gate and in windows by slot, of window kind
    int window_kind;  // 0 float32, 1 bfloat16, 2 float16
    const float* doc_abs;  // [B, lists]: each document's largest |value| per list, -1 without one
    const int64_t* doc_pos;  // [B, lists]
    const int64_t* doc_id;  // [B]
    const char* hook[2];  // gate and in [B, T, N] of hook kind
    int64_t hook_sb[2], hook_st[2];
    int bf16;
    const int64_t* lengths;  // [B]
    int64_t B, T, lists, k, before, after, per_neuron, l0, l1;
    // Packed experts (collect.stats.Packing): the hooks are [B, T', N], T the documents' length,
    // inverse [B, T, G] the slot of each position in each group's packing (-1: not seen, NaN in the
    // windows), positions [B, T', G] the position of each slot, group the neurons per group.
    // nullptr: not packed.
    const int64_t* inverse;
    const int64_t* positions;
    int64_t group, n_groups, T_packed;
};

// The batch's documents into the top-k lists [l0, l1): collect.stats.merge_top's rule (each list
// keeps its k largest sort keys, best first; an entering entry takes an evicted entry's window
// slot and gets its windows cut from the batch). Returns the lists changed.
static int64_t merge_lists(const Merge& m) {
    const int64_t W = m.before + 1 + m.after, k = m.k;
    std::vector<int64_t> ck(m.B);
    std::vector<int32_t> cb(m.B);
    std::vector<int16_t> freed(k);
    std::vector<Cut> entering;
    PackedWindows packed{{m.hook[0], m.hook[1]}, {m.hook_sb[0], m.hook_sb[1]}, {m.hook_st[0], m.hook_st[1]}, m.bf16,
                         m.lengths, m.T, m.before, m.after, {m.win[0], m.win[1]}, m.window_kind, m.inverse,
                         m.positions, m.group, m.n_groups, m.T_packed, {}};
    if (m.inverse != nullptr) packed.start();
    int64_t changed = 0;
    const int64_t MAX_DOC = 2147483647LL;
    for (int64_t l = m.l0; l < m.l1; ++l) {
        int64_t* key = m.key + l * k;
        const int64_t last = key[k - 1];
        int64_t nc = 0;
        for (int64_t b = 0; b < m.B; ++b) {
            const float a = m.doc_abs[b * m.lists + l];
            if (!(a >= 0)) continue;
            int32_t bits;
            std::memcpy(&bits, &a, 4);
            const int64_t c = ((int64_t)bits << 31) | (MAX_DOC - m.doc_id[b]);
            if (c <= last) continue;
            int64_t j = nc++;  // insertion, descending
            while (j > 0 && ck[j - 1] < c) ck[j] = ck[j - 1], cb[j] = cb[j - 1], --j;
            ck[j] = c, cb[j] = (int32_t)b;
        }
        if (nc == 0) continue;
        ++changed;
        int32_t* pos = m.pos + l * k;
        int16_t* slot = m.slot + l * k;
        // The two lists merged from their ends, in place: y entering documents make the new top k
        // (the j-th best, j < k, enters where it beats the list's (k - 1 - j)-th entry), evicting
        // the list's last y entries, whose window slots they take; the entries above the best
        // entering one stay where they are. Ties keep a list's own entry first, as
        // collect.stats.merge_top.
        int64_t y = 0;
        while (y < nc && y < k && ck[y] > key[k - 1 - y]) ++y;
        for (int64_t q = k - y; q < k; ++q) freed[q - (k - y)] = slot[q];
        for (int64_t p = k - 1, i = k - y - 1, j = y - 1, f = 0; j >= 0; --p) {
            if (i >= 0 && ck[j] > key[i]) {
                key[p] = key[i], pos[p] = pos[i], slot[p] = slot[i], --i;
            } else {
                key[p] = ck[j], pos[p] = (int32_t)m.doc_pos[cb[j] * m.lists + l], slot[p] = freed[f++];
                entering.push_back(Cut{cb[j], pos[p], l / m.per_neuron, (l * k + slot[p]) * W});
                --j;
            }
        }
        // Packed: cut a few thousand at a time (each list's windows are its own: nothing reads them
        // meanwhile), so that the pending cuts stay small whatever the lists.
        if (m.inverse != nullptr && entering.size() >= 4096) packed.cut_all(entering), entering.clear();
    }
    if (m.inverse != nullptr) {
        packed.cut_all(entering);
        return changed;
    }
    cut_windows_of(entering, m.hook, m.hook_sb, m.hook_st, m.bf16, m.lengths, m.T, m.before, m.after,
                   m.win, m.window_kind);
    return changed;
}

// merge(pointers: [key, pos, slot, win_gate, win_in, doc_abs, doc_pos, doc_id, gate, in, lengths(,
// inverse, positions)], sizes: [window_kind, bf16, gate_sb, gate_st, in_sb, in_st, B, T, lists, k, before,
// after, per_neuron, l0, l1(, group, n_groups, T_packed)]): see merge_lists; returns the lists changed.
static PyObject* merge(PyObject*, PyObject* args) {
    PyObject *p, *s;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &p, &PyList_Type, &s)) return nullptr;
    const bool packed = PyList_GET_SIZE(p) == 13;
    if ((PyList_GET_SIZE(p) != 11 || PyList_GET_SIZE(s) != 15) && (!packed || PyList_GET_SIZE(s) != 18)) {
        PyErr_SetString(PyExc_ValueError, "merge: expected 11 pointers and 15 sizes (packed: 13 and 18)");
        return nullptr;
    }
    Merge m;
    m.key = (int64_t*)ptr(p, 0);
    m.pos = (int32_t*)ptr(p, 1);
    m.slot = (int16_t*)ptr(p, 2);
    m.win[0] = (char*)ptr(p, 3);
    m.win[1] = (char*)ptr(p, 4);
    m.doc_abs = (const float*)ptr(p, 5);
    m.doc_pos = (const int64_t*)ptr(p, 6);
    m.doc_id = (const int64_t*)ptr(p, 7);
    m.hook[0] = (const char*)ptr(p, 8);
    m.hook[1] = (const char*)ptr(p, 9);
    m.lengths = (const int64_t*)ptr(p, 10);
    m.window_kind = (int)num(s, 0);
    m.bf16 = (int)num(s, 1);
    m.hook_sb[0] = num(s, 2), m.hook_st[0] = num(s, 3), m.hook_sb[1] = num(s, 4), m.hook_st[1] = num(s, 5);
    m.B = num(s, 6), m.T = num(s, 7), m.lists = num(s, 8), m.k = num(s, 9), m.before = num(s, 10);
    m.after = num(s, 11), m.per_neuron = num(s, 12), m.l0 = num(s, 13), m.l1 = num(s, 14);
    m.inverse = packed ? (const int64_t*)ptr(p, 11) : nullptr;
    m.positions = packed ? (const int64_t*)ptr(p, 12) : nullptr;
    m.group = packed ? num(s, 15) : 1, m.n_groups = packed ? num(s, 16) : 1, m.T_packed = packed ? num(s, 17) : 0;
    if (PyErr_Occurred()) return nullptr;
    if (m.group < 1) {
        PyErr_SetString(PyExc_ValueError, "merge: group < 1");
        return nullptr;
    }
    int64_t changed;
    Py_BEGIN_ALLOW_THREADS
    changed = merge_lists(m);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(changed);
}

struct Examples {
    int64_t* key;  // [lists, S] ascending by (key, document * 2**16 + position), EMPTY_PRIORITY last
    int32_t* doc;  // [lists, S]
    int32_t* pos;  // [lists, S]
    float* value;  // [lists, S, H]
    char* win[2];  // [lists, S, W] gate and in windows, of window kind
    int window_kind;
    const int64_t* cand_key;  // [lists, S] the batch's candidates, EMPTY_PRIORITY in unused slots
    const int32_t* cand_b;
    const int32_t* cand_t;
    const int64_t* doc_id;  // [B]
    const int64_t* lengths;  // [B]
    const char* hook[H];  // post, in, gate, swish [B, T, N]
    int64_t hook_sb[H], hook_st[H];
    int bf16;
    int64_t T, S, per_neuron, before, after, l0, l1;
    // Packed experts (collect.stats.Packing): the hooks' rows are slots, cand_t a slot; positions
    // [B, T, G] the document position of each slot, inverse [B, T_doc, G] the slot of each document
    // position (-1: the group did not see it), group the neurons per group. nullptr: not packed.
    const int64_t* positions;
    const int64_t* inverse;
    int64_t group, n_groups, T_doc;
};

// A batch's random-example candidates into their lists [l0, l1): collect.stats.add_candidates's
// rule (each list keeps its S entries of lowest priority, then document * 2**16 + position, the
// list's own entries first on a tie), an entering entry with its hook values and windows read from
// the batch. Entries move within their list only: one list at a time, from its end; the entering
// entries' windows are cut at the end, in an order that reads memory well (cut_windows_of).
static void add_examples(const Examples& e) {
    const int64_t S = e.S, W = e.before + 1 + e.after;
    const int64_t wbytes = e.window_kind == 0 ? 4 : 2;
    std::vector<int64_t> ck(S), cc(S);
    std::vector<int32_t> cj(S), src(S);
    std::vector<Cut> cuts;  // the entering entries' windows, cut once every list is merged (packed: at once)
    PackedWindows packed{{e.hook[2], e.hook[1]}, {e.hook_sb[2], e.hook_sb[1]}, {e.hook_st[2], e.hook_st[1]}, e.bf16,
                         e.lengths, e.T_doc, e.before, e.after, {e.win[0], e.win[1]}, e.window_kind, e.inverse,
                         e.positions, e.group, e.n_groups, e.T, {}};
    if (e.inverse != nullptr) packed.start();
    for (int64_t l = e.l0; l < e.l1; ++l) {
        const int64_t* cand = e.cand_key + l * S;
        if (cand[0] == EMPTY_PRIORITY) continue;
        const int64_t n = l / e.per_neuron, g = n / e.group;
        int64_t m = 0;  // the candidates, sorted by (key, document * 2**16 + position)
        for (int64_t j = 0; j < S && cand[j] != EMPTY_PRIORITY; ++j) {
            const int64_t b = e.cand_b[l * S + j], t = e.cand_t[l * S + j];
            const int64_t c = e.doc_id[b] * 65536 + (e.positions != nullptr ? e.positions[(b * e.T + t) * e.n_groups + g] : t);
            int64_t q = m++;
            while (q > 0 && (ck[q - 1] > cand[j] || (ck[q - 1] == cand[j] && cc[q - 1] > c)))
                ck[q] = ck[q - 1], cc[q] = cc[q - 1], cj[q] = cj[q - 1], --q;
            ck[q] = cand[j], cc[q] = c, cj[q] = (int32_t)j;
        }
        int64_t* key = e.key + l * S;
        int32_t* doc = e.doc + l * S;
        int32_t* pos = e.pos + l * S;
        int64_t i = 0, j = 0;
        for (int64_t p = 0; p < S; ++p) {
            bool old = j >= m;
            if (!old && key[i] != EMPTY_PRIORITY) {
                const int64_t c = (int64_t)doc[i] * 65536 + pos[i];
                old = key[i] < ck[j] || (key[i] == ck[j] && c <= cc[j]);
            }
            src[p] = old ? (int32_t)i++ : -1 - (int32_t)j++;
        }
        // From the end: an entry kept moves to a later slot (p >= i), never over one still to move.
        for (int64_t p = S - 1; p >= 0; --p) {
            const int64_t at = l * S + p;
            if (src[p] >= 0) {
                const int64_t from = l * S + src[p];
                if (from == at) continue;
                key[p] = key[src[p]], doc[p] = doc[src[p]], pos[p] = pos[src[p]];
                std::memcpy(e.value + at * H, e.value + from * H, sizeof(float) * H);
                for (int h = 0; h < 2; ++h)
                    std::memmove(e.win[h] + at * W * wbytes, e.win[h] + from * W * wbytes, W * wbytes);
                continue;
            }
            const int32_t c = cj[-1 - src[p]];
            const int64_t b = e.cand_b[l * S + c], t = e.cand_t[l * S + c];
            key[p] = cand[c];
            doc[p] = (int32_t)e.doc_id[b];
            pos[p] = (int32_t)(cc[-1 - src[p]] % 65536);  // the document position (t itself where not packed)
            for (int h = 0; h < H; ++h)
                e.value[at * H + h] = load_scalar(e.hook[h], b * e.hook_sb[h] + t * e.hook_st[h] + n, e.bf16);
            if (e.inverse != nullptr) packed.cut({b, pos[p], n, at * W});
            else cuts.push_back({b, pos[p], n, at * W});
        }
    }
    const char* windows[2] = {e.hook[2], e.hook[1]};  // gate, in
    const int64_t sb[2] = {e.hook_sb[2], e.hook_sb[1]}, st[2] = {e.hook_st[2], e.hook_st[1]};
    cut_windows_of(cuts, windows, sb, st, e.bf16, e.lengths, e.T, e.before, e.after, e.win, e.window_kind);
}

// examples(pointers: [key, doc, pos, value, win_gate, win_in, cand_key, cand_b, cand_t, doc_id, lengths,
// post, in, gate, swish(, positions, inverse)], sizes: [window_kind, bf16, 4 x (sb, st), T, S, per_neuron,
// before, after, l0, l1(, group, n_groups, T_doc)]): see add_examples.
static PyObject* examples(PyObject*, PyObject* args) {
    PyObject *p, *s;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &p, &PyList_Type, &s)) return nullptr;
    const bool packed = PyList_GET_SIZE(p) == 17;
    if ((PyList_GET_SIZE(p) != 15 || PyList_GET_SIZE(s) != 17) && (!packed || PyList_GET_SIZE(s) != 20)) {
        PyErr_SetString(PyExc_ValueError, "examples: expected 15 pointers and 17 sizes (packed: 17 and 20)");
        return nullptr;
    }
    Examples e;
    e.key = (int64_t*)ptr(p, 0);
    e.doc = (int32_t*)ptr(p, 1);
    e.pos = (int32_t*)ptr(p, 2);
    e.value = (float*)ptr(p, 3);
    e.win[0] = (char*)ptr(p, 4);
    e.win[1] = (char*)ptr(p, 5);
    e.cand_key = (const int64_t*)ptr(p, 6);
    e.cand_b = (const int32_t*)ptr(p, 7);
    e.cand_t = (const int32_t*)ptr(p, 8);
    e.doc_id = (const int64_t*)ptr(p, 9);
    e.lengths = (const int64_t*)ptr(p, 10);
    for (int h = 0; h < H; ++h) e.hook[h] = (const char*)ptr(p, 11 + h);
    e.window_kind = (int)num(s, 0);
    e.bf16 = (int)num(s, 1);
    for (int h = 0; h < H; ++h) e.hook_sb[h] = num(s, 2 + 2 * h), e.hook_st[h] = num(s, 3 + 2 * h);
    e.T = num(s, 10), e.S = num(s, 11), e.per_neuron = num(s, 12), e.before = num(s, 13), e.after = num(s, 14);
    e.l0 = num(s, 15), e.l1 = num(s, 16);
    e.positions = packed ? (const int64_t*)ptr(p, 15) : nullptr;
    e.inverse = packed ? (const int64_t*)ptr(p, 16) : nullptr;
    e.group = packed ? num(s, 17) : 1, e.n_groups = packed ? num(s, 18) : 1, e.T_doc = packed ? num(s, 19) : e.T;
    if (PyErr_Occurred()) return nullptr;
    if (e.group < 1 || e.n_groups < 1 || e.S < 1 || e.per_neuron < 1 ||
        (packed && (e.positions == nullptr || e.inverse == nullptr))) {
        PyErr_SetString(PyExc_ValueError, "examples: inconsistent arguments");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    add_examples(e);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// convert(values: int (float32 pointer), out: int (pointer), count, kind): float32 values as the
// windows store them (kind: 0 float32, 1 bfloat16, 2 float16 by to_halves), for the tests.
static PyObject* halves(PyObject*, PyObject* args) {
    unsigned long long values, out;
    long long count;
    int kind;
    if (!PyArg_ParseTuple(args, "KKLi", &values, &out, &count, &kind)) return nullptr;
    if (kind == 2) {
        to_halves((const float*)values, count, (uint16_t*)out);
        Py_RETURN_NONE;
    }
    for (long long i = 0; i < count; ++i) store_window_value((void*)out, i, kind, ((const float*)values)[i]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"layer_batch", layer_batch, METH_VARARGS, "One layer-batch's fused statistics (see collect/fused.py)."},
    {"windows", windows, METH_VARARGS, "Windows around chosen positions (see collect/fused.py)."},
    {"merge", merge, METH_VARARGS, "A batch's documents into the top-k lists (see collect/fused.py)."},
    {"examples", examples, METH_VARARGS, "A batch's random-example candidates into their lists (see collect/fused.py)."},
    {"convert", halves, METH_VARARGS, "float32 to a window dtype, as the merge stores them (for the tests)."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
