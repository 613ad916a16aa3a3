"""The CUDA sources, checked without a GPU wherever nvcc is (on PATH or in /usr/local/cuda/bin).

- Every csrc/*.cu compiles for sm_80 (A100) and sm_90 (H100/H200), warnings as errors, with
  every kernel built for both and no register spills (ptxas -v).
- The objects define the launchers that kernels.h declares, and river_ops_cuda.cpp registers
  a CUDA kernel for every tensor op that the built library declares.
- Each kernel's own per-thread code (the __host__ __device__ parts of the .cu files), compiled
  for the host, replays a launch there, thread after thread: the plan, the grid, the shared-
  memory tiles and codebook slices of vq_nearest, the head, 16-byte packs, tail and grid-
  stride passes of euler_step_. The replayed results must match river's references, NaN/inf
  rule included. What only a GPU shows (atomics racing, shared memory, streams, timing) is
  left to the CUDA cases of tests/test_kernels.py and to tests/gpu_check.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import river

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NVCC = shutil.which("nvcc") or next(
    (p for p in ["/usr/local/cuda/bin/nvcc"] if os.access(p, os.X_OK)), None)
needs_nvcc = pytest.mark.skipif(NVCC is None,
                                reason="nvcc not found on PATH or in /usr/local/cuda/bin")
ARCHS = ("sm_80", "sm_90")

# Host programs that #include a .cu file and replay its launches with the kernel's own
# per-thread functions; only the loop over blocks, threads and tiles is written again here.
REPLAY = {
    "vq_nearest.cu": r"""
#include "vq_nearest.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace river;

// vq_nearest_search over the whole grid, each block's threads one after another between
// the block's barriers; the tile is filled with codes that would win between copies, so a
// stale or short copy shows
template <typename T, int DP>
void search(const T* z, const float* packed, int64_t N, int64_t K, int64_t D, const VqPlan& p,
            unsigned long long* keys) {
  constexpr int TK = tile_codes(DP), ROW4 = SearchThread<DP>::ROW / 4;
  std::vector<float4> tile(TK * ROW4);
  std::vector<SearchThread<DP>> threads(THREADS);
  for (int64_t bx = 0; bx < p.blocks; ++bx)
    for (int64_t by = 0; by < p.slices; ++by) {
      const int64_t first = bx * THREADS * SearchThread<DP>::V;
      const int64_t k_begin = p.ks * by, k_end = std::min(k_begin + p.ks, K);
      for (int t = 0; t < THREADS; ++t) threads[t].load(z, N, D, first + t, k_begin);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += TK) {
        const int tk = int(std::min<int64_t>(TK, k_end - k0));
        std::fill(tile.begin(), tile.end(), make_float4(-1e30f, 0.f, 0.f, 0.f));
        for (int t = 0; t < THREADS; ++t)
          stage_tile(tile.data(), reinterpret_cast<const float4*>(packed), k0, tk, ROW4, t);
        for (int t = 0; t < THREADS; ++t) threads[t].scan(tile.data(), tk, int(k0));
      }
      for (int t = 0; t < THREADS; ++t) threads[t].publish_all(keys, N, first + t);
    }
}

