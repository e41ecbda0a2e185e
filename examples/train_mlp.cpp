// Train a small MLP on two interleaved half-moons, entirely in C++:
// data, model, loss, optimiser, mini-batches — then look at the curvature of
// the loss at the trained point and save the parameters as .npy files.
//
//   build/examples/train_mlp [output folder]     (default: train_mlp_params)
#include <cmath>
#include <cstdio>
#include <iostream>

#include <hesse/hesse.hpp>

using hesse::Tensor;
namespace nn = hesse::nn;

// Two moons: class 0 on the upper half circle, class 1 on a shifted lower one,
// with Gaussian noise. Targets are class indices stored as doubles.
void two_moons(std::size_t n, double noise, hesse::Generator& gen, Tensor& x, Tensor& y) {
  x = Tensor::empty({n, 2});
  y = Tensor::empty({n});
  for (std::size_t i = 0; i < n; ++i) {
    const bool upper = i % 2 == 0;
    const double t = M_PI * gen.uniform();
    x.mutable_data()[2 * i] = (upper ? std::cos(t) : 1.0 - std::cos(t)) + noise * gen.normal();
    x.mutable_data()[2 * i + 1] = (upper ? std::sin(t) : 0.5 - std::sin(t)) + noise * gen.normal();
    y.mutable_data()[i] = upper ? 0.0 : 1.0;
  }
}

double accuracy(nn::Module& model, const Tensor& x, const Tensor& y) {
  hesse::NoGradGuard no_grad;
  const Tensor predicted = hesse::argmax(model(x), 1);
  std::size_t right = 0;
  for (std::size_t i = 0; i < y.numel(); ++i) right += predicted.data()[i] == y.data()[i];
  return double(right) / double(y.numel());
}

int main(int argc, char** argv) {
  const std::string folder = argc > 1 ? argv[1] : "train_mlp_params";
  hesse::Generator gen(7);

  Tensor x_train, y_train, x_test, y_test;
  two_moons(512, 0.15, gen, x_train, y_train);
  two_moons(256, 0.15, gen, x_test, y_test);

  auto model = nn::mlp({2, 16, 16, 2}, nn::Activation::Kind::tanh, gen);  // 0.weight [16, 2], 0.bias, 2.weight, ...
  std::cout << *model << "\n\n";

  const nn::CrossEntropyLoss loss;                       // mean over the batch
  nn::Adam optimiser(model->parameters(), {/*lr=*/0.02});
  nn::DataLoader loader(x_train, y_train, /*batch_size=*/64, /*shuffle=*/true, /*seed=*/1);

  for (int epoch = 1; epoch <= 60; ++epoch) {
    double total = 0.0;
    for (const nn::Batch& batch : loader) {  // a new shuffle every epoch
      optimiser.zero_grad();
      const Tensor l = loss((*model)(batch.x), batch.y);
      l.backward();
      optimiser.step();
      total += l.item() * double(batch.x.size(0));
    }
    if (epoch % 10 == 0)
      std::printf("epoch %2d  train loss %.4f  test accuracy %.3f\n", epoch, total / double(x_train.size(0)),
                  accuracy(*model, x_test, y_test));
  }

  const double final_loss = loss((*model)(x_test), y_test).item();
  const double final_accuracy = accuracy(*model, x_test, y_test);
  std::printf("\nfinal test loss %.4f, test accuracy %.3f\n", final_loss, final_accuracy);

  // Curvature at the trained point: the sharpness (largest |eigenvalue|) of the
  // training loss's Hessian over all 354 parameters.
  std::printf("loss sharpness at the end of training: %.4f\n",
              hesse::loss_sharpness(*model, loss, {x_train}, y_train));

  model->save(folder);  // one <name>.npy per parameter: 0.weight.npy, 0.bias.npy, ...
  std::cout << "parameters saved in " << folder << "/ (load them in numpy with np.load)\n";
  return final_accuracy > 0.9 ? 0 : 1;
}

// Expected output:
//   parameter  shape                count  trainable
//   0.weight   [16, 2]                 32  yes
//   0.bias     [16]                    16  yes
//   2.weight   [16, 16]               256  yes
//   2.bias     [16]                    16  yes
//   4.weight   [2, 16]                 32  yes
//   4.bias     [2]                      2  yes
//   354 parameters, 354 trainable (train mode)
//
//   epoch 10  train loss 0.1849  test accuracy 0.926
//   epoch 20  train loss 0.0453  test accuracy 0.977
//   epoch 30  train loss 0.0354  test accuracy 0.980
//   epoch 40  train loss 0.0248  test accuracy 0.980
//   epoch 50  train loss 0.0262  test accuracy 0.980
//   epoch 60  train loss 0.0260  test accuracy 0.980
//
//   final test loss 0.0623, test accuracy 0.980
//   loss sharpness at the end of training: 5.5965
//   parameters saved in train_mlp_params/ (load them in numpy with np.load)
