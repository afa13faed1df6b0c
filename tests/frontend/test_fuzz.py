"""Property-based robustness of the front end (hypothesis).

The examples are mutated token by token (deleted, duplicated, swapped, replaced by keywords, by
hostile identifiers or by random text, truncated) and the front end must answer only with
diagnostics or success:

* ``check_source`` never raises; every diagnostic has a registered code, a span inside the text
  whose line/column agree with its offset, and renders (text and JSON);
* the command line answers 0 or 1, never a traceback;
* any spec that parses prints canonically: ``parse(print(x)) == x`` and printing is idempotent.

Example counts are fixed and there is no deadline, so the run is deterministic in length
(about 15 s on 2 cores); ``derandomize`` makes it reproducible.
"""

from __future__ import annotations

import contextlib
import io
import keyword
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlc import options
from nlc.cli import main as cli_main
from nlc.diagnostics import CODES, SpecError, render, to_json
from nlc.parser import parse_source
from nlc.pipeline import CheckResult, check_file, check_source
from nlc.printer import print_spec
from nlc.source import SourceFile

from ..conftest import EXAMPLES, ROOT

TEXTS = [p.read_text(encoding="utf-8") for p in EXAMPLES]
_TOKEN = re.compile(r"#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|->|\s+|\S")

KEYWORDS = [
    "nl", "model", "dims", "memory", "embed", "head", "norm", "block", "cms", "level", "per", "state",
    "let", "reads", "output", "objective", "rule", "every", "never", "frozen", "reset", "init", "from",
    "grad", "through", "writes", "read", "target", "context", "x",
]
# words with a meaning somewhere in the language (options, units, stages, memories)
MEANINGFUL = sorted(
    {"input", "tokens", "steps", "grads", "chunks", "truncate", "sequence", "learned", "zeros", "self"}
    | set(options.OPS) | set(options.MEMORY_KINDS) | set(options.IN_CONTEXT_RULES) | set(options.OUTER_RULES)
    | set(options.OPTIMIZER_RULES) | set(options.IN_CONTEXT_OBJECTIVES) | set(options.CMS_VARIANTS)
    | set(options.NORMS) | set(options.HEADS) | set(options.READ_MODES) | set(options.GRAD_MODES)
)
# identifiers that must never reach generated Python unchecked
HOSTILE = sorted(set(keyword.kwlist) | {
    "__init__", "__class__", "__import__", "__builtins__", "os", "sys", "self", "exec", "eval",
    "torch", "nn", "F", "super", "print", "_", "__", "a" * 300, "l" * 2, "O0", "None_", "lambda_",
})
PUNCT = ["{", "}", "(", ")", ",", ":", ";", "=", "->", "|", "+", "-", "*", "/", "0", "-1", "1e999",
         "0.0", "3e", "0x10", "1.2.3", "99999999999999999999999"]


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


@st.composite
def mutants(draw) -> str:
    """An example with 1-4 token-level mutations (any of them may break the syntax)."""
    toks = _tokens(draw(st.sampled_from(TEXTS)))
    for _ in range(draw(st.integers(1, 4))):
        solid = [i for i, t in enumerate(toks) if t.strip() and not t.startswith("#")]
        i = draw(st.sampled_from(solid))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "keyword", "meaningful", "hostile",
                                   "punct", "bytes", "truncate"]))
        if op == "delete":
            toks[i] = ""
        elif op == "duplicate":
            toks[i] = toks[i] + " " + toks[i]
        elif op == "swap":
            j = draw(st.sampled_from(solid))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "keyword":
            toks[i] = draw(st.sampled_from(KEYWORDS))
        elif op == "meaningful":
            toks[i] = draw(st.sampled_from(MEANINGFUL))
        elif op == "hostile":
            toks[i] = draw(st.sampled_from(HOSTILE))
        elif op == "punct":
            toks[i] = draw(st.sampled_from(PUNCT))
        elif op == "bytes":
            toks[i] = draw(st.text(min_size=1, max_size=4))  # any code point, control characters too
        else:
            text = "".join(toks)
            return text[: draw(st.integers(0, len(text)))]
    return "".join(toks)


