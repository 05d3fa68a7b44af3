// Dense scaled dot-product attention for transformer inference, written once over the vector type `V` (included
// by sparse_kernels.cpp inside its AVX-512 and AVX2 namespaces, after spmm_simd.h and the namespace's
// transpose_square). For one (sample, head), with q (Sq x D), k and v (Sk x D):
//
//     out = softmax(scale * q k^T + mask) v          (Vaswani et al. 2017, eq. 1; the mask is additive)
//
// torch's CPU attention runs the two products through MKL and the softmax as separate ops. Here both products are
// register-blocked tiles of V::ATTENTION_ROWS query rows by up to V::ATTENTION_REGISTERS registers: a tile of
// scores (ROWS x Sk) is computed from k transposed once per head (the key index vectorised), exponentiated in
// place (spmm_simd.h's exp_nonpositive), and multiplied into v (the head dimension vectorised); the rows are
// normalised at the end. D must be a multiple of 16. Threads split the (sample, head) pairs. The problem (struct
// Attention) is defined once in sparse_kernels.cpp.

// scores[r][j] = scale * sum_d q[r][d] kt[d][j] + mask[r][j] for R rows and NV registers of keys from j0
template <int R, int NV>
static inline void attention_scores(const Attention& a, const float* q, const float* kt, int64_t ldk,
                                    const float* mask, int64_t j0, float* scores, int64_t lds) {
  using reg = typename V::reg;
  reg acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int64_t d = 0; d < a.D; ++d) {
    reg key[NV];
    for (int v = 0; v < NV; ++v) key[v] = V::load(kt + d * ldk + j0 + V::W * v);
    for (int r = 0; r < R; ++r) {
      const reg query = V::set1(q[r * a.q_strides[2] + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(query, key[v], acc[r][v]);
    }
  }
  const reg scale = V::set1(a.scale);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const int64_t j = j0 + V::W * v;
      reg s = V::mul(acc[r][v], scale);
      if (mask) {
        const float* m = mask + r * a.mask_strides[2] + j;
        s = V::add(s, j + V::W <= a.Sk ? V::load(m) : V::load_tail(m, V::tail(std::max<int64_t>(a.Sk - j, 0))));
      }
      V::store(scores + r * lds + j, s);
    }
}

// out[r][d0 + ...] = sum_j p[r][j] v[j][d0 + ...] / sums[r] for R rows and NV registers of the head dimension
template <int R, int NV>
static inline void attention_values(const Attention& a, const float* p, int64_t ldp, const float* v, int64_t d0,
                                    const float* inverse_sums, float* out, int64_t ldo) {
  using reg = typename V::reg;
  reg acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < NV; ++w) acc[r][w] = V::zero();
  for (int64_t j = 0; j < a.Sk; ++j) {
    reg value[NV];
    for (int w = 0; w < NV; ++w) value[w] = V::load(v + j * a.v_strides[2] + d0 + V::W * w);
    for (int r = 0; r < R; ++r) {
      const reg weight = V::set1(p[r * ldp + j]);
      for (int w = 0; w < NV; ++w) acc[r][w] = V::fma(weight, value[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const reg inverse = V::set1(inverse_sums[r]);
    for (int w = 0; w < NV; ++w) V::store(out + r * ldo + d0 + V::W * w, V::mul(acc[r][w], inverse));
  }
}

// f<NV>() for nv registers, 1 <= nv <= NV
template <int NV, typename F>
static inline void with_registers(int64_t nv, const F& f) {
  if (nv >= NV) return f(std::integral_constant<int, NV>());
  if constexpr (NV > 1) with_registers<NV - 1>(nv, f);
}

// One tile of R query rows: scores, softmax (unnormalised, then 1 / sum), values.
template <int R>
static void attention_tile(const Attention& a, const float* q, const float* kt, int64_t ldk, const float* mask,
                           const float* v, float* scores, float* out) {
  using reg = typename V::reg;
  constexpr int NV = V::ATTENTION_REGISTERS;
  for (int64_t j0 = 0; j0 < ldk; j0 += NV * V::W)
    with_registers<NV>((ldk - j0) / V::W, [&](auto nv) {
      attention_scores<R, decltype(nv)::value>(a, q, kt, ldk, mask, j0, scores, ldk);
    });
  float inverse_sums[R];
  alignas(64) float lanes[V::W];
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * ldk;
    // padding keys (j >= Sk) get -inf: e^-inf = 0
    for (int64_t j = a.Sk; j < ldk; ++j) row[j] = -std::numeric_limits<float>::infinity();
    reg top = V::set1(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < ldk; j += V::W) top = V::max(top, V::load(row + j));
    V::store(lanes, top);
    const float m = *std::max_element(lanes, lanes + V::W);
    // a row masked everywhere (-inf) attends to nothing: zeros, as torch's CPU attention gives
    const bool empty = m == -std::numeric_limits<float>::infinity();
    const reg shift = V::set1(empty ? 0.0f : m);
    reg sum = V::zero();
    for (int64_t j = 0; j < ldk; j += V::W) {
      const reg e = exp_nonpositive(V::fnma(shift, V::set1(1.0f), V::load(row + j)));
      V::store(row + j, e);
      sum = V::add(sum, e);
    }
    V::store(lanes, sum);
    float total = 0.0f;
    for (int i = 0; i < V::W; ++i) total += lanes[i];
    inverse_sums[r] = empty ? 0.0f : 1.0f / total;
  }
  const int64_t ldo = a.H * a.D;
  for (int64_t d0 = 0; d0 < a.D; d0 += NV * V::W)
    with_registers<NV>((a.D - d0) / V::W, [&](auto nv) {
      attention_values<R, decltype(nv)::value>(a, scores, ldk, v, d0, inverse_sums, out, ldo);
    });
}

static void attention_heads(const Attention& a, int64_t begin, int64_t end) {
  constexpr int ROWS = V::ATTENTION_ROWS;
  const int64_t ldk = (a.Sk + V::W - 1) / V::W * V::W;  // keys padded to whole registers
  std::vector<float> kt(a.D * ldk, 0.0f), scores(ROWS * ldk);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / a.H, h = pair % a.H;
    const float* q = a.q + b * a.q_strides[0] + h * a.q_strides[1];
    const float* k = a.k + b * a.k_strides[0] + h * a.k_strides[1];
    const float* v = a.v + b * a.v_strides[0] + h * a.v_strides[1];
    const float* mask = a.mask ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] : nullptr;
    float* out = a.out + b * a.Sq * a.H * a.D + h * a.D;
    const int64_t whole = a.Sk / V::W * V::W;  // kt[d][j] = k[j][d]: W x W register transposes, then the last keys
    for (int64_t j = 0; j < whole; j += V::W)
      for (int64_t d = 0; d < a.D; d += V::W)
        transpose_square(k + j * a.k_strides[2] + d, a.k_strides[2], &kt[d * ldk + j], ldk);
    for (int64_t j = whole; j < a.Sk; ++j)
      for (int64_t d = 0; d < a.D; ++d) kt[d * ldk + j] = k[j * a.k_strides[2] + d];
    for (int64_t i = 0; i < a.Sq; i += ROWS) {
      const float* qi = q + i * a.q_strides[2];
      const float* mi = mask ? mask + i * a.mask_strides[2] : nullptr;
      float* oi = out + i * a.H * a.D;
      with_registers<ROWS>(a.Sq - i, [&](auto rows) {
        attention_tile<decltype(rows)::value>(a, qi, kt.data(), ldk, mi, v, scores.data(), oi);
      });
    }
  }
}
