// fxsparse's compiled sparse CPU kernels (docs/INFERENCE.md, "How the kernels work").
//
// One product does all the work: a CSR weight (rows = output channels or features) times a dense operand x
// whose rows are read at an offset per nonzero, vectorised over the columns p (pixels or tokens):
//
//     out[m, p] = epilogue(bias[m] + sum_{e in row m} val[e] * x[col[e] * ld + p]),
//     epilogue(v) = max(v + residual[m, p], 0) (residual and ReLU optional).
//
// * linear, many tokens: x = the input transposed, (in, tokens); col = input feature, ld = tokens.
// * conv, direct (no im2col copy): x = the input zero-padded and split by stride phase, channel-major,
//   samples side by side: x[phase][c][n][r][q] = input[n, c, r*sh + a - pt, q*sw + b - pl] for phase (a, b).
//   A nonzero at (c, i, j) then reads a whole shifted window of x: its offset is
//   phase(i*dh % sh, j*dw % sw) + c*plane + (i*dh / sh) * Wq + (j*dw / sw), and the product runs over the
//   "wide" output p = (n*Hq + oh)*Wq + ow (the columns past Wo are computed and dropped). Any kernel size,
//   stride, dilation, groups and padding; the batch is folded into p; offsets are computed per call, so the
//   kernel works at any input size. A 1x1 stride-1 conv reads its input as it is.
// * linear, one to a few tokens (decode): a gathered dot product per output feature over the token's row,
//   with int16 column indices when the layer has fewer than 32768 inputs (memory-bound: 6 bytes a nonzero).
//
// Threads (at::parallel_for, torch's thread count) split the output rows into contiguous blocks of equal
// nonzero counts. The vector code is spmm_simd.h, compiled for AVX-512 and for AVX2+FMA; a portable scalar
// version (auto-vectorised for the compiler's baseline) runs elsewhere. The instruction set is chosen at run
// time (force_isa() overrides it, for the tests).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <unordered_map>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define FXSPARSE_X86 1
#include <immintrin.h>
#endif

namespace {

// The activation an epilogue applies to each output (the op's `activation` argument: its code).
enum class Activation : int64_t { none = 0, relu = 1, gelu = 2 };

// GELU(v) = v Phi(v) = v/2 (1 + erf(v / sqrt 2)) (Hendrycks & Gimpel 2016, the exact form torch's "none"
// approximation computes); the vector form is spmm_simd.h's gelu.
inline float gelu_value(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }

inline float activate(float v, Activation act) {
  if (act == Activation::relu) return v < 0.0f ? 0.0f : v;
  return act == Activation::gelu ? gelu_value(v) : v;
}

struct Epilogue {
  const float* bias = nullptr;      // [M] or null
  const float* residual = nullptr;  // residual[m * ldr + p] or null
  int64_t ldr = 0;
  Activation act = Activation::none;
  float* out = nullptr;  // out[m * ldo + p]
  int64_t ldo = 0;
  // a direct conv's wide columns p = (n*Hq + oh)*Wq + ow (Wq > 0): only oh < Ho, ow < Wo are stored, at
  // out[((n*M + m)*Ho + oh)*Wo + ow] (NCHW), the residual read at the same place
  int64_t Wq = 0, Hq = 0, Ho = 0, Wo = 0, M = 0;
};

// The scalar epilogue of one output: v (bias included) plus its residual r[k] (r null: none), then the
// activation (the vector version is spmm_simd.h's epilogue).
inline float epilogue_value(float v, const float* r, int64_t k, Activation act) {
  return activate(v + (r ? r[k] : 0.0f), act);
}

// Store the columns [p0, p0 + n) of row m (values in `tile`, bias included) of a wide product into NCHW,
// with the residual and the ReLU: a few row segments per tile.
inline void store_wide(const Epilogue& epi, int64_t m, int64_t p0, int64_t n, const float* tile) {
  int64_t p = p0;
  const int64_t end = p0 + n, plane = epi.Hq * epi.Wq;
  while (p < end) {
    const int64_t sample = p / plane, oh = (p % plane) / epi.Wq, ow = p % epi.Wq;
    const int64_t run = std::min(epi.Wq - ow, end - p);
    if (oh < epi.Ho && ow < epi.Wo) {
      const int64_t count = std::min(run, epi.Wo - ow);
      const int64_t at = ((sample * epi.M + m) * epi.Ho + oh) * epi.Wo + ow;
      const float* from = tile + (p - p0);
      float* to = epi.out + at;
      const float* r = epi.residual ? epi.residual + at : nullptr;
      for (int64_t k = 0; k < count; ++k) to[k] = epilogue_value(from[k], r, k, epi.act);
    }
    p += run;
  }
}

// Row m of a product whose weight row has no nonzeros (a pruned output channel): epilogue(bias) over all P
// columns, written straight to the output (NCHW planes for a direct conv's wide columns) instead of a pass of the
// vector tiles per column tile. ResNet-50's nearly empty 3x3 layers under the global ST-3-sigma-shaped mask spent
// most of their time on such rows (see docs/INFERENCE.md).
inline void store_empty_row(const Epilogue& epi, int64_t m, int64_t P) {
  const float start = epi.bias ? epi.bias[m] : 0.0f;
  int64_t samples = 1, length = P, at = m * epi.ldo, step = 0;
  if (epi.Wq) {  // P = ((N - 1) Hq + Ho - 1) Wq + Wo: N planes of Ho Wo outputs, a sample's M planes apart
    samples = (P - 1) / (epi.Hq * epi.Wq) + 1, length = epi.Ho * epi.Wo, at = m * length, step = epi.M * length;
  }
  for (int64_t n = 0; n < samples; ++n, at += step) {
    float* to = epi.out + at;
    const float* r = epi.residual ? epi.residual + (epi.Wq ? at : m * epi.ldr) : nullptr;
    for (int64_t k = 0; k < length; ++k) to[k] = epilogue_value(start, r, k, epi.act);
  }
}

// One attention call (attention_simd.h): q (B, H, Sq, D), k and v (B, H, Sk, D) by their strides.
struct Attention {
  const float *q, *k, *v, *mask;  // mask: additive, may be null
  float* out;                     // (B, Sq, H, D), contiguous
  int64_t B, H, Sq, Sk, D;
  int64_t q_strides[3], k_strides[3], v_strides[3], mask_strides[3];  // sample, head, row; columns contiguous
  float scale;
};

template <typename Index>
struct Product {
  const float* x;
  int64_t ld;  // row stride of x, in floats: a nonzero's row starts at x + col * ld
  const int32_t* rowptr;
  const Index* col;
  const float* val;
  int64_t P;  // columns
  Epilogue epi;
  // channel blocks: col and val stored block by block, each block's rows in order (the weights then stream in
  // the order a block's sweep reads them); row m's nonzeros of block b are [seg[b * (M + 1) + m], seg[b * (M + 1)
  // + m + 1]) for the product's M rows
  const int32_t* seg = nullptr;
  int64_t blocks = 1, M = 0;
};

// The nonzeros of row m in channel block b: [first, second) of job.col and job.val.
template <typename Index>
inline std::pair<int64_t, int64_t> row_segment(const Product<Index>& job, int64_t m, int64_t b) {
  if (!job.seg) return {job.rowptr[m], job.rowptr[m + 1]};
  const int32_t* s = job.seg + b * (job.M + 1);
  return {s[m], s[m + 1]};
}

// What a conv computes from its weight's CSR and its input's geometry before the product: each nonzero's offset
// into the packed input, and the channel blocks (below). Kept between calls (prepared()).
struct Prepared {
  std::vector<int32_t> off;
  std::vector<int32_t> seg;  // empty: one block
  int64_t blocks = 1;
  std::vector<float> val;  // with blocks: the weight's values in the order of off (block by block)
  std::vector<uint8_t> channel_read;  // a direct conv: whether some nonzero reads input channel c (empty: all do)
  std::vector<int16_t> off16;  // a linear of int16 indices: its reordered column indices (off is then empty)

