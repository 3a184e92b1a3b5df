// The fused conv's eager first-order path in C++ (mace_accel/backends/cuda/native.py builds and loads it).
//
// Why: an eager forward + backward of a short conv kernel is bound by host time, and most of that host time is
// Python: the autograd.Function, our launch code, and above all the backward, which the autograd engine runs
// on its device thread (the Python there also has to take the GIL). Here the forward launch, the autograd node
// and the first-order backward (allocations, one kernel launch, the dy / dw reductions) are C++; the kernels
// are the same generated and compiled ones the Python path launches (their CUfunction handles come from
// Python), with the same arguments (CONV_PARAMS in tp_conv.cu: 15 pointers, then 3 index_t).
//
// What stays in Python: building the plan and compiling kernels, the receiver grouping (memoised), and any
// backward this file does not do: a backward under create_graph (its gradients must be differentiable: the
// Python path builds them from the custom autograd Functions) and a backward whose kernel is not compiled yet
// (the Python path compiles it, then registers it here for the next call). Both go through slow_backward.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Driver entry points, resolved by the Python side from the loaded libcuda (no link-time dependency on it).
using LaunchFn = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                         void**, void**);
using CtxGetCurrentFn = int (*)(void**);
LaunchFn g_launch = nullptr;
CtxGetCurrentFn g_ctx_get_current = nullptr;

// CONV_PARAMS: X, Y, W, G, sender, receiver, perm, seg_ptr, OUT, DY, DW, X2, Y2, W2, OUT2 (pointers), then
// num_edges, num_items, w_stride (index_t = long long).
constexpr int kNumPointers = 15;

// One compiled kernel and what its launch needs to know (KernelSpec's fields, set from Python).
struct Kernel {
  int64_t function = 0;        // CUfunction; 0: not compiled yet
  int64_t edges_per_warp = 1;  // runs (atomic) backward: a work item is this many edges
  int64_t num_parts = 1;       // output parts: warps per item = num_parts * num_chunks
  bool bulk_rows = false;      // weight rows by bulk copies: W must start BULK_ALIGN-aligned
  bool dy_atomic = false;      // dy added with atomics into one zeroed [1, E, D2] buffer
};

// Backward kernels by which gradients are asked: need_x * 4 + need_y * 2 + need_w.
constexpr int kBackwardSlots = 8;

struct Plan {
  // geometry (mace_accel.backends.cuda.codegen constants and the plan's dimensions, set from Python)
  int64_t num_chunks = 1, warps_per_block = 1, threads_per_block = 32, bulk_align = 16;
  int64_t out_dim = 0, in2_dim = 0, weight_numel = 0;
  bool unused_out = false, unused_in2 = false;
  Kernel forward;
  Kernel backward[kBackwardSlots];
  // (plan id, x, y, w, gout, sender, receiver, need_x, need_y, need_w) -> (dx, dy, dw): the Python path
  py::object slow_backward;
};

// Plans live as long as the process (a few per model): nodes refer to them by address, and a backward may run
// long after the Python side has moved on. Never freed, so no Python object is released without the GIL.
std::mutex g_plans_lock;
std::vector<Plan*> g_plans;

Plan* plan_at(int64_t id) {
  std::lock_guard<std::mutex> guard(g_plans_lock);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_plans.size()), "mace_accel native: no plan ", id);
  return g_plans[id];
}

// A copy of a kernel slot (-1: the forward), read under the lock: Python may fill a slot from another thread.
Kernel kernel_at(const Plan* p, int slot) {
  std::lock_guard<std::mutex> guard(g_plans_lock);
  return slot < 0 ? p->forward : p->backward[slot];
}

void ensure_context() {
  // The autograd engine's device thread may not have made the primary context current yet (the runtime
  // does it lazily); cudaFree(nullptr) makes it current, as PyTorch does before its own driver launches.
  void* ctx = nullptr;
  g_ctx_get_current(&ctx);
  if (ctx == nullptr) {
    cudaFree(nullptr);
  }
}

