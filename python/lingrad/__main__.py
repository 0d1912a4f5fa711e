"""`python -m lingrad`: the single-neuron example, computed by lingrad's kernels.

One sample x = [1, 2, 3] with target 5, weights [0.5, 0.5, 0.5] and bias -0.5:
prediction 2.5, loss 6.25, dL/dW = [-5, -10, -15], dL/db = -5.
"""
import numpy as np

import lingrad
from lingrad import kernels


def main() -> None:
    x = np.array([[1.0, 2.0, 3.0]])
    target = np.array([[5.0]])
    weight = np.array([[0.5, 0.5, 0.5]])
    bias = np.array([-0.5])

    prediction = kernels.linear_forward(x, weight, bias)
    loss, grad_x, grad_w, grad_b = kernels.linear_mse(x, weight, bias, target)
    lingrad.show_config()
    print()
    print("single neuron: x = [1, 2, 3], target 5, weight [0.5, 0.5, 0.5], bias -0.5")
    print(f"  prediction   {prediction[0, 0]:g}")
    print(f"  loss         {loss:g}                 (prediction - target)^2")
    print(f"  dL/dW        {grad_w[0].tolist()}   2 (prediction - target) x")
    print(f"  dL/db        {grad_b.tolist()}               2 (prediction - target)")
    print(f"  dL/dx        {grad_x[0].tolist()}   2 (prediction - target) W")
    print("The prediction is too small, so every gradient is negative: gradient descent raises W and b.")


if __name__ == "__main__":
    main()
