"""The csrc/ ops against their plain PyTorch references in river.py.

Every test forces the extension (RIVER_KERNELS=ext semantics: a build failure is an error,
not a silent fallback), calls torch.ops.river.* directly and compares with
river.vq_nearest_reference / river.euler_step_reference_ on odd sizes and every dtype: on
the CPU once per copy of the inner kernels this machine can run (forced with
torch.ops.river.set_cpu_isa; the others are skipped, with the reason), and on CUDA when a
GPU is present. The first run JIT-builds the extension (~20 s) unless `pip install -e .` or
`python setup.py build_ext --inplace` already did.
"""

import math
import os
import platform
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import river  # noqa: E402

# The CPU kernels carry one copy of their inner loops per instruction set and pick one at
# run time; torch.ops.river.set_cpu_isa forces a copy. Every CPU test runs once per copy,
# and a copy this CPU cannot run is skipped with the op's reason (pytest -rs shows it).
CPU_ISAS = ["default", "avx2", "avx512"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = [f"cpu-{isa}" for isa in CPU_ISAS] + [pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Load the extension as RIVER_KERNELS=ext would; restore the default afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIVER_KERNELS", "ext")
        river.load_kernels.cache_clear()
        assert river.load_kernels()
    yield
    river.load_kernels.cache_clear()


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu" with the copy of the inner kernels named in the param forced, or "cuda"."""
    if request.param == "cuda":
        yield "cuda"
        return
    isa = request.param.removeprefix("cpu-")
    try:
        assert torch.ops.river.set_cpu_isa(isa) == isa
    except RuntimeError as e:
        pytest.skip(str(e))
    yield "cpu"
    torch.ops.river.set_cpu_isa("auto")


# ---------------------------------------------------------------------------------------
# vq_nearest
# ---------------------------------------------------------------------------------------

def float32_error_bound(z, codebook, eps=torch.finfo(torch.float32).eps):
    """How far the float32 value of ||z||^2 - 2 z.e + ||e||^2 may stray, per row of z:
    a sum of D + 2 terms, each at most ~(||z||^2 + ||e||^2), rounded at every step. `eps`:
    of the dtype the distances are computed in, when that is not float32."""
    z2 = z.double().pow(2).sum(1)
    e2_max = codebook.double().pow(2).sum(1).max()
    return 4 * eps * (z.shape[1] + 2) * (1 + z2 + e2_max)


def check_vq_nearest(z, codebook):
    """The op's code is a true nearest code; its index is the reference's where no near-tie."""
    N = z.shape[0]
    idx, dist = torch.ops.river.vq_nearest(z, codebook)
    assert idx.dtype == torch.int64 and idx.shape == (N,) and idx.device == z.device
    assert dist.dtype == z.dtype and dist.shape == (N,) and dist.device == z.device
    check_vq_nearest_result(idx, dist, z, codebook)


def check_vq_nearest_result(idx, dist, z, codebook, rows=4096):
    """(idx, dist) from any implementation, against exact float64 distances and the
    reference, `rows` rows of z at a time (on z's device: a (rows, K) matrix at once)."""
    e64 = codebook.double()
    tol_all = float32_error_bound(z, codebook)
    for n0 in range(0, z.shape[0], rows):
        n1 = min(n0 + rows, z.shape[0])
        # the reference, run in float32 like the kernel (half inputs are computed in float32)
        ref_idx, ref_dist = river.vq_nearest_reference(z[n0:n1].float(), codebook.float())
        # exact distances in float64 from the same (rounded) inputs, (rows, K)
        z64 = z[n0:n1].double()
        d64 = (z64.pow(2).sum(1, keepdim=True) - 2 * z64 @ e64.t() + e64.pow(2).sum(1)).clamp_min(0)
        tol = tol_all[n0:n1]
        chosen = d64.gather(1, idx[n0:n1, None].to(d64.device))[:, 0]
        true_min = d64.min(1).values
        assert (chosen <= true_min + tol).all(), "a chosen code is not a nearest one"
        if codebook.shape[0] > 1:
            two = d64.topk(2, dim=1, largest=False).values
            clear = ((two[:, 1] - two[:, 0]) > 4 * tol).cpu()  # no near-tie: one argmin
            assert torch.equal(idx[n0:n1].cpu()[clear], ref_idx.cpu()[clear])
        torch.testing.assert_close(dist[n0:n1].cpu().float(),
                                   ref_dist.cpu().to(dist.dtype).float(),
                                   atol=float(tol.max()) + 1e-6,
                                   rtol={torch.float32: 1e-5, torch.float16: 2e-3,
                                         torch.bfloat16: 2e-2}[dist.dtype])


@pytest.mark.parametrize("K", [1, 7, 1024])
@pytest.mark.parametrize("D", [1, 3, 4, 8, 64])
@pytest.mark.parametrize("N", [1, 37, 1001])
def test_vq_nearest_float32(N, D, K, device):
    g = torch.Generator().manual_seed(N * 10007 + D * 101 + K)
    z = torch.randn(N, D, generator=g).to(device)
    codebook = torch.randn(K, D, generator=g).to(device)
    check_vq_nearest(z, codebook)


@pytest.mark.parametrize("D", range(1, 11))
def test_vq_nearest_every_small_code_dim(D, device):
    # every D up to 8 has a micro-kernel of its own, D > 8 the general one; K = 5000 is no
    # multiple of a panel and spans several L1 tiles at every D
    g = torch.Generator().manual_seed(D)
    check_vq_nearest(torch.randn(37, D, generator=g).to(device),
                     torch.randn(5000, D, generator=g).to(device))


def cpu_chunks(N, K, D, threads):
    """Chunks that river_ops.cpp's vq_nearest_with cuts N vectors into for `threads` threads
    (at least 4 per thread, R = 4 to 128 vectors each; one chunk below 100K FLOPs)."""
    if 2 * N * K * D < 100_000:
        return 1
    per_thread = -(-N // (4 * threads))
    return -(-N // min(max(-(-per_thread // 4) * 4, 16), 128))


@pytest.mark.parametrize("N", [33, 129, 1001])  # a 1-row last chunk, odd tails, many chunks
def test_vq_nearest_split_over_threads(N, device):
    # Threads take chunks of rows in turn; every row must still get its own answer. Each row
    # is a code plus noise far below the codes' spacing, so its answer is known exactly, and
    # every thread count draws other codes: a chunk skipped, done twice or written at the
    # wrong offset shows as wrong indices, and cannot pass on what an earlier call left in
    # the output's memory.
    if device != "cpu":
        pytest.skip("the thread count splits CPU work only")
    g = torch.Generator().manual_seed(N)
    K = 3000
    codebook = torch.randn(K, 4, generator=g)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            assert n == 1 or cpu_chunks(N, K, 4, n) >= n, "too few chunks to split"
            torch.set_num_threads(n)
            codes = torch.randperm(K, generator=g)[:N]
            z = codebook[codes] + 1e-4 * torch.randn(N, 4, generator=g)
            idx, dist = torch.ops.river.vq_nearest(z, codebook)
            assert torch.equal(idx, codes), f"{n} threads: rows got other rows' codes"
            torch.testing.assert_close(dist, (z - codebook[codes]).pow(2).sum(1),
                                       atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,K", [(37, 3, 7), (1001, 8, 1024), (3, 4, 16384), (2, 64, 16384)])
def test_vq_nearest_dtypes_and_big_codebooks(N, D, K, dtype, device):
    g = torch.Generator().manual_seed(N + D + K)
    z = torch.randn(N, D, generator=g).to(device, dtype)
    codebook = torch.randn(K, D, generator=g).to(device, dtype)
    check_vq_nearest(z, codebook)


@pytest.mark.parametrize("distinct", [1, 13, 1000])
def test_vq_nearest_exact_ties_go_to_lowest_index(distinct, device):
    # the codebook repeated 3 times: every nearest code has two exact copies further on,
    # in other vector lanes, panels and cache tiles
    g = torch.Generator().manual_seed(distinct)
    base = torch.randn(distinct, 8, generator=g)
    codebook = base.repeat(3, 1).to(device)                   # (3 * distinct, 8)
    z = torch.cat([base[:5], torch.randn(300, 8, generator=g)]).to(device)
    idx, dist = torch.ops.river.vq_nearest(z, codebook)
    assert (idx < distinct).all()                             # always the first copy
    m = min(5, distinct)                                      # rows of z that ARE codes
    assert torch.equal(idx[:m].cpu(), torch.arange(m))
    assert dist[:m].abs().max() < 1e-5


def test_vq_nearest_edge_shapes(device):
    codebook = torch.randn(5, 3, device=device)
    idx, dist = torch.ops.river.vq_nearest(torch.empty(0, 3, device=device), codebook)
    assert idx.shape == (0,) and dist.shape == (0,)
    # a strided view of z is read like its contiguous copy
    z = torch.randn(3, 40, device=device).t()                # (40, 3), not contiguous
    torch.testing.assert_close(torch.ops.river.vq_nearest(z, codebook),
                               torch.ops.river.vq_nearest(z.contiguous(), codebook))
    # and so is a strided codebook
    codebook = torch.randn(3, 50, device=device)[:, ::2].t()  # (25, 3), not contiguous
    torch.testing.assert_close(torch.ops.river.vq_nearest(z, codebook),
                               torch.ops.river.vq_nearest(z, codebook.contiguous()))


@pytest.mark.parametrize("z_shape,e_shape,z_dtype,e_dtype,message", [
    ((4,), (8, 4), torch.float32, torch.float32, "z must be 2-D (N, D), got 1-D"),
    ((2, 3, 4), (8, 4), torch.float32, torch.float32, "z must be 2-D (N, D), got 3-D"),
    ((6, 4), (8,), torch.float32, torch.float32, "codebook must be 2-D (K, D), got 1-D"),
    ((6, 4), (5, 8), torch.float32, torch.float32, "z has D=4 but codebook has D=8"),
    ((6, 4), (8, 4), torch.int64, torch.int64, "z must be float32, float16 or bfloat16"),
    ((6, 4), (8, 4), torch.float64, torch.float64, "z must be float32, float16 or bfloat16"),
    ((6, 4), (8, 4), torch.float32, torch.float16, "z is Float but codebook is Half"),
    ((6, 4), (0, 4), torch.float32, torch.float32, "codebook is empty (K=0)"),
])
def test_vq_nearest_bad_inputs(z_shape, e_shape, z_dtype, e_dtype, message, device):
    z = torch.zeros(z_shape, dtype=z_dtype, device=device)
    codebook = torch.zeros(e_shape, dtype=e_dtype, device=device)
    with pytest.raises(RuntimeError, match="vq_nearest: " + re.escape(message)):
        torch.ops.river.vq_nearest(z, codebook)


# NaN and inf: one rule for the reference and both kernels (vq_nearest_reference's
# docstring): a code with a NaN or inf entry is never chosen; a row with one, or with no
# finite code to choose from, gets index 0 and distance NaN.

POISON = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e20}  # 1e20^2 overflows


def poisoned(dtype, device, seed=0):
    """z (40, 4) and codebook (37, 4) with a NaN, inf, -inf and huge entry in some codes (in
    different lanes, panels and positions) and rows. Rows 0-9 copy codes, poisoned ones too."""
    g = torch.Generator().manual_seed(seed)
    codebook, z = torch.randn(37, 4, generator=g), torch.randn(40, 4, generator=g)
    bad_codes = {0: "nan", 5: "inf", 17: "-inf", 36: "huge", 20: "nan"}
    for k, what in bad_codes.items():
        codebook[k, k % 4] = POISON[what]
    z[:10] = codebook[[0, 5, 17, 36, 20, 1, 2, 3, 4, 6]]
    z[:10] = torch.where(z[:10].isfinite() & (z[:10].abs() < 1e19), z[:10], 0.5)
    bad_rows = {12: "nan", 13: "inf", 14: "-inf", 15: "huge", 39: "nan"}
    for n, what in bad_rows.items():
        z[n, n % 4] = POISON[what]
    return z.to(device, dtype), codebook.to(device, dtype), set(bad_codes), set(bad_rows)


def check_nan_rule(idx, dist, z, codebook, bad_codes, bad_rows,
                   eps=torch.finfo(torch.float32).eps):
    """The rule, and a nearest finite code within the rounding of distances computed at
    `eps` (float32's by default: the kernels and the reference compute in float32)."""
    idx, dist = idx.cpu(), dist.cpu().float()
    rows = torch.tensor(sorted(bad_rows))
    assert torch.equal(idx[rows], torch.zeros(len(rows), dtype=torch.long)), "bad row: index 0"
    assert dist[rows].isnan().all(), "a row with NaN or inf gets distance NaN"
    good = torch.tensor([n for n in range(z.shape[0]) if n not in bad_rows])
    assert not set(idx[good].tolist()) & bad_codes, "a non-finite code was chosen"
    assert dist[good].isfinite().all()
    # a nearest finite code, by exact float64 distances (on z's device)
    valid = torch.tensor([k for k in range(codebook.shape[0]) if k not in bad_codes])
    zg, ev = z[good.to(z.device)], codebook[valid.to(z.device)]
    d64 = torch.cdist(zg.double(), ev.double()).pow(2)  # (good rows, valid codes)
    chosen = d64.gather(1, torch.searchsorted(valid, idx[good])[:, None].to(z.device))[:, 0]
    assert (chosen <= d64.min(1).values + float32_error_bound(zg, ev, eps)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_vq_nearest_nan_inf_rule(dtype, device):
    z, codebook, bad_codes, bad_rows = poisoned(dtype, device)
    check_nan_rule(*torch.ops.river.vq_nearest(z, codebook), z, codebook, bad_codes, bad_rows)
    # the reference follows the same rule, in the inputs' dtype and in float32; it promises
    # a nearest code within the rounding of its dtype (it computes in float32 since, but a
    # float32 bound on a float16/bfloat16 computation failed 3% / 21% of seeds on CUDA)
    for ref_dtype in {dtype, torch.float32}:
        ref = river.vq_nearest_reference(z.to(ref_dtype), codebook.to(ref_dtype))
        check_nan_rule(*ref, z, codebook, bad_codes, bad_rows, torch.finfo(ref_dtype).eps)


def nearest_in(dtype, z, codebook):
    """Nearest codes by ||z||^2 - 2 z.e + ||e||^2 computed in `dtype` throughout (the NaN/inf
    rule from float32 norms), as vq_nearest_reference did for half inputs."""
    z, codebook = z.to(dtype), codebook.to(dtype)
    invalid = ~codebook.float().pow(2).sum(1).isfinite()
    e = codebook.masked_fill(invalid[:, None], 0)
    e2 = (e * e).sum(1).masked_fill(invalid, math.inf)
    d2, idx = ((z * z).sum(1, keepdim=True) - 2 * z @ e.t() + e2).min(1)
    bad = ~(z.float().pow(2).sum(1).isfinite() & (d2.float() < math.inf))
    return idx.masked_fill(bad, 0), d2.clamp_min(0).masked_fill(bad, math.nan)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_nan_rule_check_allows_for_the_dtype_computed_in(dtype):
    # a search computed in bfloat16/float16 throughout is right within that dtype's
    # rounding, not float32's: judged by a float32 bound, some seeds fail though nothing is
    # wrong; the check takes the dtype's eps and then passes them all
    failed = {"float32": 0, "own": 0}
    for seed in range(60):
        z, codebook, bad_codes, bad_rows = poisoned(torch.float32, "cpu", seed)
        z, codebook = z.to(dtype), codebook.to(dtype)
        idx, dist = nearest_in(dtype, z, codebook)
        for name, eps in (("float32", torch.finfo(torch.float32).eps),
                          ("own", torch.finfo(dtype).eps)):
            try:
                check_nan_rule(idx, dist, z, codebook, bad_codes, bad_rows, eps)
            except AssertionError:
                failed[name] += 1
    assert failed["own"] == 0 and failed["float32"] > 0, failed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vq_nearest_reference_computes_half_inputs_in_float32(dtype):
    # entries of several hundred: float16 squares overflow from ~256 (65504 is its largest),
    # and a bfloat16 z.e keeps 8 bits. The reference computes in float32 from the rounded
    # inputs, as the kernels do, and rounds only the distance back.
    g = torch.Generator().manual_seed(5)
    codebook = (300 * torch.randn(500, 4, generator=g)).to(dtype)
    codes = torch.randint(500, (200,), generator=g)
    z = (codebook[codes].float() + torch.randn(200, 4, generator=g)).to(dtype)
    idx, dist = river.vq_nearest_reference(z, codebook)
    in_float32 = river.vq_nearest_reference(z.float(), codebook.float())
    assert idx.dtype == torch.int64 and dist.dtype == dtype
    assert torch.equal(idx, in_float32[0]) and torch.equal(dist, in_float32[1].to(dtype))
    assert dist.isfinite().all()
    check_vq_nearest_result(idx, dist, z, codebook)


def test_vq_nearest_no_finite_code(device):
    codebook = torch.full((7, 3), math.nan, device=device)
    codebook[2, 1], codebook[4, 0] = math.inf, -math.inf
    z = torch.randn(50, 3, device=device)
    for idx, dist in (torch.ops.river.vq_nearest(z, codebook),
                      river.vq_nearest_reference(z, codebook)):
        assert (idx == 0).all() and dist.isnan().all()


def test_vq_nearest_reference_nan_inf_rule_on_cpu():
    # the reference alone, whatever the kernels do
    z, codebook, bad_codes, bad_rows = poisoned(torch.float32, "cpu", seed=1)
    check_nan_rule(*river.vq_nearest_reference(z, codebook), z, codebook, bad_codes, bad_rows)


# ---------------------------------------------------------------------------------------
# euler_step_
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (1000,), (65536 + 3,), (3, 5, 7),
                                   (2, 4, 131072 + 1)])
def test_euler_step_matches_reference(shape, dtype, device):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(device, dtype)
    v = torch.randn(shape, generator=g).to(device, dtype)
    dt = -0.37
    expected = river.euler_step_reference_(x.clone(), v, dt)
    exact = (x.double() + dt * v.double()).to(dtype)   # the update in float64, rounded once
    v_before, ptr = v.clone(), x.data_ptr()
    out = torch.ops.river.euler_step_(x, v, dt)
    assert out is None                             # in place: the schema returns ()
    assert x.data_ptr() == ptr                     # same storage, changed in place
    assert torch.equal(v, v_before)                # v untouched
    # computed in float32 and rounded once: within an ulp of the exact update. The reference
    # (x.add_(v, alpha=dt)) rounds dt itself to float16/bfloat16 first, so it may differ
    # from both by a few ulps of |dt * v| where x + dt * v cancels.
    eps = torch.finfo(dtype).eps
    scale = float((exact.double().abs() + (dt * v.double()).abs()).max()) if x.numel() else 0.0
    torch.testing.assert_close(x, exact, rtol=eps, atol=eps * scale)
    torch.testing.assert_close(x, expected, rtol=eps, atol=4 * eps * scale)


def test_euler_step_dense_non_contiguous(device):
    # channels_last is dense: one flat pass works when x and v share the strides
    x = torch.randn(2, 3, 5, 7, device=device).to(memory_format=torch.channels_last)
    v = torch.randn(2, 3, 5, 7, device=device).to(memory_format=torch.channels_last)
    expected = river.euler_step_reference_(x.clone(), v, 0.5)
    torch.ops.river.euler_step_(x, v, 0.5)
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("case,message", [
    ("int", "x must be float32, float16 or bfloat16, got Long"),
    ("dtype", "x is Float but v is Half (they must match)"),
    ("shape", "x and v must have the same shape, got [2, 3] and [3, 2]"),
    ("broadcast", "x and v must have the same shape, got [2, 3] and [3]"),
    ("strides", "x and v must be contiguous, or dense with the same strides"),
    ("gaps", "x and v must be contiguous, or dense with the same strides"),
])
def test_euler_step_bad_inputs(case, message, device):
    x, v = torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device)
    if case == "int":
        x, v = x.long(), v.long()
    elif case == "dtype":
        v = v.half()
    elif case == "shape":
        v = torch.zeros(3, 2, device=device)
    elif case == "broadcast":
        v = torch.zeros(3, device=device)
    elif case == "strides":
        v = torch.zeros(3, 2, device=device).t()   # same shape, transposed layout
    elif case == "gaps":
        x, v = torch.zeros(2, 6, device=device)[:, ::2], torch.zeros(2, 6, device=device)[:, ::2]
    with pytest.raises(RuntimeError, match="euler_step_: " + re.escape(message)):
        torch.ops.river.euler_step_(x, v, 0.1)


@pytest.mark.parametrize("x_at,v_at", [(1, 0), (0, 1), (0, 3), (5, 2)])
def test_euler_step_refuses_partial_overlap(x_at, v_at, device):
    # x and v: 6 elements of one buffer, v shifted against x (the result would depend on
    # the order of the writes); torch's add_ refuses these too
    buf = torch.randn(12, device=device)
    x, v = buf[x_at:x_at + 6], buf[v_at:v_at + 6]
    with pytest.raises(RuntimeError, match=re.escape("euler_step_: x and v partially overlap")):
        torch.ops.river.euler_step_(x, v, 0.5)
    with pytest.raises(RuntimeError, match="overlap|refer to a single memory location"):
        river.euler_step_reference_(x, v, 0.5)


def test_euler_step_refuses_a_leaf_that_requires_grad(device):
    # as add_ does: the change would be lost to autograd. Under no_grad it is an update.
    x = torch.randn(10, device=device, requires_grad=True)
    v = torch.randn(10, device=device)
    leaf = "a leaf Variable that requires grad is being used in an in-place operation"
    for step in (torch.ops.river.euler_step_, river.euler_step_, river.euler_step_reference_):
        with pytest.raises(RuntimeError, match=leaf):
            step(x, v, 0.5)
    expected = (x + 0.5 * v).detach()
    with torch.no_grad():
        torch.ops.river.euler_step_(x, v, 0.5)
    torch.testing.assert_close(x.detach(), expected)


def test_euler_step_v_may_be_x_itself(device):
    for alias in (lambda x: x, lambda x: x[:], lambda x: x.view(x.shape)):
        x = torch.randn(1000, device=device)
        expected = x * 1.5
        torch.ops.river.euler_step_(x, alias(x), 0.5)     # x <- x + 0.5 x
        torch.testing.assert_close(x, expected)
    # views of one buffer that do not overlap are two tensors like any others
    buf = torch.randn(20, device=device)
    expected = buf[:10] + 0.5 * buf[10:]
    torch.ops.river.euler_step_(buf[:10], buf[10:], 0.5)
    torch.testing.assert_close(buf[:10], expected)


@needs_cuda
def test_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match="vq_nearest: z is on cuda:0 but codebook is on cpu"):
        torch.ops.river.vq_nearest(torch.zeros(3, 4, device="cuda"), torch.zeros(5, 4))
    with pytest.raises(RuntimeError, match="euler_step_: x is on cuda:0 but v is on cpu"):
        torch.ops.river.euler_step_(torch.zeros(3, device="cuda"), torch.zeros(3), 0.1)


# ---------------------------------------------------------------------------------------
# CUDA only: training sizes, storage offsets, devices, streams, graphs, long tensors
# (every test name here holds "cuda": tests/gpu_check.py runs them with -k cuda)
# ---------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("N,D,K,dtype", [
    # the sizes training uses: several codebook slices per vector, several tiles per slice
    (16384, 4, 512, torch.float32), (16384, 4, 16384, torch.float32),
    (65536, 4, 16384, torch.float32), (32768, 8, 8192, torch.float32),
    (65536, 8, 512, torch.float32), (16384, 6, 8192, torch.float32),
    (16384, 5, 16384, torch.float32), (16384, 4, 16384, torch.bfloat16),
    (16384, 8, 8192, torch.float16),
])
def test_cuda_vq_nearest_training_sizes(N, D, K, dtype):
    g = torch.Generator().manual_seed(N + D + K)
    z = torch.randn(N, D, generator=g).to("cuda", dtype)
    codebook = torch.randn(K, D, generator=g).to("cuda", dtype)
    check_vq_nearest(z, codebook)