  int64_t bytes() const {
    return static_cast<int64_t>(off.capacity() * sizeof(int32_t) + seg.capacity() * sizeof(int32_t) +
                                val.capacity() * sizeof(float) + channel_read.capacity() + off16.capacity() * 2);
  }
};

// Split the rows of a product into blocks of input channels, so that the slice of x that one column tile reads
// in a block fits in L1 (x holds `floats_per_channel` floats per channel for a tile; a weight column c reads
// channel c / taps). The vector code sweeps a tile's rows once per block (spmm_simd.h).
// The weight is stored again block by block (prepared.off and .val; `seg` a row pointer per block), so that a
// block's sweep streams its nonzeros in order: read in place, a sweep jumped from row to row through the CSR and
// the weights came from L3 (on 14x14 and 7x7 maps the blocks were then 0.5-0.9x with the weights cold, and were
// not used there; stored by block, 1.30-1.61x on ResNet-50's 29-41% 1x1 layers at 14x14 and 7x7, Intel Xeon VM).
// Used for direct kh x kw convs (each channel read by kh kw taps: 1.1-1.8x on ResNet-50's 3x3 layers), and for
// 1x1 convs with at least MIN_NONZEROS_PER_BLOCK nonzeros a row and block on average (`min_nonzeros_per_block`;
// 1.14-1.37x at 25-41% density on ResNet-50's 1x1 shapes; with fewer, as at 90% sparsity, the partial sums cost
// more than L1 saves: 0.90-0.96x at 12.8 a block). No split when it would give one block or too few nonzeros.
constexpr int64_t MIN_NONZEROS_PER_BLOCK = 16;
constexpr int64_t L1_SLICE = 32 * 1024 / sizeof(float);  // of the 32-48 KiB L1d: the rest for weights and sums

template <typename Index>
void split_by_channel_blocks(const int32_t* rowptr, const Index* col, const float* val, int64_t M, int64_t channels,
                             int64_t taps, int64_t floats_per_channel, int64_t min_nonzeros_per_block,
                             Prepared& prepared, int64_t slice_floats = L1_SLICE) {
  const int64_t per_block_max = std::max<int64_t>(1, slice_floats / std::max<int64_t>(1, floats_per_channel));
  const int64_t blocks = (channels + per_block_max - 1) / per_block_max;
  if (blocks <= 1 || rowptr[M] < min_nonzeros_per_block * blocks * M) return;
  const int64_t block_columns = (channels + blocks - 1) / blocks * taps;
  // each row's entries are sorted by column: a block is a run of them (any order would stay exact)
  std::vector<int32_t> start(M * (blocks + 1));
  for (int64_t m = 0; m < M; ++m) {
    int32_t* row = start.data() + m * (blocks + 1);
    int64_t e = rowptr[m];
    const int64_t end = rowptr[m + 1];
    for (int64_t b = 0; b < blocks; ++b) {
      row[b] = static_cast<int32_t>(e);
      while (e < end && col[e] < (b + 1) * block_columns) ++e;
    }
    row[blocks] = static_cast<int32_t>(end);
  }
  // the entries stored block by block (off and val permuted alike), seg a row pointer per block
  const std::vector<int32_t> off = prepared.off;
  prepared.val.resize(rowptr[M]);
  prepared.seg.resize(blocks * (M + 1));
  int64_t at = 0;
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t m = 0; m < M; ++m) {
      prepared.seg[b * (M + 1) + m] = static_cast<int32_t>(at);
      for (int64_t e = start[m * (blocks + 1) + b]; e < start[m * (blocks + 1) + b + 1]; ++e, ++at) {
        prepared.off[at] = off[e];
        prepared.val[at] = val[e];
      }
      prepared.seg[b * (M + 1) + m + 1] = static_cast<int32_t>(at);
    }
  prepared.blocks = blocks;
}

// A product reads its weight from `prepared` when that holds channel blocks (the weight reordered block by block;
// a linear of int16 indices keeps its reordered indices in off16).
template <typename Index>
inline void use_blocks(const Prepared& prepared, int64_t M, Product<Index>& job) {
  if (prepared.seg.empty()) return;
  if constexpr (std::is_same_v<Index, int16_t>)
    job.col = prepared.off16.data();
  else
    job.col = prepared.off.data();
  job.val = prepared.val.data();
  job.seg = prepared.seg.data();
  job.blocks = prepared.blocks;
  job.M = M;
}

struct PreparedEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> owner, values_owner;
  const c10::TensorImpl* values;
  int64_t version;
  std::vector<int64_t> key;
  std::shared_ptr<const Prepared> value;
};
std::mutex prepared_mutex;
std::unordered_map<const c10::TensorImpl*, PreparedEntry> prepared_cache;

// The Prepared of a conv or linear weight (its CSR column indices, `indices`, and values, `values`) for an input
// geometry (`key`), built by build(Prepared&) on the first call and kept while both tensors live unchanged (same
// versions) and the geometry stays: the O(nonzeros) offsets cost 10-20% of ResNet-50's time when computed per call.
// Memory (kept_bytes()): a conv, 4 bytes a nonzero (plus the blocks), the size of the weight's indices; with
// channel blocks, 8 (the values too); a linear with blocks of inputs, 6 (int16 indices) or 8.
std::shared_ptr<const Prepared> prepared(const at::Tensor& indices, std::vector<int64_t> key, const at::Tensor& values,
                                         const std::function<void(Prepared&)>& build) {
  std::mutex& mutex = prepared_mutex;
  auto& cache = prepared_cache;
  const c10::TensorImpl* impl = indices.unsafeGetTensorImpl();
  const int64_t version = static_cast<int64_t>(indices._version());
  key.push_back(static_cast<int64_t>(values._version()));
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(impl);  // a live owner keeps its address: the entry is this tensor's
    if (it != cache.end() && !it->second.owner.expired() && it->second.version == version && it->second.key == key &&
        !it->second.values_owner.expired() && it->second.values == values.unsafeGetTensorImpl())
      return it->second.value;
  }
  auto value = std::make_shared<Prepared>();
  build(*value);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= 256)  // forget the entries of weights that are gone
    for (auto it = cache.begin(); it != cache.end();) it = it->second.owner.expired() ? cache.erase(it) : std::next(it);
  cache.erase(impl);
  cache.emplace(impl, PreparedEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(indices.getIntrusivePtr()),
                                    c10::weak_intrusive_ptr<c10::TensorImpl>(values.getIntrusivePtr()),
                                    values.unsafeGetTensorImpl(), version, std::move(key), value});
  return value;
}

// The bytes the kernels keep for the weights that are alive (prepared()'s offsets, blocks and reordered weights).
int64_t kept_bytes() {
  std::lock_guard<std::mutex> lock(prepared_mutex);
  int64_t total = 0;
  for (const auto& [impl, entry] : prepared_cache)
    if (!entry.owner.expired() && !entry.values_owner.expired()) total += entry.value->bytes();
  return total;
}

// Activation buffers kept between calls: a float32 buffer of at least POOL_MIN_BYTES that a kernel returns or uses
// as a temporary comes from a process-wide pool of earlier buffers of the same size that nothing else references
// any more (their storage's only owner is the pool), else is allocated and, while the pool holds less than its
// limit, pooled (a full pool first drops its idle buffers). A fresh buffer of a few MiB is mapped by the
// allocator and every one of its pages faults on first touch (ResNet-50's 3.2 MB 56x56 outputs); a pooled one is
// warm (ResNet-50 90%, batch 1, one thread: 1.016x end to end). An output still held by the caller, or a view of
// it, is never handed out again: its storage has another owner.
// The limit: POOL_MAX_BYTES, or POOL_LARGEST_TIMES times the largest buffer asked for when that is more, so that a
// large batch's few live activations fit too (ResNet-50 at batch 16: 51 MB outputs, about 300 MB pooled; 1.19-1.25x
// end to end over a fixed 128 MiB, two threads); set_pool_limit() fixes it instead.
constexpr int64_t POOL_MIN_BYTES = 128 * 1024, POOL_MAX_BYTES = 128 * 1024 * 1024, POOL_LARGEST_TIMES = 8;

struct BufferPool {
  std::mutex mutex;
  std::vector<at::Storage> buffers;
  int64_t bytes = 0;
  int64_t largest = 0;      // the largest buffer asked for
  int64_t fixed_limit = -1;  // set_pool_limit(); -1: the adaptive limit above
  int64_t limit() const {
    return fixed_limit >= 0 ? fixed_limit : std::max(POOL_MAX_BYTES, POOL_LARGEST_TIMES * largest);
  }
};

BufferPool& buffer_pool() {
  static BufferPool* pool = new BufferPool();  // never destroyed: tensors may outlive static destructors
  return *pool;
}

