"""He et al.'s CIFAR ResNet-20 ("Deep Residual Learning", section 4.2): 6n + 2 layers with n = 3.

A 3x3 conv of 16 filters, then three stages of three basic blocks (two 3x3 conv + BN each) with 16, 32
and 64 filters, the first block of stages 2 and 3 strided (32x32 -> 16x16 -> 8x8); global average
pooling, Dense(10, softmax). Shortcuts are option B: identity where the shape is kept, a 1x1 strided
projection conv + BN where it changes (the paper's CIFAR runs use option A, zero-padded identity; B
adds 2 small convs, ~3k parameters, and is what Keras's and torchvision-style ports use).

    graphcnn train examples/resnet20.py --data cifar10
    graphcnn train examples/resnet20.py                     # MNIST-shaped (28, 28, 1)
"""
import graphcnn as gc
from graphcnn import layers

MNIST_SHAPE, CIFAR_SHAPE = (28, 28, 1), (32, 32, 3)
TRAIN = {"epochs": 3, "batch_size": 128, "input_shape": MNIST_SHAPE}
BLOCKS_PER_STAGE = 3


def conv_bn(x, filters, kernel_size=3, strides=1, relu=True):
    """Conv2D (no bias before BN) -> BatchNormalization -> optional ReLU."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x) if relu else x


def basic_block(x, filters, strides):
    y = conv_bn(x, filters, strides=strides)
    y = conv_bn(y, filters, relu=False)
    if strides != 1:      # in ResNet-20 the width changes exactly where the stride does
        x = conv_bn(x, filters, kernel_size=1, strides=strides, relu=False)    # option B projection
    return layers.ReLU()(layers.Add()([x, y]))


def build_model(input_shape=CIFAR_SHAPE, num_classes=10, augment=None):
    """ResNet-20 for `input_shape` (H, W, C). augment=None: random flip + translation for colour input
    (the paper's 4-pixel-pad random crop and horizontal flip, approximately)."""
    input_shape = tuple(input_shape)
    augment = input_shape[-1] == 3 if augment is None else augment
    inputs = layers.Input(input_shape)
    x = inputs
    if augment:
        x = layers.RandomFlip("horizontal", seed=1)(x)
        x = layers.RandomTranslation(0.125, 0.125, fill_mode="constant", seed=2)(x)
    x = conv_bn(x, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(BLOCKS_PER_STAGE):
            x = basic_block(x, filters, 2 if stage > 0 and block == 0 else 1)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return gc.Model(inputs, outputs, name="resnet20")


model = build_model(TRAIN["input_shape"])