@needs_cuda
def test_cuda_vq_nearest_nan_inf_across_slices():
    # the rule at a training size: poisoned codes and rows in different slices and tiles
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(16384, 4, generator=g), torch.randn(16384, 4, generator=g)
    bad_codes = {0: math.nan, 300: math.inf, 9000: -math.inf, 16383: 1e20, 5000: math.nan}
    bad_rows = {5: math.nan, 4097: math.inf, 16383: -math.inf, 9999: 1e20}
    for k, value in bad_codes.items():
        codebook[k, 1] = value
    for n, value in bad_rows.items():
        z[n, 2] = value
    z[:4] = codebook[[0, 300, 9000, 16383]].nan_to_num(0.5, 0.5, 0.5).clamp(-9, 9)
    z, codebook = z.cuda(), codebook.cuda()
    idx, dist = torch.ops.river.vq_nearest(z, codebook)
    check_nan_rule(idx, dist, z, codebook, set(bad_codes), set(bad_rows))
    check_nan_rule(*river.vq_nearest_reference(z, codebook), z, codebook, set(bad_codes),
                   set(bad_rows))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_storage_offsets(dtype):
    # views that start 1 element into their storage: not 16-byte aligned
    g = torch.Generator().manual_seed(1)
    zbuf, ebuf = torch.randn(3001 * 4 + 1, generator=g), torch.randn(777 * 4 + 1, generator=g)
    z = zbuf.to("cuda", dtype)[1:].view(3001, 4)
    codebook = ebuf.to("cuda", dtype)[1:].view(777, 4)
    assert z.storage_offset() == 1 and z.is_contiguous()
    torch.testing.assert_close(torch.ops.river.vq_nearest(z, codebook),
                               torch.ops.river.vq_nearest(z.clone(), codebook.clone()))
    check_vq_nearest(z, codebook)
    n = 100003
    xbuf, vbuf = torch.randn(n + 3, generator=g), torch.randn(n + 3, generator=g)
    for x_at, v_at in ((1, 1), (1, 2), (0, 3), (3, 0)):  # a common head, or none
        x, v = xbuf.to("cuda", dtype)[x_at:x_at + n], vbuf.to("cuda", dtype)[v_at:v_at + n]
        exact = (x.double() + 0.3 * v.double()).to(dtype)
        torch.ops.river.euler_step_(x, v, 0.3)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(x, exact, rtol=eps, atol=eps * 8)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_euler_step_grid_stride_passes_and_tail(dtype, offset):
    # more elements than the resident grid covers in one pass (8 blocks of 256 threads per
    # SM, 16 bytes each), plus a tail shorter than 16 bytes and, with offset 1, a head
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    vec = 16 // (torch.finfo(dtype).bits // 8)  # elements per 16 bytes
    n = 2 * sms * 8 * 256 * vec + vec - 1        # two passes, and a tail of vec - 1
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n + offset, generator=g).to("cuda", dtype)[offset:]
    v = torch.randn(n + offset, generator=g).to("cuda", dtype)[offset:]
    exact = (x.double() - 0.7 * v.double()).to(dtype)
    torch.ops.river.euler_step_(x, v, -0.7)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(x, exact, rtol=eps, atol=eps * 8)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cuda_tensor_on_second_device():
    # the ops run on their tensors' device, not on the current one
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5000, 4, generator=g).to("cuda:1")
    codebook = torch.randn(3000, 4, generator=g).to("cuda:1")
    idx, dist = torch.ops.river.vq_nearest(z, codebook)
    assert idx.device == dist.device == z.device
    check_vq_nearest_result(idx, dist, z, codebook)
    x, v = (torch.randn(300001, generator=g).to("cuda:1") for _ in range(2))
    expected = x.cpu() + 0.5 * v.cpu()
    torch.ops.river.euler_step_(x, v, 0.5)
    torch.testing.assert_close(x.cpu(), expected)
    assert torch.cuda.current_device() == 0