at::Tensor pooled_empty(at::IntArrayRef sizes) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(sizeof(float));
  if (nbytes < POOL_MIN_BYTES) return at::empty(sizes, options);
  BufferPool& pool = buffer_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  pool.largest = std::max(pool.largest, nbytes);
  const int64_t limit = pool.limit();
  for (const at::Storage& storage : pool.buffers)
    if (static_cast<int64_t>(storage.nbytes()) == nbytes && storage.use_count() == 1)
      return at::empty({0}, options).set_(storage, 0, sizes);
  at::Tensor fresh = at::empty(sizes, options);
  if (pool.bytes + nbytes > limit) {  // full: forget the idle buffers (sizes no longer asked for)
    auto idle = [](const at::Storage& storage) { return storage.use_count() == 1; };
    pool.buffers.erase(std::remove_if(pool.buffers.begin(), pool.buffers.end(), idle), pool.buffers.end());
    pool.bytes = 0;
    for (const at::Storage& storage : pool.buffers) pool.bytes += static_cast<int64_t>(storage.nbytes());
  }
  if (pool.bytes + nbytes <= limit) {
    pool.buffers.push_back(fresh.storage());
    pool.bytes += nbytes;
  }
  return fresh;
}

// Give the pooled buffers back to the allocator (those still in use stay with their owners); returns the bytes
// the pool held. The adaptive limit starts again from POOL_MAX_BYTES.
int64_t release_buffers() {
  BufferPool& pool = buffer_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  const int64_t held = pool.bytes;
  pool.buffers.clear();
  pool.bytes = 0;
  pool.largest = 0;
  return held;
}

// Fix the pool's limit at `bytes` (0: no pooling), or restore the adaptive limit (-1); returns the limit in force
// before.
int64_t set_pool_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= -1, "fxsparse set_pool_limit: bytes must be >= 0, or -1 for the adaptive limit");
  BufferPool& pool = buffer_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  const int64_t before = pool.limit();
  pool.fixed_limit = bytes;
  return before;
}

template <typename Index>
struct Gathered {
  const float* x;
  int64_t ldx;  // row stride of x (one row per token)
  int64_t T;    // tokens
  const int32_t* rowptr;
  const Index* col;
  const float* val;
  const float* bias;
  Activation act;
  float* out;
  int64_t ldo_t, ldo_m;
};

// ---------------------------------------------------------------------------------------------------------
// portable scalar kernels (also the reading of what the vector ones compute)
// ---------------------------------------------------------------------------------------------------------
namespace portable {

constexpr int64_t TILE = 64;

template <typename Index>
void spmm_rows(const Product<Index>& job, int64_t m0, int64_t m1) {
  float acc[TILE];
  for (int64_t p0 = 0; p0 < job.P; p0 += TILE) {
    const int64_t n = std::min(TILE, job.P - p0);
    for (int64_t m = m0; m < m1; ++m) {
      const float start = job.epi.bias ? job.epi.bias[m] : 0.0f;
      for (int64_t k = 0; k < n; ++k) acc[k] = start;
      for (int64_t b = 0; b < job.blocks; ++b) {
        const auto [first, end] = row_segment(job, m, b);
        for (int64_t e = first; e < end; ++e) {
          const float* s = job.x + static_cast<int64_t>(job.col[e]) * job.ld + p0;
          const float w = job.val[e];
          for (int64_t k = 0; k < n; ++k) acc[k] += w * s[k];
        }
      }
      if (job.epi.Wq) {
        store_wide(job.epi, m, p0, n, acc);
        continue;
      }
      float* o = job.epi.out + m * job.epi.ldo + p0;
      const float* r = job.epi.residual ? job.epi.residual + m * job.epi.ldr + p0 : nullptr;
      for (int64_t k = 0; k < n; ++k) o[k] = epilogue_value(acc[k], r, k, job.epi.act);
    }
  }
}

template <typename Index>
void spmv_rows(const Gathered<Index>& job, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t t = 0; t < job.T; ++t) {
      const float* xt = job.x + t * job.ldx;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      int64_t e = job.rowptr[m];
      const int64_t end = job.rowptr[m + 1];
      for (; e + 4 <= end; e += 4) {
        a0 += job.val[e] * xt[job.col[e]];
        a1 += job.val[e + 1] * xt[job.col[e + 1]];
        a2 += job.val[e + 2] * xt[job.col[e + 2]];
        a3 += job.val[e + 3] * xt[job.col[e + 3]];
      }
      for (; e < end; ++e) a0 += job.val[e] * xt[job.col[e]];
      float y = (a0 + a1) + (a2 + a3) + (job.bias ? job.bias[m] : 0.0f);
      job.out[t * job.ldo_t + m * job.ldo_m] = activate(y, job.act);
    }
  }
}

}  // namespace portable

#ifdef FXSPARSE_X86
// ---------------------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL)
// ---------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
struct V {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int W = 16;
  static constexpr int REGISTERS = 32, TILE_REGISTERS = 8;  // 128 columns
  // attention tiles: 6 rows x 4 registers of accumulators, 4 operands, 1 broadcast: 29 of 32
  static constexpr int ATTENTION_ROWS = 6, ATTENTION_REGISTERS = 4;
  static inline mask tail(int64_t n) { return n >= 16 ? mask(0xFFFF) : mask((1u << n) - 1u); }
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg set1(float f) { return _mm512_set1_ps(f); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg load_tail(const float* p, mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg fnma(reg a, reg b, reg c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg reciprocal(reg d) {  // 14 bits, one Newton step: r (2 - d r)
    const reg r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  }
  static inline reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline reg max0(reg a) { return _mm512_max_ps(a, _mm512_setzero_ps()); }
  static inline reg abs(reg a) { return _mm512_abs_ps(a); }
  static inline reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline reg scale2(reg p, reg n) { return _mm512_scalef_ps(p, n); }
  static inline reg where_less(reg x, reg y, reg a, reg b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, y, _CMP_LT_OQ), b, a);
  }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline void store_tail(float* p, reg v, mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static inline reg gather(const float* base, const int16_t* idx, int64_t n) {
    const mask m = tail(n);
    const __m512i i = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, idx));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i, base, 4);
  }
  static inline reg gather(const float* base, const int32_t* idx, int64_t n) {
    const mask m = tail(n);
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_maskz_loadu_epi32(m, idx), base, 4);
  }
  static inline float reduce(reg v) { return _mm512_reduce_add_ps(v); }
};
#include "spmm_simd.h"

// max pooling's two passes (max_pool2d below), vectorised: a NaN-propagating max (as the scalar nan_max) ...
static inline __m512 nan_max(__m512 m, __m512 v) {
  const __mmask16 take = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(take, m, v);
}

// ... rows[w] = max(rows[w], r[w]) for w < W (the window's next input row) ...
static void pool_rows(float* rows, const float* r, int64_t W) {
  for (int64_t w = 0; w < W; w += 16) {
    const __mmask16 m = V::tail(W - w);
    _mm512_mask_storeu_ps(rows + w, m, nan_max(_mm512_maskz_loadu_ps(m, rows + w), _mm512_maskz_loadu_ps(m, r + w)));
  }
}

