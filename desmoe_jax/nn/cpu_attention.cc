// Causal attention for XLA:CPU, forward and backward, float32: one XLA FFI custom call each
// (desmoe_jax/nn/cpu_attention.py builds this file with the host's C++ compiler and registers it).
//
// Why a kernel: on XLA:CPU the blocked attention (nn/blocked_attention.py) is half of the tiny
// model's train step. Its score products contract over the head dims (48 and 32 on the tiny
// model), thin products that XLA's dot runs far below the machine's matmul speed, and every
// elementwise pass goes over [B, H, 256, <=1024] float32 blocks in memory. Here the scores of
// one 64 x 64 tile live in the cache between the products, and one register-tiled loop does the
// products (bench/RESULTS.md, "sixth round").
//
// Semantics are blocked_attention.py's (the einsum reference's to float32 rounding): softmax of
// q k^T * scale over the keys the mask allows, in float32; a query whose row of the mask has no
// key gets the mean of V over all S keys, and passes its gradient to V alone (1/S to every key).
// The mask must be causal: tiles of keys after a query tile are never read.
//
// Layouts are the model's: q, k [B, S, H, D], v [B, S, H, Dv], mask [B, 1, S, S] (bool), out
// [B, S, H, Dv], lse [B, H, S] (the row's log-sum-exp of the scaled scores, +inf for a row
// without a key). D and Dv must be multiples of 16 (the Python side checks, and falls back).
// The work is split by (batch, head) over XLA's intra-op thread pool; each (batch, head) writes
// only its own rows, so the outputs need no reduction across threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int kTile = 64;  // queries and keys per tile: a 16 KiB score tile stays in L1/L2
constexpr float kInf = std::numeric_limits<float>::infinity();

inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store8(float* p, v8f x) { std::memcpy(p, &x, sizeof(x)); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// exp(x) for 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial),
// within 2 ulp of the true value over the normal range; x <= -88 gives 0 exactly.
inline v8f exp8(v8f x) {
  const v8f hi = splat(88.3762626647949f), lo = splat(-88.0f);
  v8f zero = splat(0.0f);
  v8i under = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v8f shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v8f t = x * splat(1.44269504088896341f) + shifter;
  v8f n = t - shifter;
  v8i ni = (v8i)t - (v8i)shifter;
  v8f r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  v8i bits = (ni + 127) << 23;
  v8f scale = (v8f)bits;
  v8f y = p * scale;
  return under ? zero : y;
}

inline float hsum8(v8f x) {
  float a[8];
  std::memcpy(a, &x, sizeof(a));
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}
inline float hmax8(v8f x) {
  float a[8];
  std::memcpy(a, &x, sizeof(a));
  return std::max(std::max(std::max(a[0], a[1]), std::max(a[2], a[3])),
                  std::max(std::max(a[4], a[5]), std::max(a[6], a[7])));
}

// C[MR, 16] (+)= A[MR, K] B[K, 16]: A read as scalars (any strides), B and C rows of 16
// contiguous floats. MR <= 6 keeps the 12 accumulators and two B vectors in 16 registers.
template <int MR>
inline void micro(int K, const float* A, int64_t a_sm, int64_t a_sk, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool acc) {
  v8f c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    if (acc) {
      c0[r] = load8(C + r * ldc);
      c1[r] = load8(C + r * ldc + 8);
    } else {
      c0[r] = splat(0.0f);
      c1[r] = splat(0.0f);
    }
  }
  for (int k = 0; k < K; ++k) {
    const v8f b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + 8);
    const float* a = A + k * a_sk;
    for (int r = 0; r < MR; ++r) {
      const v8f ar = splat(a[r * a_sm]);
      c0[r] += ar * b0;
      c1[r] += ar * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(C + r * ldc, c0[r]);
    store8(C + r * ldc + 8, c1[r]);
  }
}

// C[M, N] (+)= A[M, K] B[K, N], N a multiple of 16. A(m, k) = A[m * a_sm + k * a_sk]; B and C
// row-major with leading dimensions ldb, ldc. The sum over k runs in order.
void gemm(int M, int N, int K, const float* A, int64_t a_sm, int64_t a_sk, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool acc) {
  for (int n = 0; n < N; n += 16) {
    int m = 0;
    for (; m + 6 <= M; m += 6)
      micro<6>(K, A + m * a_sm, a_sm, a_sk, B + n, ldb, C + m * ldc + n, ldc, acc);
    const float* a = A + m * a_sm;
    float* c = C + m * ldc + n;
    switch (M - m) {
      case 5: micro<5>(K, a, a_sm, a_sk, B + n, ldb, c, ldc, acc); break;
      case 4: micro<4>(K, a, a_sm, a_sk, B + n, ldb, c, ldc, acc); break;
      case 3: micro<3>(K, a, a_sm, a_sk, B + n, ldb, c, ldc, acc); break;
      case 2: micro<2>(K, a, a_sm, a_sk, B + n, ldb, c, ldc, acc); break;
      case 1: micro<1>(K, a, a_sm, a_sk, B + n, ldb, c, ldc, acc); break;
      default: break;
    }
  }
}

