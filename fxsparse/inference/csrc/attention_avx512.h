// Dense scaled dot-product attention for transformer inference, AVX-512 (included by sparse_kernels.cpp inside
// its AVX-512 namespace). For one (sample, head), with q (Sq x D), k and v (Sk x D):
//
//     out = softmax(scale * q k^T + mask) v          (Vaswani et al. 2017, eq. 1; the mask is additive)
//
// torch's CPU attention runs its two products through MKL, which uses AVX2 on AMD processors (about 50 GMAC/s on
// one Zen 5 core); here both products are register-blocked AVX-512 tiles of ROWS query rows. A tile of scores
// (ROWS x Sk) is computed from k transposed once per head (the key index vectorised), exponentiated in place
// (spmm_simd.h's exp_nonpositive), and multiplied into v (the head dimension vectorised); the rows are
// normalised at the end. D must be a multiple of 16. Threads split the (sample, head) pairs.

struct Attention {
  const float *q, *k, *v, *mask;  // mask: additive, may be null
  float* out;                     // (B, Sq, H, D), contiguous
  int64_t B, H, Sq, Sk, D;
  int64_t q_strides[3], k_strides[3], v_strides[3], mask_strides[3];  // sample, head, row; columns contiguous
  float scale;
};

static constexpr int ATTENTION_ROWS = 6;  // 6 rows x 4 registers of accumulators, 4 operands, 1 broadcast: 29 of 32

// scores[r][j] = scale * sum_d q[r][d] kt[d][j] + mask[r][j] for R rows and NV registers of keys from j0
template <int R, int NV>
static inline void attention_scores(const Attention& a, const float* q, const float* kt, int64_t ldk,
                                    const float* mask, int64_t j0, float* scores, int64_t lds) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < a.D; ++d) {
    __m512 key[NV];
    for (int v = 0; v < NV; ++v) key[v] = _mm512_loadu_ps(kt + d * ldk + j0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 query = _mm512_set1_ps(q[r * a.q_strides[2] + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(query, key[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const int64_t j = j0 + 16 * v;
      const __mmask16 keys = j + 16 <= a.Sk ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(a.Sk - j, 0)) - 1u);
      __m512 s = _mm512_mul_ps(acc[r][v], scale);
      if (mask) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(keys, mask + r * a.mask_strides[2] + j));
      // padding keys (j >= Sk) get -inf: e^-inf = 0
      s = _mm512_mask_blend_ps(keys, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), s);
      _mm512_storeu_ps(scores + r * lds + j, s);
    }
}

