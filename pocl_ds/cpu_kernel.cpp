// Native CPU rows of the divergence kernel: jsd without labels, fp32, AVX2 (see cpu_kernel.py).
//
// The formulas are those of `_block_divergence_` in divergence.py, kind "jsd", row by row:
//   q = exp(s - max s) / Zq, p = exp(t - max t) / Zp   (the student's and the teacher's)
//   d = log p - log q, capped at L                       (exactly 0 where p = q)
//   e = m/q - 1 = beta*(p_exp/q_exp)*(Zq/Zp) - beta     (0/0 -> 0, capped at `cap`)
//   f = log1p(e) = log m - log q
//   D = beta*sum p*(d - f) - (1 - beta)*sum q*f
//   dD/ds = factor * (f - sum q*f) * q_exp,  factor = -(1 - beta)/Zq
// Eager PyTorch writes each intermediate of a block back to memory; here a row takes four
// sweeps (max, exponentials, the divergence, the gradient), each in registers.
//
// exp: ATen's exp_u20 (within 20 ulp, about 1e-6 relative; the one its CPU attention
// kernels use), chosen over Sleef's 1-ulp exp for speed: in a prototype the rows took 2.27
// instead of 2.67 ns/element on two lanes. The jsd loss stays within 1e-5 of float64
// (tests/test_cpu_kernel.py; measured up to 3.4e-6, the eager blocks up to 1.4e-6) and the
// gradients as close to float64 as the eager blocks' (the sums' rounding dominates). It flushes
// arguments below ln(FLT_MIN) to 0, where Sleef goes on into denormals: such tokens take the
// 0/0 and capped-ratio paths, as in the eager blocks a little further down. The same exp is
// applied to s and t at every position, so p = q still gives exactly 0.
//
// Sums: each run of kBlock vectors is added in a vector, and the runs in double, so the error
// stays near torch's own cascade sums (a plain float accumulator over 50k terms put the
// gradient 3.8e-4 of its largest entry from float64, against 4.9e-6 now). A row's sums never
// depend on the thread that runs it.

#include <torch/extension.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();
constexpr int64_t kBlock = 32;  // vectors per partial sum

float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

float max_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v);
}

struct RowResult {
  double divergence;
  float factor;
};

