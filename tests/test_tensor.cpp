#define BOOST_TEST_MODULE test_tensor
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>

#include <xtensor/xbuilder.hpp>

using namespace hesse;
using hesse::testing::max_abs_diff;

namespace {

Shape S(std::initializer_list<std::size_t> dims) { return Shape(dims.begin(), dims.end()); }

std::string printed(const Tensor& t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

bool contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

}  // namespace

// ---------------------------------------------------------------- construction

BOOST_AUTO_TEST_SUITE(construction)

BOOST_AUTO_TEST_CASE(from_xarray_row_major_values) {
  xt::xarray<double> a = {{1.0, 2.0, 3.0}, {4.0, 5.0, 6.0}};
  Tensor t(a);
  BOOST_TEST((t.shape() == S({2, 3})));
  BOOST_TEST(t.ndim() == 2u);
  BOOST_TEST(t.numel() == 6u);
  for (std::size_t i = 0; i < 6; ++i) BOOST_TEST(t.data()[i] == double(i + 1));
  BOOST_TEST(!t.requires_grad());
  BOOST_TEST(t.is_leaf());
  // the tensor owns a copy: changing the source does not change it
  a(0, 0) = 100.0;
  BOOST_TEST(t.data()[0] == 1.0);
  // value() round-trips
  BOOST_TEST((t.value() == xt::xarray<double>{{1.0, 2.0, 3.0}, {4.0, 5.0, 6.0}}));
}

BOOST_AUTO_TEST_CASE(from_column_major_xarray_is_stored_row_major) {
  xt::xarray<double, xt::layout_type::column_major> a = {{1.0, 2.0}, {3.0, 4.0}, {5.0, 6.0}};
  Tensor t{xt::xarray<double>(a)};
  BOOST_TEST((t.shape() == S({3, 2})));
  for (std::size_t i = 0; i < 6; ++i) BOOST_TEST(t.data()[i] == double(i + 1));
}

BOOST_AUTO_TEST_CASE(from_xarray_with_requires_grad) {
  Tensor t(xt::xarray<double>{1.0, 2.0}, true);
  BOOST_TEST(t.requires_grad());
  BOOST_TEST(t.is_leaf());
  BOOST_TEST(!t.grad().defined());
}

BOOST_AUTO_TEST_CASE(nested_initializer_lists) {
  Tensor v{1.0, 2.0, 3.0};
  BOOST_TEST((v.shape() == S({3})));
  BOOST_TEST(v.data()[2] == 3.0);

  Tensor m{{1.0, 2.0, 3.0}, {4.0, 5.0, 6.0}};
  BOOST_TEST((m.shape() == S({2, 3})));
  for (std::size_t i = 0; i < 6; ++i) BOOST_TEST(m.data()[i] == double(i + 1));

  Tensor c{{{1.0, 2.0}, {3.0, 4.0}, {5.0, 6.0}}, {{7.0, 8.0}, {9.0, 10.0}, {11.0, 12.0}}};
  BOOST_TEST((c.shape() == S({2, 3, 2})));
  for (std::size_t i = 0; i < 12; ++i) BOOST_TEST(c.data()[i] == double(i + 1));
}

BOOST_AUTO_TEST_CASE(ragged_initializer_lists_throw) {
  HESSE_CHECK_THROWS((Tensor{{1.0, 2.0}, {3.0}}), ShapeError, "ragged");
  HESSE_CHECK_THROWS((Tensor{{{1.0, 2.0}, {3.0, 4.0}}, {{5.0, 6.0}}}), ShapeError, "ragged");
  HESSE_CHECK_THROWS((Tensor{{{1.0, 2.0}, {3.0, 4.0}}, {{5.0, 6.0}, {7.0}}}), ShapeError, "[1][1]");
}

BOOST_AUTO_TEST_CASE(scalars) {
  Tensor s(2.5);
  BOOST_TEST(s.ndim() == 0u);
  BOOST_TEST(s.shape().empty());
  BOOST_TEST(s.numel() == 1u);
  BOOST_TEST(s.item() == 2.5);
  Tensor implicit = 4.0;  // scalars convert implicitly
  BOOST_TEST(implicit.item() == 4.0);
  Tensor from_0d(xt::xarray<double>(7.0));
  BOOST_TEST(from_0d.ndim() == 0u);
  BOOST_TEST(from_0d.item() == 7.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- creation

BOOST_AUTO_TEST_SUITE(creation)

BOOST_AUTO_TEST_CASE(zeros_ones_full) {
  Tensor z = zeros(S({2, 3}));
  Tensor o = ones(S({4}));
  Tensor f = full(S({3, 1, 2}), -1.5);
  BOOST_TEST((z.shape() == S({2, 3})));
  BOOST_TEST((o.shape() == S({4})));
  BOOST_TEST((f.shape() == S({3, 1, 2})));
  for (std::size_t i = 0; i < z.numel(); ++i) BOOST_TEST(z.data()[i] == 0.0);
  for (std::size_t i = 0; i < o.numel(); ++i) BOOST_TEST(o.data()[i] == 1.0);
  for (std::size_t i = 0; i < f.numel(); ++i) BOOST_TEST(f.data()[i] == -1.5);
  BOOST_TEST(!z.requires_grad());
  BOOST_TEST(ones(S({2}), true).requires_grad());
  BOOST_TEST(zeros(S({})).numel() == 1u);
  BOOST_TEST(zeros(S({0, 3})).numel() == 0u);

  Tensor like = ones_like(f);
  BOOST_TEST((like.shape() == f.shape()));
  BOOST_TEST(like.data()[5] == 1.0);
  BOOST_TEST(zeros_like(f).data()[5] == 0.0);
}

BOOST_AUTO_TEST_CASE(undefined_tensor_use_is_a_value_error) {
  Tensor u;
  BOOST_TEST(!u.defined());
  HESSE_CHECK_THROWS(u.shape(), hesse::ValueError, "undefined tensor");
  HESSE_CHECK_THROWS(u.numel(), hesse::ValueError, "undefined tensor");
  HESSE_CHECK_THROWS(u.ndim(), hesse::ValueError, "undefined tensor");
  HESSE_CHECK_THROWS(u.data(), hesse::ValueError, "undefined tensor");
  HESSE_CHECK_THROWS(u.mutable_data(), hesse::ValueError, "undefined tensor");
  HESSE_CHECK_THROWS(u.requires_grad(), hesse::ValueError, "undefined tensor");
  HESSE_CHECK_THROWS(u.item(), hesse::ValueError, "undefined tensor");
}

BOOST_AUTO_TEST_CASE(eye_square_and_rectangular) {
  Tensor i3 = eye(3);
  BOOST_TEST((i3.shape() == S({3, 3})));
  for (std::size_t r = 0; r < 3; ++r)
    for (std::size_t c = 0; c < 3; ++c) BOOST_TEST(i3.data()[r * 3 + c] == (r == c ? 1.0 : 0.0));

  Tensor wide = eye(2, 4);
  BOOST_TEST((wide.shape() == S({2, 4})));
  for (std::size_t r = 0; r < 2; ++r)
    for (std::size_t c = 0; c < 4; ++c) BOOST_TEST(wide.data()[r * 4 + c] == (r == c ? 1.0 : 0.0));

  Tensor tall = eye(4, 2);
  BOOST_TEST((tall.shape() == S({4, 2})));
  for (std::size_t r = 0; r < 4; ++r)
    for (std::size_t c = 0; c < 2; ++c) BOOST_TEST(tall.data()[r * 2 + c] == (r == c ? 1.0 : 0.0));

  // an empty size means empty, not "square" (numpy.eye(3, 0) is 3 × 0)
  BOOST_TEST((eye(3, 0).shape() == S({3, 0})));
  BOOST_TEST((eye(0, 2).shape() == S({0, 2})));
  BOOST_TEST((eye(0).shape() == S({0, 0})));
}

BOOST_AUTO_TEST_CASE(arange_both_forms) {
  Tensor a = arange(5);
  BOOST_TEST((a.shape() == S({5})));
  for (std::size_t i = 0; i < 5; ++i) BOOST_TEST(a.data()[i] == double(i));

  Tensor b = arange(1.0, 2.0, 0.25);  // 1, 1.25, 1.5, 1.75 (stop excluded)
  BOOST_TEST((b.shape() == S({4})));
  for (std::size_t i = 0; i < 4; ++i) BOOST_TEST(b.data()[i] == 1.0 + 0.25 * double(i));

  Tensor c = arange(3.0, -3.0, -2.0);  // 3, 1, -1
  BOOST_TEST((c.shape() == S({3})));
  BOOST_TEST(c.data()[0] == 3.0);
  BOOST_TEST(c.data()[2] == -1.0);

  Tensor d = arange(2.0, 7.0);  // default step 1: 2..6
  BOOST_TEST(d.numel() == 5u);
  BOOST_TEST(d.data()[4] == 6.0);

  BOOST_TEST(arange(4.0, 1.0).numel() == 0u);  // empty, not an error
  HESSE_CHECK_THROWS(arange(0.0, 1.0, 0.0), ValueError, "step");
  HESSE_CHECK_THROWS(arange(0.0, INFINITY), ValueError, "finite");
  HESSE_CHECK_THROWS(arange(NAN, 3.0), ValueError, "finite");
  HESSE_CHECK_THROWS(arange(0.0, 1e300, 1.0), ValueError, "elements");
}

BOOST_AUTO_TEST_CASE(shapes_whose_size_overflows_throw) {
  const std::size_t big = std::size_t(1) << 40;
  HESSE_CHECK_THROWS(Tensor::empty(S({big, big})), ValueError, "too many elements");
  HESSE_CHECK_THROWS(zeros(S({big, big, 2})), ValueError, "too many elements");
  HESSE_CHECK_THROWS(Tensor::empty(S({big * 4, big * 4})), ValueError, "too many elements");  // wraps to 0
  HESSE_CHECK_THROWS(Tensor::empty(S({std::size_t(1) << 61})), ValueError, "too many elements");  // bytes overflow
  BOOST_TEST(Tensor::empty(S({big, big, 0})).numel() == 0u);  // zero elements is fine
}

BOOST_AUTO_TEST_CASE(rand_is_seeded_and_in_unit_interval) {
  Generator g1(42), g2(42), g3(43);
  Tensor a = rand(S({50}), g1);
  Tensor b = rand(S({50}), g2);
  Tensor c = rand(S({50}), g3);
  BOOST_TEST(max_abs_diff(a, b) == 0.0);
  BOOST_TEST(max_abs_diff(a, c) > 0.0);
  // the generator advances: the next draw differs from the first
  Tensor a2 = rand(S({50}), g1);
  BOOST_TEST(max_abs_diff(a, a2) > 0.0);
  // reseeding starts over
  g1.seed(42);
  BOOST_TEST(max_abs_diff(rand(S({50}), g1), a) == 0.0);

  Generator g(7);
  Tensor u = rand(S({100000}), g);
  double lo = 1.0, hi = 0.0, sum = 0.0;
  for (std::size_t i = 0; i < u.numel(); ++i) {
    lo = std::min(lo, u.data()[i]);
    hi = std::max(hi, u.data()[i]);
    sum += u.data()[i];
  }
  BOOST_TEST(lo >= 0.0);
  BOOST_TEST(hi < 1.0);
  BOOST_TEST(lo < 0.001);  // covers the interval
  BOOST_TEST(hi > 0.999);
  BOOST_TEST(std::abs(sum / 1e5 - 0.5) < 0.01);  // sd of the mean is 0.0009
}

BOOST_AUTO_TEST_CASE(randn_is_seeded_with_unit_moments) {
  Generator g1(1), g2(1), g3(2);
  BOOST_TEST(max_abs_diff(randn(S({3, 4}), g1), randn(S({3, 4}), g2)) == 0.0);
  g1.seed(1);
  BOOST_TEST(max_abs_diff(randn(S({3, 4}), g1), randn(S({3, 4}), g3)) > 0.0);

  Generator g(12345);
  Tensor x = randn(S({100000}), g);
  double mean = 0.0;
  for (std::size_t i = 0; i < x.numel(); ++i) mean += x.data()[i];
  mean /= double(x.numel());
  double var = 0.0;
  for (std::size_t i = 0; i < x.numel(); ++i) var += (x.data()[i] - mean) * (x.data()[i] - mean);
  var /= double(x.numel() - 1);
  // sd of the sample mean is 0.0032, of the sample variance 0.0045
  BOOST_TEST(std::abs(mean) < 0.02);
  BOOST_TEST(std::abs(var - 1.0) < 0.03);
}

BOOST_AUTO_TEST_CASE(default_generator_and_manual_seed) {
  manual_seed(99);
  Tensor a = randn(S({10}));
  manual_seed(99);
  Tensor b = randn(S({10}));
  BOOST_TEST(max_abs_diff(a, b) == 0.0);
  Tensor c = randn(S({10}));
  BOOST_TEST(max_abs_diff(a, c) > 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- accessors

BOOST_AUTO_TEST_SUITE(accessors)

BOOST_AUTO_TEST_CASE(shape_ndim_numel_size) {
  Tensor t = zeros(S({2, 3, 5}));
  BOOST_TEST(t.ndim() == 3u);
  BOOST_TEST(t.numel() == 30u);
  BOOST_TEST(t.size(0) == 2u);
  BOOST_TEST(t.size(2) == 5u);
  BOOST_TEST(t.size(-1) == 5u);
  BOOST_TEST(t.size(-3) == 2u);
  HESSE_CHECK_THROWS(t.size(3), IndexError, "axis 3");
  HESSE_CHECK_THROWS(t.size(-4), IndexError, "axis -4");
  BOOST_TEST(to_string(t.shape()) == "[2, 3, 5]");
  BOOST_TEST(to_string(Shape{}) == "[]");
  BOOST_TEST(numel_of(S({4, 0, 2})) == 0u);
  BOOST_TEST(numel_of(Shape{}) == 1u);
}

BOOST_AUTO_TEST_CASE(value_and_item) {
  Tensor t{{1.0, 2.0}, {3.0, 4.0}};
  const xt::xarray<double> v = t.value();
  BOOST_TEST(v.dimension() == 2u);
  BOOST_TEST(v(1, 0) == 3.0);
  BOOST_TEST(Tensor{5.0}.item() == 5.0);                  // one element, 1-D
  BOOST_TEST(reshape(Tensor{-2.0}, {1, 1, 1}).item() == -2.0);  // one element, 3-D
  // a one-element nested list must name its type (Tensor{{3.0}} is ambiguous)
  BOOST_TEST(Tensor(std::initializer_list<std::initializer_list<double>>{{3.0}}).ndim() == 2u);
  HESSE_CHECK_THROWS(t.item(), ShapeError, "[2, 2]");
  HESSE_CHECK_THROWS(zeros(S({0})).item(), ShapeError, "[0]");
}

BOOST_AUTO_TEST_CASE(mutable_data_writes_through) {
  Tensor t = zeros(S({3}));
  t.mutable_data()[1] = 8.0;
  BOOST_TEST(t.data()[1] == 8.0);
  Tensor alias = t;  // handles share the value
  BOOST_TEST(alias.data()[1] == 8.0);
  BOOST_TEST(alias.data() == t.data());
}

BOOST_AUTO_TEST_CASE(undefined_tensor_use_throws) {
  Tensor u;
  BOOST_TEST(!u.defined());
  HESSE_CHECK_THROWS(u.shape(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.numel(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.ndim(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.data(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.item(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.value(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.requires_grad(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.requires_grad_(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.detach(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.clone(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.grad(), ValueError, "undefined");
  HESSE_CHECK_THROWS(u.backward(), ValueError, "undefined");
  HESSE_CHECK_THROWS(zeros_like(u), ValueError, "undefined");
  BOOST_TEST(printed(u) == "tensor(undefined)");
}

BOOST_AUTO_TEST_CASE(requires_grad_on_non_leaf_throws) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  BOOST_TEST(x.requires_grad());
  Tensor y = x * 3.0;
  BOOST_TEST(!y.is_leaf());
  BOOST_TEST(y.requires_grad());
  HESSE_CHECK_THROWS(y.requires_grad_(), AutogradError, "mul_scalar");
  HESSE_CHECK_THROWS(y.requires_grad_(false), AutogradError, "detach");
  // a leaf can be switched off and on
  x.requires_grad_(false);
  BOOST_TEST(!x.requires_grad());
  BOOST_TEST(!(x * 3.0).requires_grad());
  x.requires_grad_(true);
  BOOST_TEST((x * 3.0).requires_grad());
}

BOOST_AUTO_TEST_CASE(set_grad_and_zero_grad) {
  Tensor x = zeros(S({2}), true);
  x.set_grad(Tensor{1.0, 2.0});
  BOOST_TEST(x.grad().data()[1] == 2.0);
  HESSE_CHECK_THROWS(x.set_grad(Tensor{1.0, 2.0, 3.0}), ShapeError, "[3]");
  x.zero_grad();
  BOOST_TEST(!x.grad().defined());
  // a gradient carrying a tape is stored detached (else x -> grad -> graph -> x)
  Tensor y = x * 2.0;
  x.set_grad(y);
  BOOST_TEST(!x.grad().requires_grad());
  BOOST_TEST(!x.grad().grad_fn());
  BOOST_TEST(x.grad().data() == y.data());
  BOOST_TEST(y.grad_fn() != nullptr);  // the argument keeps its own history
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- printing

BOOST_AUTO_TEST_SUITE(printing)

BOOST_AUTO_TEST_CASE(shows_values) {
  const std::string s = printed(Tensor{{1.5, -2.0}, {3.25, 4.0}});
  BOOST_TEST(s.rfind("tensor(", 0) == 0u);
  BOOST_TEST(contains(s, "1.5"));
  BOOST_TEST(contains(s, "-2"));
  BOOST_TEST(contains(s, "3.25"));
  BOOST_TEST(contains(s, "4"));
  BOOST_TEST(!contains(s, "requires_grad"));
  BOOST_TEST(!contains(s, "grad_fn"));
  BOOST_TEST(contains(printed(Tensor(0.125)), "0.125"));
}

BOOST_AUTO_TEST_CASE(empty_tensors_print_their_shape_at_once) {
  // measuring column widths once walked all 2^40 leading indices of this one
  BOOST_TEST(printed(zeros({std::size_t(1) << 40, 0})) == "tensor([], shape=[1099511627776, 0])");
  BOOST_TEST(printed(zeros({0})) == "tensor([], shape=[0])");
}

BOOST_AUTO_TEST_CASE(shows_autograd_state) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  const std::string sx = printed(x);
  BOOST_TEST(contains(sx, "requires_grad"));
  BOOST_TEST(!contains(sx, "grad_fn"));
  const std::string sy = printed(tanh(x));
  BOOST_TEST(contains(sy, "grad_fn=tanh"));
  BOOST_TEST(contains(printed(x * x), "grad_fn=mul"));
  BOOST_TEST(!contains(printed(x.detach()), "grad"));
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- detach, clone

BOOST_AUTO_TEST_SUITE(detach_clone)

BOOST_AUTO_TEST_CASE(detach_shares_values_not_tape) {
  Tensor x = Tensor{1.0, 2.0, 3.0}.requires_grad_();
  Tensor y = x * 2.0;
  Tensor d = y.detach();
  BOOST_TEST(d.is_leaf());
  BOOST_TEST(!d.requires_grad());
  BOOST_TEST(!d.grad_fn());
  BOOST_TEST(d.data() == y.data());  // shares storage
  BOOST_TEST((d.shape() == y.shape()));
  y.mutable_data()[0] = 10.0;
  BOOST_TEST(d.data()[0] == 10.0);
  // nothing computed from d reaches x
  Tensor z = sum(d * d);
  BOOST_TEST(!z.requires_grad());
  // and the original is untouched
  BOOST_TEST(y.grad_fn() != nullptr);
  BOOST_TEST(y.requires_grad());
}

BOOST_AUTO_TEST_CASE(clone_copies) {
  Tensor x = Tensor{{1.0, 2.0}, {3.0, 4.0}}.requires_grad_();
  Tensor c = x.clone();
  BOOST_TEST(c.data() != x.data());
  BOOST_TEST((c.shape() == x.shape()));
  BOOST_TEST(max_abs_diff(c, x) == 0.0);
  BOOST_TEST(!c.requires_grad());
  BOOST_TEST(c.is_leaf());
  c.mutable_data()[0] = -1.0;
  BOOST_TEST(x.data()[0] == 1.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- storage

BOOST_AUTO_TEST_SUITE(storage)

BOOST_AUTO_TEST_CASE(freed_buffer_is_reused) {
  const Shape shape = S({3, 1111});  // a size nothing else in this file uses
  const double* first = nullptr;
  {
    Tensor a = Tensor::empty(shape);
    first = a.data();
  }
  Tensor b = Tensor::empty(shape);
  BOOST_TEST(b.data() == first);
  // while b holds it, a new one gets another buffer
  Tensor c = Tensor::empty(shape);
  BOOST_TEST(c.data() != b.data());
}

BOOST_AUTO_TEST_CASE(most_recently_freed_goes_out_first) {
  const Shape shape = S({2, 2222});
  Tensor a = Tensor::empty(shape);
  Tensor b = Tensor::empty(shape);
  const double* pa = a.data();
  const double* pb = b.data();
  a = Tensor();
  b = Tensor();  // freed last: still warm in cache
  BOOST_TEST(Tensor::empty(shape).data() == pb);
  BOOST_TEST(pa != pb);
}

BOOST_AUTO_TEST_CASE(buffers_are_aligned_and_distinct) {
  std::set<const double*> seen;
  std::vector<Tensor> live;
  for (std::size_t n : {1u, 7u, 8u, 9u, 100u, 1000u, 70000u, 200000u}) {
    live.push_back(Tensor::empty(S({n})));
    const double* p = live.back().data();
    BOOST_TEST(reinterpret_cast<std::uintptr_t>(p) % 64 == 0u);
    BOOST_TEST(seen.insert(p).second);
    // the whole buffer is writable (ASan would catch an undersized one)
    std::fill_n(live.back().mutable_data(), n, 1.0);
  }
}

BOOST_AUTO_TEST_SUITE_END()
