"""Linear4bit: forward/backward against x @ deq(W)^T, dtype rules, device moves, state dicts, errors."""

import pytest
import torch
from conftest import one_line, rel_err
from torch import nn

from qtune.nn import Linear4bit, matmul_4bit, quantize_linears
from qtune.quant import dequantize_4bit, quantize_4bit


def test_gradcheck_float64():
    lin = nn.Linear(40, 24)
    layer = Linear4bit.from_linear(lin, blocksize=32, double_quant=True, compute_dtype=torch.float64)
    layer.bias.data = layer.bias.data.double()
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert layer.bias.requires_grad  # the bias gradient was checked too


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_and_input_grad_match_dequantized_reference(quant_type):
    lin = nn.Linear(192, 160)
    layer = Linear4bit.from_linear(lin, quant_type=quant_type)
    w = layer.dequantize()
    x = torch.randn(4, 7, 192, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = lin.bias.detach().clone().requires_grad_()
    y_ref = x_ref @ w.T + b_ref
    assert rel_err(y, y_ref) < 1e-6
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert rel_err(x.grad, x_ref.grad) < 1e-6
    assert rel_err(layer.bias.grad, b_ref.grad) < 1e-6
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_autocast_output_dtype_sets_the_input_grad_dtype():
    """Under autocast a float32 product comes out in bfloat16 (F.linear autocasts): its input
    gradient is decoded and multiplied in the output's dtype, and comes back in the input's."""
    packed, state = quantize_4bit(torch.randn(96, 128), 64, "nf4", True)
    x = torch.randn(2, 300, 128, requires_grad=True)  # 600 rows: dequantize + F.linear on CUDA too
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = matmul_4bit(x, packed, state)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    want = g.float() @ dequantize_4bit(packed, state, torch.bfloat16).float()
    assert x.grad.dtype == torch.float32 and rel_err(x.grad, want) < 2**-7


def test_backward_saves_only_the_packed_weight():
    layer = Linear4bit.from_linear(nn.Linear(256, 512, bias=False))
    x = torch.randn(64, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert len(saved) == 1 and saved[0].dtype == torch.uint8 and saved[0].numel() == 256 * 512 // 2


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inputs_cast_to_compute_dtype_and_back(in_dtype):
    lin = nn.Linear(64, 32)
    layer = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    x = torch.randn(5, 64).to(in_dtype)
    y = layer(x)
    assert y.dtype == in_dtype
    expect = (x.float() @ layer.dequantize(torch.float32).T + lin.bias).to(in_dtype)
    assert torch.equal(y, expect)


def test_compute_dtype_defaults_to_weight_dtype_and_shows_in_repr():
    layer = Linear4bit.from_linear(nn.Linear(64, 32, dtype=torch.bfloat16), double_quant=True)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight_dtype == torch.bfloat16
    r = repr(layer)
    assert "quant_type=nf4" in r and "blocksize=64" in r and "compute_dtype=bfloat16" in r and "double_quant=True" in r


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_dtype_casts_leave_packed_weight_and_state_alone(storage):
    layer = Linear4bit.from_linear(nn.Linear(64, 64), double_quant=True, quant_storage=storage)
    before = layer.dequantize()
    packed = layer.weight.detach().clone()
    layer.half()
    layer.to(torch.float64)
    assert layer.weight.dtype == storage and torch.equal(layer.weight.view(torch.uint8), packed.view(torch.uint8))
    state = layer.quant_state
    assert state.absmax.dtype == torch.uint8 and state.nested.absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.float64  # the bias follows casts, as in nn.Linear
    assert torch.equal(layer.dequantize(), before)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_state_dict_round_trip_is_bit_exact(double_quant, storage):
    layer = Linear4bit.from_linear(nn.Linear(130, 96), quant_type="fp4", blocksize=128, double_quant=double_quant,
                                   quant_storage=storage)
    sd = layer.state_dict()
    prefix = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__fp4"}
    assert prefix <= set(sd) and ({"weight.nested_absmax", "weight.nested_quant_map"} <= set(sd)) == double_quant
    fresh = Linear4bit(130, 96)  # default nf4 / 64 / no double quant: all replaced by the checkpoint
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.weight.view(torch.uint8), layer.weight.view(torch.uint8))  # bytes: a float view may hold NaNs
    assert torch.equal(fresh.quant_state.absmax, layer.quant_state.absmax)
    assert fresh.quant_type == "fp4" and fresh.blocksize == 128 and fresh.double_quant == double_quant
    assert torch.equal(fresh.dequantize(), layer.dequantize()) and torch.equal(fresh.bias, layer.bias)
    x = torch.randn(3, 130)
    assert torch.equal(fresh(x), layer(x))


def test_model_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 10))

    model = quantize_linears(make(), skip_modules=["2"], double_quant=True)
    assert isinstance(model[0], Linear4bit) and type(model[2]) is nn.Linear and isinstance(model[3], Linear4bit)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    other = quantize_linears(make(), skip_modules=["2"])
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(4, 64)
    assert torch.equal(other(x), model(x))


