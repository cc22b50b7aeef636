"""How long the mnist_cnn training step takes to compile: passes, then LLVM cold (empty object cache)
and warm (cache hit). Usage: python benchmarks/compile_time.py [--threads N]"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model", default=os.path.join(ROOT, "examples", "mnist_cnn.py"))
    a = ap.parse_args()
    os.environ["GRAPHCNN_CACHE"] = tempfile.mkdtemp(prefix="gc-cache-")
    from backends.llvm import compile_llvm
    from graphcnn.cli import load_model_source
    from ir.passes import run_pipeline
    from ir.training import make_training_graph
    m = load_model_source(a.model)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    t0 = time.perf_counter()
    fwd = run_pipeline(m._graph(True, "sparse_categorical_crossentropy"), "training_forward").graph
    tg = run_pipeline(make_training_graph(fwd, fwd.outputs[1].name), "training").graph
    t1 = time.perf_counter()
    print(f"passes (autodiff, fusion, planning): {t1 - t0:.3f} s")
    for label in ("cold", "warm"):
        t = time.perf_counter()
        e = compile_llvm(tg, threads=a.threads)
        print(f"LLVM {label}: {time.perf_counter() - t:.3f} s (cache hits {[p.jit.cache_hit for p in e._parts]})")


if __name__ == "__main__":
    main()