template <typename T>
void run(int64_t N, int64_t K, int64_t D, int sms, const char* in, const char* out) {
  const VqPlan p = vq_plan(N, K, D, sms);
  std::printf("{\"dp\": %d, \"row\": %lld, \"vectors\": %d, \"tile\": %d, \"blocks\": %lld, "
              "\"slices\": %lld, \"ks\": %lld, \"workspace\": %lld}\n", p.dp, (long long)p.row,
              p.vectors, p.dp > 0 ? tile_codes(p.dp) : 0, (long long)p.blocks,
              (long long)p.slices, (long long)p.ks, (long long)vq_nearest_workspace_floats(K, D));
  if (!in) return;
  std::vector<float> raw((N + K) * D);  // z then the codebook, float32
  FILE* f = std::fopen(in, "rb");
  if (!f || std::fread(raw.data(), sizeof(float), raw.size(), f) != raw.size()) std::exit(3);
  std::fclose(f);
  std::vector<T> z(N * D), e(K * D);
  for (int64_t i = 0; i < N * D; ++i) z[i] = from_float<T>(raw[i]);
  for (int64_t i = 0; i < K * D; ++i) e[i] = from_float<T>(raw[N * D + i]);
  std::vector<float> packed(vq_nearest_workspace_floats(K, D) + 4);
  float* ws = packed.data() + (4 - reinterpret_cast<uintptr_t>(packed.data()) % 16 / 4) % 4;
  for (int64_t k = 0; k < K; ++k) pack_code(e.data() + k * D, D, p.row, ws + k * p.row);
  std::vector<int64_t> idx(N, -1);  // the memset: every key all ones
  auto* keys = reinterpret_cast<unsigned long long*>(idx.data());
  switch (p.dp) {
#define CASE(DP) case DP: search<T, DP>(z.data(), ws, N, K, D, p, keys); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
    CASE(12) CASE(16) CASE(24) CASE(32) CASE(48) CASE(64)
#undef CASE
    default:
      for (int64_t n = 0; n < N; ++n)
        for (int64_t by = 0; by < p.slices; ++by)
          search_any_d(z.data() + n * D, D, ws, p.row, p.ks * by, std::min(p.ks * (by + 1), K),
                       keys + n);
  }
  std::vector<T> dist(N);
  std::vector<float> dist32(N);
  for (int64_t n = 0; n < N; ++n) {
    finish_row(z.data() + n * D, D, idx.data() + n, dist.data() + n);
    dist32[n] = to_float(dist[n]);
  }
  f = std::fopen(out, "wb");
  std::fwrite(idx.data(), sizeof(int64_t), N, f);
  std::fwrite(dist32.data(), sizeof(float), N, f);
  std::fclose(f);
}

// replay DTYPE N K D SMS [IN OUT]: prints the plan; with IN and OUT, replays the launch
int main(int argc, char** argv) {
  if (argc != 6 && argc != 8) return 2;
  const int64_t N = std::atoll(argv[2]), K = std::atoll(argv[3]), D = std::atoll(argv[4]);
  const int sms = std::atoi(argv[5]);
  const char* in = argc == 8 ? argv[6] : nullptr;
  const char* out = argc == 8 ? argv[7] : nullptr;
  const char dtype = argv[1][0];
  if (dtype == 'f') run<float>(N, K, D, sms, in, out);
  else if (dtype == 'h') run<__half>(N, K, D, sms, in, out);
  else run<__nv_bfloat16>(N, K, D, sms, in, out);
  return 0;
}
""",
    "euler_step.cu": r"""
#include "euler_step.cu"

#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace river;

// x += dt v on x and v placed X_OFF and V_OFF elements past a 256-byte boundary (SAME: v is
// x), replayed with every thread of the planned grid; each element must come out as one
// update of its own (checked exactly), so an element done twice, or not at all, shows.
template <typename T>
int run(int64_t n, int x_off, int v_off, bool same, int sms) {
  std::vector<T> xs(n + 512), vs(n + 512), expected(n);
  auto at_256 = [](T* p) {  // the first element on a 256-byte boundary
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 255) / 256 * 256);
  };
  T* x = at_256(xs.data()) + x_off;
  T* v = same ? x : at_256(vs.data()) + v_off;
  const float dt = 0.375f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = from_float<T>(float(i % 1000) - 500.f);
    if (!same) v[i] = from_float<T>(float((i * 7) % 31) - 15.f);
    expected[i] = x[i];
    update(&expected[i], same ? &x[i] : &v[i], dt);
  }
  const EulerPlan p = euler_plan(reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(v),
                                 n, int(sizeof(T)), sms);
  const int64_t stride = p.blocks * THREADS;
  for (int64_t t = 0; t < stride; ++t) {
    if (p.vec > 1)
      euler_thread<T, 16 / sizeof(T)>(x, v, dt, n, p.head, t, stride);
    else
      euler_thread<T, 1>(x, v, dt, n, 0, t, stride);
  }
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) wrong += to_float(x[i]) != to_float(expected[i]);
  const int64_t packs = (n - p.head) / p.vec;
  std::printf("{\"vec\": %d, \"head\": %d, \"blocks\": %lld, \"passes\": %lld, \"tail\": %lld, "
              "\"wrong\": %lld}\n", p.vec, p.head, (long long)p.blocks,
              (long long)((packs + stride - 1) / stride), (long long)((n - p.head) % p.vec),
              (long long)wrong);
  return 0;
}

