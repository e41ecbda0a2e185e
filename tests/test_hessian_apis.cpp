#define BOOST_TEST_MODULE hessian_apis
#include "test_util.hpp"

// Every public entry point of include/hesse/hessian.hpp, driven from one table
// (entry_points()): each result against central finite differences of
// hesse's own gradients (every block, the mirrored lower ones too, and
// symmetry), and each bad input refused with the specific hesse error naming
// the api and the offending name, shape or byte count.

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <typeinfo>
#include <vector>

#include <boost/core/demangle.hpp>
#include <xtensor-blas/xlinalg.hpp>

using namespace hesse;
using hesse::testing::LossCase;
using hesse::testing::max_abs_diff;

namespace {

// ---------------------------------------------------------------- the entry points

/// One request's arguments; each entry point takes those it needs.
struct Request {
  nn::Module& model;
  Criterion criterion;
  std::vector<Tensor> inputs;
  Tensor target;
  Tensor v;  // [k, n]: the vectors hessian_vector_product multiplies
  HessianOptions options;
};

/// Whose Hessians an entry point gives: each model output entry's, the loss's, each sample's loss's.
enum class Of { model, loss, sample_loss };
/// What it gives of them: the matrices (a dict is put together as one), H vᵀ, diag H, max |λ|.
enum class Form { matrices, product, diagonal, sharpness };

struct EntryPoint {
  std::string label;  // the api, as its messages name it, then the variant
  Of of;
  Form form;
  bool dense;  // refuses a result over the memory limit
  std::function<Tensor(const Request&)> call;