// ... and line[ow] = max_j rows[ow * sw + j], j < kw, for a stride sw of 1 or 2 (rows readable 32 floats past the
// last window: the lanes past Wo are computed from them and not stored)
static void pool_columns(const float* rows, int64_t kw, int64_t sw, int64_t Wo, float* line) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t ow = 0; ow < Wo; ow += 16) {
    const float* window = rows + ow * sw;
    auto column = [&](int64_t j) {  // rows[(ow + l) * sw + j] for the 16 lanes l
      if (sw == 1) return _mm512_loadu_ps(window + j);
      return _mm512_permutex2var_ps(_mm512_loadu_ps(window + j), even, _mm512_loadu_ps(window + j + 16));
    };
    __m512 top = column(0);
    for (int64_t j = 1; j < kw; ++j) top = nan_max(top, column(j));
    _mm512_mask_storeu_ps(line + ow, V::tail(Wo - ow), top);
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i, j < 16: pairs of rows unpacked, then pairs of pairs shuffled (lane
// l of s[g][c] holds column 4l + c of rows 4g..4g+3), then the 128-bit lanes of the four row groups gathered in
// two steps; 64 shuffles for 256 floats (the 8 x 8 transpose needs 96) and whole 64-byte rows stored.
static inline void transpose16x16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16], s[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // s[4g + c]: column 4l + c of rows 4g..4g+3 in lane l
    const __m512 *lo = t + 4 * g, *hi = t + 4 * g + 2;
    s[4 * g + 0] = _mm512_shuffle_ps(lo[0], hi[0], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * g + 1] = _mm512_shuffle_ps(lo[0], hi[0], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * g + 2] = _mm512_shuffle_ps(lo[1], hi[1], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * g + 3] = _mm512_shuffle_ps(lo[1], hi[1], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    // even: lanes 0 and 2 of groups (0, 1) and of (2, 3); odd: lanes 1 and 3
    const __m512 even01 = _mm512_shuffle_f32x4(s[c], s[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 odd01 = _mm512_shuffle_f32x4(s[c], s[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512 even23 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 odd23 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
    _mm512_storeu_ps(dst + (0 + c) * ldd, _mm512_shuffle_f32x4(even01, even23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(odd01, odd23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(even01, even23, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(odd01, odd23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

static inline void transpose_square(const float* src, int64_t lds, float* dst, int64_t ldd) {
  transpose16x16(src, lds, dst, ldd);
}
#include "attention_simd.h"
}  // namespace avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------
// AVX2 + FMA
// ---------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using reg = __m256;
  using mask = __m256i;
  static constexpr int W = 8;
  // tiles of 80 columns in one accumulator set, the channel blocks sized for them: ResNet-50 90% 1.15x (one thread,
  // paired) against 64 in two sets (they spilled); 64 or 96 columns in one set 1.12x (AMD EPYC Zen 3)
  static constexpr int REGISTERS = 16, TILE_REGISTERS = 10;
  // attention tiles: 6 rows x 2 registers of accumulators, 2 operands, 1 broadcast: 15 of 16
  static constexpr int ATTENTION_ROWS = 6, ATTENTION_REGISTERS = 2;
  static inline mask tail(int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))), lanes);
  }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float f) { return _mm256_set1_ps(f); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg load_tail(const float* p, mask m) { return _mm256_maskload_ps(p, m); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg fnma(reg a, reg b, reg c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg reciprocal(reg d) {  // 12 bits, one Newton step: r (2 - d r)
    const reg r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  }
  static inline reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg max0(reg a) { return _mm256_max_ps(a, _mm256_setzero_ps()); }
  static inline reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline reg scale2(reg p, reg n) {  // 2^n built from its exponent bits (a normal float for n >= -126)
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
  static inline reg where_less(reg x, reg y, reg a, reg b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, y, _CMP_LT_OQ));
  }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static inline void store_tail(float* p, reg v, mask m) { _mm256_maskstore_ps(p, m, v); }
  // base[idx[0]], ..., base[idx[n - 1]] (0 beyond) by scalar loads: on AMD EPYC Zen 3 AVX2's 8-lane gather
  // instruction ran GPT-2's decode shapes 1.19-1.29x slower than a scalar loop, which needs three loads a
  // nonzero where this needs about one and a half (1.22-1.47x faster than the scalar loop)
  template <typename Index>
  static inline reg gather(const float* base, const Index* idx, int64_t n) {
    if (n >= 8) {
      const __m128 lo = _mm_setr_ps(base[idx[0]], base[idx[1]], base[idx[2]], base[idx[3]]);
      const __m128 hi = _mm_setr_ps(base[idx[4]], base[idx[5]], base[idx[6]], base[idx[7]]);
      return _mm256_set_m128(hi, lo);
    }
    // lane by lane into registers (floats stored one by one and read back as a vector stall the load)
    const auto lane = [&](int64_t i) { return i < n ? base[idx[i]] : 0.0f; };
    return _mm256_setr_ps(lane(0), lane(1), lane(2), lane(3), lane(4), lane(5), lane(6), lane(7));
  }
  static inline float reduce(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#include "spmm_simd.h"

// dst[j * ldd + i] = src[i * lds + j] for i, j < 8: unpack pairs of rows, shuffle pairs of pairs, swap halves
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
static inline void transpose_square(const float* src, int64_t lds, float* dst, int64_t ldd) {
  transpose8x8(src, lds, dst, ldd);
}

#include "attention_simd.h"
}  // namespace avx2
#pragma GCC pop_options
#endif  // FXSPARSE_X86

// ---------------------------------------------------------------------------------------------------------
// instruction set and threads
// ---------------------------------------------------------------------------------------------------------
enum class Isa { portable, avx2, avx512 };

Isa detected_isa() {
#ifdef FXSPARSE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::portable;
}

Isa& current_isa() {
  static Isa isa = detected_isa();
  return isa;
}

std::string isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "portable";
}

std::string isa() { return isa_name(current_isa()); }

// Select an instruction set ("avx512", "avx2", "portable", or "auto"); one the CPU lacks is refused.
std::string force_isa(const std::string& name) {
  const Isa best = detected_isa();
  Isa wanted;
  if (name == "auto") {
    wanted = best;
  } else if (name == "avx512") {
    wanted = Isa::avx512;
  } else if (name == "avx2") {
    wanted = Isa::avx2;
  } else if (name == "portable") {
    wanted = Isa::portable;
  } else {
    TORCH_CHECK(false, "unknown instruction set '", name, "'; expected avx512, avx2, portable or auto");
  }
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best), "this CPU does not support ", name);
  current_isa() = wanted;
  return isa_name(wanted);
}

// The rows [0, M) split into blocks of about equal nonzero counts, one per thread (block k is [bounds[k],
// bounds[k + 1])); one block when the product is small (`work`: multiply-adds), where waking threads costs more
// than it saves.
std::vector<int64_t> row_blocks(const int32_t* rowptr, int64_t M, int64_t work) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), M);
  if (threads <= 1 || work < 32768) return {0, M};
  std::vector<int64_t> bounds(threads + 1, M);
  bounds[0] = 0;
  const int64_t nnz = rowptr[M];
  for (int64_t k = 1; k < threads; ++k) {
    const int64_t target = nnz * k / threads;
    bounds[k] = std::lower_bound(rowptr, rowptr + M + 1, static_cast<int32_t>(target)) - rowptr;
    bounds[k] = std::max(bounds[k], bounds[k - 1]);
  }
  return bounds;
}

// Run body(k, m0, m1) for each row block k = [m0, m1) of `bounds`, one thread a block.
template <typename Body>
void over_blocks(const std::vector<int64_t>& bounds, const Body& body) {
  const int64_t blocks = static_cast<int64_t>(bounds.size()) - 1;
  if (blocks == 1) return body(0, bounds[0], bounds[1]);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      if (bounds[k] < bounds[k + 1]) body(k, bounds[k], bounds[k + 1]);
  });
}

template <typename Body>
void over_row_blocks(const int32_t* rowptr, int64_t M, int64_t work, const Body& body) {
  over_blocks(row_blocks(rowptr, M, work), [&](int64_t, int64_t m0, int64_t m1) { body(m0, m1); });
}

// The widest column tile of the current instruction set's product (spmm_rows), in floats: what a channel block's
// slice of x is sized for.
int64_t tile_columns() {
#ifdef FXSPARSE_X86
  if (current_isa() == Isa::avx512) return avx512::V::TILE_REGISTERS * avx512::V::W;
  if (current_isa() == Isa::avx2) return avx2::V::TILE_REGISTERS * avx2::V::W;
#endif
  return portable::TILE;
}

template <typename Index>
void spmm_rows_on(Isa isa, const Product<Index>& job, int64_t m0, int64_t m1) {
#ifdef FXSPARSE_X86
  if (isa == Isa::avx512) return avx512::spmm_rows(job, m0, m1);
  if (isa == Isa::avx2) return avx2::spmm_rows(job, m0, m1);
#endif
  portable::spmm_rows(job, m0, m1);
}

template <typename Index>
void run_product(const Product<Index>& job, int64_t M) {
  if (job.P <= 0 || M <= 0) return;
  const Isa isa = current_isa();
  over_row_blocks(job.rowptr, M, static_cast<int64_t>(job.rowptr[M]) * job.P,
                  [&](int64_t m0, int64_t m1) { spmm_rows_on(isa, job, m0, m1); });
}

template <typename Index>
void run_gathered(const Gathered<Index>& job, int64_t M) {
  if (job.T <= 0 || M <= 0) return;
  const Isa isa = current_isa();
  over_row_blocks(job.rowptr, M, static_cast<int64_t>(job.rowptr[M]) * job.T, [&](int64_t m0, int64_t m1) {
#ifdef FXSPARSE_X86
    if (isa == Isa::avx512) return avx512::spmv_rows(job, m0, m1);
    if (isa == Isa::avx2) return avx2::spmv_rows(job, m0, m1);
#endif
    portable::spmv_rows(job, m0, m1);
  });
}