// Runs f(0..n-1) on the calling thread and up to num_threads - 1 of XLA's pool threads. The
// caller waits only for items already claimed, so a pool whose threads are all busy (or absent:
// Schedule then runs the task inline) cannot deadlock it; a task that starts after the last item
// touches only the shared counters.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int n, const F& f) {
  struct State {
    std::atomic<int> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  // A task that starts after the last item touches only `st` (shared), never f (the caller's
  // frame may be gone by then): it sees next >= n first.
  auto work = [st, n, fp = &f]() {
    for (int i; (i = st->next.fetch_add(1)) < n;) {
      (*fp)(i);
      if (st->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), n)) - 1;
  for (int t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

struct Dims {
  int64_t B, S, H, D, Dv;
};

// x [S, D] rows with stride ld -> xt in tiles of kTile keys, [S / kTile][D][kTile] (the last
// tile padded with zeros): the score products read one tile's [D, kTile] rows 256 bytes apart.
// A plain [D, S] copy puts them S floats apart, which for S = 1024 is 4 KiB, and every row of
// the tile then falls in the same L1 set.
void transpose_tiles(const float* x, int64_t ld, int64_t S, int64_t D, float* xt) {
  for (int64_t j0 = 0; j0 < S; j0 += kTile) {
    float* t = xt + j0 * D;
    const int64_t nj = std::min<int64_t>(kTile, S - j0);
    if (nj < kTile) std::fill(t, t + D * kTile, 0.0f);
    for (int64_t n = 0; n < nj; ++n)
      for (int64_t d = 0; d < D; ++d) t[d * kTile + n] = x[(j0 + n) * ld + d];
  }
}

// Rows of one head, [S, D] with stride ld -> contiguous [S, D].
void pack(const float* x, int64_t ld, int64_t S, int64_t D, float* out) {
  for (int64_t n = 0; n < S; ++n) std::memcpy(out + n * D, x + n * ld, D * sizeof(float));
}
void unpack(const float* x, int64_t S, int64_t D, float* out, int64_t ld) {
  for (int64_t n = 0; n < S; ++n) std::memcpy(out + n * ld, x + n * D, D * sizeof(float));
}

// mask bytes of 8 keys -> lanes true (-1) where the key is allowed (one zero-extending load).
inline v8i mask8(const bool* m) {
  typedef uint8_t v8u __attribute__((vector_size(8)));
  v8u bytes;
  std::memcpy(&bytes, m, sizeof(bytes));
  return __builtin_convertvector(bytes, v8i) != 0;
}

// Per-thread scratch that persists across calls: no allocation (and no fresh pages) per step.
float* scratch(int slot, size_t n) {
  thread_local std::vector<float> bufs[8];
  if (bufs[slot].size() < n) bufs[slot].resize(n);
  return bufs[slot].data();
}

inline int64_t padded(int64_t S) { return (S + kTile - 1) / kTile * kTile; }

void forward_head(const Dims& dm, const float* q, const float* k, const float* v,
                  const bool* mask, float* out, float* lse, float scale, int64_t bh) {
  const int64_t S = dm.S, H = dm.H, D = dm.D, Dv = dm.Dv;
  const int64_t b = bh / H, h = bh % H, qs = H * D, vs = H * Dv;
  const int64_t qoff = (b * S * H + h) * D, voff = (b * S * H + h) * Dv;
  float* lb = lse + bh * S;
  const bool* mb = mask + b * S * S;

  float* qh = scratch(0, S * D);          // [S, D]
  float* kt = scratch(1, padded(S) * D);  // [S / kTile][D][kTile]
  float* vh = scratch(2, S * Dv);         // [S, Dv]
  float* st = scratch(3, kTile * kTile);  // scores, then probabilities, of one tile
  float* acc = scratch(4, kTile * Dv);    // unnormalised output of one query tile
  float* mrow = scratch(5, 2 * kTile);    // running row max, and sum of exponentials
  float* lrow = mrow + kTile;
  float* mean_v = scratch(6, Dv);
  pack(q + qoff, qs, S, D, qh);
  pack(v + voff, vs, S, Dv, vh);
  transpose_tiles(k + qoff, qs, S, D, kt);
  std::fill(mean_v, mean_v + Dv, 0.0f);
  for (int64_t n = 0; n < S; ++n)
    for (int64_t c = 0; c < Dv; ++c) mean_v[c] += vh[n * Dv + c];
  for (int64_t c = 0; c < Dv; ++c) mean_v[c] /= static_cast<float>(S);

  for (int64_t i0 = 0; i0 < S; i0 += kTile) {
    const int ni = static_cast<int>(std::min<int64_t>(kTile, S - i0));
    std::fill(mrow, mrow + ni, -kInf);
    std::fill(lrow, lrow + ni, 0.0f);
    std::fill(acc, acc + ni * Dv, 0.0f);
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const int nj = static_cast<int>(std::min<int64_t>(kTile, S - j0));
      gemm(ni, nj, D, qh + i0 * D, D, 1, kt + j0 * D, kTile, st, kTile, false);
      for (int r = 0; r < ni; ++r) {
        float* srow = st + r * kTile;
        const bool* mr = mb + (i0 + r) * S + j0;
        v8f vmax = splat(-kInf);
        for (int c = 0; c < nj; c += 8) {
          v8f x = load8(srow + c) * splat(scale);
          x = mask8(mr + c) ? x : splat(-kInf);
          store8(srow + c, x);
          vmax = x > vmax ? x : vmax;
        }
        const float mnew = std::max(mrow[r], hmax8(vmax));
        if (mnew == -kInf) {  // no key yet in this row
          std::fill(srow, srow + nj, 0.0f);
          continue;
        }
        if (mrow[r] != mnew) {
          const float corr = mrow[r] == -kInf ? 0.0f : std::exp(mrow[r] - mnew);
          lrow[r] *= corr;
          for (int64_t c = 0; c < Dv; c += 8)
            store8(acc + r * Dv + c, load8(acc + r * Dv + c) * splat(corr));
          mrow[r] = mnew;
        }
        v8f vsum = splat(0.0f);
        for (int c = 0; c < nj; c += 8) {
          const v8f x = load8(srow + c);
          v8f p = exp8(x - splat(mnew));
          p = x == splat(-kInf) ? splat(0.0f) : p;
          store8(srow + c, p);
          vsum += p;
        }
        lrow[r] += hsum8(vsum);
      }
      gemm(ni, Dv, nj, st, kTile, 1, vh + j0 * Dv, Dv, acc, Dv, true);
    }
    for (int r = 0; r < ni; ++r) {
      float* orow = out + voff + (i0 + r) * vs;
      if (mrow[r] == -kInf) {  // a row without a key: the mean of V
        std::memcpy(orow, mean_v, Dv * sizeof(float));
        lb[i0 + r] = kInf;
      } else {
        for (int64_t c = 0; c < Dv; ++c) orow[c] = acc[r * Dv + c] / lrow[r];
        lb[i0 + r] = mrow[r] + std::log(lrow[r]);
      }
    }
  }
}

void backward_head(const Dims& dm, const float* q, const float* k, const float* v,
                   const bool* mask, const float* out, const float* lse, const float* g,
                   float* dq, float* dk, float* dv, float scale, int64_t bh) {
  const int64_t S = dm.S, H = dm.H, D = dm.D, Dv = dm.Dv;
  const int64_t b = bh / H, h = bh % H, qs = H * D, vs = H * Dv;
  const int64_t qoff = (b * S * H + h) * D, voff = (b * S * H + h) * Dv;
  const float* lb = lse + bh * S;
  const bool* mb = mask + b * S * S;

  // [S, D] / [S, Dv] copies of this head's q, k, g and its gradient accumulators; K and V also
  // transposed in tiles for the two score-shaped products.
  float* qh = scratch(0, S * (3 * D + 2 * Dv));
  float* kh = qh + S * D;
  float* dqh = kh + S * D;
  float* gh = dqh + S * D;
  float* dvh = gh + S * Dv;
  float* kt = scratch(1, padded(S) * (D + Dv));
  float* vt = kt + padded(S) * D;
  float* dkh = scratch(2, S * D);
  float* pt = scratch(3, 2 * kTile * kTile);
  float* ds = pt + kTile * kTile;
  float* delta = scratch(4, S);
  float* ginv = scratch(6, Dv);
  pack(q + qoff, qs, S, D, qh);
  pack(k + qoff, qs, S, D, kh);
  pack(g + voff, vs, S, Dv, gh);
  transpose_tiles(k + qoff, qs, S, D, kt);
  transpose_tiles(v + voff, vs, S, Dv, vt);
  std::fill(dqh, dqh + S * D, 0.0f);
  std::fill(dkh, dkh + S * D, 0.0f);
  std::fill(dvh, dvh + S * Dv, 0.0f);
  std::fill(ginv, ginv + Dv, 0.0f);
  for (int64_t m = 0; m < S; ++m) {
    const float* grow = gh + m * Dv;
    const float* orow = out + voff + m * vs;
    float s = 0.0f;
    if (lb[m] == kInf) {  // mean(V): its gradient goes to every key's V
      for (int64_t c = 0; c < Dv; ++c) ginv[c] += grow[c];
    } else {
      for (int64_t c = 0; c < Dv; ++c) s += grow[c] * orow[c];
    }
    delta[m] = s;  // rowsum(dprobs * probs) = g . out
  }

  for (int64_t j0 = 0; j0 < S; j0 += kTile) {
    const int nj = static_cast<int>(std::min<int64_t>(kTile, S - j0));
    for (int64_t i0 = j0; i0 < S; i0 += kTile) {
      const int ni = static_cast<int>(std::min<int64_t>(kTile, S - i0));
      gemm(ni, nj, D, qh + i0 * D, D, 1, kt + j0 * D, kTile, pt, kTile, false);
      for (int r = 0; r < ni; ++r) {
        float* prow = pt + r * kTile;
        const bool* mr = mb + (i0 + r) * S + j0;
        const v8f l = splat(lb[i0 + r]);
        for (int c = 0; c < nj; c += 8) {
          v8f p = exp8(load8(prow + c) * splat(scale) - l);
          p = mask8(mr + c) ? p : splat(0.0f);
          store8(prow + c, p);
        }
      }
      // dV_j += P^T g_i
      gemm(nj, Dv, ni, pt, 1, kTile, gh + i0 * Dv, Dv, dvh + j0 * Dv, Dv, true);
      // dP = g_i V_j^T
      gemm(ni, nj, Dv, gh + i0 * Dv, Dv, 1, vt + j0 * Dv, kTile, ds, kTile, false);
      for (int r = 0; r < ni; ++r) {
        const v8f dl = splat(delta[i0 + r]);
        for (int c = 0; c < nj; c += 8) {
          const v8f p = load8(pt + r * kTile + c);
          v8f x = p * (load8(ds + r * kTile + c) - dl);
          x = p == splat(0.0f) ? splat(0.0f) : x;
          store8(ds + r * kTile + c, x * splat(scale));
        }
      }
      // dQ_i += dS K_j ; dK_j += dS^T Q_i
      gemm(ni, D, nj, ds, kTile, 1, kh + j0 * D, D, dqh + i0 * D, D, true);
      gemm(nj, D, ni, ds, 1, kTile, qh + i0 * D, D, dkh + j0 * D, D, true);
    }
  }
  for (int64_t c = 0; c < Dv; ++c) ginv[c] /= static_cast<float>(S);
  for (int64_t m = 0; m < S; ++m)
    for (int64_t c = 0; c < Dv; ++c) dvh[m * Dv + c] += ginv[c];
  unpack(dqh, S, D, dq + qoff, qs);
  unpack(dkh, S, D, dk + qoff, qs);
  unpack(dvh, S, Dv, dv + voff, vs);
}

ffi::Error check_dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& v,
                      const ffi::Buffer<ffi::PRED>& mask, Dims* dm) {
  auto qd = q.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || vd.size() != 4 || md.size() != 4)
    return ffi::Error::InvalidArgument("cpu_attention: q, v, mask must be rank 4");
  *dm = Dims{qd[0], qd[1], qd[2], qd[3], vd[3]};
  if (dm->D % 16 || dm->Dv % 16 || dm->S % 16)
    return ffi::Error::InvalidArgument("cpu_attention: head dims must be multiples of 16, S of 16");
  if (md[0] != dm->B || md[1] != 1 || md[2] != dm->S || md[3] != dm->S)
    return ffi::Error::InvalidArgument("cpu_attention: mask must be [B, 1, S, S]");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   float scale) {
  Dims dm;
  if (auto e = check_dims(q, v, mask, &dm); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, static_cast<int>(dm.B * dm.H), [&](int bh) {
    forward_head(dm, qp, kp, vp, mp, op, lp, scale, bh);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    float scale) {
  Dims dm;
  if (auto e = check_dims(q, v, mask, &dm); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = g.typed_data();
  const bool* mp = mask.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, static_cast<int>(dm.B * dm.H), [&](int bh) {
    backward_head(dm, qp, kp, vp, mp, op, lp, gp, dqp, dkp, dvp, scale, bh);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DesmoeCausalAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DesmoeCausalAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
