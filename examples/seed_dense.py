"""The seed tutorial's model: one Dense(10, sigmoid) layer on flattened 28x28 input."""
import graphcnn as gc
from graphcnn import layers

model = gc.Sequential([layers.Dense(10, input_shape=(784,), activation="sigmoid")], name="seed_dense")
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

TRAIN = {"epochs": 5, "batch_size": 32}
