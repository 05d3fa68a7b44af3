// The vectorised sparse x dense products, written once over a vector type `V` (see sparse_kernels.cpp, which
// includes this file once per instruction set, inside a namespace compiled for that instruction set).
//
// V provides: `reg` (the register type), `W` (floats per register), `mask` (a tail mask type),
// tail(n) (the mask of the first n lanes), zero(), set1(f), load(p), load_tail(p, m) (lanes beyond the mask
// read nothing and are 0), fma(a, b, c) = a*b + c, add, max0, store(p, v), store_tail(p, v, m), and for the
// gathered product: gather(base, idx16/idx32, n) and reduce(v).

// Rows [m0, m1) of out for the tile of columns [p0, p0 + n), NV registers wide (n > (NV-1) W):
//   out[m, p] = epilogue(bias[m] + sum_{e in row m} val[e] * x[col[e] * ld + p]).
// Two accumulator sets (even / odd nonzeros), so that more FMAs are in flight than one set allows.
template <int NV, typename Index>
static void spmm_tile(const Product<Index>& job, int64_t m0, int64_t m1, int64_t p0, int64_t n) {
    const typename V::mask last = V::tail(n - (NV - 1) * V::W);
  const float* x = job.x + p0;
  for (int64_t m = m0; m < m1; ++m) {
    typename V::reg a[NV], b[NV];
    const float start = job.epi.bias ? job.epi.bias[m] : 0.0f;
    for (int v = 0; v < NV; ++v) {
      a[v] = V::set1(start);
      b[v] = V::zero();
    }
    int64_t e = job.rowptr[m];
    const int64_t end = job.rowptr[m + 1];
    for (; e + 1 < end; e += 2) {
        const float* s0 = x + static_cast<int64_t>(job.col[e]) * job.ld;
        const float* s1 = x + static_cast<int64_t>(job.col[e + 1]) * job.ld;
        const typename V::reg w0 = V::set1(job.val[e]), w1 = V::set1(job.val[e + 1]);
        for (int v = 0; v < NV - 1; ++v) {
          a[v] = V::fma(w0, V::load(s0 + v * V::W), a[v]);
          b[v] = V::fma(w1, V::load(s1 + v * V::W), b[v]);
        }
        a[NV - 1] = V::fma(w0, V::load_tail(s0 + (NV - 1) * V::W, last), a[NV - 1]);
        b[NV - 1] = V::fma(w1, V::load_tail(s1 + (NV - 1) * V::W, last), b[NV - 1]);
    }
    for (; e < end; ++e) {
      const float* s0 = x + static_cast<int64_t>(job.col[e]) * job.ld;
      const typename V::reg w0 = V::set1(job.val[e]);
      for (int v = 0; v < NV - 1; ++v) a[v] = V::fma(w0, V::load(s0 + v * V::W), a[v]);
      a[NV - 1] = V::fma(w0, V::load_tail(s0 + (NV - 1) * V::W, last), a[NV - 1]);
    }
    for (int v = 0; v < NV; ++v) a[v] = V::add(a[v], b[v]);
    if (job.epi.Wq) {  // a direct conv's wide columns: through a buffer, row segment by row segment
      alignas(64) float tile[NV * V::W];
      for (int v = 0; v < NV; ++v) V::store(tile + v * V::W, a[v]);
      store_wide(job.epi, m, p0, n, tile);
      continue;
    }
    if (job.epi.residual) {
      const float* r = job.epi.residual + m * job.epi.ldr + p0;
      for (int v = 0; v < NV - 1; ++v) a[v] = V::add(a[v], V::load(r + v * V::W));
      a[NV - 1] = V::add(a[NV - 1], V::load_tail(r + (NV - 1) * V::W, last));
    }
    if (job.epi.relu)
      for (int v = 0; v < NV; ++v) a[v] = V::max0(a[v]);
    float* o = job.epi.out + m * job.epi.ldo + p0;
    for (int v = 0; v < NV - 1; ++v) V::store(o + v * V::W, a[v]);
    V::store_tail(o + (NV - 1) * V::W, a[NV - 1], last);
  }
}

// Rows [m0, m1), all columns: tiles of up to 8 registers, the rows of a thread swept once per tile so that the
// tile's slice of x stays in the caches while the weights stream.
template <typename Index>
static void spmm_rows(const Product<Index>& job, int64_t m0, int64_t m1) {
  constexpr int64_t TILE = 8 * V::W;
  for (int64_t p0 = 0; p0 < job.P; p0 += TILE) {
    const int64_t n = std::min(TILE, job.P - p0);
    switch ((n + V::W - 1) / V::W) {
      case 1: spmm_tile<1>(job, m0, m1, p0, n); break;
      case 2: spmm_tile<2>(job, m0, m1, p0, n); break;
      case 3: spmm_tile<3>(job, m0, m1, p0, n); break;
      case 4: spmm_tile<4>(job, m0, m1, p0, n); break;
      case 5: spmm_tile<5>(job, m0, m1, p0, n); break;
      case 6: spmm_tile<6>(job, m0, m1, p0, n); break;
      case 7: spmm_tile<7>(job, m0, m1, p0, n); break;
      default: spmm_tile<8>(job, m0, m1, p0, n); break;
    }
  }
}

// Rows [m0, m1) of y = W x for each of the T rows of x (row stride ldx): one gathered dot product per output,
// out[t * ldo_t + m * ldo_m] = epilogue(bias[m] + sum_e val[e] * x[t * ldx + col[e]]).
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
      if (job.relu && y < 0.0f) y = 0.0f;
      job.out[t * job.ldo_t + m * job.ldo_m] = y;
    }
  }
}
