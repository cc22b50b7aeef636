"""Keras's classic MNIST convnet (DESIGN.md's API sample).

    graphcnn train examples/mnist_cnn.py          # 3 epochs, batch 128, bundled MNIST subset
"""
import graphcnn as gc
from graphcnn import layers

model = gc.Sequential([
    layers.Input((28, 28, 1)),
    layers.Conv2D(32, 3, activation="relu"),
    layers.MaxPool2D(2),
    layers.Conv2D(64, 3, activation="relu"),
    layers.MaxPool2D(2),
    layers.Flatten(),
    layers.Dropout(0.5),
    layers.Dense(10, activation="softmax"),
], name="mnist_cnn")

TRAIN = {"epochs": 3, "batch_size": 128}
