#include "model/activation_checkpointing.h"

#include <ATen/core/ivalue.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "util/error.h"

namespace coil {

ActivationCheckpointing parse_activation_checkpointing(const std::string& value, const std::string& what) {
  if (value == "none") return ActivationCheckpointing::none;
  if (value == "full") return ActivationCheckpointing::full;
  fail("{} must be \"none\" or \"full\", not \"{}\"", what, value);
}

const char* to_string(ActivationCheckpointing mode) { return mode == ActivationCheckpointing::full ? "full" : "none"; }

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The function, held by the node until its backward (an IValue capsule).
struct Held : torch::CustomClassHolder {
  CheckpointedFunction f;
  explicit Held(CheckpointedFunction fn) : f(std::move(fn)) {}
};

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  static at::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<Held> held, at::TensorList inputs) {
    ctx->saved_data["f"] = c10::IValue::make_capsule(held);
    ctx->save_for_backward(inputs.vec());
    return held->f(inputs.vec());  // gradient mode is off here: nothing inside is saved
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto held = c10::static_intrusive_pointer_cast<Held>(ctx->saved_data["f"].toCapsule());
    std::vector<at::Tensor> inputs = ctx->get_saved_variables();
    // The recompute: the inputs as fresh leaves, the function's graph built again, differentiated.
    std::vector<at::Tensor> wrt;
    std::vector<size_t> where;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (!ctx->needs_input_grad(i)) {  // edges: the tensor inputs only
        inputs[i] = inputs[i].defined() ? inputs[i].detach() : inputs[i];
        continue;
      }
      inputs[i] = inputs[i].detach().requires_grad_(true);
      wrt.push_back(inputs[i]);
      where.push_back(i);
    }
    variable_list out(1 + inputs.size());
    if (wrt.empty()) return out;
    at::Tensor y;
    {
      c10::AutoGradMode grad_on(true);
      y = held->f(inputs);
    }
    const variable_list grads = torch::autograd::grad({y}, wrt, {grad_out[0]}, false, false, /*allow_unused=*/true);
    for (size_t k = 0; k < where.size(); ++k) out[1 + where[k]] = grads[k];
    return out;
  }
};

}  // namespace

at::Tensor checkpointed(const CheckpointedFunction& f, const std::vector<at::Tensor>& inputs) {
  bool any = false;
  for (const auto& t : inputs) any = any || (t.defined() && t.requires_grad());
  if (!c10::GradMode::is_enabled() || !any) return f(inputs);
  return Checkpoint::apply(c10::make_intrusive<Held>(f), at::TensorList(inputs));
}

}  // namespace coil
