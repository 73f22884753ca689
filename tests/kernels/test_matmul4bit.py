"""The fused dequant-matmul kernels (forward Y = X deq(W)^T + b, input gradient dY deq(W)) and
Linear4bit's dispatch, against a float32 product with the reference-dequantized weight.

Bounds are relative norms, 4 units of roundoff of the compute dtype (bf16 2^-6, fp16 2^-9; fp32
1e-5): the kernels round X, the 4-bit codes and the output to that dtype once each and
accumulate in float32."""

import pytest
import torch

from qtune.kernels import matmul4bit as mm
from qtune.kernels import matmul4bit_tma as mt
from qtune.kernels import launch, nibbles
from qtune.nn import Linear4bit
from qtune.quant import quantize_4bit
from qtune.quant.reference import dequantize_4bit as reference_dequant

from conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}


def _weight(N, K, quant_type="nf4", blocksize=64, double_quant=True):
    w = torch.randn(N, K, device=DEVICE) / K**0.5
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    return packed, state, reference_dequant(packed, state, torch.float32)


CASES = [(1, 48, 128), (5, 80, 192), (33, 40, 256)]


@pytest.mark.parametrize("M,N,K", CASES)
@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 32, False),
                                                               ("nf4", 128, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_match_reference(M, N, K, quant_type, blocksize, double_quant, dtype):
    if not mm.supported(K, blocksize):
        K = 256
    packed, state, W = _weight(N, K, quant_type, blocksize, double_quant)
    x, dy = torch.randn(M, K, device=DEVICE).to(dtype), torch.randn(M, N, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    mm.forward(x, packed, state.absmax, state.code, N, blocksize, state.nested_tensors, bias, out=y)
    assert rel_err(y, x.float() @ W.T + bias.float()) < BOUND[dtype]
    for lut in (1, 2, 3):  # the tiled kernel: code table through L1, byte pairs or nibbles from shared memory
        y.fill_(float("nan"))
        mm.forward(x, packed, state.absmax, state.code, N, blocksize, state.nested_tensors, bias, (16, 32, 4, 1, lut), y)
        assert rel_err(y, x.float() @ W.T + bias.float()) < BOUND[dtype], lut
    for config in ((4, 2, 8, 4, 1), (8, 1, 2, 2, 2), (16, 4, 4, 4, 3), (2, 8, 1, 1, 3)):  # the GEMV (with split-K)
        y.fill_(float("nan"))
        mm.gemv(x, packed, state.absmax, state.code, N, blocksize, state.nested_tensors, bias, config=config, out=y)
        assert rel_err(y, x.float() @ W.T + bias.float()) < BOUND[dtype], config
    dx = torch.full((M, K), float("nan"), dtype=dtype, device=DEVICE)
    mm.backward(dy, packed, state.absmax, state.code, K, blocksize, state.nested_tensors, out=dx)
    assert rel_err(dx, dy.float() @ W) < BOUND[dtype]


@pytest.mark.parametrize("M", [1, 5])
def test_strided_packed_bytes_are_read_in_order(M):
    """A strided packed weight (every other byte of a larger tensor) gives its contiguous copy's
    products: the GEMV (M=1), the tiled forward and the input gradient."""
    packed, state, W = _weight(48, 128)
    strided = torch.stack([packed.view(-1), torch.zeros_like(packed.view(-1))], 1)[:, 0]
    x, dy = torch.randn(M, 128, device=DEVICE), torch.randn(M, 48, device=DEVICE)
    args = (state.absmax, state.code, 48, 64, state.nested_tensors)
    assert torch.equal(mm.forward(x, strided, *args), mm.forward(x, packed, *args))
    assert rel_err(mm.forward(x, strided, *args), x @ W.T) < BOUND[torch.float32]
    dx = mm.backward(dy, strided, state.absmax, state.code, 128, 64, state.nested_tensors)
    assert rel_err(dx, dy @ W) < BOUND[torch.float32]


@pytest.mark.parametrize("split_k,nblk,K", [(2, 1, 320), (4, 1, 320), (1, 2, 512), (2, 4, 1024), (4, 2, 320)])
def test_split_k_and_block_groups_forward(split_k, nblk, K):
    """Split-K: K = 5 absmax blocks in 2 or 4 runs (one of them empty), partials summed by the last
    program of each tile; twice in a row (the tile locks must be left at zero). NBLK absmax blocks per
    iteration (lowered by the launcher where runs do not divide: 5 blocks take split 1... with groups)."""
    M, N = 5, 80
    packed, state, W = _weight(N, K)
    bias = torch.randn(N, device=DEVICE).to(torch.float16)
    for _ in range(2):
        x = torch.randn(M, K, device=DEVICE).to(torch.float16)
        y = torch.full((M, N), float("nan"), dtype=torch.float16, device=DEVICE)
        mm.forward(x, packed, state.absmax, state.code, N, 64, state.nested_tensors, bias,
                   (16, 32, 4, 3, False, split_k, nblk), y)
        assert rel_err(y, x.float() @ W.T + bias.float()) < BOUND[torch.float16]
    assert int(mm._locks(torch.device(DEVICE), 1).abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 48, 128), (5, 200, 320), (16, 80, 256), (29, 72, 320), (150, 136, 256)])