def test_load_errors():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError) as e:
        Linear4bit(64, 48).load_state_dict(layer.state_dict())
    assert "checkpoint holds shape (32, 64); this layer is (48, 64)" in one_line(e)
    with pytest.raises(ValueError) as e:
        Linear4bit(64, 32).load_state_dict({"weight": layer.weight})
    assert "packed uint8 tensor without its quant state" in one_line(e)
    with pytest.raises(ValueError) as e:
        Linear4bit(64, 32).load_state_dict(nn.Linear(64, 48).state_dict())
    assert "weight has shape (48, 64); this layer is (32, 64)" in one_line(e)
    sd = layer.state_dict()
    sd["weight"] = sd["weight"][:10]
    with pytest.raises(ValueError) as e:
        Linear4bit(64, 32).load_state_dict(sd)
    assert "holds 10 bytes" in one_line(e)


@pytest.mark.parametrize("shape", [(64,), (4, 8, 16)])
def test_from_linear_needs_a_matrix(shape):
    lin = nn.Linear(8, 8)
    lin.weight = nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError) as e:
        Linear4bit.from_linear(lin, name="m.weight")
    assert f"m.weight must be a 2-D matrix (out_features, in_features); got shape {shape}" in one_line(e)


def test_from_linear_errors():
    lin = nn.Linear(64, 64)
    with pytest.raises(ValueError) as e:
        Linear4bit.from_linear(lin, quant_type="int4")
    assert "allowed: nf4, fp4" in one_line(e)
    with pytest.raises(ValueError) as e:
        Linear4bit.from_linear(lin, blocksize=100)
    assert "blocksize 100" in one_line(e)
    lin.weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError) as e:
        Linear4bit.from_linear(lin)
    assert "not a float" in one_line(e)
    with pytest.raises(TypeError) as e:
        Linear4bit(64, 64, compute_dtype=torch.int8)
    assert "compute_dtype" in one_line(e)


def test_quantize_linears_names_the_bad_weight():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[3, 5] = float("nan")
    with pytest.raises(ValueError) as e:
        quantize_linears(model)
    assert one_line(e).startswith("1.weight has 1 non-finite value")


def test_matmul_4bit_functional():
    w = torch.randn(48, 64)
    packed, state = quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(2, 64)
    assert torch.equal(matmul_4bit(x, packed, state), x @ dequantize_4bit(packed, state).T)


def test_float_state_dict_quantizes_with_the_layers_settings():
    lin = nn.Linear(128, 64)
    layer = Linear4bit(128, 64, quant_type="fp4", double_quant=True, device="meta")
    assert not layer.is_quantized and isinstance(layer, nn.Linear)
    with pytest.raises(RuntimeError) as e:
        layer(torch.randn(2, 128))
    assert "no quantized weight yet" in one_line(e)
    layer.load_state_dict(lin.state_dict(), assign=True)  # assign: the bias is on meta too
    expect = Linear4bit.from_linear(lin, quant_type="fp4", double_quant=True)
    assert layer.is_quantized and torch.equal(layer.weight, expect.weight)
    assert torch.equal(layer.dequantize(), expect.dequantize()) and torch.equal(layer.bias, lin.bias)


def test_quantize_in_place():
    layer = Linear4bit(64, 32, bias=False, blocksize=32)
    with torch.no_grad():
        layer.weight.normal_()
    w = layer.weight.detach().clone()
    layer.quantize_()
    assert layer.weight.dtype == torch.uint8 and 0.085 < rel_err(layer.dequantize(), w) < 0.095