  std::string api() const { return label.substr(0, label.find(' ')); }
};

HessianOptions whole(HessianOptions o) {  // is_batch off: one Hessian per entry of model(all inputs)
  o.is_batch = false;
  return o;
}

/// A dict's blocks put together as one stack lead + [n, n], θ in the dict's name order;
/// each block must have shape lead + P.shape + Q.shape and every (P, Q) must be there.
Tensor assembled(const HessianDict& d, const nn::Module& m) {
  const std::vector<std::string>& names = d.names();
  std::vector<Shape> shapes;
  std::vector<std::size_t> off{0};
  for (const std::string& p : names) {
    shapes.push_back(m.parameter(p).shape());
    off.push_back(off.back() + m.parameter(p).numel());
  }
  BOOST_REQUIRE_EQUAL(d.blocks().size(), names.size() * names.size());
  const Shape& first = d(names[0], names[0]).shape();
  const Shape lead(first.begin(), first.end() - 2 * shapes[0].size());
  const std::size_t n = off.back(), entries = numel_of(lead);
  Shape full = lead;
  full.insert(full.end(), {n, n});
  Tensor out = zeros(full);
  for (std::size_t p = 0; p < names.size(); ++p)
    for (std::size_t q = 0; q < names.size(); ++q) {
      const Tensor& block = d(names[p], names[q]);
      Shape expect = lead;
      expect.insert(expect.end(), shapes[p].begin(), shapes[p].end());
      expect.insert(expect.end(), shapes[q].begin(), shapes[q].end());
      BOOST_REQUIRE_MESSAGE(block.shape() == expect, "block (" << names[p] << ", " << names[q] << ") has shape "
                                                                << to_string(block.shape()));
      const std::size_t rows = off[p + 1] - off[p], cols = off[q + 1] - off[q];
      for (std::size_t e = 0; e < entries; ++e)
        for (std::size_t i = 0; i < rows; ++i)
          std::copy_n(block.data() + (e * rows + i) * cols, cols,
                      out.mutable_data() + (e * n + off[p] + i) * n + off[q]);
    }
  return out;
}

/// Silences notices for its lifetime, counting them.
struct NoticeCounter {
  int count = 0;
  NoticeHandler before = set_notice_handler([this](const std::string&) { ++count; });
  ~NoticeCounter() { set_notice_handler(before); }
};

/// A sharpness request with the dense limit at 8 bytes: the matrix-free (Lanczos) route, which must say so.
Tensor matrix_free(const Request& r, const std::function<Tensor(const HessianOptions&)>& sharpness) {
  HessianOptions o = r.options;
  o.max_bytes = 8;
  o.matrix_free_fallback = true;
  NoticeCounter notices;
  const Tensor out = sharpness(o);
  BOOST_CHECK_MESSAGE(notices.count > 0, "no notice of the switch to Lanczos");
  return out;
}

/// hessian_vector_product with each v [n] on its own, rows stacked as [k, n].
Tensor one_v_at_a_time(const Request& r) {
  std::vector<Tensor> rows;
  for (std::size_t a = 0; a < r.v.shape()[0]; ++a) {
    const Tensor v = reshape(slice(r.v, 0, std::int64_t(a), std::int64_t(a) + 1), Shape{r.v.shape()[1]});
    rows.push_back(unsqueeze(hessian_vector_product(r.model, r.criterion, r.inputs, r.target, v, r.options), 0));
  }
  return concatenate(rows, 0);
}

const std::vector<EntryPoint>& entry_points() {
  using R = const Request&;
  static const std::vector<EntryPoint> table = {
      {"model_hessian_matrix", Of::model, Form::matrices, true,
       [](R r) { return model_hessian_matrix(r.model, r.inputs, r.options); }},
      {"model_hessian_matrix (whole batch)", Of::model, Form::matrices, true,
       [](R r) { return model_hessian_matrix(r.model, r.inputs, whole(r.options)); }},
      {"model_hessian_dict", Of::model, Form::matrices, true,
       [](R r) { return assembled(model_hessian_dict(r.model, r.inputs, r.options), r.model); }},
      {"model_hessian_dict (whole batch)", Of::model, Form::matrices, true,
       [](R r) { return assembled(model_hessian_dict(r.model, r.inputs, whole(r.options)), r.model); }},
      {"loss_hessian_matrix", Of::loss, Form::matrices, true,
       [](R r) { return loss_hessian_matrix(r.model, r.criterion, r.inputs, r.target, r.options); }},
      {"loss_hessian_dict", Of::loss, Form::matrices, true,
       [](R r) { return assembled(loss_hessian_dict(r.model, r.criterion, r.inputs, r.target, r.options), r.model); }},
      {"batch_loss_hessian_matrix", Of::sample_loss, Form::matrices, true,
       [](R r) { return batch_loss_hessian_matrix(r.model, r.criterion, r.inputs, r.target, r.options); }},
      {"model_sharpness", Of::model, Form::sharpness, true,
       [](R r) { return model_sharpness(r.model, r.inputs, r.options); }},
      {"model_sharpness (whole batch)", Of::model, Form::sharpness, true,
       [](R r) { return model_sharpness(r.model, r.inputs, whole(r.options)); }},
      {"model_sharpness (Lanczos)", Of::model, Form::sharpness, false,
       [](R r) {
         return matrix_free(r, [&](const HessianOptions& o) { return model_sharpness(r.model, r.inputs, o); });
       }},
      {"loss_sharpness", Of::loss, Form::sharpness, true,
       [](R r) { return Tensor(loss_sharpness(r.model, r.criterion, r.inputs, r.target, r.options)); }},
      {"loss_sharpness (Lanczos)", Of::loss, Form::sharpness, false,
       [](R r) {
         return matrix_free(r, [&](const HessianOptions& o) {
           return Tensor(loss_sharpness(r.model, r.criterion, r.inputs, r.target, o));
         });
       }},
      {"batch_loss_sharpness", Of::sample_loss, Form::sharpness, true,
       [](R r) { return batch_loss_sharpness(r.model, r.criterion, r.inputs, r.target, r.options); }},
      {"batch_loss_sharpness (Lanczos)", Of::sample_loss, Form::sharpness, false,
       [](R r) {
         return matrix_free(r, [&](const HessianOptions& o) {
           return batch_loss_sharpness(r.model, r.criterion, r.inputs, r.target, o);
         });
       }},
      {"hessian_vector_product (v [k, n])", Of::loss, Form::product, false,
       [](R r) { return hessian_vector_product(r.model, r.criterion, r.inputs, r.target, r.v, r.options); }},
      {"hessian_vector_product (v [n])", Of::loss, Form::product, false, one_v_at_a_time},
      {"loss_hessian_diagonal", Of::loss, Form::diagonal, false,
       [](R r) { return loss_hessian_diagonal(r.model, r.criterion, r.inputs, r.target, r.options); }},
  };
  return table;
}

// ---------------------------------------------------------------- finite differences

double max_abs(const Tensor& t) {
  double m = 0.0;
  for (std::size_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.data()[i]));
  return m;
}

/// The parameters `names` selects (all trainable ones when empty), in registration order.
std::vector<Tensor> selected(const nn::Module& m, const std::vector<std::string>& names) {
  std::vector<Tensor> out;
  for (const auto& [name, p] : m.trainable_parameters())
    if (names.empty() || std::count(names.begin(), names.end(), name)) out.push_back(p);
  return out;
}