// replay DTYPE N X_OFF V_OFF SAME SMS
int main(int argc, char** argv) {
  if (argc != 7) return 2;
  const int64_t n = std::atoll(argv[2]);
  const int x_off = std::atoi(argv[3]), v_off = std::atoi(argv[4]), sms = std::atoi(argv[6]);
  const bool same = argv[5][0] == '1';
  const char dtype = argv[1][0];
  if (dtype == 'f') return run<float>(n, x_off, v_off, same, sms);
  if (dtype == 'h') return run<__half>(n, x_off, v_off, same, sms);
  return run<__nv_bfloat16>(n, x_off, v_off, same, sms);
}
""",
}


def test_every_cu_file_has_a_replay():
    assert sorted(REPLAY) == sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """cu file -> (replay executable, ptxas report): each .cu compiled once, with its replay
    program, for sm_80 and sm_90, warnings as errors."""
    out, cache = tmp_path_factory.mktemp("cuda"), {}

    def build(cu):
        if cu not in cache:
            src, exe = out / f"replay_{cu}", out / f"replay_{cu}.bin"
            src.write_text(REPLAY[cu])
            cmd = [NVCC, "-O2", "-std=c++17", "-Werror", "all-warnings", "-Xptxas", "-v",
                   "-I", CSRC, "-x", "cu", *[f for a in ARCHS for f in (
                       "-gencode", f"arch=compute_{a[3:]},code={a}")], str(src), "-o", str(exe)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
            cache[cu] = (str(exe), result.stderr)
        return cache[cu]
    return build


def kernels_in(ptxas_report):
    """{(kernel, arch): (registers, spill bytes)} from ptxas -v."""
    found, current = {}, None
    for line in ptxas_report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = m.groups()
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            found.setdefault(current, [0, 0])[1] = int(m[1]) + int(m[2])
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            found.setdefault(current, [0, 0])[0] = int(m[1])
    return found


@needs_nvcc
@pytest.mark.parametrize("cu,kernels", [
    # 3 dtypes x (14 compiled widths + the any-D loop) searches, packs, finishes
    ("vq_nearest.cu", {"vq_nearest_search": 3 * 14, "vq_nearest_search_any_d": 3,
                       "vq_pack_codebook": 3, "vq_nearest_finish": 3}),
    ("euler_step.cu", {"euler_step_kernel": 3 * 2}),  # 3 dtypes x (16-byte packs, singles)
])
def test_every_kernel_builds_for_each_arch_without_spills(cu, kernels, built):
    found = kernels_in(built(cu)[1])
    for arch in ARCHS:
        for name, count in kernels.items():
            mangled = f"{len(name)}{name}I"  # the kernel's name in its mangled template name
            mine = {k: v for (k, a), v in found.items() if a == arch and mangled in k}
            assert len(mine) == count, f"{name} for {arch}: {len(mine)} builds, want {count}"
            for k, (registers, spills) in mine.items():
                assert spills == 0, f"{k} spills {spills} bytes on {arch}"
                assert 0 < registers <= 128, f"{k} needs {registers} registers on {arch}"


@needs_nvcc
@pytest.mark.parametrize("cu", sorted(REPLAY))
def test_the_launchers_of_kernels_h_are_defined(cu, built):
    header = open(os.path.join(CSRC, "kernels.h")).read()
    declared = set(re.findall(r"^(?!//)\S[^\n(]* (\w+)\(", header, re.M))
    assert declared == {"launch_euler_step", "launch_vq_nearest", "vq_nearest_workspace_floats"}
    symbols = subprocess.run(["nm", "-C", "--defined-only", built(cu)[0]], capture_output=True,
                             text=True, check=True).stdout
    defined = {name for name in declared if re.search(rf" T river::{name}\(", symbols)}
    expected = {n for n in declared if n.startswith("launch_euler")} if cu == "euler_step.cu" \
        else {n for n in declared if "vq_nearest" in n}
    assert defined == expected


def test_river_ops_cuda_registers_every_tensor_op():
    """Every op of the built library that takes a tensor has a CUDA kernel, registered in
    river_ops_cuda.cpp's TORCH_LIBRARY_IMPL(river, CUDA, ...) block."""
    assert river.load_kernels() or pytest.skip("the csrc/ extension does not build here")
    ops = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
           if n.startswith("river::")]
    schemas = {name: getattr(torch.ops.river, name).default._schema for name in ops}
    tensor_ops = {name for name, schema in schemas.items()
                  if any(a.type.kind() == "TensorType" for a in schema.arguments)}
    assert tensor_ops == {"vq_nearest", "euler_step_"}
    source = open(os.path.join(CSRC, "river_ops_cuda.cpp")).read()
    block = re.search(r"TORCH_LIBRARY_IMPL\(river, CUDA, m\) \{(.*?)\n\}", source, re.S)
    assert block, "no TORCH_LIBRARY_IMPL(river, CUDA, m) block"
    impls = dict(re.findall(r'm\.impl\("(\w+)", &river::(\w+)\)', block[1]))
    assert set(impls) == tensor_ops
    for op, fn in impls.items():  # each names a function defined in the file
        assert re.search(rf"\n\S[^\n]* {fn}\(", source), f"{fn} is not defined"


