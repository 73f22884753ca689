"""The README's first command: `python -m qtune.demo` on the CPU."""

import re

from qtune.demo import main


def test_demo_quantizes_prints_and_generates(capsys):
    main(["--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert out.count("Linear4bit(") == 7  # one per kind of linear layer in the printed model
    assert "(lm_head): Linear(" in out  # output embeddings stay unquantized
    mem = re.search(r"memory \(state dict\): ([\d.]+) MiB fp32 -> ([\d.]+) MiB", out)
    before, after = map(float, mem.groups())
    assert after < 0.3 * before
    tokens = re.search(r"greedy tokens, 4-bit model: \[([\d, ]+)\]", out).group(1).split(",")
    assert len(tokens) == 4
