"""One neuron, one sample, by hand and by lingrad: the smallest training step there is.

    x = [1, 2, 3], target 5, weight [0.5, 0.5, 0.5], bias -0.5

    prediction  y = w . x + b            = 0.5 + 1 + 1.5 - 0.5 = 2.5
    loss        L = (y - target)^2       = (2.5 - 5)^2         = 6.25
    dL/dy         = 2 (y - target)       = -5
    dL/dw         = dL/dy * x            = [-5, -10, -15]
    dL/db         = dL/dy                = -5

lingrad.Linear is a drop-in torch.nn.Linear whose forward and backward run lingrad's kernels.

    python examples/single_neuron.py
"""

import torch

import lingrad
from lingrad.functional import mse_loss

x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)  # one sample (batch 1) of 3 features
target = torch.tensor([[5.0]])

neuron = lingrad.Linear(3, 1)  # weight (1, 3), bias (1,), as torch.nn.Linear
with torch.no_grad():
    neuron.weight.copy_(torch.tensor([[0.5, 0.5, 0.5]]))
    neuron.bias.fill_(-0.5)

prediction = neuron(x)
loss = mse_loss(prediction, target)  # the mean over one number: (prediction - target)^2
loss.backward()


def show(t):
    """A short tensor as [a, b, c] with %g numbers."""
    return "[" + ", ".join(f"{v:g}" for v in t.reshape(-1).tolist()) + "]"


print("single neuron: x = [1, 2, 3], target 5, weight [0.5, 0.5, 0.5], bias -0.5")
print(f"  prediction   {prediction.item():g}")
print(f"  loss         {loss.item():<19g} (prediction - target)^2")
print(f"  dL/dW        {show(neuron.weight.grad):19} 2 (prediction - target) x")
print(f"  dL/db        {show(neuron.bias.grad):19} 2 (prediction - target)")
print(f"  dL/dx        {show(x.grad):19} 2 (prediction - target) W")
print()
print("The signs: the prediction (2.5) is below the target (5), so dL/dy = 2 (2.5 - 5) = -5 is negative.")
print("Every input is positive, so each weight's gradient -5 x_i is negative too, and largest in size where")
print("x_i is largest: raising w_3 a little raises the prediction 3 times as much as raising w_1 does.")
print("Gradient descent steps against the gradient, so it raises every weight and the bias.")

lr = 0.01
with torch.no_grad():  # one step of SGD: parameter -= lr * gradient
    for p in neuron.parameters():
        p -= lr * p.grad
new_prediction = neuron(x)
new_loss = mse_loss(new_prediction, target)
print()
print(f"one SGD step, learning rate {lr}: weight -> {show(neuron.weight)}, bias -> {neuron.bias.item():g}")
print(f"  prediction   {prediction.item():g} -> {new_prediction.item():g}")
print(f"  loss         {loss.item():g} -> {new_loss.item():g}")
