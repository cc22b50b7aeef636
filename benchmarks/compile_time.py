"""How long a model's training step takes to compile: the passes, then LLVM cold (empty JIT cache) with
the kernels compiled in-process (GRAPHCNN_COMPILE_WORKERS=0) and by the worker processes (the default),
interleaved round by round, and warm (every kernel a cache hit); medians and the load average.

    python benchmarks/compile_time.py [--model examples/lenet5.py] [--threads N] [--rounds 3]"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model", default=os.path.join(ROOT, "examples", "mnist_cnn.py"))
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from backends.llvm import compile_llvm, compile_pool
    from graphcnn.cli import load_model_source
    from ir.passes import run_pipeline
    from ir.training import make_training_graph
    m = load_model_source(a.model)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    t0 = time.perf_counter()
    fwd = run_pipeline(m._graph(True, "sparse_categorical_crossentropy"), "training_forward").graph
    tg = run_pipeline(make_training_graph(fwd, fwd.outputs[1].name), "training").graph
    print(f"{os.path.basename(a.model)}: passes (autodiff, fusion, planning) {time.perf_counter() - t0:.3f} s; "
          f"load average before {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    default = str(compile_pool.worker_count())
    times = {"0": [], default: []}
    for r in range(a.rounds):
        for workers in (sorted(times) if r % 2 == 0 else sorted(times, reverse=True)):
            os.environ[compile_pool.WORKERS_ENV] = workers
            os.environ["GRAPHCNN_CACHE"] = cache = tempfile.mkdtemp(prefix="gc-cache-")
            compile_pool.shutdown()                 # cold: no worker process running either
            t = time.perf_counter()
            e = compile_llvm(tg, threads=a.threads)
            times[workers].append(time.perf_counter() - t)
    kernels = sum(len(p.jit.kernel_irs) for p in e._parts)
    for workers, ts in times.items():
        print(f"LLVM cold, {workers} compile worker process(es): median {statistics.median(ts):.3f} s "
              f"({', '.join(f'{t:.3f}' for t in ts)}), {kernels} kernel modules")
    os.environ["GRAPHCNN_CACHE"] = cache
    t = time.perf_counter()
    e = compile_llvm(tg, threads=a.threads)
    hits = [(p.jit.cache_hit, p.kernels_cached) for p in e._parts]
    print(f"LLVM warm: {time.perf_counter() - t:.3f} s (per part: graph module hit, kernel modules hit: {hits}); "
          f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