@needs_cuda
def test_cuda_side_stream():
    # the ops run on the current stream: work queued after a long wait on a side stream
    # must see the inputs written on that stream (on another stream it would read them early)
    g = torch.Generator().manual_seed(3)
    z_src = torch.randn(20000, 4, generator=g).cuda()
    codebook = torch.randn(4000, 4, generator=g).cuda()
    x_src, v = torch.randn(1 << 20, generator=g).cuda(), torch.randn(1 << 20, generator=g).cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles on the side stream
        z, x = z_src * 1.0, x_src * 1.0
        idx, dist = torch.ops.river.vq_nearest(z, codebook)
        torch.ops.river.euler_step_(x, v, 0.25)
    side.synchronize()
    check_vq_nearest_result(idx, dist, z_src, codebook)
    torch.testing.assert_close(x, x_src + 0.25 * v)


@needs_cuda
def test_cuda_graph_capture():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(16384, 4, generator=g).cuda()
    codebook = torch.randn(2048, 4, generator=g).cuda()
    x, v = torch.randn(100003, generator=g).cuda(), torch.randn(100003, generator=g).cuda()
    side = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.river.vq_nearest(z, codebook)
        torch.ops.river.euler_step_(x.clone(), v, 0.25)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, dist = torch.ops.river.vq_nearest(z, codebook)
        torch.ops.river.euler_step_(x, v, 0.25)
    for _ in range(2):  # new inputs in the captured buffers, then replay
        z.copy_(torch.randn(16384, 4, generator=g))
        x0 = torch.randn(100003, generator=g).cuda()
        x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        check_vq_nearest_result(idx, dist, z, codebook)
        torch.testing.assert_close(x, x0 + 0.25 * v)


