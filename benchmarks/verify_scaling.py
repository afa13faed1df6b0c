"""How the front end scales with the number of levels (not a test).

Generates valid specs with about 10, 100 and 1000 levels in three shapes and times the three
front-end stages separately (median of a few runs, in-process, after start-up):

* ``blocks`` — many blocks, each an attention level, an in-context memory level and a
  ``never`` feed-forward level;
* ``cms`` — one block with one long sequential CMS chain of in-context MLP levels;
* ``nested`` — one block with one long nested CMS chain (periods doubling from the fastest).

Also times ``nlc check examples/*.nl`` in-process. Prints a table and writes JSON::

    python benchmarks/verify_scaling.py [--sizes 10 100 1000] [--repeat 3] [--json out.json]

Stages: ``parse`` is text → AST (lark LALR + AST build + comment attachment), ``resolve`` is
AST → IR, ``verify`` runs every pass of :mod:`nlc.verify`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc.diagnostics import Diagnostics  # noqa: E402
from nlc.parser import parse_source, parser  # noqa: E402
from nlc.pipeline import check_file  # noqa: E402
from nlc.resolve import resolve  # noqa: E402
from nlc.source import SourceFile  # noqa: E402
from nlc.verify import verify  # noqa: E402

_HEAD = """nl 1

model scale_{shape}_{n} {{
  dims {{
    d = 64
    heads = 4
    dh = d / heads
    vocab = 256
    seq = {seq}
  }}

  embed vocab -> d
"""
_TAIL = """
  norm rms
  head tied

  level pretrain {
    objective next_token
    rule adamw(lr = 1e-3)
    every 1 steps
  }
}
"""
_MEMORY = """    # memory {i}: linear attention as a 2-level system
    level mem{i} per head : linear(dh -> dh) {{
      let key = input | linear(d -> dh) | l2norm
      let value = input | linear(d -> dh)
      let query = input | linear(d -> dh) | l2norm
      output linear(heads * dh -> d)
      objective dot
      rule gd(lr = 1)
      every 16 tokens
    }}
"""
_CMS_LEVEL = """      # CMS level {i}
      level c{i} : mlp(d -> d, hidden = 2 * d) {{
        let value = input | linear(d -> d)  # learned values
        objective l2
        rule gd(lr = 0.01)
        every {period} tokens{extra}
      }}
"""


def make_spec(shape: str, n: int) -> str:
    """A valid spec of the given shape with about ``n`` levels (outer level included)."""
    if shape == "blocks":
        out = [_HEAD.format(shape=shape, n=n, seq=256)]
        for b in range(max(1, (n - 1) // 3)):
            out.append(f"\n  block b{b} {{\n    level attn{b} : attention(heads = heads)\n")
            out.append(_MEMORY.format(i=b))
            out.append(f"    level ffn{b} : swiglu(d -> d, hidden = 4 * d) {{\n      never\n    }}\n  }}\n")
        out.append(_TAIL)
        return "".join(out)
    if shape in ("cms", "nested"):
        k = max(1, n - 1)
        if shape == "cms":
            levels = [_CMS_LEVEL.format(i=i, period=16, extra="") for i in range(k)]
            seq = 256
        else:
            # slowest first, each period dividing the one before (256, 128, ..., 16, 16, ...)
            periods = [max(16, 256 >> i) for i in range(k)]
            levels = [_CMS_LEVEL.format(i=i, period=p, extra="") for i, p in enumerate(periods)]
            seq = 256
        variant = "sequential" if shape == "cms" else "nested"
        body = f"\n  block layer {{\n    cms ffn {variant} {{\n" + "".join(levels) + "    }\n  }\n"
        return _HEAD.format(shape=shape, n=n, seq=seq) + body + _TAIL
    raise ValueError(shape)


def _time(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(shape: str, n: int, repeat: int) -> dict:
    text = make_spec(shape, n)
    source = SourceFile(f"<{shape}_{n}>", text)
    spec = parse_source(source)
    diags = Diagnostics()
    program = resolve(spec, source, diags)
    verify(program, diags)
    assert not diags.has_errors, [d.message for d in diags][:5]

    def do_resolve():
        resolve(spec, source, Diagnostics())

    def do_verify():
        verify(program, Diagnostics())

    return {
        "shape": shape,
        "levels": len(program.levels),
        "lines": text.count("\n"),
        "parse_s": _time(lambda: parse_source(source), repeat),
        "resolve_s": _time(do_resolve, repeat),
        "verify_s": _time(do_verify, repeat),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--shapes", nargs="+", default=["blocks", "cms", "nested"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "verify_scaling.json"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    parser()  # build the LALR tables once (start-up, not measured below)
    startup = time.perf_counter() - t0

    rows = [measure(shape, n, args.repeat) for shape in args.shapes for n in args.sizes]
    examples = sorted((ROOT / "examples").glob("*.nl"))
    check_all = _time(lambda: [check_file(p) for p in examples], args.repeat)

    print(f"parser construction (once per process): {startup * 1e3:.0f} ms")
    print(f"{'shape':<8} {'levels':>6} {'lines':>6} {'parse ms':>9} {'resolve ms':>11} {'verify ms':>10} "
          f"{'verify µs/level':>16}")
    for r in rows:
        print(f"{r['shape']:<8} {r['levels']:>6} {r['lines']:>6} {r['parse_s'] * 1e3:>9.1f} "
              f"{r['resolve_s'] * 1e3:>11.1f} {r['verify_s'] * 1e3:>10.1f} "
              f"{r['verify_s'] / r['levels'] * 1e6:>16.0f}")
    print(f"nlc check examples/*.nl ({len(examples)} specs, in-process, after start-up): "
          f"{check_all * 1e3:.0f} ms")
    Path(args.json).write_text(json.dumps(
        {"startup_s": startup, "rows": rows, "check_examples_s": check_all, "examples": len(examples)},
        indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