@st.composite
def valid_syntax_mutants(draw) -> str:
    """An example changed without (usually) breaking its syntax: names replaced by other names,
    numbers by other numbers, white space re-flowed, comments added at line ends."""
    toks = _tokens(draw(st.sampled_from(TEXTS)))
    words = [i for i, t in enumerate(toks) if re.fullmatch(r"[A-Za-z_]\w*", t) and t not in KEYWORDS]
    for _ in range(draw(st.integers(1, 6))):
        # half of the edits hit a word (a name, unit or option value): they change the meaning
        i = draw(st.sampled_from(words) | st.integers(0, len(toks) - 1))
        t = toks[i]
        if re.fullmatch(r"[A-Za-z_]\w*", t) and t not in KEYWORDS:
            # another word, or none (`every 16 tokens` -> `every 16`, `init zeros` -> `init`)
            toks[i] = draw(st.sampled_from(MEANINGFUL + HOSTILE[:20] + ["d", "heads", "dh", "seq", "pretrain", ""]))
        elif re.fullmatch(r"\d.*", t):
            toks[i] = draw(st.sampled_from(["1", "2", "3", "16", "0.5", "3e-4", "64", "1024"]))
        elif t.isspace():
            after_comment = i > 0 and toks[i - 1].startswith("#")
            new = draw(st.sampled_from([" ", "  ", "\t", "\n", "\n\n  ", " \t\n", "\r\n"]))
            toks[i] = new if (not after_comment or "\n" in new) else "\n"
        elif t == "\n" or (t.isspace() and "\n" in t):
            toks[i] = "  # " + draw(st.sampled_from(KEYWORDS)) + " note\n"
    if draw(st.booleans()):  # a comment after some statement on its line
        lines = "".join(toks).split("\n")
        k = draw(st.integers(0, len(lines) - 1))
        if "#" not in lines[k] and lines[k].strip():
            lines[k] += "  # " + draw(st.sampled_from(HOSTILE[:10]))
        return "\n".join(lines)
    return "".join(toks)


def _assert_well_formed(text: str, result) -> None:
    assert isinstance(result, CheckResult)
    source = result.source
    for d in result.diagnostics:
        assert d.code in CODES, d.code
        assert 0 <= d.span.start <= d.span.end <= len(text), (d.span, len(text))
        assert (d.span.line, d.span.col) == source.offset_to_linecol(d.span.start), d
        assert d.message and d.hint
    rendered = render(result.diagnostics, {source.name: source})
    assert all(d.code in rendered for d in result.diagnostics)
    to_json(result.diagnostics)
    if result.ok:
        assert result.program is not None


_FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(mutants())
def test_check_answers_with_diagnostics(text: str):
    result = check_source(SourceFile("fuzz.nl", text))
    _assert_well_formed(text, result)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_text_answers_with_diagnostics(text: str):
    result = check_source(SourceFile("noise.nl", text))
    _assert_well_formed(text, result)
    assert not result.ok


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=300))
def test_random_bytes_on_disk(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bytes.nl"
        path.write_bytes(data)
        result = check_file(path)
    assert isinstance(result, CheckResult) and not result.ok
    assert result.diagnostics[0].code in CODES


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(mutants())
def test_cli_exits_0_or_1(text: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.nl"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(["check", str(path)])
            code_json = cli_main(["check", "--format", "json", str(path)])
    assert code in (0, 1) and code_json == code
    assert "Traceback" not in out.getvalue() + err.getvalue()


def test_cli_subprocess_never_tracebacks(tmp_path: Path):
    """The real process (interpreter start-up, stdout encoding) on a batch of broken specs."""
    paths = []
    for k, text in enumerate(TEXTS[:6]):
        cut = len(text) * (k + 1) // 8
        for j, broken in enumerate((text[:cut], text[:cut] + "} level { @ \u00e9 1e999", text.replace("{", "", k + 1))):
            p = tmp_path / f"m{k}_{j}.nl"
            p.write_text(broken, encoding="utf-8")
            paths.append(str(p))
    proc = subprocess.run([sys.executable, "-m", "nlc", "check", *paths], cwd=ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.count(": NL") >= len(paths)


def _roundtrip(text: str) -> bool:
    try:
        spec = parse_source(SourceFile("rt.nl", text))
    except SpecError:
        return False
    printed = print_spec(spec)
    again = parse_source(SourceFile("printed.nl", printed))
    assert again == spec, printed
    assert print_spec(again) == printed
    return True


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(valid_syntax_mutants())
def test_meaning_mutants_check_and_roundtrip(text: str):
    _assert_well_formed(text, check_source(SourceFile("meaning.nl", text)))
    _roundtrip(text)


@_FUZZ
@given(mutants())
def test_print_roundtrips_whenever_a_mutant_parses(text: str):
    _roundtrip(text)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(TEXTS), st.sampled_from(HOSTILE + KEYWORDS))
def test_hostile_names_for_levels_and_bindings(text: str, name: str):
    """Every level and binding renamed to a Python keyword, dunder, builtin or language keyword:
    the front end accepts it (names are data) or rejects it with a diagnostic, never crashes."""
    levels = re.findall(r"\blevel (\w+)", text)
    for old in levels[:1] + re.findall(r"\blet (\w+)", text)[:1]:
        text = re.sub(rf"\b{old}\b", name, text)
    result = check_source(SourceFile("hostile.nl", text))
    _assert_well_formed(text, result)