# Every instantiation of the CUDA kernels: each compiled code width (1-8, 12, 16, 24, 32,
# 48, 64) at D itself and at D just past the width below, the plain loop above 64, in each
# dtype; large codebooks cut into several slices of several tiles; N not a multiple of a
# block's vectors; more than 2^31 (vector, code) pairs; every head of euler_step_.
CUDA_WIDTHS = [*range(1, 11), 11, 13, 16, 17, 24, 25, 32, 33, 48, 49, 63, 64, 65, 100, 128]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", CUDA_WIDTHS)
def test_cuda_vq_nearest_every_width(D, dtype):
    g = torch.Generator().manual_seed(D)
    z = torch.randn(1001, D, generator=g).to("cuda", dtype)  # 1001: no multiple of 128 V
    codebook = torch.randn(3000, D, generator=g).to("cuda", dtype)  # 12 slices of 250
    check_vq_nearest(z, codebook)


@needs_cuda
@pytest.mark.parametrize("D", [4, 8, 16, 64, 65])
def test_cuda_vq_nearest_large_codebook(D):
    # 65536 codes: 132-256 slices (1001 vectors fill few blocks), of 1 (D = 4) to 17
    # (D = 64) tiles each
    g = torch.Generator().manual_seed(D)
    z = torch.randn(1001, D, generator=g).cuda()
    codebook = torch.randn(65536, D, generator=g).cuda()
    check_vq_nearest(z, codebook)