@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 32, False),
                                                               ("nf4", 128, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_register_decode_matches_reference(monkeypatch, M, N, K, quant_type, blocksize, double_quant, dtype):
    """LUT kind 4 (codes decoded in registers, Y^T tiles), split-K 1, 2 and 4 (5 blocks in 4 runs: one
    empty), tiles of 16 to 256 columns of X^T; with no fallback, so the kernel itself ran."""
    monkeypatch.setattr(mm, "_lookup_config", lambda *a: pytest.fail("fell back to the lookups"))
    if not mm.supported(K, blocksize):
        K = 256
    packed, state, W = _weight(N, K, quant_type, blocksize, double_quant)
    x, bias = torch.randn(M, K, device=DEVICE).to(dtype), torch.randn(N, device=DEVICE).to(dtype)
    for config in ((16, 64, 4, 3, 4, 1), (16, 128, 4, 3, 4, 4), (32, 64, 8, 2, 4, 2), (64, 128, 4, 3, 4, 2),
                   (128, 64, 4, 3, 4, 1), (256, 128, 8, 3, 4, 1)):  # over 64 columns: absmax folded
        for b in (bias, None):
            y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
            mm.forward(x, packed, state.absmax, state.code, N, blocksize, state.nested_tensors, b, config, y)
            want = x.float() @ W.T + (0 if b is None else b.float())
            assert rel_err(y, want) < BOUND[dtype], config


def _replay_matches(run, x, W):
    """run() captured in a CUDA graph and replayed on new values in x's buffer equals an eager call bit
    for bit, and the float32 product x W^T within bf16's bound."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        y_graph = run()
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y_graph, run())
    assert rel_err(y_graph, x.float() @ W.T) < BOUND[torch.bfloat16]


def _hopper_or_skip():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9 or mt.gluon is None:
        pytest.skip("matmul4bit_tma's kernel needs sm_90 and Gluon's Hopper API")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(2, 200, 256), (7, 13824, 5120), (16, 4000, 1024), (17, 200, 256), (32, 13824, 5120),
                                   (40, 1000, 512), (64, 4096, 4096), (48, 200, 320), (24, 200, 384), (65, 200, 320),
                                   (128, 13824, 5120), (200, 1000, 256), (256, 4096, 4096)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_kernel_matches_reference(monkeypatch, M, N, K, double_quant, dtype):
    """Kinds 6 (2-64 rows: W's bytes decoded in the MMA's register operand, X in k pair order) and 5
    (65-256 rows: the decoded tile of W in shared memory) of matmul4bit_tma, TMA-fed and
    warp-specialized, by the default dispatch, with and without bias, on a poisoned output; N not a
    multiple of the tiles' rows, M not a power of two. Kind 6 takes whole stages of 4 absmax blocks
    per row: at K=320 (5) and 384 (6) kind 4 takes the product."""
    _hopper_or_skip()
    ran, tma_forward = [], mt.forward
    monkeypatch.setattr(mt, "forward", lambda *a, **kw: ran.append(a[10]) or tma_forward(*a, **kw))
    packed, state, W = _weight(N, K, double_quant=double_quant)
    x, bias = torch.randn(M, K, device=DEVICE).to(dtype), torch.randn(N, device=DEVICE).to(dtype)
    for b in (bias, None):
        y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        mm.forward(x, packed, state.absmax, state.code, N, 64, state.nested_tensors, b, out=y)
        assert rel_err(y, x.float() @ W.T + (0 if b is None else b.float())) < BOUND[dtype]
    kind = 6 if M <= mt.RS_MAX_M else 5
    assert ran == ([] if kind == 6 and K % (mt.RS_BLOCKS * 64) else [kind] * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [8, 40, 96])
def test_tma_kernel_replays_in_a_cuda_graph(M):
    """The TMA descriptors are kernel parameters: a captured call (kind 6 with X's reordering copy, or
    kind 5) replays on new X in the same buffer."""
    _hopper_or_skip()
    packed, state, W = _weight(1000, 512)
    x = torch.randn(M, 512, device=DEVICE, dtype=torch.bfloat16)
    run = lambda: mm.forward(x, packed, state.absmax, state.code, 1000, 64, state.nested_tensors)
    run()  # compiled and the code table read outside the capture
    _replay_matches(run, x, W)


@pytest.mark.gpu
@pytest.mark.parametrize("M,warps,stages,kind", [(16, 4, 3, 6), (32, 4, 3, 6), (64, 8, 4, 6), (16, 8, 3, 6),
                                                 (16, 4, 5, 6), (128, 8, 6, 5), (200, 8, 4, 5), (256, 8, 4, 5)])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_table_decode_matches_byte_permutes(M, warps, stages, kind, quant_type, double_quant, dtype):
    """Kinds 6 and 5 decoding through their shared-memory table (at the offset _table_offset gives for
    each ring size) and through nibbles' byte permutes give the same bits."""
    _hopper_or_skip()
    if not mt.LUT_DECODE:
        pytest.skip("the decode table needs Triton 3.6's shared-memory allocator")
    N, K = 1000, 1024
    packed, state, W = _weight(N, K, quant_type, 64, double_quant)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    xk, na = mm._x_order(x, 64) if kind == 6 else x, mm._nested_args(state.absmax, state.nested_tensors)
    asm = nibbles.decode_asm(state.code, dtype)
    block_m = M if kind == 6 else (128 if M <= 128 else 256)
    assert mt._table_offset(kind, block_m, warps, stages) is not None  # the first run below decodes by the table
    ys = []
    for lut in (True, False):
        y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        ys.append(mt.forward(xk, packed, state.absmax, na, double_quant, N, None, asm, y, (block_m, warps, stages),
                             kind, state.code, lut))
    assert torch.equal(ys[0], ys[1])
    assert rel_err(ys[0], x.float() @ W.T) < BOUND[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 128])