void launch(const Plan& p, const Kernel& k, int64_t num_items, void* const (&pointers)[kNumPointers],
            int64_t num_edges, int64_t w_stride, cudaStream_t stream) {
  const int64_t warps = num_items * p.num_chunks * k.num_parts;
  if (warps == 0) {
    return;
  }
  TORCH_CHECK(g_launch != nullptr, "mace_accel native: driver entry points not set");
  void* args[kNumPointers];
  for (int i = 0; i < kNumPointers; ++i) {
    args[i] = pointers[i];
  }
  long long ints[3] = {num_edges, num_items, w_stride};
  void* params[kNumPointers + 3];
  for (int i = 0; i < kNumPointers; ++i) {
    params[i] = &args[i];
  }
  for (int i = 0; i < 3; ++i) {
    params[kNumPointers + i] = &ints[i];
  }
  ensure_context();
  const int64_t blocks = (warps + p.warps_per_block - 1) / p.warps_per_block;
  const int status = g_launch(reinterpret_cast<void*>(k.function), static_cast<unsigned>(blocks), 1, 1,
                              static_cast<unsigned>(p.threads_per_block), 1, 1, 0, stream, params, nullptr);
  TORCH_CHECK(status == 0, "mace_accel native: cuLaunchKernel failed with CUresult ", status);
}

Tensor aligned_rows(const Tensor& w, const Plan& p, const Kernel& k) {
  // as the Python path: a weight view that does not start aligned is copied for the bulk row copies
  if (k.bulk_rows && reinterpret_cast<std::uintptr_t>(w.data_ptr()) % p.bulk_align != 0) {
    return w.clone();
  }
  return w;
}

struct ConvFunction : public torch::autograd::Function<ConvFunction> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor y, Tensor w, Tensor sender, Tensor receiver,
                        Tensor perm, Tensor seg, int64_t num_rows, int64_t plan_id) {
    Plan* p = plan_at(plan_id);
    const Kernel k = kernel_at(p, -1);
    TORCH_CHECK(k.function != 0, "mace_accel native: plan ", plan_id, " has no forward kernel");
    c10::cuda::CUDAGuard device_guard(x.device());
    Tensor out = p->unused_out ? torch::zeros({num_rows, p->out_dim}, x.options())
                               : torch::empty({num_rows, p->out_dim}, x.options());
    Tensor wl = aligned_rows(w, *p, k);
    const int64_t w_stride = w.dim() == 2 ? p->weight_numel : 0;
    void* const pointers[kNumPointers] = {x.data_ptr(), y.data_ptr(), wl.data_ptr(), nullptr, sender.data_ptr(),
                                          receiver.data_ptr(), perm.data_ptr(), seg.data_ptr(), out.data_ptr(),
                                          nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    launch(*p, k, num_rows, pointers, y.size(0), w_stride,
           c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, y, w, sender, receiver, perm});
    ctx->saved_data["plan"] = plan_id;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(9);
    const Tensor& gout = grads[0];
    const bool nx = ctx->needs_input_grad(0), ny = ctx->needs_input_grad(1), nw = ctx->needs_input_grad(2);
    if (!gout.defined() || !(nx || ny || nw)) {
      return result;
    }
    const int64_t plan_id = ctx->saved_data["plan"].toInt();
    Plan* p = plan_at(plan_id);
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &y = saved[1], &w = saved[2], &sender = saved[3], &receiver = saved[4],
                 &perm = saved[5];
    const Tensor g = gout.contiguous();
    const Kernel k = kernel_at(p, (nx ? 4 : 0) + (ny ? 2 : 0) + (nw ? 1 : 0));
    if (torch::autograd::GradMode::is_enabled() || k.function == 0) {
      py::gil_scoped_acquire gil;
      py::tuple r = p->slow_backward(plan_id, x, y, w, g, sender, receiver, nx, ny, nw);
      if (nx) result[0] = r[0].cast<Tensor>();
      if (ny) result[1] = r[1].cast<Tensor>();
      if (nw) result[2] = r[2].cast<Tensor>();
      return result;
    }
    c10::cuda::CUDAGuard device_guard(x.device());
    const int64_t num_edges = y.size(0);
    auto opts = x.options();
    Tensor dy_part;
    if (ny) {
      dy_part = k.dy_atomic ? torch::zeros({1, num_edges, p->in2_dim}, opts)
                            : (p->unused_in2 ? torch::zeros({k.num_parts * p->num_chunks, num_edges, p->in2_dim}, opts)
                                             : torch::empty({k.num_parts * p->num_chunks, num_edges, p->in2_dim}, opts));
    }
    Tensor dw_edge = nw ? torch::empty({num_edges, p->weight_numel}, opts) : Tensor();
    Tensor dx = nx ? torch::zeros_like(x) : Tensor();
    Tensor wl = aligned_rows(w, *p, k);
    const int64_t w_stride = w.dim() == 2 ? p->weight_numel : 0;
    void* const pointers[kNumPointers] = {
        x.data_ptr(), y.data_ptr(), wl.data_ptr(), g.data_ptr(), sender.data_ptr(), receiver.data_ptr(),
        perm.data_ptr(), nullptr, nx ? dx.data_ptr() : nullptr, ny ? dy_part.data_ptr() : nullptr,
        nw ? dw_edge.data_ptr() : nullptr, nullptr, nullptr, nullptr, nullptr};
    const int64_t items = (num_edges + k.edges_per_warp - 1) / k.edges_per_warp;
    launch(*p, k, items, pointers, num_edges, w_stride, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    if (nx) result[0] = dx;
    if (ny) result[1] = dy_part.size(0) == 1 ? dy_part[0] : dy_part.sum(0);
    if (nw) result[2] = w.dim() == 2 ? dw_edge : dw_edge.sum(0);
    return result;
  }
};

