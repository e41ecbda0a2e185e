// Module: parameter registry with PyTorch's naming and ordering.
#include <algorithm>
#include <filesystem>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <unordered_set>

#include "hesse/io.hpp"
#include "hesse/nn/module.hpp"
#include "../detail.hpp"

namespace hesse::nn {

void Module::check_new_name(const std::string& name) const {
  if (name.empty() || name.find('.') != std::string::npos)
    throw ValueError("hesse::Module: invalid name '" + name + "' (must be non-empty and contain no '.')");
  for (const auto& p : params_)
    if (p.first == name) throw ValueError("hesse::Module: a parameter named '" + name + "' is already registered");
  for (const auto& c : children_)
    if (c.first == name) throw ValueError("hesse::Module: a submodule named '" + name + "' is already registered");
}

Tensor Module::register_parameter(const std::string& name, Tensor value, bool requires_grad) {
  check_new_name(name);
  if (!value.defined()) throw ValueError("hesse::Module: parameter '" + name + "' is undefined");
  if (!value.is_leaf()) value = value.detach();
  value.requires_grad_(requires_grad);
  params_.emplace_back(name, value);
  return value;
}

namespace {
bool reaches(const Module& from, const Module* target) {
  if (&from == target) return true;
  for (const auto& child : from.children())
    if (reaches(*child.second, target)) return true;
  return false;
}
}  // namespace

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_new_name(name);
  if (!module) throw ValueError("hesse::Module: submodule '" + name + "' is null");
  if (reaches(*module, this))  // every walk over the modules would recurse forever
    throw ValueError("hesse::Module: submodule '" + name + "' is this module or contains it");
  children_.emplace_back(name, std::move(module));
}

void Module::collect(const std::string& prefix, std::vector<NamedTensor>& out) const {
  for (const auto& [name, t] : params_) out.emplace_back(prefix + name, t);
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

// A tensor reachable under several names (a tied weight, a submodule registered
// twice) is listed once, under its first name, as PyTorch's remove_duplicate=True
// does: it is one set of variables for gradients, Hessians and save/load.
std::vector<NamedTensor> Module::named_parameters() const {
  std::vector<NamedTensor> all;
  collect("", all);
  std::vector<NamedTensor> out;
  out.reserve(all.size());
  std::unordered_set<const void*> seen;
  for (auto& p : all)
    if (seen.insert(p.second.impl().get()).second) out.push_back(std::move(p));
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& p : named_parameters()) out.push_back(p.second);
  return out;
}

std::vector<NamedTensor> Module::trainable_parameters() const {
  std::vector<NamedTensor> out;
  for (auto& p : named_parameters())
    if (p.second.requires_grad()) out.push_back(p);
  return out;
}

Tensor Module::parameter(const std::string& name) const {
  const auto all = named_parameters();
  for (const auto& p : all)
    if (p.first == name) return p.second;
  std::string known;
  for (const auto& p : all) known += (known.empty() ? "" : ", ") + p.first;
  throw ValueError("hesse::Module: no parameter named '" + name + "' (parameters: " + known + ")");
}

std::size_t Module::num_parameters(bool trainable_only) const {
  std::size_t n = 0;
  for (const auto& p : named_parameters())
    if (!trainable_only || p.second.requires_grad()) n += p.second.numel();
  return n;
}

std::vector<std::pair<std::string, Module*>> Module::named_modules() {
  std::vector<std::pair<std::string, Module*>> out{{"", this}};
  for (auto& [name, child] : children_)
    for (auto& [sub, m] : child->named_modules()) {
      bool seen = false;  // a module registered twice is listed once, as in PyTorch
      for (const auto& o : out) seen = seen || o.second == m;
      if (!seen) out.emplace_back(sub.empty() ? name : name + "." + sub, m);
    }
  return out;
}

void Module::train(bool on) {
  training_ = on;
  for (auto& c : children_) c.second->train(on);
}

void Module::zero_grad() {
  for (auto& p : named_parameters()) p.second.zero_grad();
}

std::string Module::summary() const {
  std::ostringstream os;
  const auto params = named_parameters();
  std::size_t width = 9;
  for (const auto& p : params) width = std::max(width, p.first.size());
  os << std::left << std::setw(int(width)) << "parameter" << "  " << std::setw(16) << "shape" << std::right
     << std::setw(10) << "count" << "  trainable\n";
  std::size_t total = 0, trainable = 0;
  for (const auto& [name, t] : params) {
    os << std::left << std::setw(int(width)) << name << "  " << std::setw(16) << to_string(t.shape()) << std::right
       << std::setw(10) << t.numel() << "  " << (t.requires_grad() ? "yes" : "frozen") << "\n";
    total += t.numel();
    if (t.requires_grad()) trainable += t.numel();
  }
  os << total << " parameters, " << trainable << " trainable" << (training_ ? " (train mode)" : " (eval mode)");
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Module& m) { return os << m.summary(); }

void Module::save(const std::string& folder) const {
  std::error_code ec;
  std::filesystem::create_directories(folder, ec);
  if (ec) throw IoError("hesse::Module::save: cannot create folder '" + folder + "': " + ec.message());
  for (const auto& [name, t] : named_parameters()) save_npy(folder + "/" + name + ".npy", t);
}

// Everything is read and checked before any parameter changes, so a failed
// load leaves the model as it was.
void Module::load(const std::string& folder) {
  const auto params = named_parameters();
  std::vector<Tensor> values;
  for (const auto& [name, t] : params) {
    const std::string path = folder + "/" + name + ".npy";
    if (!std::filesystem::exists(path))
      throw IoError("hesse::Module::load: parameter '" + name + "' has no file " + path);
    Tensor v = load_npy(path);
    if (v.shape() != t.shape())
      throw ShapeError("hesse::Module::load: parameter '" + name + "' has shape " + to_string(t.shape()) + " but " +
                       path + " holds shape " + to_string(v.shape()));
    values.push_back(v);
  }
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(folder, ec)) {
    const auto file = entry.path().filename().string();
    if (entry.path().extension() != ".npy") continue;
    const std::string name = file.substr(0, file.size() - 4);
    bool known = false;
    for (const auto& p : params) known = known || p.first == name;
    if (!known)
      throw IoError("hesse::Module::load: " + entry.path().string() + " names no parameter of this model ('" +
                    name + "')");
  }
  for (std::size_t i = 0; i < params.size(); ++i) {
    Tensor handle = params[i].second;
    std::copy(values[i].data(), values[i].data() + values[i].numel(), handle.mutable_data());
  }
}

}  // namespace hesse::nn
