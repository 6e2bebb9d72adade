// CUDA emulation runtime: runs the unmodified kernels of adapter_kernels.cu (compiled as C++, see
// cuda_emu.h and adapterfuse/ops/_emulation.py) on the CPU, for CI machines without a GPU. It exists to
// prove the CUDA code path correct before any GPU runs it; it is NOT a performance path (a launch runs
// every thread of every block as a fiber on the calling CPU thread).
//
// Model. The blocks of a grid run one after another. Within a block every CUDA thread is a fiber
// (ucontext) with its own stack; a fiber runs until it reaches __syncthreads() or a warp-collective
// operation (WMMA *_sync), then the scheduler picks the next runnable fiber according to the schedule:
//   asc     lowest thread index first          desc    highest first
//   random  a seeded random runnable thread    warp    warps take turns (round-robin), lanes ascending
// ADAPTERFUSE_EMU_SCHEDULE picks it (default asc) and ADAPTERFUSE_EMU_SEED seeds "random". A kernel that
// is free of races gives bit-identical results under every schedule; a missing barrier reads shared
// memory another thread has not written yet (shared memory is filled with 0xFF bytes, NaN in every float
// type, when a block starts), which the tests see as NaN or as a mismatch between schedules.
// Checked: a barrier that some live threads never reach (divergence, or threads that exited), a warp
// collective whose lanes disagree on the operation or its arguments, dynamic shared memory above what
// cudaFuncSetAttribute allowed (48 KiB without it) or above the emulated GPU's opt-in limit
// (ADAPTERFUSE_EMU_SMEM_OPTIN bytes, default 232448 as on an H100; 101376 emulates sm_86 / sm_89),
// block sizes above 1024 threads and grid dimensions above the hardware limits.
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"

// Under AddressSanitizer (the sanitizer build of the tests, see adapterfuse/ops/_emulation.py) every stack
// switch is announced to ASan, which otherwise takes a fiber's stack for a corrupted one.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define ADAPTERFUSE_EMU_ASAN 1
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  ThreadState ts;
  State state = State::kRunnable;
  int index = 0;
  // warp collective in flight
  uint64_t key = 0;
  void* frag = nullptr;
};

struct WarpOp {
  int arrived = 0;
  uint64_t key = 0;
  const char* what = nullptr;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<WarpOp> warps;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;  // 128-byte aligned, as `extern __shared__ __align__(128)` declares it
  ucontext_t sched;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  int at_barrier = 0;
  int live = 0;
  std::string error;
};

thread_local Block* g_block = nullptr;
thread_local const void* g_sched_stack = nullptr;  // the scheduler's (calling thread's) stack, for ASan
thread_local size_t g_sched_stack_size = 0;
thread_local std::string g_last_message;
thread_local cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dynamic_smem;  // per kernel, set by cudaFuncSetAttribute

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

int optin_smem() { return env_int("ADAPTERFUSE_EMU_SMEM_OPTIN", 232448); }

// Fiber -> scheduler. `final`: the fiber never resumes (it finished or failed).
void fiber_to_scheduler(Fiber* f, bool final) {
#ifdef ADAPTERFUSE_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(final ? nullptr : &fake_stack, g_sched_stack, g_sched_stack_size);
#else
  (void)final;
#endif
  swapcontext(&f->ctx, &g_block->sched);
#ifdef ADAPTERFUSE_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, &g_sched_stack, &g_sched_stack_size);
#endif
}