/// The Hessian of every entry of f() by central differences (step h) of its
/// gradients, which hesse::grad takes one entry at a time: f().shape + [n, n].
Tensor fd_hessians(std::vector<Tensor> params, const std::function<Tensor()>& f, double h = 1e-6) {
  auto jacobian = [&] {  // [entries][n], flat
    const Tensor y = f();
    GradOptions o;
    o.allow_unused = true;
    o.retain_graph = true;
    std::vector<double> J;
    for (std::size_t e = 0; e < y.numel(); ++e) {
      Tensor seed = zeros(y.shape());
      seed.mutable_data()[e] = 1.0;
      const std::vector<Tensor> g = grad({y}, params, {seed}, o);
      for (std::size_t p = 0; p < params.size(); ++p)
        for (std::size_t i = 0; i < params[p].numel(); ++i) J.push_back(g[p].defined() ? g[p].data()[i] : 0.0);
    }
    return J;
  };
  std::size_t n = 0;
  for (const Tensor& p : params) n += p.numel();
  Shape shape = f().shape();
  const std::size_t entries = numel_of(shape);
  shape.insert(shape.end(), {n, n});
  Tensor H = zeros(shape);
  std::size_t col = 0;
  for (Tensor& p : params)
    for (std::size_t i = 0; i < p.numel(); ++i, ++col) {
      const double at = p.data()[i];
      p.mutable_data()[i] = at + h;
      const std::vector<double> up = jacobian();
      p.mutable_data()[i] = at - h;
      const std::vector<double> down = jacobian();
      p.mutable_data()[i] = at;
      for (std::size_t e = 0; e < entries; ++e)
        for (std::size_t r = 0; r < n; ++r)
          H.mutable_data()[(e * n + r) * n + col] = (up[e * n + r] - down[e * n + r]) / (2 * h);
    }
  return H;
}

/// The result `form` gives of a stack of Hessians H [..., n, n] (v [k, n] for a product).
Tensor expected(Form form, const Tensor& H, const Tensor& v) {
  const std::size_t n = H.shape().back();
  const Shape lead(H.shape().begin(), H.shape().end() - 2);
  const double* h = H.data();
  switch (form) {
    case Form::matrices:
      return H;
    case Form::product: {  // (H v_a)_i = Σ_j H_ij v_aj
      const std::size_t k = v.shape()[0];
      Tensor out = zeros({k, n});
      for (std::size_t a = 0; a < k; ++a)
        for (std::size_t i = 0; i < n; ++i)
          for (std::size_t j = 0; j < n; ++j) out.mutable_data()[a * n + i] += h[i * n + j] * v.data()[a * n + j];
      return out;
    }
    case Form::diagonal: {
      Tensor out = zeros({n});
      for (std::size_t i = 0; i < n; ++i) out.mutable_data()[i] = h[i * n + i];
      return out;
    }
    case Form::sharpness: {  // max |λ| of (H + Hᵀ)/2 by LAPACK, through xtensor-blas
      Tensor out = zeros(lead);
      for (std::size_t e = 0; e < out.numel(); ++e) {
        xt::xarray<double> m = xt::zeros<double>({n, n});
        for (std::size_t i = 0; i < n; ++i)
          for (std::size_t j = 0; j < n; ++j) m(i, j) = 0.5 * (h[(e * n + i) * n + j] + h[(e * n + j) * n + i]);
        const xt::xarray<double> w = xt::linalg::eigvalsh(m);
        out.mutable_data()[e] = std::max(std::abs(xt::amin(w)()), std::abs(xt::amax(w)()));
      }
      return out;
    }
  }
  return Tensor();
}

/// Largest |H_ij - H_ji| over a stack [..., n, n].
double asymmetry(const Tensor& H) {
  const std::size_t n = H.shape().back();
  double m = 0.0;
  for (std::size_t e = 0; e < H.numel() / (n * n); ++e)
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < i; ++j) {
        const double* h = H.data() + e * n * n;
        m = std::max(m, std::abs(h[i * n + j] - h[j * n + i]));
      }
  return m;
}

/// The test bed: a tanh MLP 3-4-2 (n = 26) on a batch of 4.
struct Bed {
  static constexpr std::size_t N = 4, C = 2;
  Generator gen{90};
  std::shared_ptr<nn::Sequential> net = nn::mlp({3, 4, C}, nn::Activation::Kind::tanh, gen);
  Tensor x = randn({N, 3}, gen);

  Request request(const LossCase& c, const std::vector<std::string>& params = {}) {
    std::size_t n = 0;
    for (const Tensor& p : selected(*net, params)) n += p.numel();
    Request r{*net, c.criterion, {x}, c.target, randn({3, n}, gen), {}};
    r.options.params = params;
    return r;
  }
};

