"""The CPU kernels' worker threads: every piece runs once, errors surface, the BLAS keeps its
thread count."""
import threading

import pytest

from owlnet.kernels import threads


def test_every_piece_runs_once_and_in_parallel_lanes():
    seen, names = [], set()
    lock = threading.Lock()

    def piece(index):
        with lock:
            seen.append(index)
            names.add(threading.current_thread().name)

    threads.run_pieces(piece, range(50))
    assert sorted(seen) == list(range(50))
    assert len(names) <= threads.workers()


def test_an_error_in_a_piece_is_raised_after_the_others_finish():
    done = []

    def piece(index):
        if index == 3:
            raise ValueError("piece 3 failed")
        done.append(index)

    with pytest.raises(ValueError, match="piece 3 failed"):
        threads.run_pieces(piece, range(8))
    assert sorted(done) == ([0, 1, 2, 4, 5, 6, 7] if threads.workers() > 1 else [0, 1, 2])
    threads.run_pieces(lambda index: None, range(4))     # the pool is usable afterwards


def test_nested_calls_run_their_pieces_in_turn():
    results = []

    def inner(index):
        results.append(index)

    threads.run_pieces(lambda outer: threads.run_pieces(inner, range(outer * 10, outer * 10 + 3)),
                       range(4))
    assert sorted(results) == sorted(o * 10 + i for o in range(4) for i in range(3))


@pytest.mark.parametrize("parallel", [True, False])
def test_pieces_see_one_blas_thread_and_the_count_is_restored(parallel):
    pool = threads._get_pool()
    before = [c.num_threads for c in pool.blas]
    inside = []
    threads.run_pieces(lambda index: inside.append([c.num_threads for c in pool.blas]),
                       range(4), parallel)
    assert [c.num_threads for c in pool.blas] == before
    assert len(inside) == 4 and all(counts == [1] * len(before) for counts in inside)


def test_calls_from_several_threads_give_the_blas_its_threads_back():
    pool = threads._get_pool()
    before = [c.num_threads for c in pool.blas]
    errors = []

    def caller(parallel):
        try:
            for _ in range(200):
                threads.run_pieces(lambda index: None, range(3), parallel)
        except Exception as exc:      # reported below: an assertion here would be lost
            errors.append(exc)

    callers = [threading.Thread(target=caller, args=(k % 2 == 0,)) for k in range(4)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    assert not errors
    assert [c.num_threads for c in pool.blas] == before