void check_csr(const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& weights, int64_t rows) {
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.numel() == rows + 1,
              "fxsparse native kernel: offsets must be a contiguous int32 tensor of ", rows + 1, " entries");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "fxsparse native kernel: weights must be contiguous float32");
  TORCH_CHECK((indices.scalar_type() == at::kInt || indices.scalar_type() == at::kShort) && indices.is_contiguous() &&
                  indices.numel() == weights.numel(),
              "fxsparse native kernel: indices must be contiguous int16 or int32, one per weight");
}

const float* optional_data(const c10::optional<at::Tensor>& t, int64_t numel, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel, "fxsparse native kernel: ",
              what, " must be contiguous float32 with ", numel, " entries");
  return t->data_ptr<float>();
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, the 32 x 32 blocks [block0, block1) (row-block
// major) of 16 x 16 register transposes on AVX-512, 8 x 8 on AVX2: a block's 4 KiB read and 4 KiB written stay
// in L1.
constexpr int64_t TRANSPOSE_BLOCK = 32;

void transpose_blocks(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd,
                      int64_t block0, int64_t block1) {
  constexpr int64_t B = TRANSPOSE_BLOCK;
  const int64_t col_blocks = (cols + B - 1) / B;
#ifdef FXSPARSE_X86
  const Isa isa = current_isa();
  const int64_t tile = isa == Isa::avx512 ? 16 : isa == Isa::avx2 ? 8 : 0;
#else
  const int64_t tile = 0;
#endif
  for (int64_t block = block0; block < block1; ++block) {
    const int64_t r0 = block / col_blocks * B, c0 = block % col_blocks * B;
    const int64_t r1 = std::min(rows, r0 + B), c1 = std::min(cols, c0 + B);
    int64_t r8 = r0, c8 = c0;  // [r0, r8) x [c0, c8): whole tile x tile squares
#ifdef FXSPARSE_X86
    if (tile) {
      r8 = r0 + (r1 - r0) / tile * tile, c8 = c0 + (c1 - c0) / tile * tile;
      for (int64_t r = r0; r < r8; r += tile)
        for (int64_t c = c0; c < c8; c += tile) {
          if (tile == 16)
            avx512::transpose16x16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
          else
            avx2::transpose8x8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
        }
    }
#endif
    for (int64_t c = c0; c < c1; ++c)  // the rest, one float at a time
      for (int64_t r = (c < c8 ? r8 : r0); r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
}

int64_t transpose_block_count(int64_t rows, int64_t cols) {
  constexpr int64_t B = TRANSPOSE_BLOCK;
  return ((rows + B - 1) / B) * ((cols + B - 1) / B);
}

// The same, by the calling thread alone.
void transpose_serial(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  transpose_blocks(src, rows, cols, lds, dst, ldd, 0, transpose_block_count(rows, cols));
}

// dst[c * ldd + r] = src[r * cols + c]: (rows, cols) to (cols, rows) with rows ldd apart, the blocks shared
// among threads. torch's strided copy of a transposed (128, 768) float tensor took about 95 us here.
void transpose(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  at::parallel_for(0, transpose_block_count(rows, cols), 16, [&](int64_t begin, int64_t end) {
    transpose_blocks(src, rows, cols, cols, dst, ldd, begin, end);
  });
}

// ---------------------------------------------------------------------------------------------------------
// linear
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t GATHER_MAX_TOKENS = 4;  // up to this many tokens, a gathered dot product per output and token
constexpr int64_t OWN_TABLE_BYTES = 2 << 20;  // the largest table that each thread transposes for itself
// A linear's table is read in blocks of inputs of this size a column tile (see linear_impl).
constexpr int64_t LINEAR_SLICE_BYTES = 64 << 10;

template <typename Index>
void linear_impl(const float* x, int64_t T, int64_t in, bool features_first_in, const at::Tensor& indices,
                 const int32_t* rowptr, const at::Tensor& weights, const float* bias, int64_t M, Activation act,
                 float* out, bool features_first_out) {
  const Index* col = indices.data_ptr<Index>();
  const float* val = weights.data_ptr<float>();
  if (T <= GATHER_MAX_TOKENS) {
    at::Tensor rows;  // (T, in)
    const float* xr = x;
    if (features_first_in && T > 1) {
      rows = pooled_empty({T, in});
      xr = rows.data_ptr<float>();
      transpose(x, in, T, rows.data_ptr<float>(), in);
    }
    Gathered<Index> job{xr, in, T, rowptr, col, val, bias, act, out,
                        features_first_out ? 1 : M, features_first_out ? T : 1};
    run_gathered(job, M);
    return;
  }
  // Each thread computes a block of output rows from the whole table [x^T; 1]. A table of up to 2 MiB is
  // transposed by every thread into a copy of its own: shared, each thread would read the half the other wrote
  // from the other core's cache (BERT-base's 768x768 at 128 tokens: the shared transpose added 95 us to the
  // product at two threads, 16 us at one; own tables 1.03-1.06x). Each thread transposes the rows it computed
  // into its columns of a token-first result. The table's and the product's rows are padded to whole cache
  // lines (ld): a load that straddles two lines costs two, and 197 tokens (a ViT's) ran 1.5x slower a token
  // than 192 or 208 unpadded. A feature-first input of unaligned rows is copied to a padded table.
  const int64_t ld = (T + 15) / 16 * 16;
  const std::vector<int64_t> bounds = row_blocks(rowptr, M, static_cast<int64_t>(rowptr[M]) * T);
  const int64_t blocks = static_cast<int64_t>(bounds.size()) - 1;
  const bool own_tables =
      !features_first_in && blocks > 1 && in * ld * static_cast<int64_t>(sizeof(float)) <= OWN_TABLE_BYTES;
  at::Tensor table;  // (in, ld), or one a row block when own_tables
  if (!features_first_in) {
    table = own_tables ? pooled_empty({blocks, in, ld}) : pooled_empty({in, ld});
    if (!own_tables) transpose(x, T, in, table.data_ptr<float>(), ld);
  } else if (ld != T) {
    table = pooled_empty({in, ld});
    float* padded = table.data_ptr<float>();
    at::parallel_for(0, in, std::max<int64_t>(1, 16384 / ld), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) std::memcpy(padded + c * ld, x + c * T, sizeof(float) * T);
    });
  }
  at::Tensor product;  // (M, ld)
  if (!features_first_out) product = pooled_empty({M, ld});
  float* target = features_first_out ? out : product.data_ptr<float>();
  const int64_t ldo = features_first_out ? T : ld;
  const Isa isa = current_isa();
  const int64_t ldt = table.defined() ? ld : T;
  // With at least half a column tile of tokens, the table is read in blocks of inputs whose slice of a whole tile
  // is LINEAR_SLICE_BYTES (128 inputs on AVX-512): a thread's rows are swept once per block (channel blocks, as
  // for the 1x1 convs, the weight stored again block by block), the sums between blocks kept in memory. A nonzero
  // then reads its 512-byte row of a 128-token tile from a 64 KiB slice, not from the whole table (393 KB for 768
  // inputs, 1.5 MB for 3072), and the sums stream in order. BERT-base 90%, AMD EPYC Zen 4 (32 KiB L1d, 1 MiB L2),
  // paired against whole tables: slices of 64 KiB 1.14-1.16x at one thread, 1.15x at two; 32 KiB 1.02-1.07x, 96
  // KiB 1.13x, 128 KiB 1.08-1.15x, 256 KiB 1.02-1.16x, 384 KiB 1.06x. AVX2 (204 inputs a block of 80-column
  // tiles), AMD EPYC Zen 3 (32 KiB L1d, 512 KiB L2), end to end against 64 KiB: whole tables 0.85x, 16 KiB
  // 0.87x, 32 KiB 0.96x, 128 KiB 0.94x (before the AVX2 register fix; after it, BERT's shapes alone, 32 and 96
  // KiB 0.80-1.00x). The blocks do not depend on the token count, so inputs of another
  // length reuse them (a layout per length would be rebuilt whenever the length changed).
  std::shared_ptr<const Prepared> blocked;
  const int64_t tile = tile_columns();
  const int64_t block_inputs = LINEAR_SLICE_BYTES / static_cast<int64_t>(sizeof(float)) / tile;
  if (2 * std::min(ldt, tile) >= tile && in > block_inputs) {  // at least two blocks
    blocked = prepared(indices, {-1, in, tile}, weights, [&](Prepared& p) {
      p.off.assign(col, col + rowptr[M]);
      split_by_channel_blocks(rowptr, col, val, M, in, 1, tile, 0, p, block_inputs * tile);
      if (std::is_same_v<Index, int16_t>) {  // kept as compact as the layer's own indices
        p.off16.assign(p.off.begin(), p.off.end());
        std::vector<int32_t>().swap(p.off);
      }
    });
  }
  over_blocks(bounds, [&](int64_t k, int64_t m0, int64_t m1) {
    const float* xt = table.defined() ? table.data_ptr<float>() : x;
    if (own_tables) {
      float* own = table.data_ptr<float>() + k * in * ld;
      transpose_serial(x, T, in, in, own, ld);
      xt = own;
    }
    const Epilogue epi{bias, nullptr, 0, act, target, ldo};
    Product<Index> job{xt, ldt, rowptr, col, val, T, epi};
    if (blocked) use_blocks(*blocked, M, job);
    spmm_rows_on(isa, job, m0, m1);
    if (!features_first_out) transpose_serial(target + m0 * ldo, m1 - m0, T, ldo, out + m0, M);
  });
}

// y = activation(x W^T + b), the activation given by its code (Activation: 0 none, 1 ReLU, 2 GELU). x is
// (..., in), or (in, ...) when features_first_in; the result is (..., out), or (out, ...) when features_first_out.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& indices, const at::Tensor& offsets,
                  const at::Tensor& weights, const c10::optional<at::Tensor>& bias, int64_t out_features,
                  bool features_first_in, bool features_first_out, int64_t activation) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "fxsparse native kernel: float32 input expected, got ",
              x_in.scalar_type());
  TORCH_CHECK(activation >= 0 && activation <= 2, "fxsparse native linear: activation code ", activation,
              " is not 0 (none), 1 (ReLU) or 2 (GELU)");
  const Activation act = static_cast<Activation>(activation);
  TORCH_CHECK(x_in.dim() >= 1, "fxsparse native kernel: the input needs a feature dimension");
  check_csr(indices, offsets, weights, out_features);
  const float* b = optional_data(bias, out_features, "bias");
  const at::Tensor x = x_in.contiguous();
  std::vector<int64_t> lead = x.sizes().vec();
  int64_t in;
  if (features_first_in) {
    in = lead.front();
    lead.erase(lead.begin());
  } else {
    in = lead.back();
    lead.pop_back();
  }
  int64_t T = 1;
  for (int64_t s : lead) T *= s;
  std::vector<int64_t> shape = lead;
  if (features_first_out)
    shape.insert(shape.begin(), out_features);
  else
    shape.push_back(out_features);
  at::Tensor out = pooled_empty(shape);
  if (T == 0 || out_features == 0) return out;
  if (in == 0) {  // no inputs: the bias alone
    out.zero_();
    if (b) {
      if (features_first_out)
        out.view({out_features, T}).add_(bias->view({out_features, 1}));
      else
        out.view({T, out_features}).add_(*bias);
    }
    if (act == Activation::relu) return out.clamp_min_(0);
    return act == Activation::gelu ? at::gelu(out) : out;
  }
  const int32_t* rowptr = offsets.data_ptr<int32_t>();
  if (indices.scalar_type() == at::kShort)
    linear_impl<int16_t>(x.data_ptr<float>(), T, in, features_first_in, indices, rowptr, weights, b,
                         out_features, act, out.data_ptr<float>(), features_first_out);
  else
    linear_impl<int32_t>(x.data_ptr<float>(), T, in, features_first_in, indices, rowptr, weights, b,
                         out_features, act, out.data_ptr<float>(), features_first_out);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// conv2d, direct
