// The vectorised sparse x dense products, written once over a vector type `V` (see sparse_kernels.cpp, which
// includes this file once per instruction set, inside a namespace compiled for that instruction set).
//
// V provides: `reg` (the register type), `W` (floats per register), `REGISTERS` (vector registers of the
// instruction set), `TILE_REGISTERS` (the widest column tile, in registers), `mask` (a tail mask type),
// tail(n) (the mask of the first n lanes), zero(), set1(f), load(p), load_tail(p, m) (lanes beyond the mask
// read nothing and are 0), fma(a, b, c) = a*b + c, fnma(a, b, c) = c - a*b, add, mul, reciprocal (of a finite
// d >= 1, to float's precision), min, max, max0, abs, round (to the nearest integer), scale2(p, n) = p 2^n (n
// integral, -116 <= n <= 0), where_less(x, y, a, b) = x < y ? a : b, store(p, v), store_tail(p, v, m),
// gather(base, idx, n) (base[idx[i]] for the first n lanes, 0 beyond; idx int16 or int32), reduce(v) (the sum of
// the lanes).

// Below e^EXP_FLOOR (1.8e-35) exp_nonpositive returns 0: what it would return is a few steps from the denormal
// floats, and an arithmetic op on a denormal costs a microcode assist of about a hundred cycles (the fused GELU
// of a layer with wide pre-activations ran 3x slower than the plain product). Summed into a softmax's
// denominator (at least 1) or scaling a GELU's input, such a term is far below float's precision.
constexpr float EXP_FLOOR = -80.0f;

// e^x for x <= 0 (a softmax after its maximum is subtracted, GELU's e^(-a^2); NaN stays NaN): x = n ln2 + r,
// |r| <= ln2 / 2, e^r by its Taylor series to r^7 (truncation below 6e-9 relative), times 2^n.
static inline typename V::reg exp_nonpositive(typename V::reg x) {
  const typename V::reg floor = V::set1(EXP_FLOOR);
  const typename V::reg y = V::max(floor, x);  // max keeps its second operand when it is NaN
  const typename V::reg n = V::round(V::mul(y, V::set1(1.44269504088896341f)));
  typename V::reg r = V::fnma(n, V::set1(0.693145751953125f), y);  // ln 2 in two parts: r exact enough
  r = V::fnma(n, V::set1(1.42860676533018e-06f), r);
  typename V::reg p = V::set1(1.0f / 5040.0f);
  const float coefficients[] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
  for (float c : coefficients) p = V::fma(p, r, V::set1(c));
  return V::where_less(x, floor, V::zero(), V::scale2(p, n));
}

// GELU(x) = x/2 (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016; gelu_value is the scalar form). With a = |x| /
// sqrt 2, erfc(a) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-a^2), t = 1 / (1 + p a) (Abramowitz & Stegun
// 7.1.26: absolute error below 1.5e-7, as in torch's vectorised CPU GELU); 1 + erf(x / sqrt 2) is then
// erfc(a) for x < 0 and 2 - erfc(a) otherwise, so the far negative tail keeps its relative precision.
static inline typename V::reg gelu(typename V::reg x) {
  using reg = typename V::reg;
  // a at most 10 (erfc(10) < 1e-44 is 0 below): 1 + p a stays finite for reciprocal's Newton step
  const reg a = V::min(V::mul(V::abs(x), V::set1(0.70710678118654752f)), V::set1(10.0f));
  const reg t = V::reciprocal(V::fma(V::set1(0.3275911f), a, V::set1(1.0f)));
  reg poly = V::set1(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) poly = V::fma(poly, t, V::set1(c));
  const reg erfc = V::mul(V::mul(poly, t), exp_nonpositive(V::fnma(a, a, V::zero())));
  const reg twice_phi = V::where_less(x, V::zero(), erfc, V::fnma(erfc, V::set1(1.0f), V::set1(2.0f)));
  return V::mul(V::mul(x, V::set1(0.5f)), twice_phi);
}

