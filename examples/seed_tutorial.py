"""The seed tutorial's program (a Keras MNIST starter) with only its imports changed."""
import graphcnn as gc
from graphcnn import layers
from graphcnn.datasets import mnist

(X_train, Y_train), (X_test, Y_test) = mnist.load_data()
X_train = X_train / 255
X_test = X_test / 255
X_train_flattened = X_train.reshape(len(X_train), 28 * 28)
X_test_flattened = X_test.reshape(len(X_test), 28 * 28)

model = gc.Sequential([layers.Dense(10, input_shape=(784,), activation="sigmoid")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(X_train_flattened, Y_train, epochs=5)

print(model.evaluate(X_test_flattened, Y_test))