// ---------------------------------------------------------------------------------------------------------
int64_t output_extent(int64_t size, int64_t before, int64_t after, int64_t k, int64_t s, int64_t d) {
  return (size + before + after - d * (k - 1) - 1) / s + 1;
}

// rows[n][c][0, Ho Wo) = x[n, c, oh sh, ow sw] (x's rows contiguous: stride(3) == 1), rows[n][c][Ho Wo, ld) = 0
void copy_to_padded_rows(const at::Tensor& x, int64_t sh, int64_t sw, int64_t Ho, int64_t Wo, int64_t ld, float* rows) {
  const int64_t N = x.size(0), C = x.size(1), HW = Ho * Wo;
  const int64_t s_n = x.stride(0), s_c = x.stride(1), s_h = x.stride(2);
  const float* src = x.data_ptr<float>();
  // a channel's pixels contiguous (stride 1): one copy a channel instead of one a row (ResNet-50's 1x1 convs on
  // 1024 channels at 14x14 and 2048 at 7x7: 1.09-1.11x at one and two threads; its other 1x1s 1.00-1.03x)
  const bool whole_channels = sh == 1 && sw == 1 && s_h == Wo;
  at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / ld), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const float* in = src + (nc / C) * s_n + (nc % C) * s_c;
      float* row = rows + nc * ld;
      if (whole_channels) {
        std::memcpy(row, in, sizeof(float) * HW);
      } else {
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const float* r = in + oh * sh * s_h;
          float* o = row + oh * Wo;
          if (sw == 1) {
            std::memcpy(o, r, sizeof(float) * Wo);
          } else {
            for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = r[ow * sw];
          }
        }
      }
      std::fill(row + HW, row + ld, 0.0f);
    }
  });
}

struct ConvGeometry {
  int64_t out_channels, groups;
  std::vector<int64_t> kernel_size, stride, padding, dilation;  // padding: (top, bottom, left, right)
  bool relu;
};

// out (N, O, Ho, Wo), contiguous, written = conv2d(x, W) (+ bias, + residual, ReLU); checked by conv2d()
void conv2d_into(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& weights,
                 const float* b, const float* res, const ConvGeometry& g, const at::Tensor& out);

// out = conv2d(x, W) (+ bias, + residual, ReLU) for a CSR weight of shape (O, C/groups * kh * kw) whose
// columns are (c, i, j) taps of the group's channels. padding is (top, bottom, left, right).
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& offsets,
                  const at::Tensor& weights, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual, int64_t out_channels, int64_t groups,
                  std::vector<int64_t> kernel_size, std::vector<int64_t> stride, std::vector<int64_t> padding,
                  std::vector<int64_t> dilation, bool relu) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fxsparse native kernel: float32 input expected, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "fxsparse native conv2d: expected an (N, C, H, W) input, got ", x.dim(), " dims");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "fxsparse native conv2d: int32 indices expected");
  check_csr(indices, offsets, weights, out_channels);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t pt = padding[0], pb = padding[1], pl = padding[2], pr = padding[3], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(groups >= 1 && C % groups == 0 && out_channels % groups == 0,
              "fxsparse native conv2d: channels not divisible by groups");
  const int64_t Hp = H + pt + pb, Wp = Wd + pl + pr;
  TORCH_CHECK(Hp >= dh * (kh - 1) + 1 && Wp >= dw * (kw - 1) + 1, "Calculated padded input size per channel: (", Hp,
              " x ", Wp, "). Kernel size: (", dh * (kh - 1) + 1, " x ", dw * (kw - 1) + 1,
              "). Kernel size can't be greater than actual input size");
  const int64_t Ho = output_extent(H, pt, pb, kh, sh, dh), Wo = output_extent(Wd, pl, pr, kw, sw, dw);
  at::Tensor out = pooled_empty({N, out_channels, Ho, Wo});
  const float* res = optional_data(residual, N * out_channels * Ho * Wo, "residual");
  const float* b = optional_data(bias, out_channels, "bias");
  if (N == 0 || out_channels == 0) return out;
  conv2d_into(x, indices, offsets, weights, b, res, ConvGeometry{out_channels, groups, kernel_size, stride, padding,
                                                                  dilation, relu}, out);
  return out;
}