// The end of row m's tile: bias included in a, add the residual, the activation, store (NCHW through store_wide
// for a direct conv's wide columns).
template <int NV>
static inline void epilogue(const Epilogue& epi, int64_t m, int64_t p0, int64_t n, typename V::mask last,
                            typename V::reg* a) {
  if (epi.Wq) {  // a direct conv's wide columns: through a buffer, row segment by row segment
    alignas(64) float tile[NV * V::W];
    for (int v = 0; v < NV; ++v) V::store(tile + v * V::W, a[v]);
    store_wide(epi, m, p0, n, tile);
    return;
  }
  if (epi.residual) {
    const float* r = epi.residual + m * epi.ldr + p0;
    for (int v = 0; v < NV - 1; ++v) a[v] = V::add(a[v], V::load(r + v * V::W));
    a[NV - 1] = V::add(a[NV - 1], V::load_tail(r + (NV - 1) * V::W, last));
  }
  if (epi.act == Activation::relu)
    for (int v = 0; v < NV; ++v) a[v] = V::max0(a[v]);
  else if (epi.act == Activation::gelu)
    for (int v = 0; v < NV; ++v) a[v] = gelu(a[v]);
  float* o = epi.out + m * epi.ldo + p0;
  for (int v = 0; v < NV - 1; ++v) V::store(o + v * V::W, a[v]);
  V::store_tail(o + (NV - 1) * V::W, a[NV - 1], last);
}

// Rows [m0, m1) of out for the tile of columns [p0, p0 + n), NV registers wide (n > (NV-1) W):
//   out[m, p] = epilogue(bias[m] + sum_{e in row m} val[e] * x[col[e] * ld + p]).
// S accumulator sets (nonzero e goes to set e % S), so that more FMAs are in flight than one set allows (4 sets
// measured no faster than 2, even 4 registers wide). Two sets only while they, the broadcast weight, the tail
// mask and a loaded operand fit in the registers: AVX2's 16 hold two sets up to 6 registers wide (two sets of 8
// spilled: one set of 8 measured 1.05-1.17x faster on ResNet-50's shapes, AMD EPYC Zen 3).
// With channel blocks (job.blocks > 1), the rows are swept once per block of input channels, so that the slice
// of x the tile reads in a block stays in L1; the sums between blocks wait in `partial` ((m1 - m0) x NV W).
template <int NV, typename Index, bool WHOLE, int S = (2 * NV + 3 <= V::REGISTERS ? 2 : 1)>
static void spmm_tile(const Product<Index>& job, int64_t m0, int64_t m1, int64_t p0, int64_t n, float* partial) {
  const typename V::mask last = V::tail(n - (NV - 1) * V::W);
  // the last register's operand: whole (a plain load, no mask register held in the loop) or its first lanes
  const auto last_operand = [last](const float* p) { return WHOLE ? V::load(p) : V::load_tail(p, last); };
  const float* x = job.x + p0;
  for (int64_t block = 0; block < job.blocks; ++block) {
    const bool first = block == 0, final = block == job.blocks - 1;
    for (int64_t m = m0; m < m1; ++m) {
      if (job.rowptr[m] == job.rowptr[m + 1]) continue;  // stored once by spmm_rows (store_empty_row)
      typename V::reg a[S][NV];
      float* kept = partial + (m - m0) * NV * V::W;
      if (first) {
        const float start = job.epi.bias ? job.epi.bias[m] : 0.0f;
        for (int v = 0; v < NV; ++v) a[0][v] = V::set1(start);
      } else {
        for (int v = 0; v < NV; ++v) a[0][v] = V::load(kept + v * V::W);
      }
      for (int k = 1; k < S; ++k)
        for (int v = 0; v < NV; ++v) a[k][v] = V::zero();
      const auto segment = row_segment(job, m, block);
      int64_t e = segment.first;
      const int64_t end = segment.second;
      for (; e + S <= end; e += S) {
        for (int k = 0; k < S; ++k) {
          const float* src = x + static_cast<int64_t>(job.col[e + k]) * job.ld;
          const typename V::reg w = V::set1(job.val[e + k]);
          for (int v = 0; v < NV - 1; ++v) a[k][v] = V::fma(w, V::load(src + v * V::W), a[k][v]);
          a[k][NV - 1] = V::fma(w, last_operand(src + (NV - 1) * V::W), a[k][NV - 1]);
        }
      }
      if constexpr (S > 1) {
        for (; e < end; ++e) {
          const float* src = x + static_cast<int64_t>(job.col[e]) * job.ld;
          const typename V::reg w = V::set1(job.val[e]);
          for (int v = 0; v < NV - 1; ++v) a[0][v] = V::fma(w, V::load(src + v * V::W), a[0][v]);
          a[0][NV - 1] = V::fma(w, last_operand(src + (NV - 1) * V::W), a[0][NV - 1]);
        }
      }
      for (int k = 1; k < S; ++k)
        for (int v = 0; v < NV; ++v) a[0][v] = V::add(a[0][v], a[k][v]);
      if (!final) {
        for (int v = 0; v < NV; ++v) V::store(kept + v * V::W, a[0][v]);
        continue;
      }
      typename V::reg sums[NV];  // a copy: the accumulators' address never escapes, so they stay in registers
      for (int v = 0; v < NV; ++v) sums[v] = a[0][v];
      epilogue<NV>(job.epi, m, p0, n, last, sums);
    }
  }
}

