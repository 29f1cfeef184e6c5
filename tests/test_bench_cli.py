"""tools/bench_*.py: bad input exits 2 before any work, with argparse's one-line ``error:`` naming the flag."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tool, argv, needle", [
    ("bench_flow", ["--reference", "/nonexistent/transformer_flow.py"], "--reference /nonexistent/transformer_flow.py"),
    ("bench_flow", ["--rounds", "0"], "--rounds must be >= 1"),
    ("bench_flow", ["--micro-batches", "8", "0"], "--micro-batches"),
    ("bench_engine", ["--dps", "1", "0"], "--dps"),
    ("bench_engine", ["--global-batch", "0"], "--global-batch must be >= 1"),
    ("bench_checkpoint", ["--data", "/nonexistent/demo.npz"], "--data /nonexistent/demo.npz: not a file"),
    ("bench_checkpoint", ["--dp", "0"], "--dp"),
    ("bench_data", ["--batches", "0"], "--batches must be >= 1"),
    ("bench_data", ["--workers", "-1"], "--workers"),
    ("bench_sample", ["--cases", "tiny:0"], "--cases 'tiny:0'"),
    ("bench_sample", ["--warmup", "-1"], "--warmup must be >= 0"),
])
def test_bad_flag_exits_2_naming_it(tool, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _tool(tool).main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in err.split(": error: ", 1)[1]  # "<prog>: error: <message>", the message naming the flag