@pytest.mark.parametrize("shape,blocksize,nested,piece", [
    ((64, 1024), 64, True, 16384),  # 16 blocks a row: pieces of 16 rows keep nested blocks whole
    ((37, 96), 32, False, 1000),    # uneven last piece
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_in_row_pieces_match_whole_weight(monkeypatch, shape, blocksize, nested, piece, dtype):
    from qtune.nn import linear4bit
    from qtune.quant.functional import dequantize_4bit_rows, row_chunk

    monkeypatch.setenv("QTUNE_BACKEND", "triton")  # the kernel path, in the interpreter on the CPU
    monkeypatch.setattr(linear4bit, "PIECE", piece)
    monkeypatch.setattr(linear4bit, "PIECE_MIN_OTHER", 1)  # these products are tiny
    torch.manual_seed(shape[0])
    packed, state = quantize_4bit(torch.randn(shape), blocksize=blocksize, double_quant=nested)
    rows = row_chunk(state, piece)
    assert 1 < -(-shape[0] // rows) <= 4 and rows * shape[1] <= 2 * piece
    whole = dequantize_4bit(packed, state, dtype)
    for start in range(0, shape[0], rows):  # each piece decodes exactly the rows of the whole
        assert torch.equal(dequantize_4bit_rows(packed, state, dtype, start, min(shape[0], start + rows)),
                           whole[start:start + rows])
    dy = torch.randn(1, 2, shape[0]).to(dtype)  # few rows: the decoded weight dwarfs dX
    pieces = []
    monkeypatch.setattr(linear4bit, "dequantize_4bit_rows", lambda *a: pieces.append(a[3]) or dequantize_4bit_rows(*a))
    dx = linear4bit._dx_in_pieces(dy, packed, state, True)
    assert pieces == list(range(0, shape[0], rows))
    want_dx = (dy.float() @ whole.float()).to(dtype)
    assert dx.shape == (1, 2, shape[1]) and dx.dtype == dtype
    assert rel_err(dx, want_dx) < {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype], rel_err(dx, want_dx)
    x = torch.randn(1, 2, shape[1]).to(dtype)  # forward: each piece writes its columns of Y, bias added
    bias = torch.randn(shape[0]).to(dtype)
    pieces.clear()
    y = linear4bit._y_in_pieces(x, packed, state, bias, True)
    assert pieces == list(range(0, shape[0], rows)) and y.shape == (1, 2, shape[0])
    want = (x.float() @ whole.float().t() + bias.float()).to(dtype)
    assert rel_err(y, want) < {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype], rel_err(y, want)
    layer = Linear4bit(shape[1], shape[0], bias=False, blocksize=blocksize, compute_dtype=dtype)
    layer._set_quantized(packed, state)
    xg = x.clone().requires_grad_(True)
    pieces.clear()
    layer(xg).backward(dy)  # pieces are the layer's choice, off by default: whole weights
    assert pieces == [] and rel_err(xg.grad, want_dx) < 1e-2
    layer.decode_in_pieces = True  # through the autograd Function (2 rows: the forward is the fused kernel's)
    xg.grad = None
    layer(xg).backward(dy)
    assert pieces == list(range(0, shape[0], rows))
    assert rel_err(xg.grad, want_dx) < {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    monkeypatch.setattr(linear4bit, "PIECE_MIN_OTHER", 2 * max(shape) + 1)  # Y and dX under it: whole weights
    pieces.clear()
    linear4bit._y_in_pieces(x, packed, state, bias, True)
    linear4bit._dx_in_pieces(dy, packed, state, True)
    assert pieces == []


def test_row_pieces_of_13b_weights_start_on_nested_blocks():
    from qtune.nn.linear4bit import PIECE
    from qtune.quant.functional import row_chunk
    from qtune.quant.state import NestedState, QuantState

    for rows, cols in [(13824, 5120), (5120, 13824), (28672, 8192), (5120, 5120)]:
        state = QuantState(absmax=torch.empty(0), shape=torch.Size((rows, cols)), dtype=torch.bfloat16, blocksize=64,
                           quant_type="nf4", code=torch.empty(16),
                           nested=NestedState(absmax=torch.empty(0), code=torch.empty(256), offset=torch.empty(())))
        r = row_chunk(state, PIECE)
        assert (r * cols // 64) % 256 == 0 and r * cols <= 1.1 * PIECE or r == rows, (rows, cols, r)
        assert r == rows if rows * cols <= PIECE else r < rows
