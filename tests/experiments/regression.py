"""Linear regression by gradient descent: the model the seed experiment trains.

A separate module so that Sacred records two source files for the run.
"""

import numpy as np


def fit(x, y, lr, epochs, weight=0.0, bias=0.0, decay=1.0, every=None):
    """Yield (weight, bias, mean squared error) after each epoch."""
    for epoch in range(epochs):
        if every and epoch and epoch % every == 0:
            lr *= decay
        error = weight * x + bias - y
        weight -= lr * 2 * float(np.mean(error * x))
        bias -= lr * 2 * float(np.mean(error))
        yield weight, bias, float(np.mean((weight * x + bias - y) ** 2))