// One row: s, t [V] scaled logits (s is overwritten with G'); q_exp, p_exp [V] scratch.
RowResult jsd_row(float* s, const float* t, float* q_exp, float* p_exp, int64_t V, float beta,
                  float max_log_ratio, float cap) {
  const int64_t vec_end = V - V % kWidth;

  Vec vs_max(-std::numeric_limits<float>::infinity()), vt_max(vs_max);
  for (int64_t v = 0; v < vec_end; v += kWidth) {
    vs_max = at::vec::maximum(vs_max, Vec::loadu(s + v));
    vt_max = at::vec::maximum(vt_max, Vec::loadu(t + v));
  }
  float s_max = max_lanes(vs_max), t_max = max_lanes(vt_max);
  for (int64_t v = vec_end; v < V; ++v) {
    s_max = std::max(s_max, s[v]);
    t_max = std::max(t_max, t[v]);
  }

  double q_total = 0.0, p_total = 0.0;
  const Vec vs_shift(s_max), vt_shift(t_max);
  for (int64_t v = 0; v < vec_end;) {
    Vec q_part(0.f), p_part(0.f);
    for (int64_t n = 0; n < kBlock && v < vec_end; ++n, v += kWidth) {
      const Vec q = (Vec::loadu(s + v) - vs_shift).exp_u20();
      const Vec p = (Vec::loadu(t + v) - vt_shift).exp_u20();
      q.store(q_exp + v);
      p.store(p_exp + v);
      q_part = q_part + q;
      p_part = p_part + p;
    }
    q_total += sum_lanes(q_part);
    p_total += sum_lanes(p_part);
  }
  for (int64_t v = vec_end; v < V; ++v) {
    q_exp[v] = std::exp(s[v] - s_max);
    p_exp[v] = std::exp(t[v] - t_max);
    q_total += q_exp[v];
    p_total += p_exp[v];
  }
  const float zq = static_cast<float>(q_total), zp = static_cast<float>(p_total);
  const float log_ratio_shift = std::log(zq) - std::log(zp);  // log Zq - log Zp
  const float ratio_scale = beta * (zq / zp);

  // f into s; Σ p_exp·(d − f) and Σ q_exp·f alongside
  double kl_p = 0.0, q_dot_f = 0.0;
  const Vec v_shift(log_ratio_shift), v_cap_d(max_log_ratio), v_scale(ratio_scale),
      v_beta(beta), v_cap(cap), zero(0.f);
  for (int64_t v = 0; v < vec_end;) {
    Vec kl_part(0.f), qf_part(0.f);
    for (int64_t n = 0; n < kBlock && v < vec_end; ++n, v += kWidth) {
      const Vec p = Vec::loadu(p_exp + v), q = Vec::loadu(q_exp + v);
      const Vec d = at::vec::minimum(
          ((Vec::loadu(t + v) - vt_shift) - (Vec::loadu(s + v) - vs_shift)) + v_shift, v_cap_d);
      Vec e = p / q * v_scale - v_beta;
      e = at::vec::minimum(Vec::blendv(e, zero, e != e), v_cap);  // 0/0 -> 0; inf -> cap
      const Vec f = e.log1p();
      kl_part = kl_part + p * (d - f);
      qf_part = qf_part + q * f;
      f.store(s + v);
    }
    kl_p += sum_lanes(kl_part);
    q_dot_f += sum_lanes(qf_part);
  }
  for (int64_t v = vec_end; v < V; ++v) {
    const float d = std::min(((t[v] - t_max) - (s[v] - s_max)) + log_ratio_shift, max_log_ratio);
    float e = p_exp[v] / q_exp[v] * ratio_scale - beta;
    e = std::min(std::isnan(e) ? 0.f : e, cap);
    const float f = std::log1p(e);
    kl_p += p_exp[v] * (d - f);
    q_dot_f += q_exp[v] * f;
    s[v] = f;
  }

  const float c = static_cast<float>(q_dot_f / q_total);  // Σ q·f
  const Vec vc(c);
  for (int64_t v = 0; v < vec_end; v += kWidth) {
    ((Vec::loadu(s + v) - vc) * Vec::loadu(q_exp + v)).store(s + v);
  }
  for (int64_t v = vec_end; v < V; ++v) s[v] = (s[v] - c) * q_exp[v];

  return {beta * (kl_p / p_total) - (1.0 - beta) * (q_dot_f / q_total), -(1.f - beta) / zq};
}

// Rows of s, t [R, V] (contiguous fp32): s <- G', factor [R, 1] <- its row factors; returns
// Σ D over the rows, added in row order.
double jsd_rows_(torch::Tensor s, torch::Tensor t, torch::Tensor factor, double beta,
                 double max_log_ratio, double cap) {
  TORCH_CHECK(s.dtype() == torch::kFloat32 && t.dtype() == torch::kFloat32 &&
                  factor.dtype() == torch::kFloat32,
              "jsd_rows_: fp32 only");
  TORCH_CHECK(s.dim() == 2 && s.sizes() == t.sizes() && factor.numel() == s.size(0),
              "jsd_rows_: s and t must be [rows, V] and factor [rows, 1]");
  TORCH_CHECK(s.is_contiguous() && t.is_contiguous() && factor.is_contiguous(),
              "jsd_rows_: contiguous tensors only");
  const int64_t rows = s.size(0), V = s.size(1);
  float* s_ptr = s.data_ptr<float>();
  const float* t_ptr = t.data_ptr<float>();
  float* factor_ptr = factor.data_ptr<float>();
  std::vector<float> q_exp(V), p_exp(V);
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const RowResult row = jsd_row(s_ptr + r * V, t_ptr + r * V, q_exp.data(), p_exp.data(), V,
                                  static_cast<float>(beta), static_cast<float>(max_log_ratio),
                                  static_cast<float>(cap));
    total += row.divergence;
    factor_ptr[r] = row.factor;
  }
  return total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released: the kernel's lanes run their rows on their own Python threads.
  m.def("jsd_rows_", &jsd_rows_, py::call_guard<py::gil_scoped_release>());
}
