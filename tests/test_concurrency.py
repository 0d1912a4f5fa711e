"""Many Python threads calling the kernels at once (the GIL is released while a kernel runs, so
they really overlap) get the same bytes as serial calls, while other threads change the thread
count and the ISA. Results are bitwise identical for any thread count, so "right" is exact here."""

import threading

import numpy as np
import pytest

import lingrad
from lingrad import kernels
from lingrad import reference as ref

PYTHON_THREADS = 6


def tasks(rng):
    """(name, call) pairs over both dtypes and shapes that cross the tile and block edges."""
    out = []
    for dtype in (np.float32, np.float64):
        for batch, n_in, n_out in [(1, 3, 1), (37, 300, 19), (200, 64, 130), (5, 700, 40), (0, 4, 3)]:
            x, w, b, t, dy = ref.arrays((batch, n_in, n_out), dtype, rng)
            tag = f"{dtype.__name__} {batch}x{n_in}x{n_out}"
            out += [
                (f"linear_forward {tag}", lambda x=x, w=w, b=b: kernels.linear_forward(x, w, b)),
                (
                    f"linear_forward strided {tag}",
                    lambda x=x, w=w, b=b: kernels.linear_forward(x[::-1], w.T.copy().T, b),
                ),
                (f"linear_backward_input {tag}", lambda dy=dy, w=w: kernels.linear_backward_input(dy, w)),
                (f"linear_backward_weight {tag}", lambda dy=dy, x=x: kernels.linear_backward_weight(dy, x)),
                (f"mse_loss {tag}", lambda dy=dy, t=t: np.float64(kernels.mse_loss(dy, t))),
                (f"mse_backward {tag}", lambda dy=dy, t=t: kernels.mse_backward(dy, t)),
                (f"linear_mse {tag}", lambda x=x, w=w, b=b, t=t: kernels.linear_mse(x, w, b, t)),
            ]
    return out


def as_bytes(result):
    items = result if isinstance(result, tuple) else (result,)
    return b"|".join(np.asarray(r).tobytes() for r in items)


def run_threads(workers):
    """Starts the workers together; re-raises the first exception any of them raised."""
    errors = []
    barrier = threading.Barrier(len(workers))

    def wrap(worker):
        def run():
            try:
                barrier.wait()
                worker()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(w)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_many_threads_get_right_answers(isa, num_threads, rng):
    """Six Python threads run every kernel in a different order, each changing the thread count
    (1, 2, 3) between calls: every result equals the serial one, byte for byte."""
    work = tasks(rng)
    num_threads(1)
    expected = {name: as_bytes(call()) for name, call in work}

    def worker(k):
        def run():
            order = np.random.default_rng(k).permutation(len(work))
            for repeat in range(3):
                for i in order:
                    lingrad.set_num_threads(1 + (k + repeat + int(i)) % 3)
                    name, call = work[i]
                    assert as_bytes(call()) == expected[name], f"{name} differs in thread {k}"

        return run

    run_threads([worker(k) for k in range(PYTHON_THREADS)])


def test_errors_from_many_threads(num_threads):
    """Failing calls in many threads raise their own errors and leave nothing behind."""
    x = np.ones((8, 3), np.float32)
    w = np.ones((2, 3), np.float32)

    def worker(k):
        def run():
            for _i in range(300):
                with pytest.raises(ValueError, match="weight"):
                    kernels.linear_forward(x, w[:, :2])
                with pytest.raises(TypeError, match="bias"):
                    kernels.linear_forward(x, w, np.ones(2))
                assert kernels.linear_forward(x, w).tolist() == [[3.0, 3.0]] * 8

        return run

    run_threads([worker(k) for k in range(PYTHON_THREADS)])


def test_set_num_threads_from_many_threads(num_threads):
    """Threads that set and read the thread count at once never see a value nobody set."""
    seen = set()

    def worker(k):
        def run():
            for i in range(2000):
                lingrad.set_num_threads(1 + (i + k) % 3)
                seen.add(lingrad.get_num_threads())

        return run

    run_threads([worker(k) for k in range(PYTHON_THREADS)])
    assert seen <= {1, 2, 3}
    lingrad.set_num_threads(2)
    assert lingrad.get_num_threads() == 2


def test_set_isa_while_kernels_run(num_threads, rng):
    """Switching the ISA from one thread while others compute: each call runs on one ISA or the
    other (its result is one of theirs, bitwise), never a mix or a crash."""
    isas = lingrad.available_isas()
    x, w, *_ = ref.arrays((150, 300, 70), np.float32, rng)
    answers = set()
    for name in isas:
        with lingrad.settings(isa=name):
            answers.add(kernels.linear_forward(x, w).tobytes())
    stop = threading.Event()

    def switcher():
        i = 0
        while not stop.is_set():
            lingrad.set_isa(isas[i % len(isas)])
            assert lingrad.get_isa() in isas
            i += 1

    def worker(k):
        def run():
            try:
                for i in range(40):
                    lingrad.set_num_threads(1 + (i + k) % 3)
                    assert kernels.linear_forward(x, w).tobytes() in answers, "a result from no single ISA"
            finally:
                stop.set()

        return run

    with lingrad.settings():  # (the switcher leaves some ISA set)
        run_threads([switcher] + [worker(k) for k in range(PYTHON_THREADS - 1)])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_children_compute_after_the_parent_used_threads():
    """multiprocessing's default on Linux is fork(). GNU OpenMP cannot start a thread team again
    in a child forked after the parent's team ran (the child waited forever): such a child must
    still compute, and get the same bytes."""
    from helpers import run_python

    code = """
        import os, time
        import numpy as np
        import lingrad
        from lingrad import kernels

        rng = np.random.default_rng(0)
        x, w = rng.random((500, 300), np.float32), rng.random((200, 300), np.float32)
        t = rng.random((500, 200), np.float32)
        lingrad.set_num_threads(2)
        want = kernels.linear_forward(x, w).tobytes() + kernels.mse_backward(t, t * 2).tobytes()
        children = []
        for i in range(2):
            pid = os.fork()
            if pid == 0:
                got = kernels.linear_forward(x, w).tobytes() + kernels.mse_backward(t, t * 2).tobytes()
                os._exit(0 if got == want else 3)
            children.append(pid)
        deadline = time.monotonic() + 60
        for pid in children:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, f"child: {os.waitstatus_to_exitcode(status)}"
                    break
                if time.monotonic() > deadline:
                    for p in children:
                        os.kill(p, 9)
                    raise SystemExit("a forked child hung")
                time.sleep(0.05)
        print("ok")
    """
    assert run_python(code, timeout=120).stdout.strip() == "ok"
