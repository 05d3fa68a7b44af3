// The vectorised sparse x dense products, written once over a vector type `V` (see sparse_kernels.cpp, which
// includes this file once per instruction set, inside a namespace compiled for that instruction set).
//
// V provides: `reg` (the register type), `W` (floats per register), `REGISTERS` (vector registers of the
// instruction set), `TILE_REGISTERS` (the widest column tile, in registers), `mask` (a tail mask type),
// tail(n) (the mask of the first n lanes), zero(), set1(f), load(p), load_tail(p, m) (lanes beyond the mask
// read nothing and are 0), fma(a, b, c) = a*b + c, add, max0, store(p, v), store_tail(p, v, m).

// The end of row m's tile: bias included in a, add the residual, ReLU, store (NCHW through store_wide for a
// direct conv's wide columns).
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
  if (epi.relu)
    for (int v = 0; v < NV; ++v) a[v] = V::max0(a[v]);
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
template <int NV, typename Index, int S = (2 * NV + 3 <= V::REGISTERS ? 2 : 1)>
static void spmm_tile(const Product<Index>& job, int64_t m0, int64_t m1, int64_t p0, int64_t n, float* partial) {
  const typename V::mask last = V::tail(n - (NV - 1) * V::W);
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
          a[k][NV - 1] = V::fma(w, V::load_tail(src + (NV - 1) * V::W, last), a[k][NV - 1]);
        }
      }
      for (; e < end; ++e) {
        const float* src = x + static_cast<int64_t>(job.col[e]) * job.ld;
        const typename V::reg w = V::set1(job.val[e]);
        for (int v = 0; v < NV - 1; ++v) a[0][v] = V::fma(w, V::load(src + v * V::W), a[0][v]);
        a[0][NV - 1] = V::fma(w, V::load_tail(src + (NV - 1) * V::W, last), a[0][NV - 1]);
      }
      for (int k = 1; k < S; ++k)
        for (int v = 0; v < NV; ++v) a[0][v] = V::add(a[0][v], a[k][v]);
      if (!final) {
        for (int v = 0; v < NV; ++v) V::store(kept + v * V::W, a[0][v]);
        continue;
      }
      epilogue<NV>(job.epi, m, p0, n, last, a[0]);
    }
  }
}

// spmm_tile for a tile of nv registers, 1 <= nv <= NV.
template <int NV, typename Index>
static inline void spmm_tile_of(int nv, const Product<Index>& job, int64_t m0, int64_t m1, int64_t p0, int64_t n,
                                float* partial) {
  if (nv == NV) return spmm_tile<NV>(job, m0, m1, p0, n, partial);
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