void conv2d_into(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& weights,
                 const float* b, const float* res, const ConvGeometry& g, const at::Tensor& out) {
  const int64_t out_channels = g.out_channels, groups = g.groups;
  const Activation act = g.relu ? Activation::relu : Activation::none;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t kh = g.kernel_size[0], kw = g.kernel_size[1], sh = g.stride[0], sw = g.stride[1];
  const int64_t pt = g.padding[0], pb = g.padding[1], pl = g.padding[2], pr = g.padding[3], dh = g.dilation[0],
                dw = g.dilation[1];
  const int64_t Hp = H + pt + pb, Wp = Wd + pl + pr;
  const int64_t Ho = out.size(2), Wo = out.size(3);
  const int32_t* rowptr = offsets.data_ptr<int32_t>();
  const int32_t* col = indices.data_ptr<int32_t>();
  const float* val = weights.data_ptr<float>();
  const int64_t nnz = weights.numel(), taps = kh * kw, cg = C / groups, og = out_channels / groups;

  // a 1x1 unpadded conv reads each sample's (C, Ho*Wo) (a strided one: every sh-th row, sw-th column) as one row
  // per channel, with its epilogue fused; the input is copied to rows of a whole number of cache lines (16
  // floats: a load that straddles two lines costs two) unless it is so already
  const int64_t HW = Ho * Wo;
  if (kh == 1 && kw == 1 && pt == 0 && pb == 0 && pl == 0 && pr == 0 && C * (HW + 15) < (int64_t(1) << 31)) {
    const int64_t ld = (HW + 15) / 16 * 16;
    at::Tensor rows = x;
    if (ld != HW || sh != 1 || sw != 1 || !x.is_contiguous()) {
      rows = pooled_empty({N, C, ld});
      if (x.stride(3) == 1) {  // rows of the input contiguous: one pass, in parallel (torch's copy_ and zero_ of
        // the padding were two, and the zero_ of a strided slice cost as much as the copy at two threads)
        copy_to_padded_rows(x, sh, sw, Ho, Wo, ld, rows.data_ptr<float>());
      } else {  // channels_last: torch's copy transposes in blocks
        rows.as_strided({N, C, Ho, Wo}, {C * ld, ld, Wo, 1}).copy_(x.slice(2, 0, H, sh).slice(3, 0, Wd, sw));
        if (ld != HW) rows.narrow(2, HW, ld - HW).zero_();
      }
    }
    const int64_t tile = tile_columns();
    const auto ready = prepared(indices, {1, ld, cg, og, tile}, weights, [&](Prepared& p) {
      p.off.resize(nnz);
      for (int64_t m = 0; m < out_channels; ++m)
        for (int64_t e = rowptr[m]; e < rowptr[m + 1]; ++e) p.off[e] = static_cast<int32_t>((col[e] + (m / og) * cg) * ld);
      split_by_channel_blocks(rowptr, col, val, out_channels, cg, 1, std::min(ld, tile), MIN_NONZEROS_PER_BLOCK, p);
    });
    Product<int32_t> job{rows.data_ptr<float>(), 1, rowptr, ready->off.data(), val, HW, Epilogue{}};
    use_blocks(*ready, out_channels, job);
    const int64_t image = out_channels * HW;
    for (int64_t n = 0; n < N; ++n) {
      job.x = rows.data_ptr<float>() + n * C * ld;
      job.epi = Epilogue{b, res ? res + n * image : nullptr, HW, act, out.data_ptr<float>() + n * image, HW};
      run_product(job, out_channels);
    }
    return;
  }

  // small outputs of a batch: one sample at a time, each into its slice of the output (each sample's packed input
  // stays in L2: 1.1-1.6x faster at batch 16 on ResNet-50's 14x14 and 7x7 layers than the batch folded into the
  // columns; 28x28 and up: slower)
  if (N > 1 && HW <= 256) {
    const int64_t image = out_channels * HW;
    for (int64_t n = 0; n < N; ++n)
      conv2d_into(x.slice(0, n, n + 1), indices, offsets, weights, b, res ? res + n * image : nullptr, g,
                  out.slice(0, n, n + 1));
    return;
  }

  // phases (a, b) of the stride that some tap reads, each packed as [c][n][Hq][Wq]
  const int64_t Hq = (Hp + sh - 1) / sh, Wq = (Wp + sw - 1) / sw;
  std::vector<int64_t> slot(sh * sw, -1);
  std::vector<std::pair<int64_t, int64_t>> phases;
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t a = (i * dh) % sh, bb = (j * dw) % sw;
      if (slot[a * sw + bb] < 0) {
        slot[a * sw + bb] = static_cast<int64_t>(phases.size());
        phases.emplace_back(a, bb);
      }
    }
  const int64_t plane = N * Hq * Wq, phase_size = C * plane;
  const int64_t total = static_cast<int64_t>(phases.size()) * phase_size;
  if (total >= (int64_t(1) << 31) && N > 1) {  // int32 offsets: split the batch
    const int64_t half = N / 2, image = out_channels * Ho * Wo;
    for (auto range : {std::make_pair(int64_t(0), half), std::make_pair(half, N)})
      conv2d_into(x.slice(0, range.first, range.second), indices, offsets, weights, b,
                  res ? res + range.first * image : nullptr, g, out.slice(0, range.first, range.second));
    return;
  }
  TORCH_CHECK(total < (int64_t(1) << 31), "fxsparse native conv2d: one sample is too large for int32 offsets");
  const int64_t nphases = static_cast<int64_t>(phases.size());
  // the wide output p = (n*Hq + oh)*Wq + ow: stored as it is when it is NCHW (one sample, no extra columns),
  // else each tile row segment by row segment (store_wide)
  const int64_t P = ((N - 1) * Hq + Ho - 1) * Wq + Wo;
  const int64_t tile = tile_columns();
  const auto ready = prepared(indices, {2, N, C, H, Wd, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, groups, tile},
                              weights, [&](Prepared& p) {
    // the offset of each weight column (c, i, j) of a group, looked up per nonzero (no division per nonzero)
    std::vector<int32_t> column_offset(cg * taps);
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t tap = slot[((i * dh) % sh) * sw + (j * dw) % sw] * phase_size + ((i * dh) / sh) * Wq + (j * dw) / sw;
        for (int64_t c = 0; c < cg; ++c) column_offset[c * taps + i * kw + j] = static_cast<int32_t>(c * plane + tap);
      }
    p.off.resize(nnz);
    for (int64_t m = 0; m < out_channels; ++m) {
      const int32_t group_offset = static_cast<int32_t>((m / og) * cg * plane);
      for (int64_t e = rowptr[m]; e < rowptr[m + 1]; ++e) p.off[e] = column_offset[col[e]] + group_offset;
    }
    // a tile's slice of one channel: in each phase, the tile's columns and the rows and columns its taps reach
    const int64_t reach = ((kh - 1) * dh / sh) * Wq + (kw - 1) * dw / sw;
    if (taps > 1)
      split_by_channel_blocks(rowptr, col, val, out_channels, cg, taps, nphases * (std::min(P, tile) + reach), 0, p);
    p.channel_read.assign(C, 0);
    for (int64_t m = 0; m < out_channels; ++m)
      for (int64_t e = rowptr[m]; e < rowptr[m + 1]; ++e) p.channel_read[(m / og) * cg + col[e] / taps] = 1;
    if (std::all_of(p.channel_read.begin(), p.channel_read.end(), [](uint8_t r) { return r != 0; }))
      p.channel_read.clear();
  });
  at::Tensor packed = pooled_empty({total});
  float* xp = packed.data_ptr<float>();
  const float* src = x.data_ptr<float>();
  const int64_t s_n = x.stride(0), s_c = x.stride(1), s_h = x.stride(2), s_w = x.stride(3);
  // only the channels some nonzero reads: a very sparse layer reads a few (ResNet-50's 3x3 layers under the
  // global ST-3-sigma-shaped mask read 3-200 of 64-512; that model 1.095x end to end with the 1x1 blocks above)
  const uint8_t* channel_read = ready->channel_read.empty() ? nullptr : ready->channel_read.data();
  // a few thousand floats per thread at least; the stem's 3 channels x 4 phases (13k floats each) split too
  const int64_t pack_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, plane));
  at::parallel_for(0, nphases * C, pack_grain, [&](int64_t begin, int64_t end) {
    for (int64_t pc = begin; pc < end; ++pc) {
      const int64_t ph = pc / C, c = pc % C, a = phases[ph].first, bb = phases[ph].second;
      if (channel_read && !channel_read[c]) continue;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t r = 0; r < Hq; ++r) {
          float* row = xp + ph * phase_size + c * plane + (n * Hq + r) * Wq;
          const int64_t ih = r * sh + a - pt;
          if (ih < 0 || ih >= H) {
            std::fill(row, row + Wq, 0.0f);
            continue;
          }
          const float* in_row = src + n * s_n + c * s_c + ih * s_h;
          // the columns q whose input column iw = q*sw + bb - pl lies in [0, Wd): [q_lo, q_hi)
          const int64_t q_lo = std::min(Wq, std::max<int64_t>(0, (pl - bb + sw - 1) / sw));
          const int64_t q_hi = std::max(q_lo, std::min(Wq, (Wd - 1 + pl - bb) / sw + 1));
          std::fill(row, row + q_lo, 0.0f);
          std::fill(row + q_hi, row + Wq, 0.0f);
          const float* from = in_row + (q_lo * sw + bb - pl) * s_w;
          if (sw * s_w == 1) {
            std::memcpy(row + q_lo, from, sizeof(float) * (q_hi - q_lo));
          } else {
            const int64_t step = sw * s_w;
            for (int64_t q = q_lo; q < q_hi; ++q) row[q] = from[(q - q_lo) * step];
          }
        }
    }
  });
  Epilogue epi{b, res, Ho * Wo, act, out.data_ptr<float>(), Ho * Wo};
  if (N > 1 || Wq != Wo) epi.Wq = Wq, epi.Hq = Hq, epi.Ho = Ho, epi.Wo = Wo, epi.M = out_channels;
  Product<int32_t> job{xp, 1, rowptr, ready->off.data(), val, P, epi};
  use_blocks(*ready, out_channels, job);
  run_product(job, out_channels);
}

