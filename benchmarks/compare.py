"""Time graphcnn (llvm, numpy) against PyTorch eager (and ONNX Runtime when installed) in ONE run:
same network, same data, same thread count. Prints medians and ratios.

    python benchmarks/compare.py examples/mnist_cnn.py --threads 2
    graphcnn bench examples/mnist_cnn.py --vs torch          (the same code: graphcnn/bench.py)

Measures: training seconds per epoch on the bundled subset (8,000 images, batch 128, Adam), inference
latency at batch 1, throughput at batch 256."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graphcnn.bench import main  # noqa: E402

if __name__ == "__main__":
    main(default_model=os.path.join(ROOT, "examples", "mnist_cnn.py"))