def test_table_elsewhere_gives_nan(monkeypatch, M):
    """A table offset that is not where Triton put the table (another allocator) gives NaN, not a
    wrong product: the kernel reads its table back through the decode's addresses."""
    _hopper_or_skip()
    if not mt.LUT_DECODE:
        pytest.skip("the decode table needs Triton 3.6's shared-memory allocator")
    monkeypatch.setattr(mt, "_table_offset", lambda *shape: 4096)
    monkeypatch.setattr(mt, "_PLANS", {})  # a plan made before the patch would keep the true offset
    packed, state, W = _weight(1000, 1024)
    x = torch.randn(M, 1024, device=DEVICE, dtype=torch.bfloat16)
    y = mm.forward(x, packed, state.absmax, state.code, 1000, 64, state.nested_tensors)
    assert y.isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 128])
def test_plan_launch_matches_the_first_launch(monkeypatch, M):
    """After the first launch for a weight and shape (through Triton's path), later ones take its plan:
    Triton's C launcher, with W's TMA map kept and X's encoded per call (kinds 6 and 5), or X, Y and the
    split-K scratch replaced (the GEMV, split 2 here). A new X at another address, a new Y and another
    bias give the first launch's bits; a Y that is not 16-byte aligned gets a plan of its own."""
    _hopper_or_skip()
    monkeypatch.setattr(mm if M == 1 else mt, "_GEMV_PLANS" if M == 1 else "_PLANS", {})
    plans = mm._GEMV_PLANS if M == 1 else mt._PLANS
    packed, state, W = _weight(1000, 2048)
    xs = [torch.randn(M, 2048, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    biases = [torch.randn(1000, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    run = lambda x, b: mm.forward(x, packed, state.absmax, state.code, 1000, 64, state.nested_tensors, b)
    firsts = [run(x, b) for x, b in zip(xs, biases)]  # each its first launch: two plans
    if not launch.C_LAUNCH:
        assert not plans
        pytest.skip("plans need Triton 3.6's C launcher")
    assert len(plans) == 2
    if M == 1:
        assert all(p.grid[1] == 2 for p in plans.values())  # split-K: scratch and tile counters per call
    elif M <= mt.RS_MAX_M:  # X's copy, a plain Triton kernel, also launches through the C launcher
        assert [k for k, v in launch._COMPILED.items() if k[0] == id(mm._x_order_kernel) and v.c is not None]
    for x, b, first in zip(xs, biases, firsts):
        x2 = x.clone()  # another address
        assert x2.data_ptr() != x.data_ptr()
        assert torch.equal(run(x2, b), first)
        assert rel_err(first, x.float() @ W.T + b.float()) < BOUND[torch.bfloat16]
    assert len(plans) == 2
    odd = torch.empty(M * 1000 + 1, device=DEVICE, dtype=torch.bfloat16)[1:].view(M, 1000)  # Y 2-byte aligned
    y = mm.forward(xs[0], packed, state.absmax, state.code, 1000, 64, state.nested_tensors, biases[0], out=odd)
    assert torch.equal(y, firsts[0]) and len(plans) == 3  # Triton specializes on Y's alignment: a plan of its own


@pytest.mark.gpu
def test_other_triton_launches_without_plans(monkeypatch):
    """Where Triton's C launcher is not the known one (C_LAUNCH off: any Triton but 3.6), launches go
    through compiled.run and no plans are kept; the GEMV, kind 6 and kind 5 give the same bits."""
    _hopper_or_skip()
    packed, state, W = _weight(1000, 2048)
    run = lambda x: mm.forward(x, packed, state.absmax, state.code, 1000, 64, state.nested_tensors)
    xs = [torch.randn(m, 2048, device=DEVICE, dtype=torch.bfloat16) for m in (1, 16, 128)]
    ys = [run(x) for x in xs]
    for name, value in (("C_LAUNCH", False), ("_COMPILED", {})):
        monkeypatch.setattr(launch, name, value)
    monkeypatch.setattr(mt, "_PLANS", {})
    monkeypatch.setattr(mm, "_GEMV_PLANS", {})
    for x, y in zip(xs, ys):
        for _ in range(2):  # Triton's path, then the cached Launcher's compiled.run
            assert torch.equal(run(x), y)
    assert not mt._PLANS and not mm._GEMV_PLANS and launch._COMPILED
    assert all(v.c is None for v in launch._COMPILED.values())


def test_table_offset():
    """Triton 3.6 places the kernel's whole-life buffers largest first: the table's allocation (kind 6:
    the 32 KB table; kind 5: the decoded tiles' 64 KB, the table its second half) follows the rings
    larger than it; with a ring as large the order is not set, and where it does not fit, the kernels
    decode by permutes. Every default configuration has a table."""
    assert mt._lut_offset(24576, 24576) == 0 and mt._lut_offset(49152, 24576) == 49152
    assert mt._lut_offset(131072, 65536) == 196608 and mt._lut_offset(32768, 8192) is None
    assert mt._lut_offset(98304, 24576, buffer=65536, within=32768) == 131072
    assert mt._lut_offset(163840, 20480, buffer=65536, within=32768) is None  # 5 stages of 256 rows: no room
    for kind, configs in ((6, mt.RS_CONFIGS), (5, mt.CONFIGS)):
        for block_m, warps, stages, _ in configs:
            assert mt._table_offset(kind, block_m, warps, stages) is not None


def test_tma_kernel_declines_what_it_cannot_take():
    """matmul4bit_tma.usable: 16-bit X, 65-256 rows (kind 5) or 2-64 with a multiple of 4 absmax
    blocks per row (kind 6), blocksize 64, 16-byte aligned rows and bases."""
    packed = torch.zeros(4096 * 128, dtype=torch.uint8, device=DEVICE)
    x = torch.zeros(128, 256, dtype=torch.bfloat16, device=DEVICE)
    want = mt.gluon is not None
    assert mt.usable(x, packed, 64) == want
    assert not mt.usable(x.float(), packed, 64)
    assert not mt.usable(x[:64], packed, 64) and not mt.usable(torch.zeros(257, 256, dtype=torch.bfloat16), packed, 64)
    assert not mt.usable(x, packed, 128)
    assert not mt.usable(x[:, 1:249], packed, 64)  # base off 16 bytes
    assert not mt.usable(torch.zeros(128, 260, dtype=torch.bfloat16)[:, :256], packed, 64)  # rows 520 bytes apart
    assert not mt.usable(x, packed[1:], 64)
    assert mt.usable(x[:2], packed, 64, 6) == want and mt.usable(x[:64], packed, 64, 6) == want  # kind 6: 2-64 rows
    assert not mt.usable(x[:1], packed, 64, 6) and not mt.usable(x[:65], packed, 64, 6)
    for K in (320, 384):  # 5 and 6 blocks a row
        assert not mt.usable(torch.zeros(32, K, dtype=torch.bfloat16, device=DEVICE), packed, 64, 6)
    codes = torch.zeros(64, dtype=torch.uint8, device=DEVICE)
    assert mt.usable(x[:8], packed, 64, 6, codes) == want and not mt.usable(x[:8], packed, 64, 6, codes[1:])


@pytest.mark.gpu
def test_register_decode_falls_back_while_a_cuda_graph_captures():
    """A code table first met during capture is not read (that would sync): the lookups (kind 3) run
    instead, and the replay matches."""
    packed, state, W = _weight(200, 256)
    code = state.code.clone()  # never read yet
    x = torch.randn(4, 256, device=DEVICE, dtype=torch.bfloat16)
    y = torch.full((4, 200), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    mm.forward(x, packed, state.absmax, code, 200, 64, state.nested_tensors,
               config=mm._lookup_config(4, torch.bfloat16))  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mm.forward(x, packed, state.absmax, code, 200, 64, state.nested_tensors, out=y)
    assert not hasattr(code, "_qtune_decode_asm")
    graph.replay()
    assert rel_err(y, x.float() @ W.T) < BOUND[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 64])
def test_dependent_launch_matches_a_plain_launch(monkeypatch, M):
    """On sm_90+ the register-decode matmul (kind 4: where matmul4bit_tma's kind 6 does not run) at up to
    PDL_MAX_M rows is launched while X's copy runs (programmatic dependent launch): it was launched so,
    its output equals a plain launch's bit for bit, and a CUDA graph of it replays on new X."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    packed, state, W = _weight(13824, 5120)
    x = torch.randn(M, 5120, device=DEVICE, dtype=torch.bfloat16)
    config = mm._config(M, torch.bfloat16)  # kind 4
    run = lambda: mm.forward(x, packed, state.absmax, state.code, 13824, 64, state.nested_tensors, config=config)
    seen, launch = [], mm.launch
    monkeypatch.setattr(mm, "launch", lambda k, *a, **kw: seen.append(kw.get("PDL")) or launch(k, *a, **kw))
    y = run()
    assert seen == [True, True]  # the copy of X, then the matmul
    monkeypatch.setattr(mm, "PDL_MAX_M", 0)
    assert torch.equal(run(), y)
    monkeypatch.setattr(mm, "PDL_MAX_M", 64)
    _replay_matches(run, x, W)


@pytest.mark.parametrize("M,K,blocksize", [(3, 320, 64), (1, 2048, 32), (5, 1280, 256), (2, 256, 128)])
def test_x_order_matches_the_fragment_order(M, K, blocksize):
    """X's columns in the register-decode kernel's order, against the order written out from the MMA
    fragment: in each block of R byte pairs, pair 8c + 4s + t (k step c, half s, quad lane t) is
    byte (R/4) t + 2c + s. X is a strided view (every other row), its copy contiguous."""
    R = blocksize // 2
    pair = torch.empty(R, dtype=torch.long)
    for c in range(R // 8):
        for s in range(2):
            for t in range(4):
                pair[8 * c + 4 * s + t] = (R // 4) * t + 2 * c + s
    cols = torch.stack([2 * pair, 2 * pair + 1], 1).reshape(blocksize)
    order = (torch.arange(K // blocksize)[:, None] * blocksize + cols).reshape(K)
    x = torch.randn(2 * M, K, device=DEVICE).to(torch.bfloat16)[::2]
    got = mm._x_order(x, blocksize)
    assert got.is_contiguous() and torch.equal(got, x[:, order.to(DEVICE)])


def test_register_decode_refuses_float32():
    packed, state, _ = _weight(48, 128)
    with pytest.raises(ValueError, match="LUT kind 4 .* float16 or bfloat16 inputs, not float32"):
        mm.forward(torch.randn(2, 128, device=DEVICE), packed, state.absmax, state.code, 48, 64, state.nested_tensors,
                   config=(16, 128, 4, 3, 4, 4))


def test_gemv_refuses_an_unknown_lookup():
    packed, state, _ = _weight(48, 128)
    with pytest.raises(ValueError, match="LUT kind 0 is not one of 1, 2, 3"):
        mm.gemv(torch.randn(1, 128, device=DEVICE), packed, state.absmax, state.code, 48, 64, state.nested_tensors,
                config=(4, 2, 8, 4, 0))


def test_runs_fit_the_blocks():
    assert mm._runs(80, 8, 4) == (8, 2)  # 10 blocks per run: groups of 2
    assert mm._runs(80, 4, 4) == (4, 4)
    assert mm._runs(5, 4, 2) == (1, 1)  # 5 blocks: one run, no even groups
    assert mm._runs(5, 4, 1) == (4, 1)  # uneven runs are fine one block at a time
    assert mm._runs(2, 8) == (2, 1)


def test_nan_input_propagates():
    packed, state, W = _weight(48, 128)
    x = torch.randn(3, 128, device=DEVICE, dtype=torch.float16)
    x[1, 7] = float("nan")
    y = mm.forward(x, packed, state.absmax, state.code, 48, 64, state.nested_tensors)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_supported_shapes():
    assert mm.supported(5120, 64) and mm.supported(4096, 256)
    assert not mm.supported(5121, 64) and not mm.supported(8192, 4096)


def _linear(N, K, dtype, blocksize=64, bias=True):
    lin = torch.nn.Linear(K, N, bias=bias, device=DEVICE)
    q = Linear4bit.from_linear(lin, blocksize=blocksize, double_quant=True, compute_dtype=dtype)
    W = reference_dequant(q.weight, q.quant_state, torch.float32)
    return q, W, None if lin.bias is None else lin.bias.detach().to(dtype).float()


def _check_linear(q, W, b, M, dtype, lead=()):
    x = torch.randn(*lead, M, W.shape[1], device=DEVICE).to(dtype).requires_grad_()
    want = x.detach().float() @ W.T + (0 if b is None else b)
    dy = torch.randn(*lead, M, W.shape[0], device=DEVICE).to(dtype)
    grads = []
    for _ in range(2):  # on CUDA the second backward replays the decode's plan that the first made
        y = q(x)
        assert y.shape == (*lead, M, W.shape[0]) and y.dtype == dtype
        assert rel_err(y, want) < BOUND[dtype]
        decode = y.grad_fn.decode
        y.backward(dy)
        assert rel_err(x.grad, dy.float() @ W) < BOUND[dtype]
        grads.append(x.grad)
        x.grad = None
    assert torch.equal(grads[0], grads[1])
    if DEVICE == "cuda" and decode is not None and launch.C_LAUNCH:
        assert decode[1].__name__ == "decode"


@pytest.mark.parametrize("M", [1, 7, 40])
@pytest.mark.parametrize("blocksize", [64, 4096])  # 4096: not fused, dequantize + matmul
def test_linear4bit_dispatch(monkeypatch, M, blocksize):
    monkeypatch.setenv("QTUNE_BACKEND", "triton")
    monkeypatch.setattr(mm, "GEMV_MAX_M", 2)  # every kernel and both fallbacks, whatever the measured thresholds
    monkeypatch.setattr(mm, "FWD_MAX_M", 16)
    monkeypatch.setattr(mm, "FWD_MAX_M_REGS", 16)
    monkeypatch.setattr(mm, "BWD_MAX_M", 16)
    q, W, b = _linear(48, 128 if blocksize == 64 else 4096, torch.float16, blocksize)
    _check_linear(q, W, b, M, torch.float16, lead=(2,))


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(4096, 4096), (13824, 5120), (28672, 8192)])
@pytest.mark.parametrize("M", [1, 7, 16, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear4bit_real_sizes(N, K, M, dtype):
    q, W, b = _linear(N, K, dtype, bias=N == 4096)
    _check_linear(q, W, b, M, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 32, 64, 128, 256])  # each default launch shape of the forward
def test_kernels_real_sizes(M):
    packed, state, W = _weight(13824, 5120)
    x = torch.randn(M, 5120, device=DEVICE, dtype=torch.bfloat16)
    y = torch.full((M, 13824), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    mm.forward(x, packed, state.absmax, state.code, 13824, 64, state.nested_tensors, out=y)
    assert rel_err(y, x.float() @ W.T) < BOUND[torch.bfloat16]
    y.fill_(float("nan"))
    mm.gemv(x, packed, state.absmax, state.code, 13824, 64, state.nested_tensors, out=y)
    assert rel_err(y, x.float() @ W.T) < BOUND[torch.bfloat16]
    dy = torch.randn(M, 13824, device=DEVICE, dtype=torch.bfloat16)
    dx = torch.full((M, 5120), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    mm.backward(dy, packed, state.absmax, state.code, 5120, 64, state.nested_tensors, out=dx)
    assert rel_err(dx, dy.float() @ W) < BOUND[torch.bfloat16]