// Scheduler -> fiber, until the fiber yields back.
void scheduler_to_fiber(Block& b, Fiber* f) {
#ifdef ADAPTERFUSE_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f->stack.get(), kStackBytes);
#endif
  swapcontext(&b.sched, &f->ctx);
#ifdef ADAPTERFUSE_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

void yield_to_scheduler() { fiber_to_scheduler(g_block->running, false); }

void trampoline() {
#ifdef ADAPTERFUSE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack, &g_sched_stack_size);
#endif
  Block* b = g_block;
  (*b->body)();
  Fiber* f = b->running;
  f->state = State::kDone;
  --b->live;
  // a thread that exits while others wait at a barrier would deadlock (or worse) on the hardware
  if (b->at_barrier > 0 && b->error.empty())
    b->error = "thread " + std::to_string(f->index) + " exited while other threads wait at __syncthreads()";
  fiber_to_scheduler(f, true);
}

struct Schedule {
  enum Kind { kAsc, kDesc, kRandom, kWarp } kind = kAsc;
  std::mt19937 rng{0};
  int next_warp = 0;

  Schedule() {
    const char* s = std::getenv("ADAPTERFUSE_EMU_SCHEDULE");
    std::string v = s ? s : "asc";
    if (v == "desc") kind = kDesc;
    else if (v == "random") kind = kRandom;
    else if (v == "warp") kind = kWarp;
    rng.seed(static_cast<unsigned>(env_int("ADAPTERFUSE_EMU_SEED", 0)));
  }

  Fiber* pick(Block& b) {
    const int n = static_cast<int>(b.fibers.size());
    switch (kind) {
      case kAsc:
        for (int i = 0; i < n; ++i) if (b.fibers[i].state == State::kRunnable) return &b.fibers[i];
        return nullptr;
      case kDesc:
        for (int i = n - 1; i >= 0; --i) if (b.fibers[i].state == State::kRunnable) return &b.fibers[i];
        return nullptr;
      case kRandom: {
        std::vector<int> ready;
        for (int i = 0; i < n; ++i) if (b.fibers[i].state == State::kRunnable) ready.push_back(i);
        if (ready.empty()) return nullptr;
        return &b.fibers[ready[rng() % ready.size()]];
      }
      default: {
        const int warps = (n + kWarp - 1) / kWarp;
        for (int t = 0; t < warps; ++t) {
          const int w = (next_warp + t) % warps;
          for (int i = w * kWarp; i < std::min(n, (w + 1) * kWarp); ++i)
            if (b.fibers[i].state == State::kRunnable) {
              next_warp = (w + 1) % warps;
              return &b.fibers[i];
            }
        }
        return nullptr;
      }
    }
  }
};

int live_in_warp(const Block& b, int warp) {
  int n = 0;
  for (size_t i = warp * kWarp; i < std::min(b.fibers.size(), static_cast<size_t>((warp + 1) * kWarp)); ++i)
    n += b.fibers[i].state != State::kDone;
  return n;
}

// Run one block to completion; false (with b.error set) on a violation or a deadlock.
bool run_block(Block& b, Schedule& sched) {
  while (b.live > 0) {
    if (!b.error.empty()) return false;
    Fiber* f = sched.pick(b);
    if (f == nullptr) {
      if (b.at_barrier > 0 && b.at_barrier == b.live) {  // everyone alive is at the barrier: release it
        for (auto& x : b.fibers) if (x.state == State::kBarrier) x.state = State::kRunnable;
        b.at_barrier = 0;
        continue;
      }
      b.error = "deadlock: threads wait at __syncthreads() and at a warp collective at the same time "
                "(a barrier or a *_sync call inside divergent code)";
      return false;
    }
    b.running = f;
    scheduler_to_fiber(b, f);
    b.running = nullptr;
  }
  if (b.at_barrier > 0 && b.error.empty()) b.error = "threads still wait at __syncthreads() after the others exited";
  return b.error.empty();
}

}  // namespace

const ThreadState& current() { return g_block->running->ts; }

unsigned char* dynamic_smem() { return g_block->smem; }

void syncthreads() {
  Block* b = g_block;
  b->running->state = State::kBarrier;
  ++b->at_barrier;
  yield_to_scheduler();
}

