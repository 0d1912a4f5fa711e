"""The command line (lingrad.cli) and the examples: every subcommand runs, on small inputs."""

import importlib.metadata
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lingrad
from lingrad import cli, kernels

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path, min_width=200):
    """The file exists, is a PNG, and decodes to an image of a sensible size."""
    mpimg = pytest.importorskip("matplotlib.image")
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.shape[2] in (3, 4)


# ---------------------------------------------------------------------------------------------
# The command line itself


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "demo", "bench", "check"):
        assert command in out
    for command in ("info", "demo", "bench", "check"):
        with pytest.raises(SystemExit) as exit:
            cli.main([command, "--help"])
        assert exit.value.code == 0
        assert f"lingrad {command}" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2  # no command: the help, and a usage error
    assert "demo" in capsys.readouterr().out
    for argv in (["nonsense"], ["demo", "--steps", "0"], ["bench", "--quick", "--full"]):
        with pytest.raises(SystemExit) as exit:
            cli.main(argv)
        assert exit.value.code == 2, argv
    capsys.readouterr()


def test_console_script_and_python_m_are_the_same_cli():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert any(s.name == "lingrad" and s.value == "lingrad.cli:main" for s in scripts)
    done = subprocess.run([sys.executable, "-m", "lingrad", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"lingrad {lingrad.__version__}"


def test_info(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    info = lingrad.config()
    for text in (lingrad.__version__, info["compiler"], "OpenMP", info["isa"], "threads", np.__version__, "PyTorch"):
        assert text in out


# ---------------------------------------------------------------------------------------------
# demo


@pytest.fixture
def demo_deps():
    for name in ("torch", "tqdm", "matplotlib", "mlxtend"):
        pytest.importorskip(name)


def test_demo_small(capsys, tmp_path, demo_deps):
    png = tmp_path / "demo.png"
    threads = lingrad.get_num_threads()
    code, out, err = run_cli(
        capsys, "demo", "--images", "300", "--steps", "8", "--out", str(png), "--no-progress", "--threads", "1"
    )
    assert lingrad.get_num_threads() == threads  # restored
    assert code == 0, out + err
    assert "agree to float32 tolerance" in out
    assert "lingrad.fuse (the whole network as one call)" in out
    assert "1 threads; PyTorch" in out
    assert "their gradients are exactly 0.0 in every unit" in out
    assert f"picture written to {png}" in out
    assert err == ""  # no progress bar, no warning
    assert_png(png, min_width=1000)


def test_demo_training_agrees_and_zero_gradient_is_computed(demo_deps):
    from lingrad import demo

    pixels, labels = demo.load_mnist(200, seed=1)
    assert pixels.shape == (200, 784) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert len(set(labels.tolist())) == 10  # a random sample, not the file's first (sorted) lines
    log = io.StringIO()  # not a terminal: a plain line at the last step (and every PROGRESS_LINE_EVERY)
    run = demo.train(pixels, labels, steps=4, lr=0.008, seed=1, progress=True, progress_file=log)
    assert log.getvalue().splitlines() == [
        f"training: step 4/4, lingrad={run.loss['lingrad'][-1]:.4f}, torch={run.loss['torch'][-1]:.4f}"
    ]
    assert run.loss["lingrad"][-1] < run.loss["lingrad"][0]
    for ours, ref, fused, whole in zip(*(run.loss[k] for k in ("lingrad", "torch", "fused", "train_step"))):
        assert demo.relative_difference(ours, ref) <= demo.RTOL
        assert demo.relative_difference(fused, ref) <= demo.RTOL
        assert demo.relative_difference(whole, ref) <= demo.RTOL
    facts = demo.gradient_facts(run)
    black = (pixels == 0).all(axis=0)
    assert facts["black"] == int(black.sum()) > 0
    assert np.all(run.grad_w1[:, black] == 0.0) and facts["black_max_abs"] == 0.0
    assert facts["nonzero_entries"] > run.grad_w1.size // 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_demo_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(demo_deps):
    from lingrad import demo

    pixels, labels = demo.load_mnist(100, seed=2)
    terminal = _Terminal()
    demo.train(pixels, labels, steps=3, seed=2, progress=True, progress_file=terminal)
    assert "3/3" in terminal.getvalue() and "lingrad=" in terminal.getvalue() and "\r" in terminal.getvalue()
    steps = 2 * demo.PROGRESS_LINE_EVERY + 1
    log = io.StringIO()
    demo.train(pixels, labels, steps=steps, seed=2, progress=True, progress_file=log)
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        f"training: step {n}/{steps}" for n in (demo.PROGRESS_LINE_EVERY, 2 * demo.PROGRESS_LINE_EVERY, steps)
    ]
    assert "\r" not in log.getvalue()
    quiet = _Terminal()
    demo.train(pixels, labels, steps=2, seed=2, progress=False, progress_file=quiet)
    assert quiet.getvalue() == ""


def test_demo_names_the_extra_when_a_dependency_is_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    code, out, err = run_cli(capsys, "demo", "--out", str(tmp_path / "x.png"))
    assert code == 2
    assert 'pip install "lingrad[demo]"' in err and "tqdm" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "x.png").exists()


def test_demo_names_the_extra_when_mlxtend_is_missing(capsys, monkeypatch, tmp_path, demo_deps):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    code, out, err = run_cli(capsys, "demo", "--out", str(tmp_path / "x.png"))
    assert code == 2
    assert 'pip install "lingrad[demo]"' in err and "mlxtend" in err
    assert "Traceback" not in err + out


# ---------------------------------------------------------------------------------------------
# check


def test_check_passes_and_restores_the_isa(capsys):
    isa, threads = lingrad.get_isa(), lingrad.get_num_threads()
    code, out, _ = run_cli(capsys, "check")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[-1].startswith("PASS")
    for name in lingrad.available_isas():
        assert any(line.startswith("pass") and f" {name} " in line and "linear_mse float32" in line for line in lines)
        if lingrad.config()["bf16_numpy"]:  # the bfloat16 products too, with ml_dtypes installed
            assert any(line.startswith("pass") and f" {name} " in line and "forward bfloat16" in line for line in lines)
    assert not any(line.startswith("FAIL") for line in lines)
    if "torch" in sys.modules or importlib.util.find_spec("torch"):
        assert any("gradcheck LinearMSEFunction" in line for line in lines)
    assert (lingrad.get_isa(), lingrad.get_num_threads()) == (isa, threads)


def test_check_fails_when_a_kernel_is_wrong_or_crashes(capsys, monkeypatch):
    real = kernels.linear_backward_weight

    def slightly_wrong(grad_out, x, **kwargs):
        dw, db = real(grad_out, x, **kwargs)
        dw[..., -1] *= 1.001  # one input feature's gradient 0.1% off
        return dw, db

    def crashing(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(kernels, "linear_backward_weight", slightly_wrong)
    monkeypatch.setattr(kernels, "mse_backward", crashing)
    code, out, _ = run_cli(capsys, "check", "--no-torch")
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert any("linear_backward_weight" in line and "times the bound" in line for line in failed)
    assert any("mse_backward" in line and "RuntimeError: boom" in line for line in failed)
    assert all("linear_backward_weight" in line or "mse_backward" in line for line in failed)
    # both kernels in both dtypes, and the bfloat16 weight gradient (float32, so 0.1% is beyond its
    # bound), on every path
    bf16 = lingrad.config()["bf16_numpy"]
    assert len(failed) == (2 * 2 + bf16) * len(lingrad.available_isas())
    assert sum("linear_backward_weight bfloat16" in line for line in failed) == bf16 * len(lingrad.available_isas())
    assert out.splitlines()[-1].startswith("FAIL")


# ---------------------------------------------------------------------------------------------
# bench


def test_bench_quick_table_and_plot(capsys, monkeypatch, tmp_path):
    from lingrad import benchmark

    pytest.importorskip("matplotlib")
    monkeypatch.setattr(benchmark, "QUICK", [(1, 3, 1), (16, 32, 8)])
    monkeypatch.setattr(benchmark, "NUMPY_SETTLE", 0.0)  # the table's form is tested, not its times
    png = tmp_path / "bench.png"
    code, out, _ = run_cli(capsys, "bench", "--budget", "0.01", "--plot", str(png), "--no-progress")
    assert code == 0
    assert "FMA peak" in out and "| case |" in out
    assert "| forward | float32 | 16, 32, 8 |" in out
    assert f"chart written to {png}" in out
    assert_png(png)


# ---------------------------------------------------------------------------------------------
# examples


def run_example(*argv, timeout=120):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES)


def test_single_neuron_example():
    pytest.importorskip("torch")
    done = run_example("single_neuron.py")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for text in (
        "prediction   2.5",
        "loss         6.25",
        "[-5, -10, -15]",
        "dL/db        [-5]",
        "loss         6.25 -> 3.0625",
    ):
        assert text in out


def test_numpy_mlp_example_never_imports_torch():
    done = run_example("numpy_mlp.py", "--steps", "6", "--images", "300")
    assert done.returncode == 0, done.stdout + done.stderr  # exit 0: the loss fell
    assert "PyTorch imported: False" in done.stdout
