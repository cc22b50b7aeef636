"""graphcnn (Python runtime, model, .so) against every installed peer (torch, onnxruntime, tflite, keras)
in ONE run, interleaved round by round: medians, ratios to the fastest peer, % of the measured FMA peak,
peak RSS. The code is graphcnn/bench.py (`graphcnn bench`); this script runs it from a source checkout.

    python benchmarks/compare.py examples/mnist_cnn.py --threads 2 --rounds 5
    python benchmarks/compare.py examples/resnet8.py --vs torch,onnxruntime --rounds 3
    python benchmarks/compare.py examples/mnist_cnn.py --int8 --vs onnxruntime,tflite     (int8 inference)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graphcnn.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_model=os.path.join(ROOT, "examples", "mnist_cnn.py")))