// ---------------------------------------------------------------------------------------------------------
// max pooling (NCHW, float32, dilation 1, floor mode): the max over the window's rows first (contiguous,
// vectorised), then over its columns; NaN propagates as in torch
// ---------------------------------------------------------------------------------------------------------
inline float nan_max(float m, float v) { return (v > m) | (v != v) ? v : m; }  // v != v: NaN; no branch

at::Tensor max_pool2d(const at::Tensor& x_in, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                      std::vector<int64_t> padding) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 4, "fxsparse max_pool2d: (N, C, H, W) float32");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1], ph = padding[0],
                pw = padding[1];
  TORCH_CHECK(2 * ph <= kh && 2 * pw <= kw, "fxsparse max_pool2d: pad should be at most half of the kernel size");
  const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(H + 2 * ph >= kh && W + 2 * pw >= kw && Ho > 0 && Wo > 0, "fxsparse max_pool2d: output size is too small");
  at::Tensor out = pooled_empty({N, C, Ho, Wo});
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // the row maxima sit in `rows` between pw and kw entries of -inf, so every window reads kw entries (a window
  // always holds one input column: pad <= kernel / 2, so -inf never wins over a real value, NaN included); the
  // vector passes read up to 32 floats past the last window
  const int64_t width = (Wo - 1) * sw + kw;
#ifdef FXSPARSE_X86
  const bool vector = current_isa() == Isa::avx512 && sw <= 2;
#else
  const bool vector = false;
#endif
  at::parallel_for(0, N * C, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::max(width, pw + W) + 32, -std::numeric_limits<float>::infinity());
    float* rows = buffer.data();
    for (int64_t plane = begin; plane < end; ++plane) {
      const float* in = src + plane * H * W;
      float* o = dst + plane * Ho * Wo;
      for (int64_t oh = 0; oh < Ho; ++oh) {
        const int64_t i0 = std::max<int64_t>(0, oh * sh - ph), i1 = std::min(H, oh * sh - ph + kh);
        float* line = o + oh * Wo;
        std::copy(in + i0 * W, in + i0 * W + W, rows + pw);
#ifdef FXSPARSE_X86
        if (vector) {
          for (int64_t i = i0 + 1; i < i1; ++i) avx512::pool_rows(rows + pw, in + i * W, W);
          avx512::pool_columns(rows, kw, sw, Wo, line);
          continue;
        }
#endif
        for (int64_t i = i0 + 1; i < i1; ++i) {
          const float* r = in + i * W;
          for (int64_t w = 0; w < W; ++w) rows[pw + w] = nan_max(rows[pw + w], r[w]);
        }
        for (int64_t ow = 0; ow < Wo; ++ow) line[ow] = rows[ow * sw];
        for (int64_t j = 1; j < kw; ++j)
          for (int64_t ow = 0; ow < Wo; ++ow) line[ow] = nan_max(line[ow], rows[ow * sw + j]);
      }
    }
  });
  return out;
}

// softmax(scale q k^T + mask) v for q (B, H, Sq, D), k and v (B, H, Sk, D), mask (additive, float32) broadcast to
// (B, H, Sq, Sk) or none; returns (B, Sq, H, D), the layout a transformer's output projection reads. AVX-512 or
// AVX2 (attention_simd.h); attention.py calls torch's attention elsewhere.
at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const c10::optional<at::Tensor>& mask_in, double scale) {
#ifdef FXSPARSE_X86
  const Isa isa = current_isa();
  TORCH_CHECK(isa == Isa::avx512 || isa == Isa::avx2,
              "fxsparse attention: needs AVX-512 or AVX2 (use torch's attention)");
  auto last_contiguous = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4, "fxsparse attention: (B, H, S, D) float32 inputs");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2), D = q.size(3);
  TORCH_CHECK(D % 16 == 0 && D > 0, "fxsparse attention: the head dimension must be a multiple of 16");
  TORCH_CHECK(k.sizes() == at::IntArrayRef({B, H, Sk, D}) && v.sizes() == k.sizes(),
              "fxsparse attention: k and v must be (B, H, Sk, D) with q's B, H and D");
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->scalar_type() == at::kFloat, "fxsparse attention: an additive float32 mask");
    mask = mask_in->expand({B, H, Sq, Sk});
    if (mask.stride(3) != 1) mask = mask.contiguous();
  }
  at::Tensor out = at::empty({B, Sq, H, D}, q.options());
  if (out.numel() == 0) return out;
  if (Sk == 0) return out.zero_();
  const Attention a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                      mask.defined() ? mask.data_ptr<float>() : nullptr, out.data_ptr<float>(), B, H, Sq, Sk, D,
                      {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                      {v.stride(0), v.stride(1), v.stride(2)},
                      {mask.defined() ? mask.stride(0) : 0, mask.defined() ? mask.stride(1) : 0,
                       mask.defined() ? mask.stride(2) : 0},
                      static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    if (isa == Isa::avx512)
      avx512::attention_heads(a, begin, end);
    else
      avx2::attention_heads(a, begin, end);
  });
  return out;
#else
  TORCH_CHECK(false, "fxsparse attention: needs AVX-512 or AVX2 (use torch's attention)");
#endif
}

// Set the calling thread's intra-op thread count (torch.set_num_threads sets every thread's) and return it: the
// workers of batch_split.py each run the kernels on one thread. Returns torch's count unchanged without OpenMP.
int64_t set_thread_count(int64_t threads) {
  TORCH_CHECK(threads >= 1, "fxsparse set_thread_count: at least one thread");
  // torch's lazy per-thread initialisation first, which would set the count back later: libtorch's (behind
  // get_num_threads) and this library's own inline copy (behind at::parallel_for here)
  at::get_num_threads();
  at::internal::lazy_init_num_threads();
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(threads));
#endif
  return at::get_num_threads();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the kernels run without the GIL, so that batch_split.py's workers run side by side
  const auto without_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "sparse linear (CSR weight), float32", without_gil);
  m.def("conv2d", &conv2d, "direct sparse conv2d (CSR weight), float32", without_gil);
  m.def("max_pool2d", &max_pool2d, "max pooling, NCHW float32", without_gil);
  m.def("attention", &attention, "softmax(scale q k^T + mask) v, float32, AVX-512 or AVX2; (B, Sq, H, D) out", without_gil);
  m.def("kept_bytes", &kept_bytes, "the bytes the kernels keep for the live weights (offsets, blocks)");
  m.def("release_buffers", &release_buffers, "free the pooled activation buffers; returns the bytes held");
  m.def("set_pool_limit", &set_pool_limit, "fix the buffer pool's limit in bytes (-1: adaptive); returns the old one");
  m.def("set_thread_count", &set_thread_count, "set this thread's intra-op thread count; returns it");
  m.def("isa", &isa, "the instruction set in use");
  m.def("force_isa", &force_isa, "select avx512, avx2, portable or auto");
}
