"""MLPerf Tiny's image-classification model: ResNet-8 (the EEMBC CIFAR-10 ResNet v1), functional API.

A 3x3 stem conv, then three residual stacks of 16, 32 and 64 filters: two 3x3 conv + BN per stack (the
first strided in stacks 2 and 3), a 1x1 strided projection shortcut (no BN) where the shape changes, add,
ReLU; average pooling over the final map, Dense(10, softmax). Differences from mlcommons/tiny
(benchmark/training/image_classification/keras_model.py, v0.5 with 16 filters; ~78k parameters):
the convs before a BN have no bias (BN's beta cancels it), no l2(1e-4) kernel
regularizer and Glorot instead of He-normal initialisation (graphcnn has neither option), global average
pooling stands for AveragePooling2D(final size) + Flatten (the same numbers), and the reference's data
augmentation (rotation 15, shifts 0.1, horizontal flip) is RandomTranslation(0.1, 0.1) + RandomFlip on
colour input only (no rotation layer; a digit must not be mirrored).

    graphcnn train examples/resnet8.py                      # bundled MNIST subset, (28, 28, 1)
    graphcnn train examples/resnet8.py --data fashion-mnist
    graphcnn train examples/resnet8.py --data cifar10       # rebuilt for (32, 32, 3) from the data
    graphcnn compile examples/resnet8.py -o out/ --emit so,h
"""
import graphcnn as gc
from graphcnn import layers

# input shapes of the two dataset families; TRAIN["input_shape"] picks the module's default model
MNIST_SHAPE, CIFAR_SHAPE = (28, 28, 1), (32, 32, 3)
# batch 32 (Keras's default): with BN momentum 0.99 the moving statistics need the steps; at batch 64 the
# 375 steps of 3 epochs leave them lagging behind the weights (test accuracy 0.31 at epoch 3 while training
# accuracy is 0.97 — PyTorch's twin shows the same lag), at batch 32 they catch up
# the optimizer (a learning-rate schedule, as MLPerf Tiny's reference trains with): Adam from 2e-3, cosine
# decay over the 750 steps of 3 epochs of the bundled subset at batch 32, then held at 10% (2e-4) for
# longer runs and bigger datasets. Bundled MNIST, seed 0, 3 epochs: test accuracy 0.977 (constant
# Adam 1e-3: 0.9665). `graphcnn train ... --lr X` replaces the schedule by a constant rate.
TRAIN = {"epochs": 3, "batch_size": 32, "input_shape": MNIST_SHAPE,
         "optimizer": gc.optimizers.Adam(gc.optimizers.schedules.CosineDecay(2e-3, decay_steps=750, alpha=0.1))}


def conv_bn(x, filters, kernel_size=3, strides=1, relu=True):
    """Conv2D (no bias: BN's beta is the bias) -> BatchNormalization -> optional ReLU."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x) if relu else x


def residual_stack(x, filters, strides):
    y = conv_bn(x, filters, strides=strides)
    y = conv_bn(y, filters, relu=False)
    if strides != 1:
        x = layers.Conv2D(filters, 1, strides=strides, padding="same")(x)   # projection, as in the reference
    return layers.ReLU()(layers.Add()([x, y]))


def build_model(input_shape=CIFAR_SHAPE, num_classes=10, augment=None):
    """ResNet-8 for `input_shape` (H, W, C). augment=None: random flip + translation for colour input."""
    input_shape = tuple(input_shape)
    augment = input_shape[-1] == 3 if augment is None else augment
    inputs = layers.Input(input_shape)
    x = inputs
    if augment:
        x = layers.RandomFlip("horizontal", seed=1)(x)
        x = layers.RandomTranslation(0.1, 0.1, seed=2)(x)
    x = conv_bn(x, 16)
    x = residual_stack(x, 16, 1)
    x = residual_stack(x, 32, 2)
    x = residual_stack(x, 64, 2)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return gc.Model(inputs, outputs, name="resnet8")


model = build_model(TRAIN["input_shape"])
