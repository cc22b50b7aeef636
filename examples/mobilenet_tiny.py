"""A tiny MobileNet (v1 style) for 28x28 / 32x32 input: depthwise-separable blocks with BN and ReLU6.

A 3x3 conv of 16 filters (stride 1: the images are small), then five depthwise-separable blocks —
DepthwiseConv2D 3x3 -> BN -> ReLU6 -> 1x1 Conv2D -> BN -> ReLU6 — with (filters, stride) (32, 1),
(64, 2), (64, 1), (128, 2), (128, 1); global average pooling, Dense(10, softmax). About 37k parameters.

    graphcnn train examples/mobilenet_tiny.py
    graphcnn train examples/mobilenet_tiny.py --data cifar10
"""
import graphcnn as gc
from graphcnn import layers

MNIST_SHAPE, CIFAR_SHAPE = (28, 28, 1), (32, 32, 3)
TRAIN = {"epochs": 3, "batch_size": 64, "input_shape": MNIST_SHAPE}
BLOCKS = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))


def bn_relu6(x):
    return layers.ReLU(max_value=6)(layers.BatchNormalization()(x))


def separable_block(x, filters, strides):
    x = bn_relu6(layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x))
    return bn_relu6(layers.Conv2D(filters, 1, padding="same", use_bias=False)(x))


def build_model(input_shape=CIFAR_SHAPE, num_classes=10, augment=None):
    """MobileNet-tiny for `input_shape` (H, W, C). augment=None: flip + translation for colour input."""
    input_shape = tuple(input_shape)
    augment = input_shape[-1] == 3 if augment is None else augment
    inputs = layers.Input(input_shape)
    x = inputs
    if augment:
        x = layers.RandomFlip("horizontal", seed=1)(x)
        x = layers.RandomTranslation(0.1, 0.1, seed=2)(x)
    x = bn_relu6(layers.Conv2D(16, 3, padding="same", use_bias=False)(x))
    for filters, strides in BLOCKS:
        x = separable_block(x, filters, strides)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return gc.Model(inputs, outputs, name="mobilenet_tiny")


model = build_model(TRAIN["input_shape"])
