"""LeNet-5 style: conv 5x5x6 -> pool -> conv 5x5x16 -> pool -> dense 120 -> 84 -> 10."""
import graphcnn as gc
from graphcnn import layers

model = gc.Sequential([
    layers.Input((28, 28, 1)),
    layers.Conv2D(6, 5, padding="same", activation="relu"),
    layers.MaxPool2D(2),
    layers.Conv2D(16, 5, activation="relu"),
    layers.MaxPool2D(2),
    layers.Flatten(),
    layers.Dense(120, activation="relu"),
    layers.Dense(84, activation="relu"),
    layers.Dense(10, activation="softmax"),
], name="lenet5")

TRAIN = {"epochs": 3, "batch_size": 128}
