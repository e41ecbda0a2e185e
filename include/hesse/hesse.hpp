#pragma once
// hesse: second-order analysis of models in C++. One include for everything.
#include "hesse/error.hpp"
#include "hesse/tensor.hpp"
#include "hesse/autograd.hpp"
#include "hesse/ops.hpp"
#include "hesse/check.hpp"
#include "hesse/io.hpp"
#include "hesse/nn/module.hpp"
#include "hesse/nn/layers.hpp"
#include "hesse/nn/loss.hpp"
#include "hesse/nn/optim.hpp"
#include "hesse/nn/data.hpp"
#include "hesse/hessian.hpp"
