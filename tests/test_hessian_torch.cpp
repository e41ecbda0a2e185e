// Agreement with PyTorch (float64): every Hessian of layer 5 against reference
// values computed by torch.autograd.functional on the same weights, inputs and
// targets. The fixtures and the script that made them:
//   scripts/make_torch_fixtures.py  ->  tests/fixtures/torch/{cases.txt, <case>/...}
// The fixture folder comes from the environment: HESSE_FIXTURES=<tests/fixtures>
// (set by tests/meson.build).
//
// Criterion: max |hesse - torch| <= 1e-10 * max |torch| for every quantity, relative to
// that quantity's own scale: a batch of Hessians (or of sharpnesses, of products
// H v_i) is judged entry by entry, each by its own largest value. A reference of
// exact zeros (a model Hessian in parameters the output is linear in) must be
// matched exactly. The diagonal_only results are held to the same matrices with
// their off-diagonal blocks set to zero; the dicts are put back together into
// matrices and held to them.
#define BOOST_TEST_MODULE hessian_torch
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "hesse/nn/loss.hpp"

using namespace hesse;

namespace {

constexpr double kRelTol = 1e-10;

const std::vector<std::string> kCases = {
    "tanh_mse_sum",      "sigmoid_mse_mean",  "softplus_ce_index",   "gelu_ce_prob",       "tanh3_bce_soft",
    "softplus_bce_hard", "sigmoid3_ce_index", "gelu3_mse_sum",       "frozen_bias_tanh_ce", "subset_sigmoid_mse",
};

std::string torch_dir() {
  const char* env = std::getenv("HESSE_FIXTURES");
  BOOST_REQUIRE_MESSAGE(env != nullptr && *env != '\0',
                        "HESSE_FIXTURES is not set: run through `meson test`, or set it to the tests/fixtures "
                        "folder of the source tree (HESSE_FIXTURES=/path/to/tests/fixtures ./test_hessian_torch)");
  return std::string(env) + "/torch";
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  if (s.empty() || s == "-") return out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

// cases.txt: "name key=value key=value ..." per line, '#' comments.
std::map<std::string, std::map<std::string, std::string>> read_manifest() {
  const std::string path = torch_dir() + "/cases.txt";
  std::ifstream in(path);
  BOOST_REQUIRE_MESSAGE(in.good(), "cannot open " << path << " (HESSE_FIXTURES wrong, or fixtures not generated: "
                                                   "/usr/bin/python3 scripts/make_torch_fixtures.py)");
  std::map<std::string, std::map<std::string, std::string>> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::stringstream ss(line);
    std::string name, kv;
    ss >> name;
    auto& c = cases[name];
    while (ss >> kv) {
      const auto eq = kv.find('=');
      BOOST_REQUIRE_MESSAGE(eq != std::string::npos, "bad manifest entry '" << kv << "' in " << path);
      c[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
  }
  return cases;
}

const std::map<std::string, std::string>& manifest_entry(const std::string& name) {
  static const auto manifest = read_manifest();
  const auto it = manifest.find(name);
  BOOST_REQUIRE_MESSAGE(it != manifest.end(), "case '" << name << "' is not in cases.txt");
  return it->second;
}

nn::Activation::Kind activation(const std::string& s) {
  if (s == "tanh") return nn::Activation::Kind::tanh;
  if (s == "sigmoid") return nn::Activation::Kind::sigmoid;
  if (s == "softplus") return nn::Activation::Kind::softplus;
  if (s == "gelu") return nn::Activation::Kind::gelu;
  BOOST_FAIL("unknown activation '" << s << "' in cases.txt");
  return nn::Activation::Kind::tanh;
}

Criterion criterion(const std::string& loss, const std::string& reduction) {
  nn::Reduction r = nn::Reduction::mean;
  if (reduction == "sum") r = nn::Reduction::sum;
  else BOOST_REQUIRE_MESSAGE(reduction == "mean", "unknown reduction '" << reduction << "'");
  if (loss == "mse") return nn::MSELoss(r);
  if (loss == "cross_entropy") {
    nn::CrossEntropyOptions o;
    o.reduction = r;
    return nn::CrossEntropyLoss(o);
  }
  if (loss == "bce_with_logits") {
    nn::BCEWithLogitsOptions o;
    o.reduction = r;
    return nn::BCEWithLogitsLoss(o);
  }
  BOOST_FAIL("unknown loss '" << loss << "' in cases.txt");
  return {};
}

// The worst relative deviation seen in the current case, and where.
struct Worst {
  double rel = 0.0;
  std::string what = "-";
} worst;

// The first `batch_dims` dimensions index separate quantities (samples, output
// entries, vectors); each must satisfy max |got - ref| <= kRelTol * max |ref| on
// its own. A NaN never passes; an all-zero reference requires exact zeros.
void check(const std::string& what, const Tensor& got, const Tensor& ref, std::size_t batch_dims = 0) {
  BOOST_REQUIRE_MESSAGE(got.shape() == ref.shape(),
                        what << ": shape " << to_string(got.shape()) << ", torch has " << to_string(ref.shape()));
  std::size_t count = 1;
  for (std::size_t d = 0; d < batch_dims; ++d) count *= ref.shape()[d];
  const std::size_t unit = count == 0 ? 0 : ref.numel() / count;
  double rel = 0.0, diff = 0.0, scale = 0.0;  // of the worst quantity
  std::size_t at = 0;
  for (std::size_t e = 0; e < count; ++e) {
    double d = 0.0, s = 0.0;
    for (std::size_t i = e * unit; i < (e + 1) * unit; ++i) {
      const double di = std::abs(got.data()[i] - ref.data()[i]);
      d = std::isnan(di) ? INFINITY : std::max(d, di);
      s = std::max(s, std::abs(ref.data()[i]));
    }
    const double r = d == 0.0 ? 0.0 : d / s;  // infinite for d > 0 = s
    if (e == 0 || r > rel) std::tie(rel, diff, scale, at) = std::make_tuple(r, d, s, e);
  }
  if (rel >= worst.rel) worst = {rel, what};
  const std::string where = batch_dims == 0 ? "" : " [" + std::to_string(at) + " of " + std::to_string(count) + "]";
  BOOST_TEST_MESSAGE("  " << what << ": max |hesse - torch| = " << diff << where << " (scale " << scale << ", rel "
                          << rel << ")");
  BOOST_CHECK_MESSAGE(rel <= kRelTol, what << where << ": max |hesse - torch| = " << diff << " > " << kRelTol
                                           << " * " << scale);
}

struct Case {
  std::string name, folder;
  std::map<std::string, std::string> meta;
  std::shared_ptr<nn::Sequential> model;
  Criterion crit;
  HessianOptions options;
  Tensor x, y;
  std::size_t n = 0;
  std::vector<std::string> names;  // the selected parameters, in registration order
  std::vector<std::size_t> sizes;  // and their numbers of scalars

  Tensor ref(const std::string& file) const { return load_npy(folder + "/" + file + ".npy"); }
};

Case load_case(const std::string& name) {
  Case c;
  c.name = name;
  c.folder = torch_dir() + "/" + name;
  c.meta = manifest_entry(name);
  std::vector<std::size_t> widths;
  for (const std::string& w : split(c.meta.at("widths"), ',')) widths.push_back(std::stoul(w));
  Generator gen(0);
  c.model = nn::mlp(widths, activation(c.meta.at("act")), gen);
  c.model->load(c.folder + "/params");  // the exact torch initialisation
  for (const std::string& p : split(c.meta.at("frozen"), ',')) c.model->parameter(p).requires_grad_(false);
  c.options.params = split(c.meta.at("params"), ',');
  for (const auto& [pname, t] : c.model->trainable_parameters())
    if (c.options.params.empty() || std::count(c.options.params.begin(), c.options.params.end(), pname)) {
      c.names.push_back(pname);
      c.sizes.push_back(t.numel());
    }
  c.crit = criterion(c.meta.at("loss"), c.meta.at("reduction"));
  c.x = load_npy(c.folder + "/x.npy");
  c.y = load_npy(c.folder + "/y.npy");  // int64 class indices arrive as integral doubles
  c.n = std::stoul(c.meta.at("n"));
  BOOST_REQUIRE_EQUAL(c.x.shape()[0], std::stoul(c.meta.at("batch")));
  BOOST_REQUIRE_EQUAL(std::accumulate(c.sizes.begin(), c.sizes.end(), std::size_t(0)), c.n);
  return c;
}

// The parameter each of the n scalars belongs to.
std::vector<std::size_t> block_of(const Case& c) {
  std::vector<std::size_t> block;
  for (std::size_t p = 0; p < c.sizes.size(); ++p) block.insert(block.end(), c.sizes[p], p);
  return block;
}

// [..., n, n] with the blocks (P, Q), P != Q, set to zero: what diagonal_only computes.
Tensor block_diagonal(const Tensor& h, const Case& c) {
  const std::vector<std::size_t> block = block_of(c);
  Tensor out = h.clone();
  for (std::size_t k = 0; k < out.numel(); ++k)
    if (block[k / c.n % c.n] != block[k % c.n]) out.mutable_data()[k] = 0.0;
  return out;
}

// H v (or the rows H v_i of V [k, n]) for H [n, n] symmetric: V H.
Tensor product(const Tensor& h, const Tensor& v) {
  const std::size_t n = h.shape()[0];
  Tensor out = zeros(v.shape());
  for (std::size_t r = 0; r < v.numel() / n; ++r)
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < n; ++j) out.mutable_data()[r * n + j] += v.data()[r * n + i] * h.data()[i * n + j];
  return out;
}

// A dict against the reference matrices [lead..., n, n]: it must hold every
// block (P, Q), or with diagonal_only every (P, P) and nothing else, each of shape
// lead + P.shape + Q.shape; put back together (zero where a block is absent),
// it is checked as the matrix, each of the lead entries on its own.
void check_dict(const std::string& what, const HessianDict& d, const Case& c, const Tensor& ref,
                bool diagonal_only) {
  BOOST_REQUIRE_MESSAGE(d.names() == c.names, what << ": names differ from the selection");
  const Shape lead(ref.shape().begin(), ref.shape().end() - 2);
  const std::size_t count = ref.numel() / (c.n * c.n);
  Tensor m = zeros(ref.shape());
  std::size_t blocks = 0;
  for (std::size_t i = 0, oi = 0; i < c.names.size(); oi += c.sizes[i++])
    for (std::size_t j = 0, oj = 0; j < c.names.size(); oj += c.sizes[j++]) {
      const std::string& p = c.names[i];
      const std::string& q = c.names[j];
      if (diagonal_only && i != j) {
        BOOST_CHECK_MESSAGE(!d.contains(p, q), what << ": diagonal_only kept block (" << p << ", " << q << ")");
        continue;
      }
      BOOST_REQUIRE_MESSAGE(d.contains(p, q), what << ": no block (" << p << ", " << q << ")");
      const Tensor& block = d.at(p, q);
      Shape want = lead;
      for (std::size_t s : c.model->parameter(p).shape()) want.push_back(s);
      for (std::size_t s : c.model->parameter(q).shape()) want.push_back(s);
      BOOST_REQUIRE_MESSAGE(block.shape() == want, what << " (" << p << ", " << q << "): shape "
                                                        << to_string(block.shape()) << ", expected " << to_string(want));
      for (std::size_t e = 0; e < count; ++e)
        for (std::size_t r = 0; r < c.sizes[i]; ++r)
          std::copy_n(block.data() + (e * c.sizes[i] + r) * c.sizes[j], c.sizes[j],
                      m.mutable_data() + e * c.n * c.n + (oi + r) * c.n + oj);
      ++blocks;
    }
  BOOST_CHECK_EQUAL(d.blocks().size(), blocks);
  check(what, m, ref, lead.size());
}

void run_case(const std::string& name) {
  Case c = load_case(name);
  nn::Module& m = *c.model;
  const HessianOptions& o = c.options;
  HessianOptions diag = o;
  diag.diagonal_only = true;
  BOOST_TEST_MESSAGE(name << ": n = " << c.n);
  worst = Worst();

  // the forward pass and the loss value
  check("loss", c.crit(m(c.x), c.y), c.ref("loss"));

  // loss Hessian, its dict forms, diagonal, HVP, sharpness; diagonal_only: its (P, P) blocks
  const Tensor h = loss_hessian_matrix(m, c.crit, {c.x}, c.y, o);
  BOOST_REQUIRE_EQUAL(h.shape()[0], c.n);
  const Tensor h_ref = c.ref("loss_hessian"), h_diag = block_diagonal(h_ref, c);
  check("loss_hessian_matrix", h, h_ref);
  check("loss_hessian_matrix diagonal_only", loss_hessian_matrix(m, c.crit, {c.x}, c.y, diag), h_diag);
  check_dict("loss_hessian_dict", loss_hessian_dict(m, c.crit, {c.x}, c.y, o), c, h_ref, false);
  check_dict("loss_hessian_dict diagonal_only", loss_hessian_dict(m, c.crit, {c.x}, c.y, diag), c, h_diag, true);
  HessianOptions chunked = o;
  chunked.chunk_size = 7;  // a chunk size that divides nothing
  check("loss_hessian_matrix chunk_size 7", loss_hessian_matrix(m, c.crit, {c.x}, c.y, chunked), h_ref);
  check("loss_hessian_diagonal", loss_hessian_diagonal(m, c.crit, {c.x}, c.y, o), c.ref("diagonal"));
  check("hessian_vector_product", hessian_vector_product(m, c.crit, {c.x}, c.y, c.ref("v"), o), c.ref("hvp"));
  check("hessian_vector_product [2, n]", hessian_vector_product(m, c.crit, {c.x}, c.y, c.ref("vs"), o),
        c.ref("hvps"), 1);
  check("hessian_vector_product [2, n] diagonal_only",
        hessian_vector_product(m, c.crit, {c.x}, c.y, c.ref("vs"), diag), product(h_diag, c.ref("vs")), 1);
  check("loss_sharpness", Tensor(loss_sharpness(m, c.crit, {c.x}, c.y, o)), c.ref("sharpness"));

  // per-sample loss Hessians
  const Tensor bh_ref = c.ref("batch_loss_hessian");
  check("batch_loss_hessian_matrix", batch_loss_hessian_matrix(m, c.crit, {c.x}, c.y, o), bh_ref, 1);
  check("batch_loss_hessian_matrix diagonal_only", batch_loss_hessian_matrix(m, c.crit, {c.x}, c.y, diag),
        block_diagonal(bh_ref, c), 1);
  check("batch_loss_sharpness", batch_loss_sharpness(m, c.crit, {c.x}, c.y, o), c.ref("batch_sharpness"), 1);

  // model Hessians [mb, C, n, n] of the first model_batch samples: is_batch (each
  // sample alone) and one pass over the whole batch (the same numbers for an MLP)
  const std::int64_t mb = std::stol(c.meta.at("model_batch"));
  const Tensor xm = slice(c.x, 0, 0, mb);
  const Tensor mh_ref = c.ref("model_hessian"), mh_diag = block_diagonal(mh_ref, c);
  check("model_hessian_matrix", model_hessian_matrix(m, {xm}, o), mh_ref, 2);
  HessianOptions whole = o;
  whole.is_batch = false;
  check("model_hessian_matrix is_batch=false", model_hessian_matrix(m, {xm}, whole), mh_ref, 2);
  check("model_hessian_matrix diagonal_only", model_hessian_matrix(m, {xm}, diag), mh_diag, 2);
  check_dict("model_hessian_dict", model_hessian_dict(m, {xm}, o), c, mh_ref, false);
  check_dict("model_hessian_dict is_batch=false", model_hessian_dict(m, {xm}, whole), c, mh_ref, false);
  check_dict("model_hessian_dict diagonal_only", model_hessian_dict(m, {xm}, diag), c, mh_diag, true);
  check("model_sharpness", model_sharpness(m, {xm}, o), c.ref("model_sharpness"), 2);

  // nothing leaked: the frozen flags are as the case set them
  for (const auto& [pname, t] : m.named_parameters()) {
    const auto frozen = split(c.meta.at("frozen"), ',');
    const bool want = std::find(frozen.begin(), frozen.end(), pname) == frozen.end();
    BOOST_CHECK_MESSAGE(t.requires_grad() == want, pname << ": requires_grad changed by the Hessian calls");
  }
  BOOST_TEST_MESSAGE(name << ": worst relative deviation " << worst.rel << " (" << worst.what << ")");
}

}  // namespace

BOOST_AUTO_TEST_CASE(manifest_lists_every_case) {
  const auto manifest = read_manifest();
  std::set<std::string> listed;
  for (const auto& [name, meta] : manifest) listed.insert(name);
  const std::set<std::string> expected(kCases.begin(), kCases.end());
  BOOST_CHECK_EQUAL_COLLECTIONS(listed.begin(), listed.end(), expected.begin(), expected.end());
}

BOOST_AUTO_TEST_CASE(tanh_mse_sum) { run_case("tanh_mse_sum"); }
BOOST_AUTO_TEST_CASE(sigmoid_mse_mean) { run_case("sigmoid_mse_mean"); }
BOOST_AUTO_TEST_CASE(softplus_ce_index) { run_case("softplus_ce_index"); }
BOOST_AUTO_TEST_CASE(gelu_ce_prob) { run_case("gelu_ce_prob"); }
BOOST_AUTO_TEST_CASE(tanh3_bce_soft) { run_case("tanh3_bce_soft"); }
BOOST_AUTO_TEST_CASE(softplus_bce_hard) { run_case("softplus_bce_hard"); }
BOOST_AUTO_TEST_CASE(sigmoid3_ce_index) { run_case("sigmoid3_ce_index"); }
BOOST_AUTO_TEST_CASE(gelu3_mse_sum) { run_case("gelu3_mse_sum"); }
BOOST_AUTO_TEST_CASE(frozen_bias_tanh_ce) { run_case("frozen_bias_tanh_ce"); }
BOOST_AUTO_TEST_CASE(subset_sigmoid_mse) { run_case("subset_sigmoid_mse"); }
