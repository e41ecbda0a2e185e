// A tour of hesse's autograd: derivatives of any order with grad(...,
// create_graph), a whole Hessian from one batched backward pass, checks
// against finite differences, and the gradient of a small neural network
// written with raw ops. Run: build/examples/autograd_tour
#include <cmath>
#include <cstdio>
#include <iostream>
#include <vector>

#include <hesse/hesse.hpp>

using hesse::Tensor;

namespace {

int failures = 0;

// "matches" when |got - want| <= tol; the example exits non-zero otherwise.
const char* verdict(double diff, double tol = 1e-12) {
  if (diff <= tol) return "matches";
  ++failures;
  return "MISMATCH";
}

}  // namespace

int main() {
  // ---- 1. first, second and third derivatives of a scalar function ----
  // f(x) = x³ tanh x. With t = tanh x and s = 1 - t² (so t' = s, s' = -2ts):
  //   f'   = 3x²t + x³s
  //   f''  = 6xt + 6x²s - 2x³ts
  //   f''' = 6t + 18xs - 18x²ts - 2x³s² + 4x³t²s
  std::printf("1. f(x) = x^3 tanh(x) at x = 0.7\n");
  Tensor x = Tensor(0.7).requires_grad_();  // a 0-d leaf to differentiate by
  Tensor f = hesse::pow(x, 3) * hesse::tanh(x);

  hesse::GradOptions keep;  // record the backward pass so it can be differentiated again
  keep.create_graph = true;
  Tensor d1 = hesse::grad(f, x, Tensor(), keep);   // f'(x), itself on the tape
  Tensor d2 = hesse::grad(d1, x, Tensor(), keep);  // f''(x)
  Tensor d3 = hesse::grad(d2, x);                  // f'''(x); this graph need not be kept

  const double v = 0.7, t = std::tanh(v), s = 1 - t * t;
  const double closed[] = {v * v * v * t,                                      //
                           3 * v * v * t + v * v * v * s,                      //
                           6 * v * t + 6 * v * v * s - 2 * v * v * v * t * s,  //
                           6 * t + 18 * v * s - 18 * v * v * t * s - 2 * v * v * v * s * s + 4 * v * v * v * t * t * s};
  const Tensor derivatives[] = {f, d1, d2, d3};
  const char* names[] = {"f   ", "f'  ", "f'' ", "f'''"};
  for (int k = 0; k < 4; ++k) {
    const double got = derivatives[k].item();
    std::printf("%s = %.12f   closed form %.12f   %s\n", names[k], got, closed[k],
                verdict(std::fabs(got - closed[k])));
  }

  // ---- 2. a whole Hessian in one backward pass with batched seeds ----
  // g(y) = y0² y1 + y1 sin y2. Row i of the Hessian is the gradient of
  // <e_i, ∇g>; seeding with all rows of the identity at once (an extra leading
  // dimension of 3) gives every row in a single pass over ∇g's graph.
  std::printf("\n2. Hessian of g(y) = y0^2 y1 + y1 sin(y2) at y = (1, 2, 3), in one batched pass\n");
  Tensor y = Tensor{1.0, 2.0, 3.0}.requires_grad_();
  const auto at = [&y](std::int64_t i) { return hesse::sum(hesse::slice(y, 0, i, i + 1)); };  // y[i], 0-d
  Tensor g = hesse::square(at(0)) * at(1) + at(1) * hesse::sin(at(2));
  Tensor grad_g = hesse::grad(g, y, Tensor(), keep);  // [3], on the tape

  hesse::GradOptions batched;
  batched.batched_grad_outputs = true;                        // seeds [3, 3]: 3 seeds of shape [3]
  Tensor H = hesse::grad(grad_g, y, hesse::eye(3), batched);  // [3, 3]

  const double y0 = 1, y1 = 2, y2 = 3;
  Tensor H_closed{{2 * y1, 2 * y0, 0},  //
                  {2 * y0, 0, std::cos(y2)},
                  {0, std::cos(y2), -y1 * std::sin(y2)}};
  std::cout << "H =\n" << H << "\n";
  std::printf("closed form: [[2 y1, 2 y0, 0], [2 y0, 0, cos y2], [0, cos y2, -y1 sin y2]]   %s\n",
              verdict(hesse::max(hesse::abs(hesse::flatten(H - H_closed)), 0).item()));

  // ---- 3. the same machinery checked against finite differences ----
  // gradcheck compares every backward rule used by a function with central
  // differences; gradgradcheck does the same for the backward of the backward.
  const hesse::TensorFunction h = [](const std::vector<Tensor>& in) {
    return hesse::sum(hesse::tanh(in[0]) * hesse::exp(in[0]) * in[0]);
  };
  const bool first = hesse::gradcheck(h, {Tensor{0.3, -1.2, 2.0}.requires_grad_()});
  const bool second = hesse::gradgradcheck(h, {Tensor{0.3, -1.2, 2.0}.requires_grad_()});
  std::printf("\n3. h(a) = sum(tanh(a) exp(a) a): gradcheck %s, gradgradcheck %s\n", first ? "passed" : "FAILED",
              second ? "passed" : "FAILED");

  // ---- 4. the gradient of a two-layer network, written with raw ops ----
  // logits = tanh(X W1 + b1) W2 + b2,  loss = mean_i -log softmax(logits_i)[label_i]
  // X: [4, 3] inputs, labels: [4, 1], W1: [3, 5], b1: [5], W2: [5, 3], b2: [3]
  std::printf("\n4. cross-entropy of a two-layer network tanh(X W1 + b1) W2 + b2\n");
  hesse::Generator gen(7);
  Tensor X = hesse::randn({4, 3}, gen);
  Tensor labels = hesse::reshape(Tensor{0, 2, 1, 2}, {4, 1});  // the class of each row
  Tensor W1 = (hesse::randn({3, 5}, gen) * 0.5).requires_grad_();
  Tensor b1 = hesse::zeros({5}, /*requires_grad=*/true);
  Tensor W2 = (hesse::randn({5, 3}, gen) * 0.5).requires_grad_();
  Tensor b2 = hesse::zeros({3}, /*requires_grad=*/true);

  const hesse::TensorFunction network_loss = [&](const std::vector<Tensor>& p) {
    Tensor hidden = hesse::tanh(hesse::matmul(X, p[0]) + p[1]);  // [4, 5]
    Tensor logits = hesse::matmul(hidden, p[2]) + p[3];          // [4, 3]
    Tensor logp = hesse::log_softmax(logits, 1);                 // [4, 3]
    return -hesse::mean(hesse::gather(logp, 1, labels));         // []: mean of -logp[i, label_i]
  };
  const std::vector<Tensor> params = {W1, b1, W2, b2};
  Tensor loss = network_loss(params);
  std::vector<Tensor> grads = hesse::grad({loss}, params);  // one gradient per parameter

  std::cout << "loss = " << loss.item() << "\n";
  const char* pnames[] = {"dloss/dW1", "dloss/db1", "dloss/dW2", "dloss/db2"};
  for (int k = 0; k < 4; ++k)
    std::cout << pnames[k] << " " << hesse::to_string(grads[k].shape()) << " =\n" << grads[k] << "\n";
  // every row of softmax - onehot sums to zero, so the entries of dloss/db2 do too
  std::printf("sum(dloss/db2) = 0   %s\n", verdict(std::fabs(hesse::sum(grads[3]).item())));
  std::printf("gradcheck of the loss in all four parameters %s\n",
              hesse::gradcheck(network_loss, params) ? "passed" : "FAILED");

  std::printf("\n%s\n", failures == 0 ? "all checks passed" : "SOME CHECKS FAILED");
  return failures == 0 ? 0 : 1;
}