void warp_collective(uint64_t key, const char* what, void* frag, size_t frag_bytes,
                     const std::function<void(void*)>& op) {
  Block* b = g_block;
  Fiber* f = b->running;
  const int warp = f->index / kWarp;
  WarpOp& w = b->warps[warp];
  if (w.arrived > 0 && w.key != key && b->error.empty())
    b->error = std::string("warp ") + std::to_string(warp) + ": lanes disagree on a warp-collective operation (" +
               what + " vs " + (w.what ? w.what : "?") + ", or different arguments)";
  if (w.arrived == 0) {
    w.key = key;
    w.what = what;
  }
  f->key = key;
  f->frag = frag;
  ++w.arrived;
  if (w.arrived < live_in_warp(*b, warp)) {
    f->state = State::kWarp;
    yield_to_scheduler();
    return;  // the last lane did the work for everyone
  }
  // the last lane: the operation happens once, now, for the whole warp
  op(frag);
  for (size_t i = warp * kWarp; i < std::min(b->fibers.size(), static_cast<size_t>((warp + 1) * kWarp)); ++i) {
    Fiber& o = b->fibers[i];
    if (o.state != State::kWarp) continue;
    if (frag_bytes > 0) std::memcpy(o.frag, frag, frag_bytes);
    o.state = State::kRunnable;
  }
  w.arrived = 0;
}

void fail(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  if (g_block != nullptr && g_block->error.empty()) g_block->error = buf;
  // stop this thread here: the scheduler sees the error and abandons the block
  if (g_block != nullptr && g_block->running != nullptr) {
    g_block->running->state = State::kDone;
    fiber_to_scheduler(g_block->running, true);
  }
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  auto set = [](cudaError_t e, std::string msg) {
    g_last_error = e;
    g_last_message = std::move(msg);
    return e;
  };
  if (threads == 0 || threads > 1024 || grid.y > 65535 || grid.z > 65535 || grid.x == 0)
    return set(cudaErrorInvalidConfiguration, "invalid grid / block dimensions");
  auto it = g_max_dynamic_smem.find(kernel);
  const size_t allowed = it == g_max_dynamic_smem.end() ? 48 * 1024 : static_cast<size_t>(it->second);
  if (smem > allowed)
    return set(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(smem) + " bytes > " +
                                          std::to_string(allowed) + " allowed for this kernel");
  Schedule sched;
  Block b;
  b.fibers.resize(threads);
  b.warps.resize((threads + kWarp - 1) / kWarp);
  for (size_t i = 0; i < threads; ++i) b.fibers[i].stack.reset(new char[kStackBytes]);
  b.body = &body;
  Block* saved = g_block;
  g_block = &b;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.smem_storage.assign(smem + 128, 0xFF);
        b.smem = b.smem_storage.data() + (128 - reinterpret_cast<uintptr_t>(b.smem_storage.data()) % 128) % 128;
        b.live = static_cast<int>(threads);
        b.at_barrier = 0;
        for (auto& w : b.warps) w = WarpOp{};
        for (size_t i = 0; i < threads; ++i) {
          Fiber& f = b.fibers[i];
          f.index = static_cast<int>(i);
          f.state = State::kRunnable;
          f.ts.thread_idx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.ts.block_idx = make_uint3(bx, by, bz);
          f.ts.block_dim = block;
          f.ts.grid_dim = grid;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &b.sched;
          makecontext(&f.ctx, trampoline, 0);
        }
        if (!run_block(b, sched)) {
          g_block = saved;
          return set(cudaErrorLaunchFailure, "block (" + std::to_string(bx) + ", " + std::to_string(by) + "): " +
                                                 b.error);
        }
      }
  g_block = saved;
  return set(cudaSuccess, "");
}

}  // namespace emu

// ---- the runtime API the launch code calls -------------------------------------------------------

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::optin_smem(); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > emu::optin_smem()) return cudaErrorInvalidValue;
  emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  if (error == cudaSuccess) return "no error";
  if (!emu::g_last_message.empty()) return emu::g_last_message.c_str();
  return error == cudaErrorInvalidValue ? "invalid argument"
         : error == cudaErrorInvalidConfiguration ? "invalid configuration argument" : "unspecified launch failure";
}

}  // extern "C"
