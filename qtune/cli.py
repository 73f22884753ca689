"""`key=value` command-line arguments for qtune's smaller commands (merge, generate), with the
same spelling as qtune.train's Hydra overrides and one-line errors."""

from __future__ import annotations

import sys
from typing import Any

TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def parse(argv: list[str], spec: dict[str, tuple[type, Any]], prog: str) -> dict[str, Any]:
    """spec: name -> (type, default); a default of ... means required. Exits 2 with one line on
    a malformed, unknown, ill-typed or missing argument."""
    out: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(f"usage: python -m {prog} " + " ".join(
                f"{k}=<{t.__name__}>" if d is ... else f"[{k}={d}]" for k, (t, d) in spec.items()))
            raise SystemExit(0)
        key, eq, value = arg.partition("=")
        if not eq:
            fail(f"argument {arg!r} is not key=value; keys: {', '.join(spec)}")
        if key not in spec:
            fail(f"unknown argument {key!r}; allowed: {', '.join(spec)}")
        typ = spec[key][0]
        try:
            if typ is bool:
                if value.lower() not in TRUE | FALSE:
                    raise ValueError
                out[key] = value.lower() in TRUE
            else:
                out[key] = typ(value)
        except ValueError:
            fail(f"{key}={value!r} is not a valid {typ.__name__}")
    for key, (_, default) in spec.items():
        if key not in out:
            if default is ...:
                fail(f"missing required argument {key}=...")
            out[key] = default
    return out


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
