"""Write qtune/assets/tiny_instructions.jsonl: a small alpaca-format instruction set for the tiny
recipe (simple string and arithmetic tasks a 1M-parameter character model can start to learn).

    python scripts/make_tiny_data.py
"""

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger lemon piano rocket garden silver candle forest window "
         "yellow planet orange bridge castle winter summer pencil marble coffee violin").split()


def examples(rng: random.Random, n: int):
    for _ in range(n):
        kind = rng.randrange(5)
        w = rng.choice(WORDS)
        if kind == 0:
            yield {"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()}
        elif kind == 1:
            yield {"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"}
        elif kind == 2:
            a, b = rng.randrange(10), rng.randrange(10)
            yield {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
        elif kind == 3:
            yield {"instruction": "Spell the word with dashes.", "input": w, "output": "-".join(w)}
        else:
            yield {"instruction": "Name the first letter of the word.", "input": w, "output": w[0]}


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "qtune" / "assets" / "tiny_instructions.jsonl"
    with open(out, "w") as f:
        for ex in examples(random.Random(0), 600):
            f.write(json.dumps(ex) + "\n")
    print(f"wrote {out}")