/* Expected output (Debian 12, g++ 12):

1. f(x) = x^3 tanh(x) at x = 0.7
f    = 0.207298147551   closed form 0.207298147551   matches
f'   = 1.106136311726   closed form 1.106136311726   matches
f''  = 4.141318376079   closed form 4.141318376079   matches
f''' = 8.282137160119   closed form 8.282137160119   matches

2. Hessian of g(y) = y0^2 y1 + y1 sin(y2) at y = (1, 2, 3), in one batched pass
H =
tensor([[        4,         2,         0],
        [        2,         0, -0.989992],
        [        0, -0.989992,  -0.28224]])
closed form: [[2 y1, 2 y0, 0], [2 y0, 0, cos y2], [0, cos y2, -y1 sin y2]]   matches

3. h(a) = sum(tanh(a) exp(a) a): gradcheck passed, gradgradcheck passed

4. cross-entropy of a two-layer network tanh(X W1 + b1) W2 + b2
loss = 0.906109
dloss/dW1 [3, 5] =
tensor([[  -0.104342,   -0.158801,   -0.007056,   -0.174101,   0.0420019],
        [  0.0204846,    0.115366, -0.00955733,   0.0980068,   0.0075161],
        [  0.0242573,  0.00239272,   0.0481377,   0.0360549,  0.00302614]])
dloss/db1 [5] =
tensor([ 0.0329925,  0.0718673, -0.0386181,  0.0500115, -0.0201821])
dloss/dW2 [5, 3] =
tensor([[-0.0263664,  0.0435317, -0.0171653],
        [0.00355465,   0.046839, -0.0503937],
        [ 0.0794378,   -0.13777,  0.0583317],
        [-0.0275484,  0.0895535, -0.0620051],
        [ 0.0525416, -0.0948448,  0.0423032]])
dloss/db2 [3] =
tensor([ 0.0488457, -0.0626793,  0.0138336])
sum(dloss/db2) = 0   matches
gradcheck of the loss in all four parameters passed

all checks passed
*/