/// Every entry point under every loss against finite differences, differentiating by `params`.
void check_every_entry_point_against_fd(const std::vector<std::string>& params) {
  Bed bed;
  nn::Module& net = *bed.net;
  const std::vector<Tensor> theta = selected(net, params);
  const Tensor model_fd = fd_hessians(theta, [&] { return net({bed.x}); });  // [N, C, n, n]
  for (const LossCase& c : hesse::testing::loss_cases(bed.gen, Bed::N, Bed::C)) {
    const Tensor loss_fd = fd_hessians(theta, [&] { return c.criterion(net({bed.x}), c.target); });  // [n, n]
    const Tensor sample_fd = fd_hessians(theta, [&] {  // [N, n, n]: sample b's loss criterion(model(x_b), t_b)
      std::vector<Tensor> losses;
      for (std::size_t b = 0; b < Bed::N; ++b) {
        const auto one = [b](const Tensor& t) { return slice(t, 0, std::int64_t(b), std::int64_t(b) + 1); };
        losses.push_back(c.criterion(net({one(bed.x)}), one(c.target)));
      }
      return stack(losses);
    });
    const Request r = bed.request(c, params);
    for (const EntryPoint& e : entry_points())
      BOOST_TEST_CONTEXT("loss " << c.name << ", " << e.label) {
        const Tensor& H = e.of == Of::model ? model_fd : e.of == Of::loss ? loss_fd : sample_fd;
        const Tensor want = expected(e.form, H, r.v);
        const Tensor got = e.call(r);
        // FD's error (h² and rounding / h) is far below 1e-6 of the values' scale
        const double scale = std::max(1.0, max_abs(want)), diff = max_abs_diff(got, want);
        BOOST_CHECK_MESSAGE(diff <= 1e-6 * scale, "max |result - FD| = " << diff << " (scale " << scale << ")");
        BOOST_CHECK_GT(max_abs(want), 1e-3);  // not trivially zero
        if (e.form == Form::matrices) BOOST_CHECK_LE(asymmetry(got), 1e-12 * scale);
      }
  }
}

// ---------------------------------------------------------------- bad input

/// Checks that entry point e refuses request r with an E (that very class) whose
/// message contains every one of `texts` and "hesse::<api>", the function called.
template <class E>
void check_refuses(const EntryPoint& e, const Request& r, std::vector<std::string> texts) {
  texts.push_back("hesse::" + e.api());
  BOOST_TEST_CONTEXT(e.label) {
    try {
      e.call(r);
      BOOST_ERROR("no exception");
    } catch (const std::exception& err) {
      const std::string what = err.what(), type = boost::core::demangle(typeid(err).name());
      BOOST_CHECK_MESSAGE(typeid(err) == typeid(E),
                          "threw " << type << ", not " << boost::core::demangle(typeid(E).name()) << ": " << what);
      for (const std::string& t : texts)
        BOOST_CHECK_MESSAGE(what.find(t) != std::string::npos, "the message lacks '" << t << "': " << what);
    }
  }
}

bool takes_a_loss(const EntryPoint& e) { return e.of != Of::model; }

/// A loss to make requests with: MSE (mean) on targets [N, C].
LossCase mse(Bed& bed) { return {"mse", nn::MSELoss(), randn({Bed::N, Bed::C}, bed.gen)}; }

/// Sets the global memory limit for its lifetime.
struct GlobalLimit {
  std::size_t before = hessian_memory_limit();
  explicit GlobalLimit(std::size_t bytes) { set_hessian_memory_limit(bytes); }
  ~GlobalLimit() { set_hessian_memory_limit(before); }
};

/// y = x W with W [3, 2], and E, a parameter of no entries.
struct HasAnEmptyParameter : nn::Module {
  Tensor W, E;
  explicit HasAnEmptyParameter(Generator& gen) {
    W = register_parameter("W", randn({3, 2}, gen));
    E = register_parameter("E", zeros({0}));
  }
  Tensor forward(const std::vector<Tensor>& in) override { return matmul(in[0], W); }
};

}  // namespace

// ================================================================ finite differences

BOOST_AUTO_TEST_SUITE(finite_differences)

BOOST_AUTO_TEST_CASE(every_entry_point_by_all_parameters) { check_every_entry_point_against_fd({}); }