# ---------------------------------------------------------------------------------------
# The toolchain: what a failed CUDA build tells the user to do
# ---------------------------------------------------------------------------------------

@pytest.fixture
def cuda_build(monkeypatch):
    """river's loader on a machine whose torch has CUDA 12.8 and a toolkit (nvcc's version
    given by the test), nothing installed; the compiler is replaced by `compile` and every
    load_kernels() call is fresh. Yields (set nvcc version, compile calls)."""
    import importlib.util
    import torch.utils.cpp_extension
    build = river.csrc_build()
    calls, version = [], {"nvcc": "12.8"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(build, "want_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a device to build for
    monkeypatch.setattr(build, "nvcc_version", lambda home: version["nvcc"])
    monkeypatch.setattr(build, "register_fakes", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RIVER_KERNELS", raising=False)
    river.load_kernels.cache_clear()
    yield version, calls
    river.load_kernels.cache_clear()


ADVICE = ["torch.version.cuda (12.8", "install CUDA 12.x and set CUDA_HOME to it",
          "NVIDIA driver >= 580", "RIVER_KERNELS=ref"]


def test_a_toolkit_of_another_cuda_version_is_refused_with_what_to_do(cuda_build, monkeypatch):
    version, calls = cuda_build
    version["nvcc"] = "13.0"
    with pytest.warns(UserWarning) as record:
        assert river.load_kernels() == {"cpu"}  # the CPU kernels stay
    message = str(record[-1].message)
    assert "is CUDA 13.0 but torch was built with CUDA 12.8; building the CPU kernels" in message
    assert all(what in message for what in ADVICE), message
    assert len(calls) == 1 and not any(s.endswith(".cu") for s in calls[0]["sources"])
    monkeypatch.setenv("RIVER_KERNELS", "ext")
    river.load_kernels.cache_clear()
    with pytest.raises(RuntimeError,
                       match="RIVER_KERNELS=ext but .* CUDA 13.0 .*RIVER_KERNELS=ref"):
        river.load_kernels()


def nvcc_fails(calls):
    """A compiler that fails on the CUDA sources (nvcc's error among ninja's lines) and
    builds the CPU ones."""
    def compile(**kw):
        if any(s.endswith(".cu") for s in kw["sources"]):
            raise RuntimeError("Error building extension 'river_kernels': [1/4] /cuda/bin/nvcc "
                               "-c vq_nearest.cu -o vq_nearest.cuda.o\nFAILED: vq_nearest.cuda.o"
                               "\nnvcc fatal   : Unsupported gpu architecture 'compute_120'\n"
                               "ninja: build stopped: subcommand failed.")
        calls.append(kw)
    return compile


def test_a_failed_cuda_build_keeps_the_cpu_kernels_and_shows_nvccs_error(cuda_build,
                                                                         monkeypatch):
    import torch.utils.cpp_extension
    version, calls = cuda_build
    monkeypatch.setattr(torch.utils.cpp_extension, "load", nvcc_fails(calls))
    with pytest.warns(UserWarning) as record:
        assert river.load_kernels() == {"cpu"}
    assert len(calls) == 1 and not any(s.endswith(".cu") for s in calls[0]["sources"])
    message = str(record[-1].message)
    assert "the CUDA build failed (RuntimeError: FAILED: vq_nearest.cuda.o" in message
    assert "nvcc fatal   : Unsupported gpu architecture 'compute_120'" in message
    assert "CUDA tensors use the PyTorch reference ops" in message
    # nvcc is torch's version (12.8): the version is not blamed, the compiler's error is
    assert "is torch's CUDA version, so the compiler's errors say what failed" in message
    assert "must match" not in message and "install CUDA" not in message
    assert "TORCH_CUDA_ARCH_LIST" in message and "RIVER_KERNELS=ref" in message
    monkeypatch.setenv("RIVER_KERNELS", "ext")  # forced: the failure is an error
    river.load_kernels.cache_clear()
    with pytest.raises(RuntimeError, match="(?s)RIVER_KERNELS=ext but .*Unsupported gpu"):
        river.load_kernels()


def test_a_failed_cuda_build_blames_a_toolkit_of_another_minor_version(cuda_build, monkeypatch):
    import torch.utils.cpp_extension
    version, calls = cuda_build
    version["nvcc"] = "12.6"  # same major: it compiles, and the difference may be why it failed
    monkeypatch.setattr(torch.utils.cpp_extension, "load", nvcc_fails(calls))
    with pytest.warns(UserWarning) as record:
        assert river.load_kernels() == {"cpu"}
    message = str(record[-1].message)
    assert "the CUDA toolkit must match torch.version.cuda (12.8" in message
    assert "has nvcc 12.6): install CUDA 12.8 and set CUDA_HOME to it" in message


def test_a_matching_toolkit_builds_cuda_kernels(cuda_build):
    version, calls = cuda_build
    assert river.load_kernels() == {"cpu", "cuda"}
    assert {os.path.basename(s) for s in calls[0]["sources"]} >= {"vq_nearest.cu", "euler_step.cu"}


def test_without_a_toolkit_cuda_tensors_use_the_reference(cuda_build, monkeypatch):
    build = river.csrc_build()
    monkeypatch.setattr(build, "want_cuda", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match="no CUDA toolkit found .* built for the CPU only; CUDA "
                                         "tensors use the PyTorch reference ops"):
        assert river.load_kernels() == {"cpu"}


def test_cuda_home_is_guessed_before_torch_reads_it():
    """torch.utils.cpp_extension reads CUDA_HOME once, on import: build.load() must run
    guess_cuda_home (inside want_cuda) before it imports it, or a toolkit found only by the
    guess (nvcc a wrapper outside the toolkit) is missed and CUDA silently not built."""
    code = "\n".join([
        "import importlib.util, sys, torch",
        "torch.version.cuda = '13.0'",
        f"spec = importlib.util.spec_from_file_location('b', {os.path.join(CSRC, 'build.py')!r})",
        "b = importlib.util.module_from_spec(spec)",
        "spec.loader.exec_module(b)",
        "importlib.util.find_spec = lambda name: None",
        "b.guess_cuda_home = lambda: print('read before the guess:',",
        "                                  'torch.utils.cpp_extension' in sys.modules)",
        "b.check_cuda_toolkit = lambda: None",
        "b.extension_args = lambda cuda: sys.exit(0)",
        "b.load()"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "read before the guess: False" in out.stdout


# ---------------------------------------------------------------------------------------
# Launches replayed on the host
# ---------------------------------------------------------------------------------------

H100_SMS = 132
DTYPE_CODE = {torch.float32: "f", torch.float16: "h", torch.bfloat16: "b"}


def vq_plan(built, N, K, D, sms, dtype=torch.float32):
    out = subprocess.run([built("vq_nearest.cu")[0], DTYPE_CODE[dtype], str(N), str(K), str(D),
                          str(sms)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[0])


def vq_replay(built, z, codebook, sms, tmp_path):
    N, D = z.shape
    K = codebook.shape[0]
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(torch.cat([z.float().flatten(), codebook.float().flatten()]).numpy().tobytes())
    run = subprocess.run([built("vq_nearest.cu")[0], DTYPE_CODE[z.dtype], str(N), str(K), str(D),
                          str(sms), str(inp), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    data = out.read_bytes()
    idx = torch.frombuffer(bytearray(data[:8 * N]), dtype=torch.int64)
    dist = torch.frombuffer(bytearray(data[8 * N:]), dtype=torch.float32).to(z.dtype)  # exact
    return idx, dist, json.loads(run.stdout.splitlines()[0])


@needs_nvcc
@pytest.mark.parametrize("N", [16384, 32768, 65536])
@pytest.mark.parametrize("K", [512, 1024, 8192, 16384])
@pytest.mark.parametrize("D", [4, 6, 8])
def test_vq_plan_at_training_sizes(N, K, D, built):
    # an H100's 132 SMs: every vector and code is covered once, by a grid that fits
    p = vq_plan(built, N, K, D, H100_SMS)
    assert p["blocks"] * 128 * p["vectors"] >= N > (p["blocks"] - 1) * 128 * p["vectors"]
    assert p["slices"] * p["ks"] >= K > (p["slices"] - 1) * p["ks"]  # no empty slice
    assert p["ks"] >= min(K, 256) and 1 <= p["slices"] <= 65535
    assert p["dp"] == D and p["vectors"] == 4 and p["row"] % 4 == 0 and p["row"] >= D + 1
    assert p["tile"] * p["row"] * 4 <= 8192  # the shared-memory tile
    assert p["workspace"] == K * p["row"]
    # enough blocks to fill the SMs when the codebook allows it
    assert p["blocks"] * p["slices"] >= min(4 * H100_SMS, p["blocks"] * (K // 256))


@needs_nvcc
@pytest.mark.parametrize("N,K,D,sms", [
    (1000, 3000, 4, 1),      # several tiles per slice (the tile holds 256 codes at D = 4)
    (2048, 16384, 4, 16),    # a training-sized codebook: 32 slices of 2 tiles
    (37, 5000, 4, 132),      # few vectors: 20 slices, 1 tile each
    (513, 700, 8, 1),        # a thread's 4 vectors cut by N; D = 8 (tile: 170 codes)
    (300, 777, 6, 2),        # the widths river's autoencoders do not use, once slow
    (300, 777, 5, 2), (300, 777, 7, 2), (300, 777, 1, 2), (300, 777, 2, 2), (300, 777, 3, 2),
    (257, 1000, 9, 3), (257, 1000, 16, 3), (129, 500, 20, 3), (129, 500, 40, 3),
    (129, 300, 64, 3),
    (70, 300, 65, 3), (70, 300, 100, 3),  # above 64: the plain loop
])
def test_vq_replay_matches_reference(N, K, D, sms, built, tmp_path):
    from test_kernels import check_vq_nearest_result
    g = torch.Generator().manual_seed(N + K + D)
    z, codebook = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    idx, dist, plan = vq_replay(built, z, codebook, sms, tmp_path)
    check_vq_nearest_result(idx, dist, z, codebook)
    if (N, K, D) == (1000, 3000, 4):
        assert plan["ks"] > plan["tile"], "meant to span several tiles per slice"


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vq_replay_dtypes_ties_and_nan_rule(dtype, built, tmp_path):
    from test_kernels import check_nan_rule, poisoned
    z, codebook, bad_codes, bad_rows = poisoned(dtype, "cpu")
    idx, dist, _ = vq_replay(built, z, codebook, 1, tmp_path)
    check_nan_rule(idx, dist, z, codebook, bad_codes, bad_rows)
    # exact ties across slices and tiles: the codebook three times, each copy in other slices
    base = torch.randn(300, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    idx, dist, plan = vq_replay(built, base[:200], base.repeat(3, 1), 1, tmp_path)
    assert plan["slices"] > 1
    assert torch.equal(idx, torch.arange(200)) and dist.float().abs().max() < 1e-5


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,x_off,v_off,same", [
    (3 * 8 * 256 * 8 + 5, 0, 0, False),    # aligned: three grid-stride passes and a tail
    (3 * 8 * 256 * 8 + 5, 1, 1, False),    # a head, then 16-byte packs (buf[1:])
    (3 * 8 * 256 * 8 + 5, 3, 3, True),     # x and v the same memory, with a head
    (50001, 1, 2, False),                  # no common 16-byte boundary: one by one
    (3, 1, 1, False), (1, 0, 0, False),    # shorter than a head or a pack
])
def test_euler_replay(dtype, n, x_off, v_off, same, built):
    exe = built("euler_step.cu")[0]
    run = subprocess.run([exe, DTYPE_CODE[dtype], str(n), str(x_off), str(v_off), str(int(same)),
                          "1"], capture_output=True, text=True)  # 1 SM: 8 blocks of 256
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["wrong"] == 0, r
    size = torch.finfo(dtype).bits // 8
    vec = 16 // size
    if x_off % vec == v_off % vec or same:
        assert r["vec"] == vec and r["head"] == min(n, (-x_off * size) % 16 // size), r
    else:
        assert r["vec"] == 1
    if n > 3 * 8 * 256 * 8:
        assert r["passes"] >= 2, r
        assert r["tail"] > 0 or x_off != 0, r


# ---------------------------------------------------------------------------------------
# Another torch: the GPU machine's (torch 2.11.0+cu130 there), installed in a venv of its own
# ---------------------------------------------------------------------------------------

OTHER_TORCH = os.environ.get("RIVER_OTHER_TORCH")  # that venv's python

# In the other torch's python: river's JIT build as on a GPU machine (torch.cuda.is_available
# made true; TORCH_CUDA_ARCH_LIST names the architecture), strict as RIVER_KERNELS=ext, then
# what got registered and how nvcc was called.
BUILD_WITH_OTHER_TORCH = r"""
import glob, json, os, sys
import torch
torch.cuda.is_available = lambda: True
sys.path.insert(0, sys.argv[1])
import river
build = river.csrc_build()
devices = build.load(strict=True)
ninja = glob.glob(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "river_kernels*", "build.ninja"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
z = torch.randn(50, 4)
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "devices": sorted(devices),
    "cuda_kernels": [has(f"river::{op}", "CUDA") for op in ("vq_nearest", "euler_step_")],
    "cpu_ok": bool(torch.equal(torch.ops.river.vq_nearest(z, z)[0], torch.arange(50))),
    "cuda_home": build.cuda_home(), "ninja": open(ninja[0]).read() if ninja else ""}))
"""


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(not OTHER_TORCH, reason="set RIVER_OTHER_TORCH to another torch's python "
                                           "(a CUDA build, e.g. torch 2.11.0+cu130 in a venv)")
def test_the_extension_builds_and_loads_with_another_torch(tmp_path):
    """csrc/ compiles with nvcc, links and registers both CUDA kernels against that torch, with
    the toolkit's runtime headers ahead of any pip wheel's (several minutes with MAX_JOBS=1)."""
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0",
           "TORCH_EXTENSIONS_DIR": os.environ.get("RIVER_OTHER_TORCH_EXT", str(tmp_path))}
    out = subprocess.run([OTHER_TORCH, "-c", BUILD_WITH_OTHER_TORCH, ROOT], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr[-5000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["cuda"] and r["devices"] == ["cpu", "cuda"] and r["cuda_kernels"] == [True, True]
    assert r["cpu_ok"]
    flags = re.search(r"^cuda_cflags = (.*)$", r["ninja"], re.M)[1].split()
    toolkit = flags.index(os.path.join(r["cuda_home"], "include"))
    wheels = [i for i, f in enumerate(flags) if "/nvidia/" in f]
    assert all(i > toolkit for i in wheels), flags  # pip headers after the toolkit's
    print(r["torch"], "CUDA", r["cuda"], "wheel include folders:", [flags[i] for i in wheels])