@needs_cuda
def test_cuda_vq_nearest_over_2_to_the_31_pairs():
    # N K > 2^31: no index or offset may be a 32-bit product of the two
    N, K = 131075, 16400
    assert N * K > 2**31
    g = torch.Generator().manual_seed(31)
    codebook = torch.randn(K, 4, generator=g).cuda()
    z = torch.randn(N, 4, generator=g).cuda()
    check_vq_nearest(z, codebook)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_euler_step_every_head(dtype):
    # x and v starting 0-7 elements past 16 bytes: a common head of each length, or none
    n, eps = 10007, torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(n)
    xbuf, vbuf = torch.randn(n + 8, generator=g), torch.randn(n + 8, generator=g)
    for x_at in range(8):
        for v_at in range(8):
            x, v = xbuf.to("cuda", dtype)[x_at:x_at + n], vbuf.to("cuda", dtype)[v_at:v_at + n]
            exact = (x.double() + 0.3 * v.double()).to(dtype)
            torch.ops.river.euler_step_(x, v, 0.3)
            torch.testing.assert_close(x, exact, rtol=eps, atol=eps * 8,
                                       msg=lambda m: f"x at {x_at}, v at {v_at}: {m}")


# ---------------------------------------------------------------------------------------
# set_cpu_isa: which copy of the CPU inner kernels runs
# ---------------------------------------------------------------------------------------