// out[r][d0 + ...] = sum_j p[r][j] v[j][d0 + ...] / sums[r] for R rows and NV registers of the head dimension
template <int R, int NV>
static inline void attention_values(const Attention& a, const float* p, int64_t ldp, const float* v, int64_t d0,
                                    const float* inverse_sums, float* out, int64_t ldo) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < NV; ++w) acc[r][w] = _mm512_setzero_ps();
  for (int64_t j = 0; j < a.Sk; ++j) {
    __m512 value[NV];
    for (int w = 0; w < NV; ++w) value[w] = _mm512_loadu_ps(v + j * a.v_strides[2] + d0 + 16 * w);
    for (int r = 0; r < R; ++r) {
      const __m512 weight = _mm512_set1_ps(p[r * ldp + j]);
      for (int w = 0; w < NV; ++w) acc[r][w] = _mm512_fmadd_ps(weight, value[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inverse = _mm512_set1_ps(inverse_sums[r]);
    for (int w = 0; w < NV; ++w) _mm512_storeu_ps(out + r * ldo + d0 + 16 * w, _mm512_mul_ps(acc[r][w], inverse));
  }
}

// One tile of R query rows: scores, softmax (unnormalised, then 1 / sum), values.
template <int R>
static void attention_tile(const Attention& a, const float* q, const float* kt, int64_t ldk, const float* mask,
                           const float* v, float* scores, float* out) {
  for (int64_t j0 = 0; j0 < ldk; j0 += 64) {
    switch (std::min<int64_t>(4, (ldk - j0) / 16)) {
      case 4: attention_scores<R, 4>(a, q, kt, ldk, mask, j0, scores, ldk); break;
      case 3: attention_scores<R, 3>(a, q, kt, ldk, mask, j0, scores, ldk); break;
      case 2: attention_scores<R, 2>(a, q, kt, ldk, mask, j0, scores, ldk); break;
      default: attention_scores<R, 1>(a, q, kt, ldk, mask, j0, scores, ldk); break;
    }
  }
  float inverse_sums[R];
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * ldk;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < ldk; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + j));
    float m = _mm512_reduce_max_ps(top);
    // a row masked everywhere (-inf) attends to nothing: zeros, as torch's CPU attention gives
    const bool empty = m == -std::numeric_limits<float>::infinity();
    const __m512 shift = _mm512_set1_ps(empty ? 0.0f : m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < ldk; j += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift));
      _mm512_storeu_ps(row + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    inverse_sums[r] = empty ? 0.0f : 1.0f / total;
  }
  const int64_t ldo = a.H * a.D;
  for (int64_t d0 = 0; d0 < a.D; d0 += 64) {
    switch (std::min<int64_t>(4, (a.D - d0) / 16)) {
      case 4: attention_values<R, 4>(a, scores, ldk, v, d0, inverse_sums, out, ldo); break;
      case 3: attention_values<R, 3>(a, scores, ldk, v, d0, inverse_sums, out, ldo); break;
      case 2: attention_values<R, 2>(a, scores, ldk, v, d0, inverse_sums, out, ldo); break;
      default: attention_values<R, 1>(a, scores, ldk, v, d0, inverse_sums, out, ldo); break;
    }
  }
}

static void attention_heads(const Attention& a, int64_t begin, int64_t end) {
  const int64_t ldk = (a.Sk + 15) / 16 * 16;  // keys padded to whole registers
  std::vector<float> kt(a.D * ldk, 0.0f), scores(ATTENTION_ROWS * ldk);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / a.H, h = pair % a.H;
    const float* q = a.q + b * a.q_strides[0] + h * a.q_strides[1];
    const float* k = a.k + b * a.k_strides[0] + h * a.k_strides[1];
    const float* v = a.v + b * a.v_strides[0] + h * a.v_strides[1];
    const float* mask = a.mask ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] : nullptr;
    float* out = a.out + b * a.Sq * a.H * a.D + h * a.D;
    const int64_t whole = a.Sk / 16 * 16;  // kt[d][j] = k[j][d]: 16 x 16 register transposes, then the last keys
    for (int64_t j = 0; j < whole; j += 16)
      for (int64_t d = 0; d < a.D; d += 16)
        transpose16x16(k + j * a.k_strides[2] + d, a.k_strides[2], &kt[d * ldk + j], ldk);
    for (int64_t j = whole; j < a.Sk; ++j)
      for (int64_t d = 0; d < a.D; ++d) kt[d * ldk + j] = k[j * a.k_strides[2] + d];
    for (int64_t i = 0; i < a.Sq; i += ATTENTION_ROWS) {
      const float* qi = q + i * a.q_strides[2];
      const float* mi = mask ? mask + i * a.mask_strides[2] : nullptr;
      float* oi = out + i * a.H * a.D;
      switch (std::min<int64_t>(ATTENTION_ROWS, a.Sq - i)) {
        case 6: attention_tile<6>(a, qi, kt.data(), ldk, mi, v, scores.data(), oi); break;
        case 5: attention_tile<5>(a, qi, kt.data(), ldk, mi, v, scores.data(), oi); break;
        case 4: attention_tile<4>(a, qi, kt.data(), ldk, mi, v, scores.data(), oi); break;
        case 3: attention_tile<3>(a, qi, kt.data(), ldk, mi, v, scores.data(), oi); break;
        case 2: attention_tile<2>(a, qi, kt.data(), ldk, mi, v, scores.data(), oi); break;
        default: attention_tile<1>(a, qi, kt.data(), ldk, mi, v, scores.data(), oi); break;
      }
    }
  }
}
