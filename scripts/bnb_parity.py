"""Byte-for-byte parity of qtune's 4-bit quantization with bitsandbytes' `quantize_4bit` (GPU).

    python scripts/bnb_parity.py [--quick]

For fresh random weights of each shape, dtype, blocksize, quant type and double-quant setting,
counts the differing packed bytes, absmax values (or 8-bit absmax codes, nested absmax and offset),
and classifies each differing code: a "near tie" is a value whose x * (1/absmax) lies within
4 float32 ulps of a rounding threshold, where bitsandbytes' approximate reciprocal
(--use_fast_math) may round the other way. Then loads each library's Linear4bit state dict into
the other's layer and checks that the decoded weights match exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

from qtune.nn import Linear4bit
from qtune.quant import dequantize_4bit, quantize_4bit
from qtune.quant.codes import fp4_magnitude_tables, nf4_thresholds
from qtune.quant.reference import unpack_nibbles

SHAPES = ((4096, 4096), (13824, 5120))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCKSIZES = (64, 128, 256)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tie_distance(x: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str) -> torch.Tensor:
    """Per element: distance of x * (1/absmax) from the nearest 4-bit rounding threshold, in
    float32 ulps of the scaled value (0: an exact tie)."""
    s = (x.reshape(-1).float().view(-1, blocksize) * (1.0 / absmax)[:, None]).reshape(-1)
    thr = nf4_thresholds() if quant_type == "nf4" else fp4_magnitude_tables()[0]
    v = s if quant_type == "nf4" else s.abs()
    dist = (v[:, None] - thr.to(v.device)[None, :]).abs().amin(1)
    return dist / (torch.finfo(torch.float32).eps * v.abs().clamp_min(1e-30))


def compare(shape, dtype, blocksize, quant_type, double_quant) -> dict:
    import bitsandbytes.functional as F

    w = torch.randn(shape, dtype=dtype, device=DEVICE)
    pb, sb = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    pq, sq = quantize_4bit(w, blocksize, quant_type, double_quant)
    r = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "blocksize": blocksize,
         "quant_type": quant_type, "double_quant": double_quant,
         "bytes": pq.numel(), "diff_bytes": int((pb.view(-1) != pq.view(-1)).sum())}
    if double_quant:
        r["diff_absmax_codes"] = int((sb.absmax != sq.absmax).sum())
        r["diff_nested_absmax"] = int((sb.state2.absmax.view(torch.int32) != sq.nested.absmax.view(torch.int32)).sum())
        r["diff_offset"] = int(sb.offset.view(torch.int32) != sq.nested.offset.view(torch.int32))
    else:
        r["diff_absmax"] = int((sb.absmax.view(torch.int32) != sq.absmax.view(torch.int32)).sum())
    codes_b, codes_q = unpack_nibbles(pb, w.numel()), unpack_nibbles(pq, w.numel())
    diff = codes_b != codes_q
    raw_absmax = w.reshape(-1).float().view(-1, blocksize).abs().amax(1)
    ulps = tie_distance(w, raw_absmax, blocksize, quant_type)
    r["diff_codes"] = int(diff.sum())
    r["diff_codes_exact_tie"] = int((diff & (ulps == 0)).sum())
    r["diff_codes_not_near_tie"] = int((diff & (ulps > 4)).sum())
    return r


def interop(quant_type: str, double_quant: bool) -> dict:
    """bitsandbytes Linear4bit -> qtune Linear4bit and back, through state dicts."""
    import bitsandbytes as bnb

    lin = torch.nn.Linear(1024, 768, bias=True, dtype=torch.bfloat16)
    b = bnb.nn.Linear4bit(1024, 768, bias=True, compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                          quant_type=quant_type)
    b.load_state_dict(lin.state_dict())
    b = b.to(DEVICE)
    sd_b = b.state_dict()
    q = Linear4bit(1024, 768, bias=True, quant_type=quant_type, double_quant=double_quant,
                   compute_dtype=torch.bfloat16, device=DEVICE)
    q.load_state_dict(sd_b)
    deq_b = bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state)
    same_bnb_to_qtune = bool(torch.equal(q.dequantize(), deq_b))
    # qtune -> bitsandbytes
    q2 = Linear4bit.from_linear(lin.to(DEVICE), quant_type=quant_type, double_quant=double_quant)
    sd_q = q2.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd_q.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(data=sd_q["weight"], quantized_stats=stats, device=DEVICE)
    same_qtune_to_bnb = bool(torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), q2.dequantize()))
    x = torch.randn(8, 1024, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        yq, yb = q(x).float(), b(x).float()
    return {"quant_type": quant_type, "double_quant": double_quant, "bnb_to_qtune_exact": same_bnb_to_qtune,
            "qtune_to_bnb_exact": same_qtune_to_bnb, "forward_rel_diff": float((yq - yb).norm() / yb.norm())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape, one dtype")
    ap.add_argument("--json", default=os.environ.get("OUT", ".") + "/bnb_parity.json")
    a = ap.parse_args(argv)
    import bitsandbytes

    shapes, dtypes = (SHAPES[:1], DTYPES[:1]) if a.quick else (SHAPES, DTYPES)
    rows = []
    print(f"bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for shape, dtype, bs, qt, dq in itertools.product(shapes, dtypes, BLOCKSIZES, ("nf4", "fp4"), (False, True)):
        r = compare(shape, dtype, bs, qt, dq)
        rows.append(r)
        extra = (f"absmax codes {r['diff_absmax_codes']} nested {r['diff_nested_absmax']} offset {r['diff_offset']}"
                 if dq else f"absmax {r['diff_absmax']}")
        print(f"{str(shape):14} {r['dtype']:9} bs={bs:<4} {qt} dq={int(dq)}  diff bytes {r['diff_bytes']:>4} / "
              f"{r['bytes']}  ({r['diff_codes']} codes: {r['diff_codes_exact_tie']} exact ties, "
              f"{r['diff_codes_not_near_tie']} over 4 ulps from a tie)  {extra}")
    inter = [interop(qt, dq) for qt in ("nf4", "fp4") for dq in (False, True)]
    for r in inter:
        print("interop", r)
    with open(a.json, "w") as f:
        json.dump({"rows": rows, "interop": inter}, f, indent=1)
    total = sum(r["diff_bytes"] for r in rows)
    print(f"TOTAL differing bytes: {total} over {sum(r['bytes'] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