// θ = [0.weight | 2.bias]: not adjacent in the model, listed out of order; a lower block (2.bias, 0.weight)
BOOST_AUTO_TEST_CASE(every_entry_point_by_a_parameter_subset) {
  check_every_entry_point_against_fd({"2.bias", "0.weight"});
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ errors

BOOST_AUTO_TEST_SUITE(errors)

BOOST_AUTO_TEST_CASE(an_empty_selection) {
  Bed bed;
  HasAnEmptyParameter m(bed.gen);
  Request no_entries{m, nn::MSELoss(), {bed.x}, randn({Bed::N, Bed::C}, bed.gen), zeros({3, 0}), {}};
  no_entries.options.params = {"E"};
  for (auto& [name, p] : bed.net->named_parameters()) p.requires_grad_(false);
  const Request all_frozen = bed.request(mse(bed));
  for (const EntryPoint& e : entry_points()) {
    check_refuses<ValueError>(e, all_frozen, {"the model has no trainable parameters"});
    check_refuses<ValueError>(e, no_entries, {"the selected parameters hold no entries"});
  }
}

BOOST_AUTO_TEST_CASE(an_unknown_parameter_name) {
  Bed bed;
  const Request r = bed.request(mse(bed), {"0.weight", "0.wieght"});
  for (const EntryPoint& e : entry_points()) check_refuses<ValueError>(e, r, {"unknown parameter '0.wieght'"});
}

BOOST_AUTO_TEST_CASE(inputs_of_the_wrong_shape) {
  Bed bed;
  Request r = bed.request(mse(bed));
  r.inputs = {randn({Bed::N, 5}, bed.gen)};  // the model takes [N, 3]; one sample is [1, 5]
  for (const EntryPoint& e : entry_points()) check_refuses<ShapeError>(e, r, {"5]"});
}

BOOST_AUTO_TEST_CASE(a_target_of_the_wrong_shape) {
  Bed bed;
  Request r = bed.request(mse(bed));
  auto check = [&](const Shape& bad, const std::string& says) {
    r.target = randn(bad, bed.gen);
    for (const EntryPoint& e : entry_points())
      if (takes_a_loss(e)) check_refuses<ShapeError>(e, r, {"target of shape", says});
  };
  check({Bed::N + 1, Bed::C}, "[5, 2]");
  // [N, 5] passes the per-sample routes' check of the batch size; mse_loss then refuses sample 0's [1, 5]
  check({Bed::N, 5}, "5]");
}

BOOST_AUTO_TEST_CASE(a_criterion_returning_a_non_scalar) {
  Bed bed;
  Request r = bed.request(mse(bed));
  r.criterion = [](const Tensor& out, const Tensor& t) { return nn::mse_loss(out, t, nn::Reduction::none); };
  for (const EntryPoint& e : entry_points())
    if (takes_a_loss(e)) {
      const std::string shape = e.of == Of::sample_loss ? "[1, 2]" : "[4, 2]";  // one sample's, or the batch's
      check_refuses<ShapeError>(e, r, {"the criterion returned shape " + shape, "scalar loss"});
    }
}

BOOST_AUTO_TEST_CASE(a_result_over_the_memory_limit) {
  // n = 26: one Hessian takes 26² · 8 = 5408 bytes; the model's N · C of them, the samples' N
  Bed bed;
  Request r = bed.request(mse(bed));
  r.options.matrix_free_fallback = false;  // sharpness: dense or nothing
  for (const EntryPoint& e : entry_points())
    if (e.dense) {
      const std::size_t count = e.of == Of::model ? Bed::N * Bed::C : e.of == Of::sample_loss ? Bed::N : 1;
      const std::string needs = "needs " + std::to_string(5408 * count) + " bytes";
      r.options.max_bytes = 5000;
      check_refuses<MemoryLimitError>(e, r, {needs, "the limit is 5000 bytes"});
      r.options.max_bytes = 0;
      const GlobalLimit limit(4000);
      check_refuses<MemoryLimitError>(e, r, {needs, "the limit is 4000 bytes"});
    }
}

BOOST_AUTO_TEST_CASE(symmetric_sharpness_of_matrices_that_are_not_square) {
  Bed bed;
  const Request r = bed.request(mse(bed));
  for (const Shape& bad : {Shape{2, 3}, Shape{4, 3, 2}, Shape{3}}) {
    const EntryPoint e{"symmetric_sharpness", Of::loss, Form::sharpness, false,
                       [&](const Request&) { return symmetric_sharpness(zeros(bad)); }};
    check_refuses<ShapeError>(e, r, {"needs square matrices", to_string(bad)});
  }
}

BOOST_AUTO_TEST_SUITE_END()