// ---- bindings -------------------------------------------------------------------------------------------
void set_driver(int64_t launch_kernel, int64_t ctx_get_current) {
  g_launch = reinterpret_cast<LaunchFn>(launch_kernel);
  g_ctx_get_current = reinterpret_cast<CtxGetCurrentFn>(ctx_get_current);
}

int64_t new_plan(int64_t num_chunks, int64_t warps_per_block, int64_t threads_per_block, int64_t bulk_align,
                 int64_t out_dim, int64_t in2_dim, int64_t weight_numel, bool unused_out, bool unused_in2,
                 py::object slow_backward) {
  auto* p = new Plan();
  p->num_chunks = num_chunks;
  p->warps_per_block = warps_per_block;
  p->threads_per_block = threads_per_block;
  p->bulk_align = bulk_align;
  p->out_dim = out_dim;
  p->in2_dim = in2_dim;
  p->weight_numel = weight_numel;
  p->unused_out = unused_out;
  p->unused_in2 = unused_in2;
  p->slow_backward = std::move(slow_backward);
  std::lock_guard<std::mutex> guard(g_plans_lock);
  g_plans.push_back(p);
  return static_cast<int64_t>(g_plans.size()) - 1;
}

// slot -1: the forward; 0..7: the backward for need_x * 4 + need_y * 2 + need_w.
void set_kernel(int64_t plan_id, int64_t slot, int64_t function, int64_t edges_per_warp, int64_t num_parts,
                bool bulk_rows, bool dy_atomic) {
  TORCH_CHECK(slot >= -1 && slot < kBackwardSlots, "mace_accel native: no kernel slot ", slot);
  TORCH_CHECK(function != 0 && edges_per_warp >= 1 && num_parts >= 1, "mace_accel native: bad kernel");
  Plan* p = plan_at(plan_id);
  Kernel k;
  k.function = function;
  k.edges_per_warp = edges_per_warp;
  k.num_parts = num_parts;
  k.bulk_rows = bulk_rows;
  k.dy_atomic = dy_atomic;
  std::lock_guard<std::mutex> guard(g_plans_lock);  // a backward on the engine's thread may read the slot
  (slot < 0 ? p->forward : p->backward[slot]) = k;
}

Tensor conv(Tensor x, Tensor y, Tensor w, Tensor sender, Tensor receiver, Tensor perm, Tensor seg,
            int64_t num_rows, int64_t plan_id) {
  return ConvFunction::apply(x, y, w, sender, receiver, perm, seg, num_rows, plan_id);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_driver", &set_driver);
  m.def("new_plan", &new_plan);
  m.def("set_kernel", &set_kernel);
  m.def("conv", &conv);
}