# what each copy needs, in /proc/cpuinfo's words
ISA_FLAGS = {"default": set(), "avx2": {"avx2", "fma", "f16c"},
             "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"),
                    reason="checks against the x86 flags of Linux's /proc/cpuinfo")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_set_cpu_isa_follows_cpu_flags(isa):
    """A copy can be forced exactly when the CPU has its instructions; else a clear error."""
    try:
        if ISA_FLAGS[isa] <= cpu_flags():
            assert torch.ops.river.set_cpu_isa(isa) == isa
        else:
            with pytest.raises(RuntimeError, match=f"set_cpu_isa: this CPU cannot run {isa}; "
                                                   "it can run: auto, default"):
                torch.ops.river.set_cpu_isa(isa)
    finally:
        torch.ops.river.set_cpu_isa("auto")


def test_set_cpu_isa_auto_and_unknown_names():
    widest = torch.ops.river.set_cpu_isa("auto")
    assert widest in CPU_ISAS
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        assert widest == [isa for isa in CPU_ISAS if ISA_FLAGS[isa] <= cpu_flags()][-1]
    with pytest.raises(RuntimeError, match="set_cpu_isa: unknown instruction set 'avx1024'; "
                                           "this CPU can run: auto, default"):
        torch.ops.river.set_cpu_isa("avx1024")