// spmm_tile for a tile of nv registers, 1 <= nv <= NV.
template <int NV, typename Index>
static inline void spmm_tile_of(int nv, const Product<Index>& job, int64_t m0, int64_t m1, int64_t p0, int64_t n,
                                float* partial) {
  if (nv == NV)
    return n == NV * V::W ? spmm_tile<NV, Index, true>(job, m0, m1, p0, n, partial)
                          : spmm_tile<NV, Index, false>(job, m0, m1, p0, n, partial);
  if constexpr (NV > 1) spmm_tile_of<NV - 1>(nv, job, m0, m1, p0, n, partial);
}

// Rows [m0, m1), all columns: tiles of up to V::TILE_REGISTERS registers, the rows of a thread swept once per tile
// so that the tile's slice of x stays in the caches while the weights stream. Rows without nonzeros are stored
// first, whole (store_empty_row).
template <typename Index>
static void spmm_rows(const Product<Index>& job, int64_t m0, int64_t m1) {
  constexpr int64_t TILE = V::TILE_REGISTERS * V::W;
  std::vector<float> buffer(job.blocks > 1 ? (m1 - m0) * TILE : 0);
  float* partial = buffer.data();
  for (int64_t m = m0; m < m1; ++m)
    if (job.rowptr[m] == job.rowptr[m + 1]) store_empty_row(job.epi, m, job.P);
  for (int64_t p0 = 0; p0 < job.P; p0 += TILE) {
    const int64_t n = std::min(TILE, job.P - p0);
    spmm_tile_of<V::TILE_REGISTERS>(static_cast<int>((n + V::W - 1) / V::W), job, m0, m1, p0, n, partial);
  }
}

// Rows [m0, m1) of y = W x for each of the T rows of x (row stride ldx): one gathered dot product per output, a
// register of nonzeros a gather (V::gather), two accumulators,
//   out[t * ldo_t + m * ldo_m] = epilogue(bias[m] + sum_e val[e] * x[t * ldx + col[e]]).
template <typename Index>
static void spmv_rows(const Gathered<Index>& job, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t begin = job.rowptr[m], end = job.rowptr[m + 1];
    for (int64_t t = 0; t < job.T; ++t) {
      const float* xt = job.x + t * job.ldx;
      typename V::reg a = V::zero(), b = V::zero();
      int64_t e = begin;
      for (; e + 2 * V::W <= end; e += 2 * V::W) {
        a = V::fma(V::load(job.val + e), V::gather(xt, job.col + e, V::W), a);
        b = V::fma(V::load(job.val + e + V::W), V::gather(xt, job.col + e + V::W, V::W), b);
      }
      for (; e < end; e += V::W) {
        const int64_t n = std::min<int64_t>(V::W, end - e);
        a = V::fma(V::load_tail(job.val + e, V::tail(n)), V::gather(xt, job.col + e, n), a);
      }
      float y = V::reduce(V::add(a, b)) + (job.bias ? job.bias[m] : 0.0f);
      job.out[t * job.ldo_t + m * job.ldo_m] = activate(y, job.act);
    }
  }
}