# ---------------------------------------------------------------------------------------
# Registration: opcheck, and river.py's dispatch between extension and reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(dtype, device):
    z = torch.randn(37, 4, device=device, dtype=dtype)
    codebook = torch.randn(7, 4, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.river.vq_nearest.default, (z, codebook))
    x, v = torch.randn(5, 11, device=device, dtype=dtype), torch.randn(5, 11, device=device,
                                                                         dtype=dtype)
    torch.library.opcheck(torch.ops.river.euler_step_.default, (x, v, 0.25))


@pytest.fixture
def kernels_mode(monkeypatch):
    """Set RIVER_KERNELS and reload: load_kernels() is cached, so clear it on both sides."""
    def set_mode(mode):
        monkeypatch.setenv("RIVER_KERNELS", mode)
        river.load_kernels.cache_clear()
        return river.load_kernels()
    yield set_mode
    river.load_kernels.cache_clear()


def test_river_dispatches_to_extension(kernels_mode, monkeypatch):
    assert "cpu" in kernels_mode("ext")

    def refuse(*args):
        raise AssertionError("the reference ran although the extension is loaded")
    monkeypatch.setattr(river, "vq_nearest_reference", refuse)
    monkeypatch.setattr(river, "euler_step_reference_", refuse)
    z, codebook = torch.randn(9, 4), torch.randn(6, 4)
    torch.testing.assert_close(river.vq_nearest(z, codebook),
                               torch.ops.river.vq_nearest(z, codebook))
    x, v = torch.randn(10), torch.randn(10)
    expected = x + 0.5 * v
    assert river.euler_step_(x, v, 0.5) is x
    torch.testing.assert_close(x, expected)


def test_river_kernels_ref_uses_reference(kernels_mode, monkeypatch):
    assert kernels_mode("ref") == frozenset()
    monkeypatch.setattr(river, "vq_nearest_reference", lambda z, e: "reference vq")
    monkeypatch.setattr(river, "euler_step_reference_", lambda x, v, dt: "reference euler")
    assert river.vq_nearest(torch.randn(3, 4), torch.randn(5, 4)) == "reference vq"
    assert river.euler_step_(torch.randn(3), torch.randn(3), 0.1) == "reference euler"
